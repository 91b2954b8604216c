//! Reusable payload buffers for the data path.
//!
//! Collective segments are megabytes each; allocating them fresh means page faults and
//! zeroing by the kernel on every segment (measured: about a sixth of the CPU time of an
//! all-reduce). Received payloads come from [`take_f32`] and go back with [`recycle`];
//! sent payloads are [`bytes::Bytes`] whose storage returns to the pool when quinn drops
//! the last reference.

use std::sync::Mutex;

/// Buffers kept per pool; beyond this, returned buffers are freed.
const KEPT_MAX: usize = 64;
/// Buffers smaller than this are not worth pooling.
const POOLED_BYTES_MIN: usize = 64 << 10;

static F32S: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
static BYTES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn take_from<T>(pool: &Mutex<Vec<Vec<T>>>, cap: usize) -> Vec<T> {
    if cap * std::mem::size_of::<T>() >= POOLED_BYTES_MIN {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = p.iter().position(|v| v.capacity() >= cap && v.capacity() <= cap * 2) {
            let mut v = p.swap_remove(i);
            v.clear();
            return v;
        }
    }
    Vec::with_capacity(cap)
}

fn give_to<T>(pool: &Mutex<Vec<Vec<T>>>, v: Vec<T>) {
    if v.capacity() * std::mem::size_of::<T>() >= POOLED_BYTES_MIN {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < KEPT_MAX {
            p.push(v);
        }
    }
}

/// An empty vector with room for `cap` elements, reused when possible.
pub fn take_f32(cap: usize) -> Vec<f32> {
    take_from(&F32S, cap)
}

/// Returns a payload vector for reuse.
pub fn recycle(v: Vec<f32>) {
    give_to(&F32S, v);
}

struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give_to(&BYTES, std::mem::take(&mut self.0));
    }
}

/// The little-endian bytes of `data` in a pooled buffer.
pub fn bytes_of_f32(data: &[f32]) -> bytes::Bytes {
    let src: &[u8] = bytemuck::cast_slice(data);
    let mut v = take_from(&BYTES, src.len());
    v.extend_from_slice(src);
    bytes::Bytes::from_owner(Pooled(v))
}
