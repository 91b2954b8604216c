//! Shape rules of every operation, shared by the CPU references and the GPU kernels.
//!
//! Each function checks its operands and returns the derived sizes, or a
//! [`TensorError`] that names the operation and the offending shapes.

use serde::{Deserialize, Serialize};

use crate::{Result, Shape, TensorError};

/// Stride and zero padding of a 2-D convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conv2dParams {
    /// Step between windows, `(rows, cols)`.
    pub stride: (usize, usize),
    /// Zero padding added on each side, `(rows, cols)`.
    pub padding: (usize, usize),
}

impl Conv2dParams {
    /// Stride `s` and padding `p` in both directions.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self { stride: (stride, stride), padding: (padding, padding) }
    }
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self::new(1, 0)
    }
}

/// Sizes of a 2-D convolution, NCHW input `[n, ci, h, w]`, weight `[co, ci, kh, kw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub ci: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub co: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
    /// Stride and padding.
    pub params: Conv2dParams,
}

impl ConvGeometry {
    /// Output shape `[n, co, ho, wo]`.
    pub fn output_shape(&self) -> Shape {
        Shape::from([self.n, self.co, self.ho, self.wo])
    }

    /// Rows of the im2col matrix: `ci * kh * kw`.
    pub fn patch_len(&self) -> usize {
        self.ci * self.kh * self.kw
    }

    /// Multiply-add count of the forward pass times two.
    pub fn forward_flops(&self) -> f64 {
        2.0 * (self.n * self.co * self.ho * self.wo) as f64 * self.patch_len() as f64
    }
}

fn window_out(op: &'static str, what: &str, len: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if s == 0 {
        return Err(TensorError::argument(op, "stride must be at least 1"));
    }
    let padded = len + 2 * p;
    if k == 0 || padded < k {
        return Err(TensorError::shape(op, format!("{what} {len} with padding {p} is smaller than the window {k}")));
    }
    Ok((padded - k) / s + 1)
}

/// Checks a convolution: `x` `[n,ci,h,w]`, `w` `[co,ci,kh,kw]`, optional bias `[co]`.
pub fn conv2d(x: &Shape, w: &Shape, bias: Option<&Shape>, params: Conv2dParams) -> Result<ConvGeometry> {
    const OP: &str = "conv2d";
    if x.rank() != 4 {
        return Err(TensorError::shape(OP, format!("input {x} must have rank 4 (NCHW)")));
    }
    if w.rank() != 4 {
        return Err(TensorError::shape(OP, format!("weight {w} must have rank 4 (out, in, kh, kw)")));
    }
    let d = x.dims();
    let k = w.dims();
    if d[1] != k[1] {
        return Err(TensorError::shape(OP, format!("input {x} has {} channels, weight {w} expects {}", d[1], k[1])));
    }
    if let Some(b) = bias
        && b.dims() != [k[0]]
    {
        return Err(TensorError::shape(OP, format!("bias {b} must be [{}] for weight {w}", k[0])));
    }
    let ho = window_out(OP, "input height", d[2], k[2], params.stride.0, params.padding.0)?;
    let wo = window_out(OP, "input width", d[3], k[3], params.stride.1, params.padding.1)?;
    if d[0] == 0 || d[1] == 0 || k[0] == 0 {
        return Err(TensorError::shape(OP, format!("input {x} and weight {w} must not be empty")));
    }
    Ok(ConvGeometry { n: d[0], ci: d[1], h: d[2], w: d[3], co: k[0], kh: k[2], kw: k[3], ho, wo, params })
}

/// Sizes of a 2-D max pooling over NCHW input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Batch times channels: the number of independent planes.
    pub planes: usize,
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window height.
    pub kh: usize,
    /// Window width.
    pub kw: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
    /// Stride and padding (padding cells never win the max).
    pub params: Conv2dParams,
}

impl PoolGeometry {
    /// Output shape `[n, c, ho, wo]`.
    pub fn output_shape(&self) -> Shape {
        Shape::from([self.n, self.c, self.ho, self.wo])
    }
}

/// Checks a max pooling of `x` `[n,c,h,w]` with window `kernel` and `params`.
pub fn max_pool2d(x: &Shape, kernel: (usize, usize), params: Conv2dParams) -> Result<PoolGeometry> {
    const OP: &str = "max_pool2d";
    if x.rank() != 4 {
        return Err(TensorError::shape(OP, format!("input {x} must have rank 4 (NCHW)")));
    }
    if params.padding.0 * 2 > kernel.0 || params.padding.1 * 2 > kernel.1 {
        return Err(TensorError::argument(
            OP,
            format!("padding {:?} must be at most half the window {kernel:?}", params.padding),
        ));
    }
    let d = x.dims();
    let ho = window_out(OP, "input height", d[2], kernel.0, params.stride.0, params.padding.0)?;
    let wo = window_out(OP, "input width", d[3], kernel.1, params.stride.1, params.padding.1)?;
    Ok(PoolGeometry {
        planes: d[0] * d[1],
        n: d[0],
        c: d[1],
        h: d[2],
        w: d[3],
        kh: kernel.0,
        kw: kernel.1,
        ho,
        wo,
        params,
    })
}

