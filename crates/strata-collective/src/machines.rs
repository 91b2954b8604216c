//! The state machines: ring and tree all-reduce, reduce-scatter, all-gather,
//! pipelined broadcast, and point-to-point send and receive.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use bytes::Bytes;
use strata_net::buffers::{SharedF32, bytes_of_f32, bytes_of_u16s, take_f32};
use strata_tensor::DType;
use strata_tensor::shard::even_ranges;
use strata_wire::ChunkTag;

use crate::{CollectiveError, Rank};

/// Buffers up to this many bytes are all-reduced over a tree by [`Algorithm::Auto`];
/// larger ones over a ring. Below it latency (rounds) dominates, above it bandwidth.
pub const TREE_BYTES_MAX_DEFAULT: usize = 256 << 10;

/// How values from different ranks combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise mean (the sum scaled by `1 / world`).
    Mean,
}

/// All-reduce algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Tree for buffers up to the tree limit, ring above.
    Auto,
    /// Pipelined ring: reduce-scatter then all-gather; bandwidth-optimal.
    Ring,
    /// Binomial tree reduce to rank 0, then broadcast down the tree; fewest rounds.
    Tree,
}

/// How all-reduce values travel on the wire.
///
/// With a 16-bit format every rank rounds its input to the wire format (ties to even),
/// partial sums are added in f32 and rounded again whenever they are sent, and the owner
/// of each chunk rounds the finished sum before sending it around, so every rank ends
/// with the same wire-format values (bitwise identical, as without compression). What is
/// lost to rounding is the caller's to carry into the next step (error feedback).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// 32-bit floats: exact.
    #[default]
    None,
    /// bfloat16: the range of f32 with 8 significant bits.
    Bf16,
    /// IEEE half precision: 11 significant bits, magnitudes up to 65504 (larger ones
    /// become infinite).
    Fp16,
}

impl Compression {
    /// The element type on the wire.
    pub fn dtype(self) -> DType {
        match self {
            Compression::None => DType::F32,
            Compression::Bf16 => DType::BF16,
            Compression::Fp16 => DType::F16,
        }
    }

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Bf16 => "bf16",
            Compression::Fp16 => "fp16",
        }
    }

    /// `x` rounded to the nearest wire value, ties to even: what `x` becomes on the wire.
    pub fn round_one(self, x: f32) -> f32 {
        match self {
            Compression::None => x,
            Compression::Bf16 => bf16_to_f32(f32_to_bf16(x)),
            Compression::Fp16 => f16_to_f32(f32_to_f16(x)),
        }
    }

    /// Rounds every value to the wire format in place (see [`Compression::round_one`]).
    pub fn round(self, v: &mut [f32]) {
        match self {
            Compression::None => {}
            Compression::Bf16 => v.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x))),
            Compression::Fp16 => v.iter_mut().for_each(|x| *x = f16_to_f32(f32_to_f16(*x))),
        }
    }

    /// `v`'s little-endian wire bytes, in a pooled buffer.
    pub fn encode(self, v: &[f32]) -> Bytes {
        match self {
            Compression::None => bytes_of_f32(v),
            Compression::Bf16 => bytes_of_u16s(v.len(), v.iter().map(|x| f32_to_bf16(*x))),
            Compression::Fp16 => bytes_of_u16s(v.len(), v.iter().map(|x| f32_to_f16(*x))),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "bf16" => Ok(Compression::Bf16),
            "fp16" => Ok(Compression::Fp16),
            other => Err(format!("unknown compression {other:?}: expected none, bf16 or fp16")),
        }
    }
}

// The conversions below select between precomputed cases instead of branching, so
// that loops over them vectorise.

/// bfloat16 bits of `x`, rounded to nearest, ties to even; NaN stays NaN.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

/// The f32 value of bfloat16 bits.
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// IEEE half-precision bits of `x`, rounded to nearest, ties to even (after F. Giesen's
/// `float_to_half_fast3_rtne`); overflow gives infinity, NaN a quiet NaN.
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    const F32_INF: u32 = 255 << 23;
    const F16_MAX: u32 = (127 + 16) << 23;
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let u = x.to_bits();
    let sign = u & 0x8000_0000;
    let a = u ^ sign;
    let inf_nan = if a > F32_INF { 0x7e00 } else { 0x7c00 };
    // Subnormal or zero: adding the magic number lets the FPU round the 10 mantissa bits
    // into place, ties to even.
    let subnormal = (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC)).to_bits().wrapping_sub(DENORM_MAGIC);
    // Normal: rebias the exponent and round the 13 dropped bits, ties to even.
    let mant_odd = (a >> 13) & 1;
    let normal = a.wrapping_add((15u32.wrapping_sub(127) << 23).wrapping_add(0xfff)).wrapping_add(mant_odd) >> 13;
    let o = if a >= F16_MAX {
        inf_nan
    } else if a < (113 << 23) {
        subnormal
    } else {
        normal
    };
    (o | (sign >> 16)) as u16
}

