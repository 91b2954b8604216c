//! Collectives over device tensors: the data goes from a GPU actor's tensor into the
//! collective and back without passing through the caller.
//!
//! [`Group::all_reduce_tensor`] cuts the tensor into pieces of [`TensorReduce::piece_len`]
//! elements and runs every piece as an all-reduce of its own: each piece is read from
//! the device straight into a pooled buffer that becomes the ring's accumulator (one host
//! copy, out of the mapped staging buffer), and the piece's result is written back from
//! the buffer the all-reduce assembled it in (one copy into the queue's staging). Up to
//! eight pieces run at once, their reads queued on the GPU actor together, in piece
//! order, so they go ahead of work queued after the call; a piece's ring starts as soon as
//! its own read is done, and its write-back is queued as soon as its ring is, so on a
//! device with its own memory the transfers of one piece overlap the network time of the
//! others. A call takes one operation id of the group whatever its length; its pieces'
//! ids derive from it.
//!
//! The pieces fix the summation order: every rank must pass the same length and
//! [`TensorReduce`], and then every rank gets bitwise the same result, as with
//! [`Group::all_reduce`].

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;

use strata_gpu::{GpuHandle, TensorId};
use strata_net::buffers::{recycle, take_f32};
use strata_tensor::shard::even_ranges;

use crate::driver::{Group, fnv};
use crate::machines::{self, AllReduce, Broadcast, Compression, Machine, Recv, ReduceOp};
use crate::{CollectiveError, Rank};

/// Elements per piece unless a call says otherwise (256 Ki, 1 MiB of f32).
pub const PIECE_LEN_DEFAULT: usize = 256 << 10;

const OP: &str = "all_reduce_tensor";

/// What [`Group::all_reduce_tensor`] computes and how it cuts the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorReduce {
    /// Sum or mean over the ranks.
    pub op: ReduceOp,
    /// The values' format on the wire (see [`Compression`]).
    pub wire: Compression,
    /// Largest piece, in elements (default 256 Ki, 1 MiB of f32): smaller pieces start
    /// the network sooner after the first read; every piece is one operation.
    pub piece_len: usize,
}

impl TensorReduce {
    /// `op` with f32 on the wire and 256 Ki-element pieces.
    pub fn new(op: ReduceOp) -> Self {
        Self { op, wire: Compression::None, piece_len: PIECE_LEN_DEFAULT }
    }

    /// The same with values travelling in `wire`.
    pub fn wire(self, wire: Compression) -> Self {
        Self { wire, ..self }
    }

    /// The same with pieces of at most `piece_len` elements.
    pub fn piece_len(self, piece_len: usize) -> Self {
        Self { piece_len, ..self }
    }

    /// The element ranges of a tensor of `len` elements, one per piece: as few pieces of
    /// at most `piece_len` as cover it, of lengths differing by at most one.
    pub fn pieces(&self, len: usize) -> Vec<Range<usize>> {
        if len == 0 {
            return Vec::new();
        }
        even_ranges(len, len.div_ceil(self.piece_len.max(1)))
    }
}

impl Group {
    /// All-reduces the `len` elements of device tensor `src` into device tensor `dst`
    /// (which may be `src`), both held by `gpu`'s actor (see the module docs). Every rank
    /// gets bitwise the same `dst`.
    ///
    /// Fails, and tells the other ranks, when a tensor is missing, is not `len` f32
    /// elements long, or the device fails; on any error `dst` may hold some pieces
    /// reduced and others not.
    pub async fn all_reduce_tensor(
        &self,
        gpu: &GpuHandle,
        src: TensorId,
        dst: TensorId,
        len: usize,
        spec: &TensorReduce,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_tensor_with(gpu, src, dst, len, spec, |_, _| {}).await
    }

    /// As [`Group::all_reduce_tensor`], with `prepare` applied on the host to each piece
    /// after it is read and before it enters the all-reduce, given the piece's element
    /// range in the tensor: scaling, or error feedback for compressed gradients. Pieces
    /// are prepared in the order their reads finish, which is piece order.
    pub async fn all_reduce_tensor_with<P>(
        &self,
        gpu: &GpuHandle,
        src: TensorId,
        dst: TensorId,
        len: usize,
        spec: &TensorReduce,
        prepare: P,
    ) -> Result<(), CollectiveError>
    where
        P: FnMut(Range<usize>, &mut [f32]) + Send,
    {
        if spec.piece_len == 0 {
            return Err(CollectiveError::Argument { op: OP, message: "pieces of 0 elements".into() });
        }
        let io = PieceIo { name: OP, read: Some(src), write: Some(dst), len };
        io.check_size(gpu)?;
        let pieces = spec.pieces(len);
        let ops = piece_ops(self.next_op(), pieces.len());
        let (rank, world, options) = (self.rank(), self.world(), self.options().clone());
        self.run_pieces(gpu, io, pieces, ops, prepare, |_, buf| {
            AllReduce::compressed(rank, world, buf, spec.op, options.algorithm, options.seg_len, spec.wire)
        })
        .await
    }

