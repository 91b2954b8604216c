//! Elementwise kernels (`shaders/elementwise.wgsl`) and buffer copies.
//!
//! Operands larger than one storage binding are processed in binding-sized chunks.

use bytemuck::{Pod, Zeroable};
use strata_tensor::{DType, TensorError, geometry};

use super::{expect_dtype, u};
use crate::{Gpu, GpuTensor, Result};

const FILE: &str = "elementwise.wgsl";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    base: u32,
    alpha: f32,
    bits: u32,
    inner: u32,
    channels: u32,
    relu: u32,
    _pad: u32,
}

impl Params {
    fn new(n: usize, base: usize) -> Self {
        Self { n: u(n), base: u(base), alpha: 1.0, bits: 0, inner: 1, channels: 1, relu: 0, _pad: 0 }
    }
}

impl Gpu {
    /// `(offset, len)` of consecutive binding-sized chunks of `n` 4-byte elements (one
    /// empty chunk when `n` is 0, so kernels still run their bookkeeping).
    pub(crate) fn chunk_ranges(&self, n: usize) -> Vec<(usize, usize)> {
        let step = self.chunk_elems(4);
        if n == 0 {
            return vec![(0, 0)];
        }
        (0..n).step_by(step).map(|o| (o, step.min(n - o))).collect()
    }

    fn binary(
        &mut self,
        op: &'static str,
        entry: &'static str,
        a: &GpuTensor,
        b: &GpuTensor,
        alpha: f32,
    ) -> Result<GpuTensor> {
        expect_dtype(op, "a", a, DType::F32)?;
        expect_dtype(op, "b", b, DType::F32)?;
        geometry::same_shape(op, a.shape(), b.shape())?;
        let out = self.empty(a.shape().clone(), DType::F32)?;
        for (off, len) in self.chunk_ranges(a.numel()) {
            let p = Params { alpha, ..Params::new(len, off) };
            let args = [a.arg_range(off, len), b.arg_range(off, len), out.arg_range(off, len)];
            self.dispatch(op, (FILE, entry), &[], &p, &args, [self.grid(len, 16), 1, 1])?;
        }
        Ok(out)
    }

    fn unary(&mut self, op: &'static str, entry: &'static str, x: &GpuTensor, y: &GpuTensor, alpha: f32) -> Result<()> {
        for (off, len) in self.chunk_ranges(x.numel()) {
            let p = Params { alpha, ..Params::new(len, off) };
            let args = [x.arg_range(off, len), y.arg_range(off, len)];
            self.dispatch(op, (FILE, entry), &[], &p, &args, [self.grid(len, 16), 1, 1])?;
        }
        Ok(())
    }

    /// `a + b`.
    pub fn add(&mut self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.binary("add", "add_scaled", a, b, 1.0)
    }

    /// `a - b`.
    pub fn sub(&mut self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.binary("sub", "add_scaled", a, b, -1.0)
    }

    /// `a * b`, elementwise.
    pub fn mul(&mut self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        self.binary("mul", "mul", a, b, 1.0)
    }

    /// Gradient of ReLU: `dy` where `x > 0`, else 0.
    pub fn relu_backward(&mut self, x: &GpuTensor, dy: &GpuTensor) -> Result<GpuTensor> {
        self.binary("relu_backward", "relu_backward", x, dy, 1.0)
    }

    /// `alpha * x`.
    pub fn scale(&mut self, x: &GpuTensor, alpha: f32) -> Result<GpuTensor> {
        expect_dtype("scale", "x", x, DType::F32)?;
        let y = self.empty(x.shape().clone(), DType::F32)?;
        self.unary("scale", "scale", x, &y, alpha)?;
        Ok(y)
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: &GpuTensor) -> Result<GpuTensor> {
        expect_dtype("relu", "x", x, DType::F32)?;
        let y = self.empty(x.shape().clone(), DType::F32)?;
        self.unary("relu", "relu", x, &y, 1.0)?;
        Ok(y)
    }

    /// `y += alpha * x`, in place.
    pub fn axpy(&mut self, alpha: f32, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
        expect_dtype("axpy", "x", x, DType::F32)?;
        expect_dtype("axpy", "y", y, DType::F32)?;
        geometry::same_shape("axpy", x.shape(), y.shape())?;
        if x.same_storage(y) {
            // One buffer cannot be bound for reading and writing at once.
            let copy = self.copy(x)?;
            return self.unary("axpy", "axpy", &copy, y, alpha);
        }
        self.unary("axpy", "axpy", x, y, alpha)
    }

    /// `y += x`, in place.
    pub fn add_assign(&mut self, y: &GpuTensor, x: &GpuTensor) -> Result<()> {
        self.axpy(1.0, x, y)
    }

    /// `y *= alpha`, in place.
    pub fn scale_assign(&mut self, y: &GpuTensor, alpha: f32) -> Result<()> {
        expect_dtype("scale_assign", "y", y, DType::F32)?;
        let copy = self.copy(y)?;
        self.unary("scale_assign", "scale", &copy, y, alpha)
    }

