//! Memory budgets per peer connection.
//!
//! Every byte a peer makes this node hold (frames being read, chunks waiting for an
//! operation that is not open yet, tensors waiting in a mailbox) is charged to the
//! budget of the connection it came on, as the data arrives rather than as a header
//! declares it. A [`Charge`] travels with the data and gives its bytes back when
//! dropped. A peer that goes over its budget is disconnected with a logged reason; the
//! node keeps serving everyone else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What every frame costs beyond its payload (header, bookkeeping), so that a flood of
/// empty frames is charged too.
pub(crate) const FRAME_OVERHEAD_BYTES: u64 = 256;

/// The budget of one connection.
#[derive(Debug)]
pub(crate) struct PeerBudget {
    peer: String,
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

/// A peer went over its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OverBudget {
    pub(crate) message: String,
}

impl PeerBudget {
    /// A budget of `limit` bytes for `peer`.
    pub(crate) fn new(peer: &str, limit: u64) -> Arc<Self> {
        Arc::new(Self { peer: peer.to_string(), limit, used: AtomicU64::new(0), peak: AtomicU64::new(0) })
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The most bytes held at once.
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    fn take(&self, bytes: u64) -> Result<(), OverBudget> {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let next = cur.saturating_add(bytes);
            if next > self.limit {
                return Err(OverBudget {
                    message: format!(
                        "peer {} exceeded its memory budget: {next} bytes buffered, limit {} bytes",
                        self.peer, self.limit
                    ),
                });
            }
            match self.used.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    return Ok(());
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Bytes charged to a peer's budget; given back when dropped.
#[derive(Debug, Default)]
pub struct Charge {
    budget: Option<Arc<PeerBudget>>,
    bytes: u64,
}

impl Charge {
    /// An empty charge against `budget`.
    pub(crate) fn new(budget: &Arc<PeerBudget>) -> Self {
        Self { budget: Some(budget.clone()), bytes: 0 }
    }

    /// Charges `bytes` more; on refusal nothing is charged.
    pub(crate) fn grow(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if let Some(b) = &self.budget {
            b.take(bytes)?;
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Bytes held by this charge.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_given_back() {
        let b = PeerBudget::new("p", 1000);
        let mut c1 = Charge::new(&b);
        c1.grow(600).unwrap();
        let mut c2 = Charge::new(&b);
        let e = c2.grow(500).unwrap_err();
        assert_eq!(e.message, "peer p exceeded its memory budget: 1100 bytes buffered, limit 1000 bytes");
        assert_eq!((b.used(), c2.bytes()), (600, 0));
        c2.grow(400).unwrap();
        drop(c1);
        assert_eq!(b.used(), 400);
        drop(c2);
        assert_eq!((b.used(), b.peak()), (0, 1000));
    }
}
