//! Programs of operations over tensor handles, and the executor that runs them.
//!
//! A [`Program`] names its operands by [`TensorId`]; outputs get ids chosen by the caller,
//! so one program can chain kernels (forward, loss, backward, optimiser step) without any
//! data passing through the host. [`Executor::run`] is atomic: every operation is checked
//! and recorded, and only when all succeeded are the results committed and the work
//! submitted; on an error nothing is submitted and the handle table is unchanged.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use strata_tensor::cpu::{AdamParams, ReduceOp, SgdParams};
use strata_tensor::geometry::Conv2dParams;
use strata_tensor::{DType, Element, HostTensor, Shape};

use crate::{Gpu, GpuError, GpuTensor, Result};

/// A handle to a tensor held by an [`Executor`] (and so by a GPU actor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TensorId(pub u64);

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// One operation of a program. Field names follow the [`Gpu`] methods they call.
#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Add {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    Sub {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    Mul {
        a: TensorId,
        b: TensorId,
        out: TensorId,
    },
    Scale {
        x: TensorId,
        alpha: f32,
        out: TensorId,
    },
    /// `y += alpha * x` in place.
    Axpy {
        alpha: f32,
        x: TensorId,
        y: TensorId,
    },
    Relu {
        x: TensorId,
        out: TensorId,
    },
    ReluBackward {
        x: TensorId,
        dy: TensorId,
        out: TensorId,
    },
    AddChannelBias {
        x: TensorId,
        bias: TensorId,
        out: TensorId,
    },
    MatMul {
        a: TensorId,
        b: TensorId,
        trans_a: bool,
        trans_b: bool,
        out: TensorId,
    },
    /// `relu` fuses a ReLU into the bias pass.
    Linear {
        x: TensorId,
        w: TensorId,
        bias: Option<TensorId>,
        out: TensorId,
        #[serde(default)]
        relu: bool,
    },
    /// `dx: None` skips the input gradient, `dw`/`db: None` the weight and bias gradients
    /// (both or neither).
    LinearBackward {
        x: TensorId,
        w: TensorId,
        dy: TensorId,
        dx: Option<TensorId>,
        dw: Option<TensorId>,
        db: Option<TensorId>,
    },
    /// `relu` fuses a ReLU into the output pass; `col` keeps what the backward pass can
    /// reuse (the patch matrix, or the input transform of a Winograd forward pass).
    Conv2d {
        x: TensorId,
        w: TensorId,
        bias: Option<TensorId>,
        params: Conv2dParams,
        out: TensorId,
        #[serde(default)]
        relu: bool,
        #[serde(default)]
        col: Option<TensorId>,
    },
    /// `dx: None` skips the input gradient, `dw`/`db: None` the weight and bias gradients
    /// (both or neither); `col` reuses what `Conv2d` kept.
    Conv2dBackward {
        x: TensorId,
        w: TensorId,
        dy: TensorId,
        params: Conv2dParams,
        dx: Option<TensorId>,
        dw: Option<TensorId>,
        db: Option<TensorId>,
        #[serde(default)]
        col: Option<TensorId>,
    },
    MaxPool2d {
        x: TensorId,
        kernel: (usize, usize),
        params: Conv2dParams,
        out: TensorId,
        indices: TensorId,
    },
    /// `relu_output`: the pool input came from a ReLU; apply its gradient too.
    MaxPool2dBackward {
        dy: TensorId,
        indices: TensorId,
        input_shape: Shape,
        kernel: (usize, usize),
        params: Conv2dParams,
        out: TensorId,
        #[serde(default)]
        relu_output: Option<TensorId>,
    },
    LogSoftmax {
        x: TensorId,
        out: TensorId,
    },
    LogSoftmaxBackward {
        y: TensorId,
        dy: TensorId,
        out: TensorId,
    },
    NllLoss {
        logp: TensorId,
        targets: TensorId,
        out: TensorId,
    },
    NllLossBackward {
        logp: TensorId,
        targets: TensorId,
        out: TensorId,
    },
    CorrectCount {
        logits: TensorId,
        targets: TensorId,
        out: TensorId,
    },
    Reduce {
        x: TensorId,
        op: ReduceOp,
        axis: Option<usize>,
        out: TensorId,
    },
    AdamStep {
        param: TensorId,
        grad: TensorId,
        m: TensorId,
        v: TensorId,
        hyper: AdamParams,
        step: u32,
    },
    SgdStep {
        param: TensorId,
        grad: TensorId,
        buf: TensorId,
        hyper: SgdParams,
        step: u32,
    },
    Reshape {
        x: TensorId,
        shape: Shape,
        out: TensorId,
    },
    Copy {
        src: TensorId,
        out: TensorId,
    },
    Fill {
        t: TensorId,
        value: f32,
    },
    Zeros {
        shape: Shape,
        dtype: DType,
        out: TensorId,
    },
    /// Flat concatenation of `srcs` (e.g. a gradient bucket).
    Concat {
        srcs: Vec<TensorId>,
        out: TensorId,
    },
    /// Inverse of `Concat`: `src` cut into tensors of the given shapes.
    Split {
        src: TensorId,
        outs: Vec<(TensorId, Shape)>,
    },
    Free {
        t: TensorId,
    },
}

