//! CPU reference kernels.
//!
//! Straightforward loops that accumulate in `f64`: the ground truth the GPU kernels are
//! tested against, not a fast path. Every function checks shapes with the rules in
//! [`crate::geometry`] and returns the same errors as the GPU path.

use serde::{Deserialize, Serialize};

use crate::geometry::{self, Conv2dParams, PoolGeometry};
use crate::{HostTensor, Result, Shape, TensorError};

/// A reduction over a whole tensor or along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Largest value.
    Max,
    /// Smallest value.
    Min,
    /// Index of the largest value (the first one on ties), as `u32`.
    ArgMax,
    /// Index of the smallest value (the first one on ties), as `u32`.
    ArgMin,
}

impl ReduceOp {
    /// Whether the result is an index (`u32`) rather than a value (`f32`).
    pub fn is_arg(self) -> bool {
        matches!(self, ReduceOp::ArgMax | ReduceOp::ArgMin)
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::ArgMax => "argmax",
            ReduceOp::ArgMin => "argmin",
        }
    }
}

/// Hyperparameters of Adam, with PyTorch's defaults and update rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamParams {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// L2 penalty added to the gradient (PyTorch `Adam`, not `AdamW`).
    pub weight_decay: f32,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Hyperparameters of SGD with momentum, with PyTorch's update rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 disables the buffer).
    pub momentum: f32,
    /// Dampening of the gradient in the momentum buffer.
    pub dampening: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdParams {
    fn default() -> Self {
        Self { lr: 1e-2, momentum: 0.9, dampening: 0.0, weight_decay: 0.0, nesterov: false }
    }
}

fn t(shape: impl Into<Shape>, data: Vec<f32>) -> HostTensor {
    HostTensor::new(shape, data).expect("reference kernels build consistent shapes")
}

/// Elementwise `a + b`.
pub fn add(a: &HostTensor, b: &HostTensor) -> Result<HostTensor> {
    geometry::same_shape("add", a.shape(), b.shape())?;
    Ok(t(a.shape().clone(), a.data().iter().zip(b.data()).map(|(x, y)| x + y).collect()))
}

/// Elementwise `a - b`.
pub fn sub(a: &HostTensor, b: &HostTensor) -> Result<HostTensor> {
    geometry::same_shape("sub", a.shape(), b.shape())?;
    Ok(t(a.shape().clone(), a.data().iter().zip(b.data()).map(|(x, y)| x - y).collect()))
}

/// Elementwise `a * b`.
pub fn mul(a: &HostTensor, b: &HostTensor) -> Result<HostTensor> {
    geometry::same_shape("mul", a.shape(), b.shape())?;
    Ok(t(a.shape().clone(), a.data().iter().zip(b.data()).map(|(x, y)| x * y).collect()))
}

/// `alpha * x`.
pub fn scale(x: &HostTensor, alpha: f32) -> HostTensor {
    t(x.shape().clone(), x.data().iter().map(|v| alpha * v).collect())
}

/// `y + alpha * x`.
pub fn axpy(alpha: f32, x: &HostTensor, y: &HostTensor) -> Result<HostTensor> {
    geometry::same_shape("axpy", x.shape(), y.shape())?;
    Ok(t(y.shape().clone(), x.data().iter().zip(y.data()).map(|(a, b)| alpha.mul_add(*a, *b)).collect()))
}

/// `max(x, 0)`.
pub fn relu(x: &HostTensor) -> HostTensor {
    t(x.shape().clone(), x.data().iter().map(|v| v.max(0.0)).collect())
}

/// Gradient of ReLU: `dy` where `x > 0`, else 0.
pub fn relu_backward(x: &HostTensor, dy: &HostTensor) -> Result<HostTensor> {
    geometry::same_shape("relu_backward", x.shape(), dy.shape())?;
    Ok(t(x.shape().clone(), x.data().iter().zip(dy.data()).map(|(x, g)| if *x > 0.0 { *g } else { 0.0 }).collect()))
}