/// The f32 value of IEEE half-precision bits (exact).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    const MAGIC: u32 = 113 << 23;
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let shifted = (h & 0x7fff) << 13;
    let exp = SHIFTED_EXP & shifted;
    let normal = shifted + ((127 - 15) << 23);
    let inf_nan = normal + ((128 - 16) << 23);
    let subnormal = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(MAGIC)).to_bits();
    let o = if exp == SHIFTED_EXP {
        inf_nan
    } else if exp == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// What a machine sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendData {
    /// These little-endian element bytes (often a view of the machine's buffer).
    Bytes(Bytes),
    /// The data that arrived under this tag, unchanged (the driver kept it when
    /// [`Machine::on_receive`] answered [`Received::Keep`]).
    Forward(ChunkTag),
}

/// Data a machine wants sent to rank `to`, labelled `tag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendAction {
    /// Destination rank.
    pub to: Rank,
    /// Label the receiver matches on.
    pub tag: ChunkTag,
    /// The elements, in the machine's wire format ([`Machine::wire_dtype`]).
    pub data: SendData,
}

/// What the driver does with received data once the machine has seen it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Nothing more: drop it.
    Done,
    /// Keep it: a later send forwards it ([`SendData::Forward`] with its tag).
    Keep,
}

/// The interface the driver uses.
pub trait Machine: std::marker::Send {
    /// Operation name for errors.
    fn name(&self) -> &'static str;
    /// The element type of every message, sent and received.
    fn wire_dtype(&self) -> DType {
        DType::F32
    }
    /// The next send, if one is ready.
    fn poll_send(&mut self) -> Option<SendAction>;
    /// Data from `from` labelled `tag` arrived: the little-endian bytes of its elements
    /// in the wire format, in pieces split anywhere (as the transport delivered them).
    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError>;
    /// Whether every receive happened and every send was handed out.
    fn is_done(&self) -> bool;
    /// Ranks this machine still expects data from.
    fn waiting_on(&self) -> Vec<Rank>;
    /// The result, once done (before that, an empty vector).
    fn take_result(&mut self) -> Vec<f32>;
}

fn segments(r: &Range<usize>, seg_len: usize) -> usize {
    r.len().div_ceil(seg_len)
}

fn segment(r: &Range<usize>, seg_len: usize, k: usize) -> Range<usize> {
    let start = r.start + k * seg_len;
    start..(start + seg_len).min(r.end)
}

fn protocol(op: &'static str, from: Rank, message: String) -> CollectiveError {
    CollectiveError::Protocol { op, from, message }
}

fn check_world(op: &'static str, rank: Rank, world: usize) -> Result<(), CollectiveError> {
    if world == 0 || rank >= world {
        return Err(CollectiveError::Argument { op, message: format!("rank {rank} is outside a world of {world}") });
    }
    Ok(())
}

/// Checks that `data` holds exactly `want` elements of `wire`.
fn check_len(
    op: &'static str,
    from: Rank,
    data: &[&[u8]],
    wire: Compression,
    want: usize,
) -> Result<(), CollectiveError> {
    let bytes: usize = data.iter().map(|p| p.len()).sum();
    let size = wire.dtype().size_bytes();
    if !bytes.is_multiple_of(size) {
        return Err(protocol(op, from, format!("segment of {bytes} bytes is not whole {} elements", wire.dtype())));
    }
    if bytes / size != want {
        return Err(protocol(op, from, format!("segment has {} elements, expected {want}", bytes / size)));
    }
    Ok(())
}

