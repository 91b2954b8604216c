//! Collectives over device tensors: the data goes from a GPU actor's tensor into the
//! collective and back without passing through the caller.
//!
//! [`Group::all_reduce_tensor`] cuts the tensor into pieces of [`TensorReduce::piece_len`]
//! elements and runs every piece as an all-reduce of its own: each piece is read from
//! the device straight into a pooled buffer that becomes the ring's accumulator (one host
//! copy, out of the mapped staging buffer), and the piece's result is written back from
//! the buffer the all-reduce assembled it in (one copy into the queue's staging). All the
//! reads are queued on the GPU actor at once, in piece order, so they go ahead of work
//! queued after the call; a piece's ring starts as soon as its own read is done, and its
//! write-back is queued as soon as its ring is, so on a device with its own memory the
//! transfers of one piece overlap the network time of the others.
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

use crate::CollectiveError;
use crate::driver::Group;
use crate::machines::{AllReduce, Compression, ReduceOp};

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
        Self { op, wire: Compression::None, piece_len: 256 << 10 }
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
        let pieces = spec.pieces(len);
        // Operation ids are taken now, in piece order, before anything waits, so that they
        // agree on every rank whatever order the pieces finish in.
        let ops: Vec<u64> = pieces.iter().map(|_| self.next_op()).collect();
        let prepare = Mutex::new(prepare);
        let prepare = &prepare;
        let futures: Vec<_> = pieces
            .into_iter()
            .zip(ops)
            .map(|(range, op)| async move {
                let result = self.reduce_piece(gpu, src, dst, len, spec, range, op, prepare).await;
                if let Err(e) = &result
                    && matches!(e, CollectiveError::Device { .. } | CollectiveError::Argument { .. })
                {
                    // The ring never ran here: the others would wait for it until their
                    // timeout.
                    self.abort_peers(op, e.to_string()).await;
                }
                result
            })
            .collect();
        join_all(futures).await.into_iter().collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn reduce_piece<P>(
        &self,
        gpu: &GpuHandle,
        src: TensorId,
        dst: TensorId,
        len: usize,
        spec: &TensorReduce,
        range: Range<usize>,
        op: u64,
        prepare: &Mutex<P>,
    ) -> Result<(), CollectiveError>
    where
        P: FnMut(Range<usize>, &mut [f32]) + Send,
    {
        fn device(e: strata_gpu::GpuError) -> CollectiveError {
            CollectiveError::Device { op: OP, message: e.to_string() }
        }
        let mut buf = take_f32(range.len());
        buf.resize(range.len(), 0.0);
        let r = range.clone();
        let mut buf = gpu
            .with(move |ex| {
                for (what, id) in [("source", src), ("destination", dst)] {
                    let n = ex.get(id).map_err(device)?.numel();
                    if n != len {
                        let message = format!("the {what} tensor has {n} elements, the call says {len}");
                        return Err(CollectiveError::Argument { op: OP, message });
                    }
                }
                ex.read_range(src, r, &mut buf).map_err(device)?;
                Ok(buf)
            })
            .await
            .map_err(device)??;
        (prepare.lock().unwrap_or_else(|p| p.into_inner()))(range.clone(), &mut buf);
        let m = AllReduce::compressed(
            self.rank(),
            self.world(),
            buf,
            spec.op,
            self.options().algorithm,
            self.options().seg_len,
            spec.wire,
        )?;
        let out = self.run(op, m).await?;
        let out = gpu.write_range(dst, range.start, out).await.map_err(device)?;
        recycle(out);
        Ok(())
    }
}

/// Polls every future to completion and returns their outputs in order. Unlike a
/// `try_join`, it does not drop the others at the first error: each one is an operation
/// other ranks take part in, and it must end on its own (done, failed or aborted).
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}