/// Adds `bias[c]` to every element of channel `c` of `x` `[n, c, ...]`.
pub fn add_channel_bias(x: &HostTensor, bias: &HostTensor) -> Result<HostTensor> {
    let c = geometry::channel_bias("add_channel_bias", x.shape(), bias.shape())?;
    let inner: usize = x.shape().dims()[2..].iter().product();
    let mut out = x.data().to_vec();
    for (i, v) in out.iter_mut().enumerate() {
        *v += bias.data()[(i / inner) % c];
    }
    Ok(t(x.shape().clone(), out))
}

/// `op(a) @ op(b)`, where `op` transposes when the flag is set.
pub fn matmul(a: &HostTensor, b: &HostTensor, trans_a: bool, trans_b: bool) -> Result<HostTensor> {
    let (m, k, n) = geometry::matmul(a.shape(), b.shape(), trans_a, trans_b)?;
    let (ad, bd) = (a.data(), b.data());
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if trans_a { ad[p * m + i] } else { ad[i * k + p] };
                let bv = if trans_b { bd[j * k + p] } else { bd[p * n + j] };
                s += f64::from(av) * f64::from(bv);
            }
            c[i * n + j] = s as f32;
        }
    }
    Ok(t([m, n], c))
}

/// Linear layer `x @ w^T + bias`, `x` `[batch, in]`, `w` `[out, in]` (PyTorch layout).
pub fn linear(x: &HostTensor, w: &HostTensor, bias: Option<&HostTensor>) -> Result<HostTensor> {
    let (batch, _, out) = geometry::linear(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    let mut y = matmul(x, w, false, true)?;
    if let Some(b) = bias {
        for r in 0..batch {
            for j in 0..out {
                y.data_mut()[r * out + j] += b.data()[j];
            }
        }
    }
    Ok(y)
}

/// Gradients of a linear layer: `(dx, dw, db)`.
pub fn linear_backward(
    x: &HostTensor,
    w: &HostTensor,
    dy: &HostTensor,
) -> Result<(HostTensor, HostTensor, HostTensor)> {
    let (batch, _, out) = geometry::linear(x.shape(), w.shape(), None)?;
    if dy.shape().dims() != [batch, out] {
        return Err(TensorError::shape(
            "linear_backward",
            format!("output gradient {} must be [{batch},{out}]", dy.shape()),
        ));
    }
    let dx = matmul(dy, w, false, false)?;
    let dw = matmul(dy, x, true, false)?;
    let db = reduce_axis(dy, ReduceOp::Sum, 0)?;
    Ok((dx, dw, db))
}

/// 2-D convolution (cross-correlation, as in PyTorch) of NCHW `x` with `w` `[co, ci, kh, kw]`.
pub fn conv2d(x: &HostTensor, w: &HostTensor, bias: Option<&HostTensor>, p: Conv2dParams) -> Result<HostTensor> {
    let g = geometry::conv2d(x.shape(), w.shape(), bias.map(|b| b.shape()), p)?;
    let (xd, wd) = (x.data(), w.data());
    let mut y = vec![0.0f32; g.n * g.co * g.ho * g.wo];
    for n in 0..g.n {
        for co in 0..g.co {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let mut s = bias.map_or(0.0, |b| f64::from(b.data()[co]));
                    for ci in 0..g.ci {
                        for kh in 0..g.kh {
                            let ih = (oh * p.stride.0 + kh) as isize - p.padding.0 as isize;
                            if ih < 0 || ih >= g.h as isize {
                                continue;
                            }
                            for kw in 0..g.kw {
                                let iw = (ow * p.stride.1 + kw) as isize - p.padding.1 as isize;
                                if iw < 0 || iw >= g.w as isize {
                                    continue;
                                }
                                let xv = xd[((n * g.ci + ci) * g.h + ih as usize) * g.w + iw as usize];
                                let wv = wd[((co * g.ci + ci) * g.kh + kh) * g.kw + kw];
                                s += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    y[((n * g.co + co) * g.ho + oh) * g.wo + ow] = s as f32;
                }
            }
        }
    }
    Ok(t(g.output_shape(), y))
}

/// Gradients of a convolution.
#[derive(Clone, Debug)]
pub struct Conv2dGrads {
    /// Gradient with respect to the input.
    pub dx: HostTensor,
    /// Gradient with respect to the weight.
    pub dw: HostTensor,
    /// Gradient with respect to the bias.
    pub db: HostTensor,
}

/// Gradients of [`conv2d`] given the output gradient `dy`.
pub fn conv2d_backward(x: &HostTensor, w: &HostTensor, dy: &HostTensor, p: Conv2dParams) -> Result<Conv2dGrads> {
    let g = geometry::conv2d(x.shape(), w.shape(), None, p)?;
    if *dy.shape() != g.output_shape() {
        return Err(TensorError::shape(
            "conv2d_backward",
            format!("output gradient {} must be {}", dy.shape(), g.output_shape()),
        ));
    }
    let (xd, wd, gd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0f64; xd.len()];
    let mut dw = vec![0.0f64; wd.len()];
    let mut db = vec![0.0f64; g.co];
    for n in 0..g.n {
        for co in 0..g.co {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let gv = f64::from(gd[((n * g.co + co) * g.ho + oh) * g.wo + ow]);
                    db[co] += gv;
                    for ci in 0..g.ci {
                        for kh in 0..g.kh {
                            let ih = (oh * p.stride.0 + kh) as isize - p.padding.0 as isize;
                            if ih < 0 || ih >= g.h as isize {
                                continue;
                            }
                            for kw in 0..g.kw {
                                let iw = (ow * p.stride.1 + kw) as isize - p.padding.1 as isize;
                                if iw < 0 || iw >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.ci + ci) * g.h + ih as usize) * g.w + iw as usize;
                                let wi = ((co * g.ci + ci) * g.kh + kh) * g.kw + kw;
                                dx[xi] += gv * f64::from(wd[wi]);
                                dw[wi] += gv * f64::from(xd[xi]);
                            }
                        }
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
    Ok(Conv2dGrads { dx: t(x.shape().clone(), f(dx)), dw: t(w.shape().clone(), f(dw)), db: t([g.co], f(db)) })
}

/// Max pooling; returns the output and, per output, the flat index `ih * w + iw` of the
/// winning input within its plane (the first one on ties).
pub fn max_pool2d(x: &HostTensor, kernel: (usize, usize), p: Conv2dParams) -> Result<(HostTensor, HostTensor<u32>)> {
    let g = geometry::max_pool2d(x.shape(), kernel, p)?;
    let mut y = Vec::with_capacity(g.planes * g.ho * g.wo);
    let mut idx = Vec::with_capacity(y.capacity());
    for plane in 0..g.planes {
        let xp = &x.data()[plane * g.h * g.w..(plane + 1) * g.h * g.w];
        for oh in 0..g.ho {
            for ow in 0..g.wo {
                let (mut best, mut arg) = (f32::NEG_INFINITY, u32::MAX);
                for kh in 0..g.kh {
                    for kw in 0..g.kw {
                        let ih = (oh * p.stride.0 + kh) as isize - p.padding.0 as isize;
                        let iw = (ow * p.stride.1 + kw) as isize - p.padding.1 as isize;
                        if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                            continue;
                        }
                        let i = ih as usize * g.w + iw as usize;
                        if arg == u32::MAX || xp[i] > best {
                            best = xp[i];
                            arg = i as u32;
                        }
                    }
                }
                y.push(best);
                idx.push(arg);
            }
        }
    }
    Ok((t(g.output_shape(), y), HostTensor::new(g.output_shape(), idx)?))
}

/// Gradient of [`max_pool2d`]: routes each output gradient to its winning input.
pub fn max_pool2d_backward(dy: &HostTensor, indices: &HostTensor<u32>, g: &PoolGeometry) -> Result<HostTensor> {
    if *dy.shape() != g.output_shape() || indices.shape() != dy.shape() {
        return Err(TensorError::shape(
            "max_pool2d_backward",
            format!("gradient {} and indices {} must be {}", dy.shape(), indices.shape(), g.output_shape()),
        ));
    }
    let mut dx = vec![0.0f32; g.planes * g.h * g.w];
    let per = g.ho * g.wo;
    for (o, (&gv, &i)) in dy.data().iter().zip(indices.data()).enumerate() {
        let plane = o / per;
        dx[plane * g.h * g.w + i as usize] += gv;
    }
    Ok(t([g.n, g.c, g.h, g.w], dx))
}

/// Row-wise log-softmax of `x` `[rows, classes]`.
pub fn log_softmax(x: &HostTensor) -> Result<HostTensor> {
    if x.shape().rank() != 2 {
        return Err(TensorError::shape("log_softmax", format!("input {} must have rank 2", x.shape())));
    }
    let c = x.shape().dim(1);
    let mut y = x.data().to_vec();
    for row in y.chunks_mut(c.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(m) + row.iter().map(|v| (f64::from(*v) - f64::from(m)).exp()).sum::<f64>().ln();
        for v in row.iter_mut() {
            *v = (f64::from(*v) - lse) as f32;
        }
    }
    Ok(t(x.shape().clone(), y))
}

/// Gradient of log-softmax given its output `y` and the output gradient `dy`:
/// `dx = dy - exp(y) * sum(dy)` per row.
pub fn log_softmax_backward(y: &HostTensor, dy: &HostTensor) -> Result<HostTensor> {
    geometry::same_shape("log_softmax_backward", y.shape(), dy.shape())?;
    let c = y.shape().dim(1);
    let mut dx = Vec::with_capacity(y.data().len());
    for (yr, gr) in y.data().chunks(c).zip(dy.data().chunks(c)) {
        let s: f64 = gr.iter().map(|v| f64::from(*v)).sum();
        dx.extend(yr.iter().zip(gr).map(|(yv, gv)| (f64::from(*gv) - f64::from(*yv).exp() * s) as f32));
    }
    Ok(t(y.shape().clone(), dx))
}

fn check_targets(op: &'static str, classes: usize, targets: &HostTensor<u32>) -> Result<()> {
    if let Some(bad) = targets.data().iter().find(|&&v| v as usize >= classes) {
        return Err(TensorError::argument(op, format!("target {bad} is out of range for {classes} classes")));
    }
    Ok(())
}

/// Mean negative log-likelihood of log-probabilities `logp` `[rows, classes]` at `targets`.
pub fn nll_loss(logp: &HostTensor, targets: &HostTensor<u32>) -> Result<f32> {
    let (rows, c) = geometry::classification("nll_loss", logp.shape(), targets.shape())?;
    check_targets("nll_loss", c, targets)?;
    let s: f64 = targets.data().iter().enumerate().map(|(r, &k)| -f64::from(logp.data()[r * c + k as usize])).sum();
    Ok((s / rows as f64) as f32)
}

/// Gradient of the mean NLL loss with respect to `logp`: `-1/rows` at each target.
pub fn nll_loss_backward(logp_shape: &Shape, targets: &HostTensor<u32>) -> Result<HostTensor> {
    let (rows, c) = geometry::classification("nll_loss_backward", logp_shape, targets.shape())?;
    check_targets("nll_loss_backward", c, targets)?;
    let mut d = vec![0.0f32; rows * c];
    for (r, &k) in targets.data().iter().enumerate() {
        d[r * c + k as usize] = -1.0 / rows as f32;
    }
    Ok(t(logp_shape.clone(), d))
}

/// Number of rows whose argmax equals the target.
pub fn accuracy_count(logits: &HostTensor, targets: &HostTensor<u32>) -> Result<u32> {
    let (_, c) = geometry::classification("accuracy_count", logits.shape(), targets.shape())?;
    let am = arg_reduce_axis(logits, ReduceOp::ArgMax, 1)?;
    let _ = c;
    Ok(am.data().iter().zip(targets.data()).filter(|(a, b)| a == b).count() as u32)
}

/// Value reduction (`Sum`, `Mean`, `Max`, `Min`) along `axis`; the axis is removed.
pub fn reduce_axis(x: &HostTensor, op: ReduceOp, axis: usize) -> Result<HostTensor> {
    geometry::axis(op.name(), x.shape(), axis)?;
    if op.is_arg() {
        return Err(TensorError::argument(op.name(), "use arg_reduce_axis for index results"));
    }
    let (outer, len, inner) = x.shape().split_at_axis(axis);
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let vals = (0..len).map(|a| x.data()[(o * len + a) * inner + i]);
            out.push(match op {
                ReduceOp::Sum => vals.map(f64::from).sum::<f64>() as f32,
                ReduceOp::Mean => (vals.map(f64::from).sum::<f64>() / len as f64) as f32,
                ReduceOp::Max => vals.fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::Min => vals.fold(f32::INFINITY, f32::min),
                ReduceOp::ArgMax | ReduceOp::ArgMin => unreachable!("checked above"),
            });
        }
    }
    Ok(t(x.shape().without_axis(axis), out))
}

