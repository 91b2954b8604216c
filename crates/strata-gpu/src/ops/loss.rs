//! Classification heads (`shaders/loss.wgsl`): log-softmax, NLL loss, accuracy count.

use bytemuck::{Pod, Zeroable};
use strata_tensor::{DType, Shape, TensorError, geometry};

use super::{expect_binding, expect_dtype, u};
use crate::{Gpu, GpuTensor, Result};

const FILE: &str = "loss.wgsl";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    classes: u32,
    scale: f32,
    _pad: u32,
}

impl Gpu {
    fn check_head(&self, op: &'static str, x: &GpuTensor, targets: &GpuTensor) -> Result<(usize, usize)> {
        expect_dtype(op, "logits", x, DType::F32)?;
        expect_dtype(op, "targets", targets, DType::U32)?;
        expect_binding(op, "logits", x, self.info().max_storage_binding_bytes)?;
        Ok(geometry::classification(op, x.shape(), targets.shape())?)
    }

    /// Row-wise log-softmax of `x` `[rows, classes]`.
    pub fn log_softmax(&mut self, x: &GpuTensor) -> Result<GpuTensor> {
        const OP: &str = "log_softmax";
        expect_dtype(OP, "input", x, DType::F32)?;
        expect_binding(OP, "input", x, self.info().max_storage_binding_bytes)?;
        if x.shape().rank() != 2 || x.shape().dim(1) == 0 {
            return Err(TensorError::shape(
                OP,
                format!("input {} must be [rows, classes] with classes > 0", x.shape()),
            )
            .into());
        }
        let (rows, classes) = (x.shape().dim(0), x.shape().dim(1));
        let y = self.empty(x.shape().clone(), DType::F32)?;
        let p = Params { rows: u(rows), classes: u(classes), scale: 1.0, _pad: 0 };
        self.dispatch(OP, (FILE, "log_softmax"), &[], &p, &[x.arg(), y.arg()], [self.grid(rows, 1), 1, 1])?;
        Ok(y)
    }

    /// Gradient of log-softmax from its output `y` and output gradient `dy`.
    pub fn log_softmax_backward(&mut self, y: &GpuTensor, dy: &GpuTensor) -> Result<GpuTensor> {
        const OP: &str = "log_softmax_backward";
        expect_dtype(OP, "output", y, DType::F32)?;
        expect_dtype(OP, "output gradient", dy, DType::F32)?;
        geometry::same_shape(OP, y.shape(), dy.shape())?;
        if y.shape().rank() != 2 {
            return Err(TensorError::shape(OP, format!("output {} must have rank 2", y.shape())).into());
        }
        let (rows, classes) = (y.shape().dim(0), y.shape().dim(1));
        let dx = self.empty(y.shape().clone(), DType::F32)?;
        let p = Params { rows: u(rows), classes: u(classes), scale: 1.0, _pad: 0 };
        self.dispatch(
            OP,
            (FILE, "log_softmax_backward"),
            &[],
            &p,
            &[y.arg(), dy.arg(), dx.arg()],
            [self.grid(rows, 1), 1, 1],
        )?;
        Ok(dx)
    }

    /// Mean negative log-likelihood of `logp` `[rows, classes]` at `u32` `targets`; a
    /// scalar tensor. Targets must be below `classes` (checked where they are uploaded).
    pub fn nll_loss(&mut self, logp: &GpuTensor, targets: &GpuTensor) -> Result<GpuTensor> {
        const OP: &str = "nll_loss";
        let (rows, classes) = self.check_head(OP, logp, targets)?;
        let out = self.empty(Shape::scalar(), DType::F32)?;
        let p = Params { rows: u(rows), classes: u(classes), scale: (1.0 / rows.max(1) as f64) as f32, _pad: 0 };
        self.dispatch(OP, (FILE, "nll_loss"), &[], &p, &[logp.arg(), targets.arg(), out.arg()], [1, 1, 1])?;
        Ok(out)
    }

    /// Gradient of the mean NLL loss with respect to `logp` of shape `logp_shape`.
    pub fn nll_loss_backward(&mut self, logp_shape: &Shape, targets: &GpuTensor) -> Result<GpuTensor> {
        const OP: &str = "nll_loss_backward";
        expect_dtype(OP, "targets", targets, DType::U32)?;
        let (rows, classes) = geometry::classification(OP, logp_shape, targets.shape())?;
        let d = self.empty(logp_shape.clone(), DType::F32)?;
        let p = Params { rows: u(rows), classes: u(classes), scale: (1.0 / rows.max(1) as f64) as f32, _pad: 0 };
        self.dispatch(
            OP,
            (FILE, "nll_backward"),
            &[],
            &p,
            &[targets.arg(), d.arg()],
            [self.grid(rows * classes, 4), 1, 1],
        )?;
        Ok(d)
    }

    /// Number of rows of `logits` whose first maximum is at the target, as an f32 scalar.
    pub fn correct_count(&mut self, logits: &GpuTensor, targets: &GpuTensor) -> Result<GpuTensor> {
        const OP: &str = "correct_count";
        let (rows, classes) = self.check_head(OP, logits, targets)?;
        let out = self.empty(Shape::scalar(), DType::F32)?;
        let p = Params { rows: u(rows), classes: u(classes), scale: 1.0, _pad: 0 };
        self.dispatch(OP, (FILE, "correct_count"), &[], &p, &[logits.arg(), targets.arg(), out.arg()], [1, 1, 1])?;
        Ok(out)
    }
}