impl Op {
    /// Every tensor handle this operation names, for callers that rename handles (a
    /// service that maps its clients' ids to its own, say).
    pub fn tensor_ids_mut(&mut self) -> Vec<&mut TensorId> {
        let mut ids: Vec<&mut TensorId> = Vec::new();
        match self {
            Op::Add { a, b, out } => {
                ids.push(a);
                ids.push(b);
                ids.push(out);
            }
            Op::Sub { a, b, out } => {
                ids.push(a);
                ids.push(b);
                ids.push(out);
            }
            Op::Mul { a, b, out } => {
                ids.push(a);
                ids.push(b);
                ids.push(out);
            }
            Op::Scale { x, out, .. } => {
                ids.push(x);
                ids.push(out);
            }
            Op::Axpy { x, y, .. } => {
                ids.push(x);
                ids.push(y);
            }
            Op::Relu { x, out } => {
                ids.push(x);
                ids.push(out);
            }
            Op::ReluBackward { x, dy, out } => {
                ids.push(x);
                ids.push(dy);
                ids.push(out);
            }
            Op::AddChannelBias { x, bias, out } => {
                ids.push(x);
                ids.push(bias);
                ids.push(out);
            }
            Op::MatMul { a, b, out, .. } => {
                ids.push(a);
                ids.push(b);
                ids.push(out);
            }
            Op::Linear { x, w, bias, out, .. } => {
                ids.push(x);
                ids.push(w);
                ids.extend(bias.as_mut());
                ids.push(out);
            }
            Op::LinearBackward { x, w, dy, dx, dw, db } => {
                ids.push(x);
                ids.push(w);
                ids.push(dy);
                ids.extend(dx.as_mut());
                ids.extend(dw.as_mut());
                ids.extend(db.as_mut());
            }
            Op::Conv2d { x, w, bias, out, col, .. } => {
                ids.push(x);
                ids.push(w);
                ids.extend(bias.as_mut());
                ids.push(out);
                ids.extend(col.as_mut());
            }
            Op::Conv2dBackward { x, w, dy, dx, dw, db, col, .. } => {
                ids.push(x);
                ids.push(w);
                ids.push(dy);
                ids.extend(dx.as_mut());
                ids.extend(dw.as_mut());
                ids.extend(db.as_mut());
                ids.extend(col.as_mut());
            }
            Op::MaxPool2d { x, out, indices, .. } => {
                ids.push(x);
                ids.push(out);
                ids.push(indices);
            }
            Op::MaxPool2dBackward { dy, indices, out, relu_output, .. } => {
                ids.push(dy);
                ids.push(indices);
                ids.push(out);
                ids.extend(relu_output.as_mut());
            }
            Op::LogSoftmax { x, out } => {
                ids.push(x);
                ids.push(out);
            }
            Op::LogSoftmaxBackward { y, dy, out } => {
                ids.push(y);
                ids.push(dy);
                ids.push(out);
            }
            Op::NllLoss { logp, targets, out } => {
                ids.push(logp);
                ids.push(targets);
                ids.push(out);
            }
            Op::NllLossBackward { logp, targets, out } => {
                ids.push(logp);
                ids.push(targets);
                ids.push(out);
            }
            Op::CorrectCount { logits, targets, out } => {
                ids.push(logits);
                ids.push(targets);
                ids.push(out);
            }
            Op::Reduce { x, out, .. } => {
                ids.push(x);
                ids.push(out);
            }
            Op::AdamStep { param, grad, m, v, .. } => {
                ids.push(param);
                ids.push(grad);
                ids.push(m);
                ids.push(v);
            }
            Op::SgdStep { param, grad, buf, .. } => {
                ids.push(param);
                ids.push(grad);
                ids.push(buf);
            }
            Op::Reshape { x, out, .. } => {
                ids.push(x);
                ids.push(out);
            }
            Op::Copy { src, out } => {
                ids.push(src);
                ids.push(out);
            }
            Op::Fill { t, .. } => {
                ids.push(t);
            }
            Op::Zeros { out, .. } => {
                ids.push(out);
            }
            Op::Concat { srcs, out } => {
                ids.extend(srcs.iter_mut());
                ids.push(out);
            }
            Op::Split { src, outs } => {
                ids.push(src);
                ids.extend(outs.iter_mut().map(|(id, _)| id));
            }
            Op::Free { t } => {
                ids.push(t);
            }
        }
        ids
    }
}