    /// `x + bias[c]` for `x` `[n, c, ...]` (convolution and linear biases).
    pub fn add_channel_bias(&mut self, x: &GpuTensor, bias: &GpuTensor) -> Result<GpuTensor> {
        self.add_channel_bias_act(x, bias, false)
    }

    /// `x + bias[c]`, then ReLU when `relu`.
    pub fn add_channel_bias_act(&mut self, x: &GpuTensor, bias: &GpuTensor, relu: bool) -> Result<GpuTensor> {
        const OP: &str = "add_channel_bias";
        expect_dtype(OP, "x", x, DType::F32)?;
        expect_dtype(OP, "bias", bias, DType::F32)?;
        let channels = geometry::channel_bias(OP, x.shape(), bias.shape())?;
        let inner: usize = x.shape().dims()[2..].iter().product();
        let y = self.empty(x.shape().clone(), DType::F32)?;
        for (off, len) in self.chunk_ranges(x.numel()) {
            let p = Params { inner: u(inner), channels: u(channels), relu: u32::from(relu), ..Params::new(len, off) };
            let args = [x.arg_range(off, len), bias.arg(), y.arg_range(off, len)];
            self.dispatch(OP, (FILE, "add_channel_bias"), &[], &p, &args, [self.grid(len, 16), 1, 1])?;
        }
        Ok(y)
    }

    /// Sets every element to `value`.
    pub fn fill(&mut self, t: &GpuTensor, value: f32) -> Result<()> {
        expect_dtype("fill", "t", t, DType::F32)?;
        self.fill_bits(t, value.to_bits())
    }

    /// Sets every 32-bit word of `t` to `bits`.
    pub(crate) fn fill_bits(&mut self, t: &GpuTensor, bits: u32) -> Result<()> {
        let n = t.numel() * t.dtype().size_bytes() / 4;
        for (off, len) in self.chunk_ranges(n) {
            let p = Params { bits, ..Params::new(len, off) };
            self.dispatch("fill", (FILE, "fill"), &[], &p, &[t.arg_range(off, len)], [self.grid(len, 16), 1, 1])?;
        }
        Ok(())
    }

    /// A copy of `x` in a new buffer.
    pub fn copy(&mut self, x: &GpuTensor) -> Result<GpuTensor> {
        let y = self.empty(x.shape().clone(), x.dtype())?;
        self.copy_bytes(x, 0, &y, 0, x.size_bytes().next_multiple_of(4));
        Ok(y)
    }

    /// Concatenates tensors of one dtype into a new flat tensor (gradient buckets).
    pub fn concat(&mut self, parts: &[&GpuTensor]) -> Result<GpuTensor> {
        let Some(first) = parts.first() else {
            return Err(TensorError::argument("concat", "needs at least one tensor").into());
        };
        if let Some(p) = parts.iter().find(|p| p.dtype() != first.dtype()) {
            return Err(
                TensorError::argument("concat", format!("mixes dtypes {} and {}", first.dtype(), p.dtype())).into()
            );
        }
        let total: usize = parts.iter().map(|p| p.numel()).sum();
        let out = self.empty([total], first.dtype())?;
        let mut off = 0u64;
        for p in parts {
            self.copy_bytes(p, 0, &out, off, p.size_bytes());
            off += p.size_bytes();
        }
        Ok(out)
    }

    /// Splits a flat tensor into new tensors of the given shapes (inverse of [`Gpu::concat`]).
    pub fn split(&mut self, src: &GpuTensor, shapes: &[strata_tensor::Shape]) -> Result<Vec<GpuTensor>> {
        let total: usize = shapes.iter().map(|s| s.numel()).sum();
        if total != src.numel() {
            return Err(TensorError::shape(
                "split",
                format!("tensor {} holds {} elements, the shapes need {total}", src.shape(), src.numel()),
            )
            .into());
        }
        let es = src.dtype().size_bytes() as u64;
        let mut off = 0u64;
        let mut out = Vec::with_capacity(shapes.len());
        for s in shapes {
            let t = self.empty(s.clone(), src.dtype())?;
            let bytes = s.numel() as u64 * es;
            self.copy_bytes(src, off, &t, 0, bytes);
            off += bytes;
            out.push(t);
        }
        Ok(out)
    }

    /// Copies `src` into `dst` (same shape and dtype).
    pub fn copy_into(&mut self, src: &GpuTensor, dst: &GpuTensor) -> Result<()> {
        if src.dtype() != dst.dtype() || src.shape() != dst.shape() {
            return Err(TensorError::shape(
                "copy_into",
                format!(
                    "source {} {} and destination {} {} differ",
                    src.dtype(),
                    src.shape(),
                    dst.dtype(),
                    dst.shape()
                ),
            )
            .into());
        }
        if !src.same_storage(dst) {
            self.copy_bytes(src, 0, dst, 0, src.size_bytes().next_multiple_of(4));
        }
        Ok(())
    }
}