/// Index reduction (`ArgMax`, `ArgMin`) along `axis`; the first index wins ties.
pub fn arg_reduce_axis(x: &HostTensor, op: ReduceOp, axis: usize) -> Result<HostTensor<u32>> {
    geometry::axis(op.name(), x.shape(), axis)?;
    if !op.is_arg() {
        return Err(TensorError::argument(op.name(), "use reduce_axis for value results"));
    }
    let (outer, len, inner) = x.shape().split_at_axis(axis);
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0usize;
            for a in 1..len {
                let v = x.data()[(o * len + a) * inner + i];
                let b = x.data()[(o * len + best) * inner + i];
                let better = if op == ReduceOp::ArgMax { v > b } else { v < b };
                if better {
                    best = a;
                }
            }
            out.push(best as u32);
        }
    }
    HostTensor::new(x.shape().without_axis(axis), out)
}

/// Value reduction over all elements, in `f64`.
pub fn reduce_all(x: &HostTensor, op: ReduceOp) -> Result<f64> {
    let flat = HostTensor::new([x.shape().numel()], x.data().to_vec())?;
    if op.is_arg() {
        return Ok(f64::from(arg_reduce_axis(&flat, op, 0)?.data()[0]));
    }
    if x.data().is_empty() {
        return Err(TensorError::shape(op.name(), format!("tensor {} is empty", x.shape())));
    }
    Ok(match op {
        ReduceOp::Sum => x.data().iter().map(|v| f64::from(*v)).sum(),
        ReduceOp::Mean => x.data().iter().map(|v| f64::from(*v)).sum::<f64>() / x.data().len() as f64,
        ReduceOp::Max => f64::from(x.data().iter().copied().fold(f32::NEG_INFINITY, f32::max)),
        ReduceOp::Min => f64::from(x.data().iter().copied().fold(f32::INFINITY, f32::min)),
        ReduceOp::ArgMax | ReduceOp::ArgMin => unreachable!("handled above"),
    })
}