/// Calls `f(first, run)` for each run of whole `size`-byte elements in `pieces`, in
/// order, `first` being the run's first element index; an element split between pieces
/// is joined in a small buffer and passed as a run of one. Trailing bytes that make no
/// whole element are ignored (callers check lengths first).
fn for_each_run(pieces: &[&[u8]], size: usize, mut f: impl FnMut(usize, &[u8])) {
    let mut index = 0;
    let mut carry = [0u8; 4];
    let mut have = 0;
    for piece in pieces {
        let mut p: &[u8] = piece;
        if have > 0 {
            let take = (size - have).min(p.len());
            carry[have..have + take].copy_from_slice(&p[..take]);
            have += take;
            p = &p[take..];
            if have < size {
                continue;
            }
            f(index, &carry[..size]);
            index += 1;
        }
        let whole = p.len() / size * size;
        if whole > 0 {
            f(index, &p[..whole]);
            index += whole / size;
        }
        let rest = &p[whole..];
        carry[..rest.len()].copy_from_slice(rest);
        have = rest.len();
    }
}

fn le_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// `dst[i] += element i of data`, straight from the received pieces. With compression
/// `dst` holds this rank's input, which is rounded to the wire format as it is added to
/// (every rank contributes its rounded input).
fn add_from(wire: Compression, dst: &mut [f32], data: &[&[u8]]) {
    let size = wire.dtype().size_bytes();
    for_each_run(data, size, |i, run| {
        let d = &mut dst[i..];
        match wire {
            Compression::None => d.iter_mut().zip(run.chunks_exact(4)).for_each(|(d, b)| *d += le_f32(b)),
            Compression::Bf16 => d.iter_mut().zip(run.chunks_exact(2)).for_each(|(d, b)| {
                *d = bf16_to_f32(f32_to_bf16(*d)) + bf16_to_f32(le_u16(b));
            }),
            Compression::Fp16 => d.iter_mut().zip(run.chunks_exact(2)).for_each(|(d, b)| {
                *d = f16_to_f32(f32_to_f16(*d)) + f16_to_f32(le_u16(b));
            }),
        }
    });
}

/// `dst[i] = element i of data`, into memory that may be uninitialised.
fn write_from(wire: Compression, dst: &mut [std::mem::MaybeUninit<f32>], data: &[&[u8]]) {
    let size = wire.dtype().size_bytes();
    for_each_run(data, size, |i, run| {
        let d = &mut dst[i..];
        match wire {
            Compression::None => d.iter_mut().zip(run.chunks_exact(4)).for_each(|(d, b)| {
                d.write(le_f32(b));
            }),
            Compression::Bf16 => d.iter_mut().zip(run.chunks_exact(2)).for_each(|(d, b)| {
                d.write(bf16_to_f32(le_u16(b)));
            }),
            Compression::Fp16 => d.iter_mut().zip(run.chunks_exact(2)).for_each(|(d, b)| {
                d.write(f16_to_f32(le_u16(b)));
            }),
        }
    });
}

/// `dst[i] = element i of data` (f32 data).
fn copy_from(dst: &mut [f32], data: &[&[u8]]) {
    for_each_run(data, 4, |i, run| dst[i..].iter_mut().zip(run.chunks_exact(4)).for_each(|(d, b)| *d = le_f32(b)));
}