/// A sequence of operations run as one submission.
pub type Program = Vec<Op>;

/// A device plus a table of tensors named by [`TensorId`].
pub struct Executor {
    gpu: Gpu,
    tensors: HashMap<TensorId, GpuTensor>,
}

/// Pending changes of a program being recorded: `None` marks a freed handle.
struct Staged<'a> {
    table: &'a HashMap<TensorId, GpuTensor>,
    changes: HashMap<TensorId, Option<GpuTensor>>,
}

impl Staged<'_> {
    fn get(&self, op: &'static str, id: TensorId) -> Result<GpuTensor> {
        let found = match self.changes.get(&id) {
            Some(change) => change.clone(),
            None => self.table.get(&id).cloned(),
        };
        found.ok_or(GpuError::UnknownTensor { op, id })
    }

    fn put(&mut self, id: TensorId, t: GpuTensor) {
        self.changes.insert(id, Some(t));
    }
}

impl Executor {
    /// An executor over `gpu` with an empty table.
    pub fn new(gpu: Gpu) -> Self {
        Self { gpu, tensors: HashMap::new() }
    }

    /// The device.
    pub fn gpu(&mut self) -> &mut Gpu {
        &mut self.gpu
    }

    /// The tensor behind `id`.
    pub fn get(&self, id: TensorId) -> Result<&GpuTensor> {
        self.tensors.get(&id).ok_or(GpuError::UnknownTensor { op: "get", id })
    }

    /// Puts a device tensor under `id` (replacing any tensor there).
    pub fn insert(&mut self, id: TensorId, t: GpuTensor) {
        self.tensors.insert(id, t);
    }

    /// Removes `id`, returning its tensor.
    pub fn remove(&mut self, id: TensorId) -> Option<GpuTensor> {
        self.tensors.remove(&id)
    }

    /// Number of live handles.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no handle is live.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Uploads `host` under `id`.
    pub fn upload<T: Element>(&mut self, id: TensorId, host: &HostTensor<T>) -> Result<()> {
        let t = self.gpu.upload(host)?;
        self.tensors.insert(id, t);
        Ok(())
    }

    /// Downloads the tensor under `id`.
    pub fn download<T: Element>(&mut self, id: TensorId) -> Result<HostTensor<T>> {
        let t = self.tensors.get(&id).cloned().ok_or(GpuError::UnknownTensor { op: "download", id })?;
        self.gpu.download(&t)
    }

    /// Copies elements `range` of the tensor under `id` into `dst` (see [`Gpu::read_range`]).
    pub fn read_range<T: Element>(&mut self, id: TensorId, range: std::ops::Range<usize>, dst: &mut [T]) -> Result<()> {
        let t = self.tensors.get(&id).cloned().ok_or(GpuError::UnknownTensor { op: "read_range", id })?;
        self.gpu.read_range(&t, range, dst)
    }

    /// Overwrites elements from `offset` of the tensor under `id` (see [`Gpu::write_range`]).
    pub fn write_range<T: Element>(&mut self, id: TensorId, offset: usize, data: &[T]) -> Result<()> {
        let t = self.tensors.get(&id).cloned().ok_or(GpuError::UnknownTensor { op: "write_range", id })?;
        self.gpu.write_range(&t, offset, data)
    }

    /// Runs `ops` atomically as one submission (see the module docs).
    pub fn run(&mut self, ops: &[Op]) -> Result<()> {
        let mut staged = Staged { table: &self.tensors, changes: HashMap::new() };
        for op in ops {
            if let Err(e) = apply(&mut self.gpu, &mut staged, op) {
                self.gpu.discard();
                return Err(e);
            }
        }
        let changes = staged.changes;
        for (id, change) in changes {
            match change {
                Some(t) => {
                    self.tensors.insert(id, t);
                }
                None => {
                    self.tensors.remove(&id);
                }
            }
        }
        self.gpu.flush()
    }
}