/// One Adam step at step number `step` (1-based), updating `param`, `m` and `v` in place.
pub fn adam_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamParams, step: u32) {
    assert!(step >= 1, "adam steps are 1-based");
    let bc1 = 1.0 - h.beta1.powi(step as i32);
    let bc2 = 1.0 - h.beta2.powi(step as i32);
    let step_size = h.lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    for i in 0..param.len() {
        let g = grad[i] + h.weight_decay * param[i];
        m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g;
        v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
        let denom = v[i].sqrt() / bc2_sqrt + h.eps;
        param[i] -= step_size * m[i] / denom;
    }
}

/// One SGD step at step number `step` (1-based), updating `param` and `buf` in place.
pub fn sgd_step(param: &mut [f32], grad: &[f32], buf: &mut [f32], h: &SgdParams, step: u32) {
    for i in 0..param.len() {
        let mut g = grad[i] + h.weight_decay * param[i];
        if h.momentum != 0.0 {
            buf[i] = if step <= 1 { g } else { h.momentum * buf[i] + (1.0 - h.dampening) * g };
            g = if h.nesterov { g + h.momentum * buf[i] } else { buf[i] };
        }
        param[i] -= h.lr * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ht(shape: impl Into<Shape>, d: &[f32]) -> HostTensor {
        HostTensor::new(shape, d.to_vec()).unwrap()
    }

    #[test]
    fn matmul_small() {
        let a = ht([2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = ht([3, 2], &[7., 8., 9., 10., 11., 12.]);
        assert_eq!(matmul(&a, &b, false, false).unwrap().data(), &[58., 64., 139., 154.]);
        let at = ht([3, 2], &[1., 4., 2., 5., 3., 6.]);
        assert_eq!(matmul(&at, &b, true, false).unwrap().data(), &[58., 64., 139., 154.]);
    }

    #[test]
    fn conv_identity_kernel_copies() {
        let x = HostTensor::random([1, 1, 4, 5], 1);
        let w = ht([1, 1, 3, 3], &[0., 0., 0., 0., 1., 0., 0., 0., 0.]);
        let y = conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap();
        assert_eq!(y.data(), x.data());
    }

    #[test]
    fn pool_and_back() {
        let x = ht([1, 1, 2, 2], &[1., 4., 3., 2.]);
        let (y, i) = max_pool2d(&x, (2, 2), Conv2dParams::new(2, 0)).unwrap();
        assert_eq!((y.data(), i.data()), (&[4.0][..], &[1u32][..]));
        let g = geometry::max_pool2d(x.shape(), (2, 2), Conv2dParams::new(2, 0)).unwrap();
        let dx = max_pool2d_backward(&ht([1, 1, 1, 1], &[5.]), &i, &g).unwrap();
        assert_eq!(dx.data(), &[0., 5., 0., 0.]);
    }

    #[test]
    fn softmax_nll() {
        let x = ht([1, 3], &[1., 2., 3.]);
        let y = log_softmax(&x).unwrap();
        let s: f32 = y.data().iter().map(|v| v.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        let tg = HostTensor::new([1], vec![2u32]).unwrap();
        assert!((nll_loss(&y, &tg).unwrap() + y.data()[2]).abs() < 1e-7);
        let e = nll_loss(&y, &HostTensor::new([1], vec![3u32]).unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "nll_loss: target 3 is out of range for 3 classes");
    }

    #[test]
    fn reductions() {
        let x = ht([2, 3], &[1., 5., 3., 4., 2., 6.]);
        assert_eq!(reduce_axis(&x, ReduceOp::Sum, 0).unwrap().data(), &[5., 7., 9.]);
        assert_eq!(reduce_axis(&x, ReduceOp::Max, 1).unwrap().data(), &[5., 6.]);
        assert_eq!(arg_reduce_axis(&x, ReduceOp::ArgMin, 1).unwrap().data(), &[0, 1]);
        assert_eq!(reduce_all(&x, ReduceOp::ArgMax).unwrap(), 5.0);
        assert_eq!(reduce_all(&x, ReduceOp::Mean).unwrap(), 3.5);
    }
}