/// `data` as f32 elements (a copy).
fn f32s_of(data: &[&[u8]]) -> Vec<f32> {
    let n = data.iter().map(|p| p.len()).sum::<usize>() / 4;
    let mut v = vec![0.0; n];
    copy_from(&mut v, data);
    v
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RingMode {
    AllReduce,
    ReduceScatter,
    AllGather,
}

/// The ring engine behind all-reduce, reduce-scatter and all-gather.
///
/// The buffer is cut into `world` chunks; with rank `r`, chunk indices mod `world`:
/// reduce-scatter step `s` sends chunk `r - s - 1` right and adds chunk `r - s - 2` from
/// the left, so after `world - 1` steps rank `r` holds chunk `r` reduced; all-gather step
/// `t` sends chunk `r - t` and receives chunk `r - t - 1`. Chunks travel in segments, and
/// segment `k` of a step is sent as soon as segment `k` of the previous step arrived,
/// so sending, receiving and adding overlap.
///
/// No element is copied that need not be: reduce-scatter adds straight from the received
/// pieces into the accumulator (the caller's buffer) and sends read-only views of it
/// (each range is written before its first send and never after); the all-gather
/// writes the result into a second buffer and forwards what it received unchanged.
struct Ring {
    op: &'static str,
    rank: Rank,
    world: usize,
    wire: Compression,
    acc: SharedF32,
    /// The result being assembled (all-reduce and all-gather): room for every element,
    /// length 0 until all of them are written.
    out: Vec<f32>,
    out_written: usize,
    chunks: Vec<Range<usize>>,
    seg_len: usize,
    rs_steps: usize,
    steps: usize,
    got: Vec<Vec<bool>>,
    pending: VecDeque<(usize, usize)>,
    received: usize,
    expected: usize,
    sends_left: usize,
}

impl Ring {
    #[allow(clippy::too_many_arguments, reason = "private constructor of three public machines")]
    fn new(
        op: &'static str,
        mode: RingMode,
        rank: Rank,
        world: usize,
        buf: Vec<f32>,
        chunks: Vec<Range<usize>>,
        seg_len: usize,
        wire: Compression,
    ) -> Self {
        let rs_steps = if mode == RingMode::AllGather { 0 } else { world - 1 };
        let ag_steps = if mode == RingMode::ReduceScatter { 0 } else { world - 1 };
        let assembles = mode != RingMode::ReduceScatter && world > 1;
        let out = if assembles { take_f32(buf.len()) } else { Vec::new() };
        let mut ring = Self {
            op,
            rank,
            world,
            wire,
            acc: SharedF32::new(buf),
            out,
            out_written: 0,
            chunks,
            seg_len: seg_len.max(1),
            rs_steps,
            steps: rs_steps + ag_steps,
            got: Vec::new(),
            pending: VecDeque::new(),
            received: 0,
            expected: 0,
            sends_left: 0,
        };
        for s in 0..ring.steps {
            let rc = &ring.chunks[ring.recv_chunk(s)];
            ring.got.push(vec![false; segments(rc, ring.seg_len)]);
            ring.expected += segments(rc, ring.seg_len);
            ring.sends_left += segments(&ring.chunks[ring.send_chunk(s)], ring.seg_len);
        }
        if ring.steps > 0 {
            for k in 0..segments(&ring.chunks[ring.send_chunk(0)], ring.seg_len) {
                ring.pending.push_back((0, k));
            }
        }
        ring
    }

    fn back(&self, k: usize) -> usize {
        (self.rank + self.world * 2 - k % self.world) % self.world
    }

    fn send_chunk(&self, step: usize) -> usize {
        if step < self.rs_steps { self.back(step + 1) } else { self.back(step - self.rs_steps) }
    }

    fn recv_chunk(&self, step: usize) -> usize {
        if step < self.rs_steps { self.back(step + 2) } else { self.back(step - self.rs_steps + 1) }
    }

    fn left(&self) -> Rank {
        (self.rank + self.world - 1) % self.world
    }

    fn right(&self) -> Rank {
        (self.rank + 1) % self.world
    }

    /// The bytes sent for `range` of the accumulator. In the all-gather's first step
    /// (`own`: this rank's finished chunk) they also go into the result, so this rank
    /// keeps exactly what the others receive.
    fn send_bytes(&mut self, range: Range<usize>, own: bool) -> Bytes {
        let bytes = match self.wire {
            Compression::None => self.acc.view(range.clone()),
            wire => wire.encode(self.acc.slice(range.clone())),
        };
        if own {
            write_from(self.wire, &mut self.out.spare_capacity_mut()[range.clone()], &[&bytes[..]]);
            self.out_written += range.len();
        }
        bytes
    }

    fn poll_send(&mut self) -> Option<SendAction> {
        let (step, k) = self.pending.pop_front()?;
        self.sends_left -= 1;
        let tag = ChunkTag { step: step as u32, segment: k as u32 };
        let data = if step > self.rs_steps {
            // All-gather after its first step: pass on what arrived.
            SendData::Forward(ChunkTag { step: step as u32 - 1, segment: k as u32 })
        } else {
            // Reduce-scatter steps send partial sums; the all-gather's first step sends
            // this rank's finished chunk.
            let range = segment(&self.chunks[self.send_chunk(step)], self.seg_len, k);
            SendData::Bytes(self.send_bytes(range, step == self.rs_steps))
        };
        Some(SendAction { to: self.right(), tag, data })
    }

    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError> {
        let (step, k) = (tag.step as usize, tag.segment as usize);
        if from != self.left() {
            return Err(protocol(self.op, from, format!("rank {} only receives from rank {}", self.rank, self.left())));
        }
        if step >= self.steps || k >= self.got[step].len() || self.got[step][k] {
            return Err(protocol(self.op, from, format!("unexpected or repeated segment {k} of step {step}")));
        }
        let range = segment(&self.chunks[self.recv_chunk(step)], self.seg_len, k);
        check_len(self.op, from, data, self.wire, range.len())?;
        let answer = if step < self.rs_steps {
            add_from(self.wire, self.acc.slice_mut(range), data);
            Received::Done
        } else {
            write_from(self.wire, &mut self.out.spare_capacity_mut()[range.clone()], data);
            self.out_written += range.len();
            if step + 1 < self.steps { Received::Keep } else { Received::Done }
        };
        self.got[step][k] = true;
        self.received += 1;
        if step + 1 < self.steps {
            self.pending.push_back((step + 1, k));
        }
        Ok(answer)
    }

    fn is_done(&self) -> bool {
        self.received == self.expected && self.sends_left == 0
    }

    fn waiting_on(&self) -> Vec<Rank> {
        if self.received < self.expected { vec![self.left()] } else { Vec::new() }
    }

    /// The assembled result (all-reduce, all-gather); empty until every element is in.
    fn take_out(&mut self) -> Vec<f32> {
        if self.world == 1 {
            // Nothing travelled: the input, rounded to the wire format, is the result.
            let acc = std::mem::replace(&mut self.acc, SharedF32::new(Vec::new()));
            let mut v = acc.try_into_vec().unwrap_or_else(|a| a.slice(0..a.len()).to_vec());
            self.wire.round(&mut v);
            return v;
        }
        let n = self.acc.len();
        if self.out_written != n || self.out.capacity() < n {
            return Vec::new();
        }
        self.out_written = 0;
        // SAFETY: every element of 0..n was written exactly once: the own chunk by
        // `finish_own`, every other chunk's segments by `on_receive` (repeats refused),
        // and together they cover 0..n (`out_written == n`).
        unsafe { self.out.set_len(n) };
        std::mem::take(&mut self.out)
    }
}

/// Binomial-tree all-reduce: each rank adds its children's partial sums in a fixed order
/// (nearest child first), rank 0 ends with the total and sends it back down the tree.
struct Tree {
    rank: Rank,
    buf: Vec<f32>,
    parent: Option<(Rank, u32)>,
    children: Vec<(Rank, u32)>,
    early: BTreeMap<usize, Vec<f32>>,
    next_child: usize,
    got_down: bool,
    pending: VecDeque<(Rank, u32)>,
    reduced: bool,
}

/// Tags of the tree: level `k` upwards, `DOWN + k` downwards.
const DOWN: u32 = 64;

impl Tree {
    fn new(rank: Rank, world: usize, buf: Vec<f32>) -> Self {
        let mut parent = None;
        let mut children = Vec::new();
        let mut k = 0u32;
        while (1usize << k) < world {
            let bit = 1usize << k;
            if rank & bit != 0 {
                parent = Some((rank - bit, k));
                break;
            }
            if rank + bit < world {
                children.push((rank + bit, k));
            }
            k += 1;
        }
        let mut t = Self {
            rank,
            buf,
            parent,
            children,
            early: BTreeMap::new(),
            next_child: 0,
            got_down: false,
            pending: VecDeque::new(),
            reduced: false,
        };
        t.advance();
        t
    }

    /// Applies buffered children in order; when all are in, sends up or starts the broadcast.
    fn advance(&mut self) {
        while let Some(data) = self.early.remove(&self.next_child) {
            for (d, s) in self.buf.iter_mut().zip(&data) {
                *d += *s;
            }
            self.next_child += 1;
        }
        if self.reduced || self.next_child < self.children.len() {
            return;
        }
        self.reduced = true;
        match self.parent {
            Some((p, k)) => self.pending.push_back((p, k)),
            None => self.send_down(),
        }
    }

    fn send_down(&mut self) {
        for &(c, k) in self.children.iter().rev() {
            self.pending.push_back((c, DOWN + k));
        }
    }

    fn poll_send(&mut self) -> Option<SendAction> {
        let (to, step) = self.pending.pop_front()?;
        Some(SendAction { to, tag: ChunkTag { step, segment: 0 }, data: SendData::Bytes(bytes_of_f32(&self.buf)) })
    }

    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError> {
        check_len("all_reduce", from, data, Compression::None, self.buf.len())?;
        if tag.step >= DOWN {
            if self.parent.map(|p| p.0) != Some(from) || self.got_down || !self.reduced {
                return Err(protocol("all_reduce", from, "unexpected result from the tree".into()));
            }
            copy_from(&mut self.buf, data);
            self.got_down = true;
            self.send_down();
            return Ok(Received::Done);
        }
        let Some(i) = self.children.iter().position(|&(c, k)| c == from && k == tag.step) else {
            return Err(protocol(
                "all_reduce",
                from,
                format!("rank {} is not a child of rank {} at level {}", from, self.rank, tag.step),
            ));
        };
        if i < self.next_child || self.early.contains_key(&i) {
            return Err(protocol("all_reduce", from, "repeated partial sum".into()));
        }
        self.early.insert(i, f32s_of(data));
        self.advance();
        Ok(Received::Done)
    }
}

/// The [`Machine`] methods of a machine that is a [`Ring`] in field `ring`.
macro_rules! ring_machine {
    () => {
        fn wire_dtype(&self) -> DType {
            self.ring.wire.dtype()
        }
        fn poll_send(&mut self) -> Option<SendAction> {
            self.ring.poll_send()
        }
        fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError> {
            self.ring.on_receive(from, tag, data)
        }
        fn is_done(&self) -> bool {
            self.ring.is_done()
        }
        fn waiting_on(&self) -> Vec<Rank> {
            self.ring.waiting_on()
        }
    };
}

/// Divides a sum by the world size when the operation is a mean.
fn finish_mean(op: ReduceOp, world: usize, mut out: Vec<f32>) -> Vec<f32> {
    if op == ReduceOp::Mean {
        let s = 1.0 / world as f32;
        out.iter_mut().for_each(|v| *v *= s);
    }
    out
}

/// All-reduce of one buffer across a group.
pub struct AllReduce {
    inner: AllReduceInner,
    op: ReduceOp,
    world: usize,
}

enum AllReduceInner {
    Ring(Ring),
    Tree(Tree),
}

impl AllReduce {
    /// All-reduce of `buf` on `rank` of `world`, in segments of `seg_len` elements (ring).
    pub fn new(
        rank: Rank,
        world: usize,
        buf: Vec<f32>,
        op: ReduceOp,
        algorithm: Algorithm,
        seg_len: usize,
    ) -> Result<Self, CollectiveError> {
        Self::compressed(rank, world, buf, op, algorithm, seg_len, Compression::None)
    }

    /// As [`AllReduce::new`], with values travelling in the `wire` format (see
    /// [`Compression`]). A compressed all-reduce always runs the ring.
    pub fn compressed(
        rank: Rank,
        world: usize,
        buf: Vec<f32>,
        op: ReduceOp,
        algorithm: Algorithm,
        seg_len: usize,
        wire: Compression,
    ) -> Result<Self, CollectiveError> {
        check_world("all_reduce", rank, world)?;
        let tree = wire == Compression::None
            && match algorithm {
                Algorithm::Tree => true,
                Algorithm::Ring => false,
                Algorithm::Auto => buf.len() * 4 <= TREE_BYTES_MAX_DEFAULT,
            };
        let inner = if tree {
            AllReduceInner::Tree(Tree::new(rank, world, buf))
        } else {
            let chunks = even_ranges(buf.len(), world);
            AllReduceInner::Ring(Ring::new("all_reduce", RingMode::AllReduce, rank, world, buf, chunks, seg_len, wire))
        };
        Ok(Self { inner, op, world })
    }

    /// Whether this instance runs the tree algorithm.
    pub fn is_tree(&self) -> bool {
        matches!(self.inner, AllReduceInner::Tree(_))
    }
}

impl Machine for AllReduce {
    fn name(&self) -> &'static str {
        "all_reduce"
    }

    fn wire_dtype(&self) -> DType {
        match &self.inner {
            AllReduceInner::Ring(r) => r.wire.dtype(),
            AllReduceInner::Tree(_) => DType::F32,
        }
    }

    fn poll_send(&mut self) -> Option<SendAction> {
        match &mut self.inner {
            AllReduceInner::Ring(r) => r.poll_send(),
            AllReduceInner::Tree(t) => t.poll_send(),
        }
    }

    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError> {
        match &mut self.inner {
            AllReduceInner::Ring(r) => r.on_receive(from, tag, data),
            AllReduceInner::Tree(t) => t.on_receive(from, tag, data),
        }
    }

    fn is_done(&self) -> bool {
        match &self.inner {
            AllReduceInner::Ring(r) => r.is_done(),
            AllReduceInner::Tree(t) => t.reduced && t.pending.is_empty() && (t.parent.is_none() || t.got_down),
        }
    }

    fn waiting_on(&self) -> Vec<Rank> {
        match &self.inner {
            AllReduceInner::Ring(r) => r.waiting_on(),
            AllReduceInner::Tree(t) => {
                let mut w: Vec<Rank> = t.children[t.next_child..].iter().map(|c| c.0).collect();
                if let (Some((p, _)), true, false) = (t.parent, t.reduced, t.got_down) {
                    w.push(p);
                }
                w
            }
        }
    }

    fn take_result(&mut self) -> Vec<f32> {
        let out = match &mut self.inner {
            AllReduceInner::Ring(r) => r.take_out(),
            AllReduceInner::Tree(t) => std::mem::take(&mut t.buf),
        };
        finish_mean(self.op, self.world, out)
    }
}