    /// Rank `root`'s device tensor `id` into every rank's `id` (each of `len` f32
    /// elements; other ranks' contents are overwritten), in pieces of
    /// [`PIECE_LEN_DEFAULT`] elements as [`Group::all_reduce_tensor`] does.
    pub async fn broadcast_tensor(
        &self,
        gpu: &GpuHandle,
        root: Rank,
        id: TensorId,
        len: usize,
    ) -> Result<(), CollectiveError> {
        const NAME: &str = "broadcast_tensor";
        if root >= self.world() {
            let message = format!("root {root} is not a rank of a group of {}", self.world());
            return Err(CollectiveError::Argument { op: NAME, message });
        }
        let mine = root == self.rank();
        let io = PieceIo { name: NAME, read: mine.then_some(id), write: (!mine).then_some(id), len };
        io.check_size(gpu)?;
        let pieces = TensorReduce::new(ReduceOp::Sum).pieces(len);
        let ops = piece_ops(self.next_op(), pieces.len());
        let (rank, world, seg_len) = (self.rank(), self.world(), self.options().seg_len);
        self.run_pieces(gpu, io, pieces, ops, |_, _| {}, |_, buf| Broadcast::new(rank, world, root, buf, seg_len)).await
    }

    /// Sends this rank's device tensor `id` (`len` f32 elements) to rank `to`, which
    /// calls [`Group::recv_tensor`] with the same length.
    pub async fn send_tensor(
        &self,
        gpu: &GpuHandle,
        to: Rank,
        id: TensorId,
        len: usize,
    ) -> Result<(), CollectiveError> {
        self.check_peer("send_tensor", to)?;
        let io = PieceIo { name: "send_tensor", read: Some(id), write: None, len };
        io.check_size(gpu)?;
        let pieces = TensorReduce::new(ReduceOp::Sum).pieces(len);
        let ops = piece_ops(self.p2p_op(self.rank(), to), pieces.len());
        let seg_len = self.options().seg_len;
        self.run_pieces(gpu, io, pieces, ops, |_, _| {}, |_, buf| Ok(machines::Send::new(to, buf, seg_len))).await
    }

    /// Receives `len` f32 elements from rank `from` (its [`Group::send_tensor`]) into this
    /// rank's existing device tensor `id` of that length.
    pub async fn recv_tensor(
        &self,
        gpu: &GpuHandle,
        from: Rank,
        id: TensorId,
        len: usize,
    ) -> Result<(), CollectiveError> {
        self.check_peer("recv_tensor", from)?;
        let io = PieceIo { name: "recv_tensor", read: None, write: Some(id), len };
        io.check_size(gpu)?;
        let pieces = TensorReduce::new(ReduceOp::Sum).pieces(len);
        let ops = piece_ops(self.p2p_op(from, self.rank()), pieces.len());
        let seg_len = self.options().seg_len;
        self.run_pieces(gpu, io, pieces, ops, |_, _| {}, |_, buf| Ok(Recv::into_buffer(from, buf, seg_len))).await
    }

    /// Runs one operation per piece, up to [`PIECES_IN_FLIGHT`] at once (see the module
    /// docs): read the piece (or start from zeros), prepare it, run `make`'s machine,
    /// write its result. After a failure no further piece starts, and the pieces other
    /// ranks may have started meanwhile are aborted, so they stop too.
    async fn run_pieces<P, M, F>(
        &self,
        gpu: &GpuHandle,
        io: PieceIo,
        pieces: Vec<Range<usize>>,
        ops: Vec<u64>,
        prepare: P,
        make: F,
    ) -> Result<(), CollectiveError>
    where
        P: FnMut(Range<usize>, &mut [f32]) + Send,
        M: Machine + 'static,
        F: Fn(Range<usize>, Vec<f32>) -> Result<M, CollectiveError>,
    {
        let prepare = Mutex::new(prepare);
        let (prepare, make, io) = (&prepare, &make, &io);
        let futures: Vec<_> = pieces
            .into_iter()
            .zip(ops.iter().copied())
            .map(|(range, op)| async move {
                let result = async {
                    let mut buf = io.fetch(gpu, range.clone()).await?;
                    if io.read.is_some() {
                        (prepare.lock().unwrap_or_else(|p| p.into_inner()))(range.clone(), &mut buf);
                    }
                    make(range.clone(), buf)
                }
                .await;
                let machine = match result {
                    Ok(m) => m,
                    Err(e) => {
                        // The operation never ran here: drop what peers sent for it, and
                        // tell them, or they would wait for this rank until their timeout.
                        self.node().close_op(op);
                        self.abort_peers(op, e.to_string()).await;
                        return Err(e);
                    }
                };
                let out = self.run(op, machine).await?;
                match io.write {
                    Some(dst) => recycle(gpu.write_range(dst, range.start, out).await.map_err(|e| io.device(e))?),
                    None => recycle(out),
                }
                Ok(())
            })
            .collect();
        let (results, started) = windowed(futures, PIECES_IN_FLIGHT).await;
        let failed = results.iter().flatten().find_map(|r| r.as_ref().err()).cloned();
        if let Some(e) = failed {
            // Peers run at most a window ahead of this rank: abort the pieces they may have
            // started that this rank never will.
            for &op in ops.iter().skip(started).take(PIECES_IN_FLIGHT) {
                self.abort_peers(op, e.to_string()).await;
            }
            return Err(e);
        }
        Ok(())
    }
}