/// Sizes `(m, k, n)` of `op(a) @ op(b)` where `op` transposes when the flag is set.
pub fn matmul(a: &Shape, b: &Shape, trans_a: bool, trans_b: bool) -> Result<(usize, usize, usize)> {
    const OP: &str = "matmul";
    if a.rank() != 2 || b.rank() != 2 {
        return Err(TensorError::shape(OP, format!("operands {a} and {b} must both have rank 2")));
    }
    let (m, ka) = if trans_a { (a.dim(1), a.dim(0)) } else { (a.dim(0), a.dim(1)) };
    let (kb, n) = if trans_b { (b.dim(1), b.dim(0)) } else { (b.dim(0), b.dim(1)) };
    if ka != kb {
        let ta = if trans_a { "^T" } else { "" };
        let tb = if trans_b { "^T" } else { "" };
        return Err(TensorError::shape(
            OP,
            format!("inner dimensions differ: a{ta} {a} has {ka} columns, b{tb} {b} has {kb} rows"),
        ));
    }
    Ok((m, ka, n))
}

/// Sizes `(batch, in, out)` of a linear layer: `x` `[batch, in]`, `w` `[out, in]`, bias `[out]`.
pub fn linear(x: &Shape, w: &Shape, bias: Option<&Shape>) -> Result<(usize, usize, usize)> {
    const OP: &str = "linear";
    if x.rank() != 2 || w.rank() != 2 {
        return Err(TensorError::shape(OP, format!("input {x} and weight {w} must both have rank 2")));
    }
    if x.dim(1) != w.dim(1) {
        return Err(TensorError::shape(
            OP,
            format!("input {x} has {} features, weight {w} expects {}", x.dim(1), w.dim(1)),
        ));
    }
    if let Some(b) = bias
        && b.dims() != [w.dim(0)]
    {
        return Err(TensorError::shape(OP, format!("bias {b} must be [{}] for weight {w}", w.dim(0))));
    }
    Ok((x.dim(0), x.dim(1), w.dim(0)))
}

/// Sizes `(rows, classes)` of a loss over logits `[rows, classes]` and targets `[rows]`.
pub fn classification(op: &'static str, logits: &Shape, targets: &Shape) -> Result<(usize, usize)> {
    if logits.rank() != 2 {
        return Err(TensorError::shape(op, format!("logits {logits} must have rank 2 (batch, classes)")));
    }
    if targets.dims() != [logits.dim(0)] {
        return Err(TensorError::shape(
            op,
            format!("targets {targets} must be [{}] for logits {logits}", logits.dim(0)),
        ));
    }
    if logits.dim(1) == 0 {
        return Err(TensorError::shape(op, format!("logits {logits} have no classes")));
    }
    Ok((logits.dim(0), logits.dim(1)))
}

/// Checks that two operands of an elementwise operation have equal shapes.
pub fn same_shape(op: &'static str, a: &Shape, b: &Shape) -> Result<()> {
    if a != b {
        return Err(TensorError::shape(op, format!("operands {a} and {b} differ in shape")));
    }
    Ok(())
}

/// Checks a reduction axis against the operand's rank.
pub fn axis(op: &'static str, x: &Shape, axis: usize) -> Result<()> {
    if axis >= x.rank() {
        return Err(TensorError::argument(op, format!("axis {axis} is out of range for {x}")));
    }
    if x.dim(axis) == 0 {
        return Err(TensorError::shape(op, format!("axis {axis} of {x} is empty")));
    }
    Ok(())
}

/// Checks that a bias `[c]` fits dimension 1 of `x` (`[n, c, ...]`), for per-channel bias.
pub fn channel_bias(op: &'static str, x: &Shape, bias: &Shape) -> Result<usize> {
    if x.rank() < 2 || bias.dims() != [x.dim(1)] {
        return Err(TensorError::shape(op, format!("bias {bias} does not fit dimension 1 of {x}")));
    }
    Ok(x.dim(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_messages_name_shapes() {
        let e = conv2d(&Shape::from([32, 3, 28, 28]), &Shape::from([64, 1, 3, 3]), None, Conv2dParams::new(1, 1))
            .unwrap_err();
        assert_eq!(e.to_string(), "conv2d: input [32,3,28,28] has 3 channels, weight [64,1,3,3] expects 1");
        let g = conv2d(
            &Shape::from([2, 3, 5, 7]),
            &Shape::from([4, 3, 3, 3]),
            Some(&Shape::from([4])),
            Conv2dParams::new(2, 1),
        )
        .unwrap();
        assert_eq!((g.ho, g.wo), (3, 4));
        let e =
            conv2d(&Shape::from([1, 1, 2, 2]), &Shape::from([1, 1, 3, 3]), None, Conv2dParams::new(1, 0)).unwrap_err();
        assert!(e.to_string().contains("smaller than the window"), "{e}");
    }

    #[test]
    fn matmul_rules() {
        assert_eq!(matmul(&Shape::from([2, 3]), &Shape::from([3, 4]), false, false).unwrap(), (2, 3, 4));
        assert_eq!(matmul(&Shape::from([3, 2]), &Shape::from([4, 3]), true, true).unwrap(), (2, 3, 4));
        let e = matmul(&Shape::from([2, 3]), &Shape::from([2, 4]), false, false).unwrap_err();
        assert!(e.to_string().starts_with("matmul: inner dimensions differ"), "{e}");
    }

    #[test]
    fn classification_rules() {
        assert!(classification("nll_loss", &Shape::from([4, 10]), &Shape::from([4])).is_ok());
        let e = classification("nll_loss", &Shape::from([4, 10]), &Shape::from([5])).unwrap_err();
        assert_eq!(e.to_string(), "nll_loss: targets [5] must be [4] for logits [4,10]");
    }
}