/// Reduce-scatter: rank `r` ends with chunk `r` (of [`even_ranges`]) of the reduced buffer.
pub struct ReduceScatter {
    ring: Ring,
    op: ReduceOp,
}

impl ReduceScatter {
    /// Reduce-scatter of `buf` on `rank` of `world`.
    pub fn new(rank: Rank, world: usize, buf: Vec<f32>, op: ReduceOp, seg_len: usize) -> Result<Self, CollectiveError> {
        check_world("reduce_scatter", rank, world)?;
        let chunks = even_ranges(buf.len(), world);
        let ring =
            Ring::new("reduce_scatter", RingMode::ReduceScatter, rank, world, buf, chunks, seg_len, Compression::None);
        Ok(Self { ring, op })
    }
}

impl Machine for ReduceScatter {
    fn name(&self) -> &'static str {
        "reduce_scatter"
    }
    ring_machine!();
    fn take_result(&mut self) -> Vec<f32> {
        let mine = self.ring.chunks[self.ring.rank].clone();
        finish_mean(self.op, self.ring.world, self.ring.acc.slice(mine).to_vec())
    }
}

/// All-gather: every rank contributes `len` elements; all end with the concatenation in
/// rank order.
pub struct AllGather {
    ring: Ring,
}

impl AllGather {
    /// All-gather of `mine` on `rank` of `world`.
    pub fn new(rank: Rank, world: usize, mine: &[f32], seg_len: usize) -> Result<Self, CollectiveError> {
        check_world("all_gather", rank, world)?;
        let m = mine.len();
        let mut buf = vec![0.0; m * world];
        buf[rank * m..(rank + 1) * m].copy_from_slice(mine);
        let chunks = (0..world).map(|b| b * m..(b + 1) * m).collect();
        Ok(Self {
            ring: Ring::new("all_gather", RingMode::AllGather, rank, world, buf, chunks, seg_len, Compression::None),
        })
    }
}