/// Pieces of one call that run at once. A rank that is ahead sends data for operations a
/// slower rank has not opened yet, which the node holds only for a bounded number of
/// operations per peer (64); the window keeps a call well inside that bound.
const PIECES_IN_FLIGHT: usize = 8;

/// The operation ids of `n` pieces, derived from the call's one id, so that a call whose
/// piece count differs between ranks (a length mistake) spoils only itself.
fn piece_ops(base: u64, n: usize) -> Vec<u64> {
    (0..n).map(|i| fnv(&[&base.to_le_bytes(), b"piece", &(i as u64).to_le_bytes()])).collect()
}

/// Polls the futures in order, at most `window` of them started and unfinished at once,
/// and starts no more after one returns an error; returns each one's output (`None` for
/// those never started) and how many were started. Unlike a `try_join`, it lets the
/// started ones end on their own (done, failed or aborted): each is an operation other
/// ranks take part in.
async fn windowed<F, T, E>(futures: Vec<F>, window: usize) -> (Vec<Option<Result<T, E>>>, usize)
where
    F: Future<Output = Result<T, E>>,
{
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<Result<T, E>>> = futures.iter().map(|_| None).collect();
    let (mut started, mut running, mut failed) = (0usize, 0usize, false);
    std::future::poll_fn(|cx| {
        loop {
            let mut progressed = false;
            while !failed && running < window.max(1) && started < futures.len() {
                started += 1;
                running += 1;
            }
            for (f, out) in futures.iter_mut().zip(outputs.iter_mut()).take(started) {
                if out.is_none()
                    && let Poll::Ready(v) = f.as_mut().poll(cx)
                {
                    failed |= v.is_err();
                    *out = Some(v);
                    running -= 1;
                    progressed = true;
                }
            }
            if running == 0 && (failed || started == futures.len()) {
                return Poll::Ready(());
            }
            // A finished piece frees a place: start the next one in this same poll.
            if !progressed || failed {
                return Poll::Pending;
            }
        }
    })
    .await;
    (outputs, started)
}

/// Where a device-tensor collective's pieces come from and go to on this rank.
struct PieceIo {
    name: &'static str,
    read: Option<TensorId>,
    write: Option<TensorId>,
    len: usize,
}

impl PieceIo {
    /// Refuses a length no tensor of this device can have before anything is allocated.
    fn check_size(&self, gpu: &GpuHandle) -> Result<(), CollectiveError> {
        let limit = gpu.info().max_buffer_bytes / 4;
        if self.len as u64 > limit {
            let message = format!("{} elements exceed the device's largest tensor ({limit} f32)", self.len);
            return Err(CollectiveError::Argument { op: self.name, message });
        }
        Ok(())
    }

    fn device(&self, e: strata_gpu::GpuError) -> CollectiveError {
        device_error(self.name, e)
    }

    /// The piece's input: read from the device, or zeros to receive into. Either way the
    /// tensors are first checked to hold `len` elements, in the same actor message.
    async fn fetch(&self, gpu: &GpuHandle, range: Range<usize>) -> Result<Vec<f32>, CollectiveError> {
        let mut buf = take_f32(range.len());
        buf.resize(range.len(), 0.0);
        let (name, read, write, len) = (self.name, self.read, self.write, self.len);
        let device = move |e| device_error(name, e);
        gpu.with(move |ex| {
            for (what, id) in [("source", read), ("destination", write)] {
                let Some(id) = id else { continue };
                let n = ex.get(id).map_err(device)?.numel();
                if n != len {
                    let message = format!("the {what} tensor has {n} elements, the call says {len}");
                    return Err(CollectiveError::Argument { op: name, message });
                }
            }
            if let Some(src) = read {
                ex.read_range(src, range, &mut buf).map_err(device)?;
            }
            Ok(buf)
        })
        .await
        .map_err(device)?
    }
}

fn device_error(op: &'static str, e: strata_gpu::GpuError) -> CollectiveError {
    CollectiveError::Device { op, message: e.to_string() }
}
