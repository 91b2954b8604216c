//! Reusable payload buffers for the data path, and the payload types that avoid copies.
//!
//! Collective segments are megabytes each; allocating them fresh means page faults and
//! zeroing by the kernel on every segment (measured: about a sixth of the CPU time of an
//! all-reduce). Received payloads of requests come from [`take_f32`] and go back with
//! [`recycle`]; sent payloads are [`bytes::Bytes`] whose storage returns to the pool when
//! quinn drops the last reference.
//!
//! Collective chunks avoid two more copies: a received chunk is a [`Payload`], the
//! transport's own decrypted buffers, which the collective reduces from directly; and a
//! sender hands out read-only views of the buffer it reduces into ([`SharedF32`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers kept per pool; beyond this, returned buffers are freed.
const KEPT_MAX: usize = 64;
/// Bytes kept per pool; beyond this, returned buffers are freed.
const KEPT_BYTES_MAX: usize = 512 << 20;
/// Buffers smaller than this are not worth pooling.
const POOLED_BYTES_MIN: usize = 64 << 10;

struct Pool<T> {
    kept: Vec<Vec<T>>,
    bytes: usize,
}

static F32S: Mutex<Pool<f32>> = Mutex::new(Pool { kept: Vec::new(), bytes: 0 });
static BYTES: Mutex<Pool<u8>> = Mutex::new(Pool { kept: Vec::new(), bytes: 0 });
static U16S: Mutex<Pool<u16>> = Mutex::new(Pool { kept: Vec::new(), bytes: 0 });

fn take_from<T>(pool: &Mutex<Pool<T>>, cap: usize) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    if cap * size >= POOLED_BYTES_MIN {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = p.kept.iter().position(|v| v.capacity() >= cap && v.capacity() <= cap * 2) {
            let mut v = p.kept.swap_remove(i);
            p.bytes -= v.capacity() * size;
            v.clear();
            return v;
        }
    }
    Vec::with_capacity(cap)
}

fn give_to<T>(pool: &Mutex<Pool<T>>, v: Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes >= POOLED_BYTES_MIN {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.kept.len() < KEPT_MAX && p.bytes + bytes <= KEPT_BYTES_MAX {
            p.bytes += bytes;
            p.kept.push(v);
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
pub fn bytes_of_f32(data: &[f32]) -> Bytes {
    let src: &[u8] = bytemuck::cast_slice(data);
    let mut v = take_from(&BYTES, src.len());
    v.extend_from_slice(src);
    Bytes::from_owner(Pooled(v))
}

struct Pooled16(Vec<u16>);

impl AsRef<[u8]> for Pooled16 {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Drop for Pooled16 {
    fn drop(&mut self) {
        give_to(&U16S, std::mem::take(&mut self.0));
    }
}

/// `len` 16-bit values in a pooled buffer, as little-endian bytes.
pub fn bytes_of_u16s(len: usize, values: impl Iterator<Item = u16>) -> Bytes {
    let mut v = take_from(&U16S, len);
    v.extend(values.take(len).map(u16::to_le));
    Bytes::from_owner(Pooled16(v))
}

/// Payload bytes as they arrived: the transport's buffers, in order, without a copy.
///
/// Elements may be split between pieces at any byte.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    pieces: Vec<Bytes>,
    len: usize,
}

impl Payload {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a piece.
    pub fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.pieces.push(piece);
        }
    }

    /// A copy of `data`'s little-endian bytes.
    pub fn from_f32(data: &[f32]) -> Self {
        Self::from(bytes_of_f32(data))
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// The pieces, for sending.
    pub fn into_pieces(self) -> Vec<Bytes> {
        self.pieces
    }

    /// The bytes as little-endian f32 elements (a copy); trailing bytes that do not
    /// make a whole element are ignored.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut bytes = Vec::with_capacity(self.len);
        for p in &self.pieces {
            bytes.extend_from_slice(p);
        }
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        let mut p = Self::new();
        p.push(b);
        p
    }
}

/// The storage behind a [`SharedF32`]: a vector that is never resized while shared,
/// and goes back to the pool when the last view is dropped.
struct SharedInner {
    ptr: *mut f32,
    len: usize,
    cap: usize,
}

// SAFETY: the allocation is plain f32 data. `SharedF32` writes only ranges that no view
// covers (checked), views only read, and the Arc orders the last use before the free.
unsafe impl Send for SharedInner {}
// SAFETY: as above; shared access is read-only through views.
unsafe impl Sync for SharedInner {}

impl Drop for SharedInner {
    fn drop(&mut self) {
        // SAFETY: ptr, len and cap came from a Vec<f32> that was forgotten in `new`.
        let v = unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) };
        recycle(v);
    }
}

struct View {
    inner: Arc<SharedInner>,
    range: Range<usize>,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range was checked against the length and frozen: the owner never
        // writes it again, and the allocation lives as long as this Arc.
        let s = unsafe { std::slice::from_raw_parts(self.inner.ptr.add(self.range.start), self.range.len()) };
        bytemuck::cast_slice(s)
    }
}