impl Machine for AllGather {
    fn name(&self) -> &'static str {
        "all_gather"
    }
    ring_machine!();
    fn take_result(&mut self) -> Vec<f32> {
        self.ring.take_out()
    }
}

/// Broadcast from `root` along a pipelined chain `root, root+1, ...`: each rank forwards
/// a segment, as it arrived, as soon as it has it.
pub struct Broadcast {
    buf: Vec<f32>,
    seg_len: usize,
    prev: Option<Rank>,
    next: Option<Rank>,
    got: Vec<bool>,
    received: usize,
    pending: VecDeque<usize>,
    sends_left: usize,
}

impl Broadcast {
    /// Broadcast of `len` elements; `buf` holds the data on the root and is ignored (but
    /// must have `len` elements) elsewhere.
    pub fn new(rank: Rank, world: usize, root: Rank, buf: Vec<f32>, seg_len: usize) -> Result<Self, CollectiveError> {
        check_world("broadcast", rank, world)?;
        check_world("broadcast", root, world)?;
        let pos = (rank + world - root) % world;
        let seg_len = seg_len.max(1);
        let segs = buf.len().div_ceil(seg_len);
        let next = (pos + 1 < world).then_some((rank + 1) % world);
        let prev = (pos > 0).then_some((rank + world - 1) % world);
        let pending = if prev.is_none() && next.is_some() { (0..segs).collect() } else { VecDeque::new() };
        Ok(Self {
            buf,
            seg_len,
            prev,
            next,
            got: vec![prev.is_none(); segs],
            received: if prev.is_none() { segs } else { 0 },
            pending,
            sends_left: if next.is_some() { segs } else { 0 },
        })
    }
}