fn apply(gpu: &mut Gpu, s: &mut Staged<'_>, op: &Op) -> Result<()> {
    use Op::*;
    match op {
        Add { a, b, out } => {
            let r = gpu.add(&s.get("add", *a)?, &s.get("add", *b)?)?;
            s.put(*out, r);
        }
        Sub { a, b, out } => {
            let r = gpu.sub(&s.get("sub", *a)?, &s.get("sub", *b)?)?;
            s.put(*out, r);
        }
        Mul { a, b, out } => {
            let r = gpu.mul(&s.get("mul", *a)?, &s.get("mul", *b)?)?;
            s.put(*out, r);
        }
        Scale { x, alpha, out } => {
            let r = gpu.scale(&s.get("scale", *x)?, *alpha)?;
            s.put(*out, r);
        }
        Axpy { alpha, x, y } => gpu.axpy(*alpha, &s.get("axpy", *x)?, &s.get("axpy", *y)?)?,
        Relu { x, out } => {
            let r = gpu.relu(&s.get("relu", *x)?)?;
            s.put(*out, r);
        }
        ReluBackward { x, dy, out } => {
            let r = gpu.relu_backward(&s.get("relu_backward", *x)?, &s.get("relu_backward", *dy)?)?;
            s.put(*out, r);
        }
        AddChannelBias { x, bias, out } => {
            let r = gpu.add_channel_bias(&s.get("add_channel_bias", *x)?, &s.get("add_channel_bias", *bias)?)?;
            s.put(*out, r);
        }
        MatMul { a, b, trans_a, trans_b, out } => {
            let r = gpu.matmul(&s.get("matmul", *a)?, &s.get("matmul", *b)?, *trans_a, *trans_b)?;
            s.put(*out, r);
        }
        Linear { x, w, bias, out, relu } => {
            let b = bias.map(|b| s.get("linear", b)).transpose()?;
            let r = gpu.linear_act(&s.get("linear", *x)?, &s.get("linear", *w)?, b.as_ref(), *relu)?;
            s.put(*out, r);
        }
        LinearBackward { x, w, dy, dx, dw, db } => {
            const N: &str = "linear_backward";
            let weight = weight_outputs(N, *dw, *db)?;
            let g = gpu.linear_backward_parts(
                &s.get(N, *x)?,
                &s.get(N, *w)?,
                &s.get(N, *dy)?,
                dx.is_some(),
                weight.is_some(),
            )?;
            if let (Some(id), Some(t)) = (dx, g.dx) {
                s.put(*id, t);
            }
            if let (Some((dw, db)), Some((gw, gb))) = (weight, g.weight) {
                s.put(dw, gw);
                s.put(db, gb);
            }
        }
        Conv2d { x, w, bias, params, out, relu, col } => {
            let b = bias.map(|b| s.get("conv2d", b)).transpose()?;
            let opts = crate::ConvForward { relu: *relu, keep_col: col.is_some() };
            let (r, kept) = gpu.conv2d_with(&s.get("conv2d", *x)?, &s.get("conv2d", *w)?, b.as_ref(), *params, opts)?;
            s.put(*out, r);
            if let Some(id) = col {
                // A batch too large for one chunk keeps nothing: drop a stale tensor.
                match kept {
                    Some(c) => s.put(*id, c),
                    None => {
                        s.changes.insert(*id, None);
                    }
                }
            }
        }
        Conv2dBackward { x, w, dy, params, dx, dw, db, col } => {
            const N: &str = "conv2d_backward";
            let saved = match col {
                Some(id) => s.get(N, *id).ok(),
                None => None,
            };
            let weight = weight_outputs(N, *dw, *db)?;
            let g = gpu.conv2d_backward_parts(
                &s.get(N, *x)?,
                &s.get(N, *w)?,
                &s.get(N, *dy)?,
                *params,
                dx.is_some(),
                weight.is_some(),
                saved.as_ref(),
            )?;
            if let (Some(id), Some(t)) = (dx, g.dx) {
                s.put(*id, t);
            }
            if let (Some((dw, db)), Some((gw, gb))) = (weight, g.weight) {
                s.put(dw, gw);
                s.put(db, gb);
            }
        }
        MaxPool2d { x, kernel, params, out, indices } => {
            let (y, i) = gpu.max_pool2d(&s.get("max_pool2d", *x)?, *kernel, *params)?;
            s.put(*out, y);
            s.put(*indices, i);
        }
        MaxPool2dBackward { dy, indices, input_shape, kernel, params, out, relu_output } => {
            const N: &str = "max_pool2d_backward";
            let mask = relu_output.map(|id| s.get(N, id)).transpose()?;
            let r = gpu.max_pool2d_relu_backward(
                &s.get(N, *dy)?,
                &s.get(N, *indices)?,
                input_shape,
                *kernel,
                *params,
                mask.as_ref(),
            )?;
            s.put(*out, r);
        }
        LogSoftmax { x, out } => {
            let r = gpu.log_softmax(&s.get("log_softmax", *x)?)?;
            s.put(*out, r);
        }
        LogSoftmaxBackward { y, dy, out } => {
            let r =
                gpu.log_softmax_backward(&s.get("log_softmax_backward", *y)?, &s.get("log_softmax_backward", *dy)?)?;
            s.put(*out, r);
        }
        NllLoss { logp, targets, out } => {
            let r = gpu.nll_loss(&s.get("nll_loss", *logp)?, &s.get("nll_loss", *targets)?)?;
            s.put(*out, r);
        }
        NllLossBackward { logp, targets, out } => {
            let shape = s.get("nll_loss_backward", *logp)?.shape().clone();
            let r = gpu.nll_loss_backward(&shape, &s.get("nll_loss_backward", *targets)?)?;
            s.put(*out, r);
        }
        CorrectCount { logits, targets, out } => {
            let r = gpu.correct_count(&s.get("correct_count", *logits)?, &s.get("correct_count", *targets)?)?;
            s.put(*out, r);
        }
        Reduce { x, op, axis, out } => {
            let r = gpu.reduce(&s.get(op.name(), *x)?, *op, *axis)?;
            s.put(*out, r);
        }
        AdamStep { param, grad, m, v, hyper, step } => {
            const N: &str = "adam_step";
            gpu.adam_step(&s.get(N, *param)?, &s.get(N, *grad)?, &s.get(N, *m)?, &s.get(N, *v)?, hyper, *step)?;
        }
        SgdStep { param, grad, buf, hyper, step } => {
            const N: &str = "sgd_step";
            gpu.sgd_step(&s.get(N, *param)?, &s.get(N, *grad)?, &s.get(N, *buf)?, hyper, *step)?;
        }
        Reshape { x, shape, out } => {
            let r = s.get("reshape", *x)?.reshape(shape.clone())?;
            s.put(*out, r);
        }
        Copy { src, out } => {
            let r = gpu.copy(&s.get("copy", *src)?)?;
            s.put(*out, r);
        }
        Fill { t, value } => gpu.fill(&s.get("fill", *t)?, *value)?,
        Zeros { shape, dtype, out } => {
            let r = gpu.zeros(shape.clone(), *dtype)?;
            s.put(*out, r);
        }
        Concat { srcs, out } => {
            let parts = srcs.iter().map(|i| s.get("concat", *i)).collect::<Result<Vec<_>>>()?;
            let r = gpu.concat(&parts.iter().collect::<Vec<_>>())?;
            s.put(*out, r);
        }
        Split { src, outs } => {
            let shapes: Vec<Shape> = outs.iter().map(|(_, sh)| sh.clone()).collect();
            let parts = gpu.split(&s.get("split", *src)?, &shapes)?;
            for ((id, _), t) in outs.iter().zip(parts) {
                s.put(*id, t);
            }
        }
        Free { t } => {
            s.get("free", *t)?;
            s.changes.insert(*t, None);
        }
    }
    Ok(())
}

/// The weight and bias outputs of a backward op: both or neither.
fn weight_outputs(
    op: &'static str,
    dw: Option<TensorId>,
    db: Option<TensorId>,
) -> Result<Option<(TensorId, TensorId)>> {
    match (dw, db) {
        (Some(w), Some(b)) => Ok(Some((w, b))),
        (None, None) => Ok(None),
        _ => Err(strata_tensor::TensorError::argument(op, "dw and db must be given together (both or neither)").into()),
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn every_named_handle_is_visited() {
        let t = TensorId;
        let mut op = Op::Linear { x: t(1), w: t(2), bias: Some(t(3)), out: t(4), relu: false };
        for id in op.tensor_ids_mut() {
            id.0 += 100;
        }
        assert_eq!(op, Op::Linear { x: t(101), w: t(102), bias: Some(t(103)), out: t(104), relu: false });
        let mut split = Op::Split { src: t(1), outs: vec![(t(2), Shape::from([1])), (t(3), Shape::from([1]))] };
        assert_eq!(split.tensor_ids_mut().len(), 3);
        assert_eq!(Op::Concat { srcs: vec![t(1), t(2)], out: t(3) }.tensor_ids_mut().len(), 3);
    }
}
