//! Shard descriptors: how a flat tensor is cut into contiguous pieces.
//!
//! Collectives cut a buffer into one chunk per rank; the distributed sampler cuts a
//! dataset into one shard per rank. Both use [`even_ranges`], so every rank derives the
//! same cut from the same `(len, parts)` with no communication.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// A contiguous slice `[offset, offset + len)` of a flat tensor of `total` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardSpec {
    /// First element.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Element count of the whole tensor.
    pub total: usize,
}

impl ShardSpec {
    /// The element range.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Cuts `len` elements into `parts` contiguous ranges whose sizes differ by at most one;
/// the first `len % parts` ranges get the extra element. `parts` must be at least 1.
pub fn even_ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    assert!(parts > 0, "even_ranges needs at least one part");
    let base = len / parts;
    let extra = len % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// The shards of [`even_ranges`] as [`ShardSpec`]s.
pub fn even_shards(len: usize, parts: usize) -> Vec<ShardSpec> {
    even_ranges(len, parts).into_iter().map(|r| ShardSpec { offset: r.start, len: r.len(), total: len }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_cover_exactly(len in 0usize..10_000, parts in 1usize..17) {
            let r = even_ranges(len, parts);
            prop_assert_eq!(r.len(), parts);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r[parts - 1].end, len);
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
                prop_assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
            }
        }
    }
}
