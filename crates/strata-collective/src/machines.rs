//! The state machines: ring and tree all-reduce, reduce-scatter, all-gather,
//! pipelined broadcast, and point-to-point send and receive.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

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

/// Data a machine wants sent: elements `range` of its buffer to rank `to`, labelled `tag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendAction {
    /// Destination rank.
    pub to: Rank,
    /// Label the receiver matches on.
    pub tag: ChunkTag,
    /// Elements of [`Machine::buffer`] to send.
    pub range: Range<usize>,
}

/// The interface the driver uses.
pub trait Machine: std::marker::Send {
    /// Operation name for errors.
    fn name(&self) -> &'static str;
    /// The next send, if one is ready.
    fn poll_send(&mut self) -> Option<SendAction>;
    /// Data from `from` labelled `tag` arrived.
    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[f32]) -> Result<(), CollectiveError>;
    /// Whether every receive happened and every send was handed out.
    fn is_done(&self) -> bool;
    /// The rank's buffer (sends read from it).
    fn buffer(&self) -> &[f32];
    /// Ranks this machine still expects data from.
    fn waiting_on(&self) -> Vec<Rank>;
    /// The result, once done.
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
/// `t` sends chunk `r - t` and copies chunk `r - t - 1`. Chunks travel in segments, and
/// segment `k` of a step is sent as soon as segment `k` of the previous step arrived,
/// so sending, receiving and adding overlap.
struct Ring {
    op: &'static str,
    rank: Rank,
    world: usize,
    buf: Vec<f32>,
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
    fn new(
        op: &'static str,
        mode: RingMode,
        rank: Rank,
        world: usize,
        buf: Vec<f32>,
        chunks: Vec<Range<usize>>,
        seg_len: usize,
    ) -> Self {
        let rs_steps = if mode == RingMode::AllGather { 0 } else { world - 1 };
        let ag_steps = if mode == RingMode::ReduceScatter { 0 } else { world - 1 };
        let mut ring = Self {
            op,
            rank,
            world,
            buf,
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

    fn poll_send(&mut self) -> Option<SendAction> {
        let (step, k) = self.pending.pop_front()?;
        self.sends_left -= 1;
        let range = segment(&self.chunks[self.send_chunk(step)], self.seg_len, k);
        Some(SendAction { to: self.right(), tag: ChunkTag { step: step as u32, segment: k as u32 }, range })
    }

    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[f32]) -> Result<(), CollectiveError> {
        let (step, k) = (tag.step as usize, tag.segment as usize);
        if from != self.left() {
            return Err(protocol(self.op, from, format!("rank {} only receives from rank {}", self.rank, self.left())));
        }
        if step >= self.steps || k >= self.got[step].len() || self.got[step][k] {
            return Err(protocol(self.op, from, format!("unexpected or repeated segment {k} of step {step}")));
        }
        let range = segment(&self.chunks[self.recv_chunk(step)], self.seg_len, k);
        if data.len() != range.len() {
            return Err(protocol(
                self.op,
                from,
                format!("segment has {} elements, expected {}", data.len(), range.len()),
            ));
        }
        let dst = &mut self.buf[range];
        if step < self.rs_steps {
            for (d, s) in dst.iter_mut().zip(data) {
                *d += *s;
            }
        } else {
            dst.copy_from_slice(data);
        }
        self.got[step][k] = true;
        self.received += 1;
        if step + 1 < self.steps {
            self.pending.push_back((step + 1, k));
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.received == self.expected && self.sends_left == 0
    }

    fn waiting_on(&self) -> Vec<Rank> {
        if self.received < self.expected { vec![self.left()] } else { Vec::new() }
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
    pending: VecDeque<SendAction>,
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

    fn whole(&self) -> Range<usize> {
        0..self.buf.len()
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
            Some((p, k)) => {
                self.pending.push_back(SendAction { to: p, tag: ChunkTag { step: k, segment: 0 }, range: self.whole() })
            }
            None => self.send_down(),
        }
    }

    fn send_down(&mut self) {
        for &(c, k) in self.children.iter().rev() {
            self.pending.push_back(SendAction {
                to: c,
                tag: ChunkTag { step: DOWN + k, segment: 0 },
                range: self.whole(),
            });
        }
    }
}

/// The [`Machine`] methods of a machine that is a [`Ring`] in field `ring`.
macro_rules! ring_machine {
    () => {
        fn poll_send(&mut self) -> Option<SendAction> {
            self.ring.poll_send()
        }
        fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[f32]) -> Result<(), CollectiveError> {
            self.ring.on_receive(from, tag, data)
        }
        fn is_done(&self) -> bool {
            self.ring.is_done()
        }
        fn buffer(&self) -> &[f32] {
            &self.ring.buf
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
        check_world("all_reduce", rank, world)?;
        let tree = match algorithm {
            Algorithm::Tree => true,
            Algorithm::Ring => false,
            Algorithm::Auto => buf.len() * 4 <= TREE_BYTES_MAX_DEFAULT,
        };
        let inner = if tree {
            AllReduceInner::Tree(Tree::new(rank, world, buf))
        } else {
            let chunks = even_ranges(buf.len(), world);
            AllReduceInner::Ring(Ring::new("all_reduce", RingMode::AllReduce, rank, world, buf, chunks, seg_len))
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

    fn poll_send(&mut self) -> Option<SendAction> {
        match &mut self.inner {
            AllReduceInner::Ring(r) => r.poll_send(),
            AllReduceInner::Tree(t) => t.pending.pop_front(),
        }
    }

    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[f32]) -> Result<(), CollectiveError> {
        match &mut self.inner {
            AllReduceInner::Ring(r) => r.on_receive(from, tag, data),
            AllReduceInner::Tree(t) => {
                if data.len() != t.buf.len() {
                    return Err(protocol(
                        "all_reduce",
                        from,
                        format!("{} elements, expected {}", data.len(), t.buf.len()),
                    ));
                }
                if tag.step >= DOWN {
                    if t.parent.map(|p| p.0) != Some(from) || t.got_down || !t.reduced {
                        return Err(protocol("all_reduce", from, "unexpected result from the tree".into()));
                    }
                    t.buf.copy_from_slice(data);
                    t.got_down = true;
                    t.send_down();
                    return Ok(());
                }
                let Some(i) = t.children.iter().position(|&(c, k)| c == from && k == tag.step) else {
                    return Err(protocol(
                        "all_reduce",
                        from,
                        format!("rank {} is not a child of rank {} at level {}", from, t.rank, tag.step),
                    ));
                };
                if i < t.next_child || t.early.contains_key(&i) {
                    return Err(protocol("all_reduce", from, "repeated partial sum".into()));
                }
                t.early.insert(i, data.to_vec());
                t.advance();
                Ok(())
            }
        }
    }

    fn is_done(&self) -> bool {
        match &self.inner {
            AllReduceInner::Ring(r) => r.is_done(),
            AllReduceInner::Tree(t) => t.reduced && t.pending.is_empty() && (t.parent.is_none() || t.got_down),
        }
    }

    fn buffer(&self) -> &[f32] {
        match &self.inner {
            AllReduceInner::Ring(r) => &r.buf,
            AllReduceInner::Tree(t) => &t.buf,
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
            AllReduceInner::Ring(r) => std::mem::take(&mut r.buf),
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
        Ok(Self { ring: Ring::new("reduce_scatter", RingMode::ReduceScatter, rank, world, buf, chunks, seg_len), op })
    }
}

impl Machine for ReduceScatter {
    fn name(&self) -> &'static str {
        "reduce_scatter"
    }
    ring_machine!();
    fn take_result(&mut self) -> Vec<f32> {
        let mine = self.ring.chunks[self.ring.rank].clone();
        finish_mean(self.op, self.ring.world, self.ring.buf[mine].to_vec())
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
        Ok(Self { ring: Ring::new("all_gather", RingMode::AllGather, rank, world, buf, chunks, seg_len) })
    }
}

impl Machine for AllGather {
    fn name(&self) -> &'static str {
        "all_gather"
    }
    ring_machine!();
    fn take_result(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.ring.buf)
    }
}

/// Broadcast from `root` along a pipelined chain `root, root+1, ...`: each rank forwards
/// a segment as soon as it has it.
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
        let range = segment(&(0..self.buf.len()), self.seg_len, k);
        Some(SendAction {
            to: self.next.expect("only ranks with a successor queue sends"),
            tag: ChunkTag { step: 0, segment: k as u32 },
            range,
        })
    }
    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[f32]) -> Result<(), CollectiveError> {
        let k = tag.segment as usize;
        if Some(from) != self.prev || tag.step != 0 || k >= self.got.len() || self.got[k] {
            return Err(protocol("broadcast", from, format!("unexpected segment {k}")));
        }
        let range = segment(&(0..self.buf.len()), self.seg_len, k);
        if data.len() != range.len() {
            return Err(protocol(
                "broadcast",
                from,
                format!("segment has {} elements, expected {}", data.len(), range.len()),
            ));
        }
        self.buf[range].copy_from_slice(data);
        self.got[k] = true;
        self.received += 1;
        if self.next.is_some() {
            self.pending.push_back(k);
        }
        Ok(())
    }
    fn is_done(&self) -> bool {
        self.received == self.got.len() && self.sends_left == 0
    }
    fn buffer(&self) -> &[f32] {
        &self.buf
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
            SendAction {
                to: self.to,
                tag: ChunkTag { step: 0, segment: k as u32 },
                range: segment(&(0..self.buf.len()), self.seg_len, k),
            }
        })
    }
    fn on_receive(&mut self, from: Rank, _: ChunkTag, _: &[f32]) -> Result<(), CollectiveError> {
        Err(protocol("send", from, "a sender receives nothing".into()))
    }
    fn is_done(&self) -> bool {
        self.next == self.segs
    }
    fn buffer(&self) -> &[f32] {
        &self.buf
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
    fn on_receive(&mut self, from: Rank, tag: ChunkTag, data: &[f32]) -> Result<(), CollectiveError> {
        let k = tag.segment as usize;
        if from != self.from || k >= self.got.len() || self.got[k] {
            return Err(protocol("recv", from, format!("unexpected segment {k}")));
        }
        let range = segment(&(0..self.buf.len()), self.seg_len, k);
        if data.len() != range.len() {
            return Err(protocol(
                "recv",
                from,
                format!("segment has {} elements, expected {}", data.len(), range.len()),
            ));
        }
        self.buf[range].copy_from_slice(data);
        self.got[k] = true;
        self.received += 1;
        Ok(())
    }
    fn is_done(&self) -> bool {
        self.received == self.got.len()
    }
    fn buffer(&self) -> &[f32] {
        &self.buf
    }
    fn waiting_on(&self) -> Vec<Rank> {
        if self.is_done() { Vec::new() } else { vec![self.from] }
    }
    fn take_result(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.buf)
    }
}