impl Machine for Broadcast {
    fn name(&self) -> &'static str {
        "broadcast"
    }
    fn poll_send(&mut self) -> Option<SendAction> {
        let k = self.pending.pop_front()?;
        self.sends_left -= 1;
        let tag = ChunkTag { step: 0, segment: k as u32 };
        let data = if self.prev.is_some() {
            SendData::Forward(tag)
        } else {
            SendData::Bytes(bytes_of_f32(&self.buf[segment(&(0..self.buf.len()), self.seg_len, k)]))
        };
        Some(SendAction { to: self.next.expect("only ranks with a successor queue sends"), tag, data })
    }
    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError> {
        let k = tag.segment as usize;
        if Some(from) != self.prev || tag.step != 0 || k >= self.got.len() || self.got[k] {
            return Err(protocol("broadcast", from, format!("unexpected segment {k}")));
        }
        let range = segment(&(0..self.buf.len()), self.seg_len, k);
        check_len("broadcast", from, data, Compression::None, range.len())?;
        copy_from(&mut self.buf[range], data);
        self.got[k] = true;
        self.received += 1;
        if self.next.is_some() {
            self.pending.push_back(k);
            return Ok(Received::Keep);
        }
        Ok(Received::Done)
    }
    fn is_done(&self) -> bool {
        self.received == self.got.len() && self.sends_left == 0
    }
    fn waiting_on(&self) -> Vec<Rank> {
        match self.prev {
            Some(p) if self.received < self.got.len() => vec![p],
            _ => Vec::new(),
        }
    }
    fn take_result(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.buf)
    }
}

