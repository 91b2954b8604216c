//! A size-class buffer pool.
//!
//! Buffers are rounded up to one of four size classes per power of two (at most 25%
//! slack) and kept for reuse when their tensor is dropped, so a training step that
//! repeats the same shapes allocates no new GPU buffers after its first iteration.
//! [`PoolStats::allocations`] counts `create_buffer` calls and tests assert on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::{GpuError, Result};

/// Smallest buffer the pool hands out; also the granularity of size classes below 1 KiB.
const CLASS_BYTES_MIN: u64 = 256;

/// Counters of the buffer pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Buffers created on the device since start.
    pub allocations: u64,
    /// Requests served from idle buffers.
    pub reuses: u64,
    /// Bytes held by live tensors (size classes, not tensor sizes).
    pub in_use_bytes: u64,
    /// Bytes held in idle buffers awaiting reuse.
    pub idle_bytes: u64,
    /// Largest `in_use_bytes + idle_bytes` seen.
    pub peak_bytes: u64,
    /// Idle buffers released to respect the memory budget.
    pub evictions: u64,
}

/// Rounds `bytes` up to its size class: a multiple of 256 bytes, and at most 25% above
/// `bytes` (four classes per power of two).
pub(crate) fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(CLASS_BYTES_MIN);
    if b <= 1024 {
        return b.div_ceil(CLASS_BYTES_MIN) * CLASS_BYTES_MIN;
    }
    let pow = 63 - b.leading_zeros() as u64; // 2^pow <= b < 2^(pow+1)
    let step = 1u64 << (pow - 2);
    b.div_ceil(step) * step
}

pub(crate) struct PoolInner {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    /// While isolated, buffers are taken from and returned to this set only, so work
    /// submitted ahead of pending commands never reuses a buffer those commands read.
    isolated: Option<HashMap<u64, Vec<wgpu::Buffer>>>,
    stats: PoolStats,
    budget_bytes: u64,
}

/// The pool shared by a device and the tensors it created.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Mutex<PoolInner>>,
    usage: wgpu::BufferUsages,
}

impl Pool {
    pub(crate) fn new(budget_bytes: u64, usage: wgpu::BufferUsages) -> Self {
        Self {
            inner: Arc::new(Mutex::new(PoolInner {
                free: HashMap::new(),
                isolated: None,
                stats: PoolStats::default(),
                budget_bytes,
            })),
            usage,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        // A panic while holding the lock leaves only counters behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    pub(crate) fn set_budget(&self, budget_bytes: u64) {
        self.lock().budget_bytes = budget_bytes;
    }

    /// Starts (`true`) or ends isolation; on its end the isolated idle buffers join the
    /// others.
    pub(crate) fn isolate(&self, on: bool) {
        let mut p = self.lock();
        match (on, p.isolated.take()) {
            (true, None) => p.isolated = Some(HashMap::new()),
            (true, Some(set)) => p.isolated = Some(set),
            (false, Some(set)) => {
                for (class, mut bufs) in set {
                    p.free.entry(class).or_default().append(&mut bufs);
                }
            }
            (false, None) => {}
        }
    }

    /// Drops every idle buffer.
    pub(crate) fn trim(&self) {
        let mut p = self.lock();
        let freed: u64 = p.free.iter().map(|(c, v)| c * v.len() as u64).sum();
        p.free.clear();
        if let Some(set) = p.isolated.as_mut() {
            let more: u64 = set.iter().map(|(c, v)| c * v.len() as u64).sum();
            set.clear();
            p.stats.idle_bytes -= more;
        }
        p.stats.idle_bytes -= freed;
    }

    /// A buffer of at least `bytes` bytes: an idle one of the same class, else a new one.
    pub(crate) fn acquire(
        &self,
        device: &wgpu::Device,
        bytes: u64,
        max_buffer_bytes: u64,
    ) -> Result<(wgpu::Buffer, u64)> {
        let class = size_class(bytes);
        if class > max_buffer_bytes {
            return Err(GpuError::BufferTooLarge { bytes, limit_bytes: max_buffer_bytes });
        }
        let mut p = self.lock();
        let reused = match p.isolated.as_mut() {
            Some(set) => set.get_mut(&class).and_then(Vec::pop),
            None => p.free.get_mut(&class).and_then(Vec::pop),
        };
        if let Some(buf) = reused {
            p.stats.reuses += 1;
            p.stats.idle_bytes -= class;
            p.stats.in_use_bytes += class;
            return Ok((buf, class));
        }
        // Make room under the budget by releasing idle buffers, largest first.
        while p.stats.in_use_bytes + p.stats.idle_bytes + class > p.budget_bytes {
            let Some(largest) = p.free.iter().filter(|(_, v)| !v.is_empty()).map(|(c, _)| *c).max() else { break };
            p.free.get_mut(&largest).and_then(Vec::pop);
            p.stats.idle_bytes -= largest;
            p.stats.evictions += 1;
        }
        if p.stats.in_use_bytes + class > p.budget_bytes {
            return Err(GpuError::OutOfMemory {
                requested_bytes: bytes,
                in_use_bytes: p.stats.in_use_bytes,
                limit_bytes: p.budget_bytes,
            });
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("strata tensor"),
            size: class,
            usage: self.usage,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            tracing::warn!("device allocation of {class} bytes failed: {e}");
            return Err(GpuError::OutOfMemory {
                requested_bytes: bytes,
                in_use_bytes: p.stats.in_use_bytes,
                limit_bytes: p.stats.in_use_bytes + p.stats.idle_bytes,
            });
        }
        p.stats.allocations += 1;
        p.stats.in_use_bytes += class;
        p.stats.peak_bytes = p.stats.peak_bytes.max(p.stats.in_use_bytes + p.stats.idle_bytes);
        Ok((buf, class))
    }

    /// Returns a buffer for reuse.
    pub(crate) fn release(&self, buf: wgpu::Buffer, class: u64) {
        let mut p = self.lock();
        p.stats.in_use_bytes -= class;
        p.stats.idle_bytes += class;
        match p.isolated.as_mut() {
            Some(set) => set.entry(class).or_default().push(buf),
            None => p.free.entry(class).or_default().push(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn classes_bound_slack() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(1000), 1024);
        for bytes in [1025u64, 4000, 4097, 1 << 20, (1 << 20) + 1, 3 << 27, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes && c.is_multiple_of(256), "{bytes} -> {c}");
            assert!(c as f64 <= bytes as f64 * 1.25 + 256.0, "{bytes} -> {c}");
        }
        assert_eq!(size_class(size_class(5000)), size_class(5000));
    }
}