/// An f32 buffer that hands out read-only views of its ranges as [`Bytes`], without a
/// copy, while its owner goes on writing other ranges.
///
/// A range is frozen by its first view: writing it afterwards panics. The allocation is
/// returned to the buffer pool when the owner and every view are gone.
pub struct SharedF32 {
    inner: Arc<SharedInner>,
    /// Frozen ranges, start to end, disjoint.
    frozen: BTreeMap<usize, usize>,
}

impl SharedF32 {
    /// Takes ownership of `v`.
    pub fn new(v: Vec<f32>) -> Self {
        let mut v = std::mem::ManuallyDrop::new(v);
        let inner = SharedInner { ptr: v.as_mut_ptr(), len: v.len(), cap: v.capacity() };
        Self { inner: Arc::new(inner), frozen: BTreeMap::new() }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    fn overlaps_frozen(&self, r: &Range<usize>) -> bool {
        if r.is_empty() {
            return false;
        }
        // The last frozen range starting before r.end is the only candidate.
        self.frozen.range(..r.end).next_back().is_some_and(|(_, &end)| end > r.start)
    }

    /// Adds `r` to the frozen ranges, merging those it overlaps or touches (so
    /// consecutive views keep the map small).
    fn freeze(&mut self, r: Range<usize>) {
        let (mut start, mut end) = (r.start, r.end);
        let merged: Vec<(usize, usize)> =
            self.frozen.range(..=end).rev().take_while(|(_, e)| **e >= start).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in merged {
            self.frozen.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.frozen.insert(start, end);
    }

    /// The elements of `range`.
    pub fn slice(&self, range: Range<usize>) -> &[f32] {
        assert!(range.start <= range.end && range.end <= self.len(), "range {range:?} outside {}", self.len());
        // SAFETY: in bounds; views only read, and writes need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.inner.ptr.add(range.start), range.len()) }
    }

    /// The elements of `range` for writing. Panics if a view froze any of them.
    pub fn slice_mut(&mut self, range: Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len(), "range {range:?} outside {}", self.len());
        assert!(!self.overlaps_frozen(&range), "range {range:?} was frozen by a view");
        // SAFETY: in bounds, no view covers the range (checked above), and `&mut self`
        // excludes every other slice of this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.inner.ptr.add(range.start), range.len()) }
    }

    /// A read-only view of `range` as little-endian bytes; the range is frozen.
    pub fn view(&mut self, range: Range<usize>) -> Bytes {
        assert!(range.start <= range.end && range.end <= self.len(), "range {range:?} outside {}", self.len());
        if range.is_empty() {
            return Bytes::new();
        }
        self.freeze(range.clone());
        Bytes::from_owner(View { inner: self.inner.clone(), range })
    }

    /// The vector back, if no view is alive.
    pub fn try_into_vec(self) -> Result<Vec<f32>, Self> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                let inner = std::mem::ManuallyDrop::new(inner);
                // SAFETY: as in Drop; ManuallyDrop keeps Drop from freeing it again.
                Ok(unsafe { Vec::from_raw_parts(inner.ptr, inner.len, inner.cap) })
            }
            Err(inner) => Err(Self { inner, frozen: self.frozen }),
        }
    }
}

impl std::fmt::Debug for SharedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedF32({} elements, {} frozen ranges)", self.len(), self.frozen.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_read_frozen_ranges_while_the_owner_writes_others() {
        let mut s = SharedF32::new((0..10).map(|i| i as f32).collect());
        let v = s.view(2..4);
        s.slice_mut(4..10).iter_mut().for_each(|x| *x += 100.0);
        s.slice_mut(0..2).iter_mut().for_each(|x| *x = -1.0);
        assert_eq!(&v[..], bytemuck::cast_slice::<f32, u8>(&[2.0, 3.0]));
        assert_eq!(s.slice(0..10), &[-1.0, -1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0, 108.0, 109.0]);
        let s = s.try_into_vec().unwrap_err();
        drop(v);
        assert_eq!(s.try_into_vec().unwrap().len(), 10);
    }

    #[test]
    #[should_panic(expected = "range 3..5 was frozen by a view")]
    fn writing_a_frozen_range_panics() {
        let mut s = SharedF32::new(vec![0.0; 10]);
        let _v = (s.view(0..1), s.view(2..3), s.view(3..4), s.view(1..2), s.view(8..9));
        assert_eq!(s.frozen.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(), vec![(0, 4), (8, 9)]);
        s.slice_mut(4..8);
        s.slice_mut(3..5);
    }

    #[test]
    fn payload_pieces_join_into_elements() {
        let all: Vec<u8> = bytemuck::cast_slice(&[1.5f32, -2.0, 3.25]).to_vec();
        let mut p = Payload::new();
        p.push(Bytes::copy_from_slice(&all[..3]));
        p.push(Bytes::new());
        p.push(Bytes::copy_from_slice(&all[3..9]));
        p.push(Bytes::copy_from_slice(&all[9..]));
        assert_eq!((p.len(), p.pieces().len()), (12, 3));
        assert_eq!(p.to_f32_vec(), vec![1.5, -2.0, 3.25]);
    }
}