/// Point-to-point send of a buffer to one rank, in segments.
pub struct Send {
    buf: Vec<f32>,
    to: Rank,
    seg_len: usize,
    next: usize,
    segs: usize,
}

impl Send {
    /// Sends `buf` to `to`.
    pub fn new(to: Rank, buf: Vec<f32>, seg_len: usize) -> Self {
        let seg_len = seg_len.max(1);
        let segs = buf.len().div_ceil(seg_len);
        Self { buf, to, seg_len, next: 0, segs }
    }
}

impl Machine for Send {
    fn name(&self) -> &'static str {
        "send"
    }
    fn poll_send(&mut self) -> Option<SendAction> {
        (self.next < self.segs).then(|| {
            let k = self.next;
            self.next += 1;
            let range = segment(&(0..self.buf.len()), self.seg_len, k);
            SendAction {
                to: self.to,
                tag: ChunkTag { step: 0, segment: k as u32 },
                data: SendData::Bytes(bytes_of_f32(&self.buf[range])),
            }
        })
    }
    fn on_receive(&mut self, from: Rank, _: ChunkTag, _: &[&[u8]]) -> Result<Received, CollectiveError> {
        Err(protocol("send", from, "a sender receives nothing".into()))
    }
    fn is_done(&self) -> bool {
        self.next == self.segs
    }
    fn waiting_on(&self) -> Vec<Rank> {
        Vec::new()
    }
    fn take_result(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.buf)
    }
}

/// Point-to-point receive of `len` elements from one rank.
pub struct Recv {
    buf: Vec<f32>,
    from: Rank,
    seg_len: usize,
    got: Vec<bool>,
    received: usize,
}

impl Recv {
    /// Receives `len` elements from `from`.
    pub fn new(from: Rank, len: usize, seg_len: usize) -> Self {
        Self::into_buffer(from, vec![0.0; len], seg_len)
    }

    /// Receives `buf.len()` elements from `from` into `buf` (reusing its memory).
    pub fn into_buffer(from: Rank, buf: Vec<f32>, seg_len: usize) -> Self {
        let seg_len = seg_len.max(1);
        let segs = buf.len().div_ceil(seg_len);
        Self { buf, from, seg_len, got: vec![false; segs], received: 0 }
    }
}

impl Machine for Recv {
    fn name(&self) -> &'static str {
        "recv"
    }
    fn poll_send(&mut self) -> Option<SendAction> {
        None
    }
    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[&[u8]]) -> Result<Received, CollectiveError> {
        let k = tag.segment as usize;
        if from != self.from || k >= self.got.len() || self.got[k] {
            return Err(protocol("recv", from, format!("unexpected segment {k}")));
        }
        let range = segment(&(0..self.buf.len()), self.seg_len, k);
        check_len("recv", from, data, Compression::None, range.len())?;
        copy_from(&mut self.buf[range], data);
        self.got[k] = true;
        self.received += 1;
        Ok(Received::Done)
    }
    fn is_done(&self) -> bool {
        self.received == self.got.len()
    }
    fn waiting_on(&self) -> Vec<Rank> {
        if self.is_done() { Vec::new() } else { vec![self.from] }
    }
    fn take_result(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.buf)
    }
}
