//! `strata check`: open the adapter, run every kernel family once on small random data
//! and compare with the CPU reference.

use std::time::Instant;

use strata_gpu::{Gpu, GpuError};
use strata_tensor::cpu::{self, AdamParams, ReduceOp, SgdParams};
use strata_tensor::geometry::{self, Conv2dParams};
use strata_tensor::{HostTensor, SplitMix64};

/// The outcome of one kernel family.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckResult {
    /// Kernel family (shader file).
    pub family: &'static str,
    /// What was run.
    pub what: &'static str,
    /// Largest absolute difference to the CPU reference.
    pub max_abs_err: f32,
    /// Tolerance it is held to.
    pub tolerance: f32,
    /// Wall-clock milliseconds, including upload and download.
    pub millis: f64,
}

impl CheckResult {
    /// Whether the error is within tolerance.
    pub fn passed(&self) -> bool {
        self.max_abs_err <= self.tolerance
    }
}

fn diff(a: &HostTensor, b: &HostTensor) -> f32 {
    a.max_abs_diff(b).unwrap_or(f32::INFINITY)
}

/// Runs one check per kernel family.
pub fn run(g: &mut Gpu) -> Result<Vec<CheckResult>, GpuError> {
    let mut out = Vec::new();
    let mut rec = |family, what, err: f32, tol: f32, t: Instant| {
        out.push(CheckResult {
            family,
            what,
            max_abs_err: err,
            tolerance: tol,
            millis: t.elapsed().as_secs_f64() * 1e3,
        });
    };

    let t = Instant::now();
    let a = HostTensor::random([3, 1001], 1);
    let b = HostTensor::random([3, 1001], 2);
    let (ga, gb) = (g.upload(&a)?, g.upload(&b)?);
    let s = g.add(&ga, &gb)?;
    let r = g.relu(&s)?;
    let got = g.download(&r)?;
    let want = cpu::relu(&cpu::add(&a, &b)?);
    rec("elementwise.wgsl", "relu(a + b), 3x1001", diff(&got, &want), 0.0, t);

    let t = Instant::now();
    let x = HostTensor::random([1 << 20], 3);
    let gx = g.upload(&x)?;
    let sum = g.reduce(&gx, ReduceOp::Sum, None)?;
    let got = g.read_scalar(&sum)?;
    let want = cpu::reduce_all(&x, ReduceOp::Sum)? as f32;
    rec("reduce.wgsl", "sum of 1M", (got - want).abs(), 1e-3, t);

    let t = Instant::now();
    let a = HostTensor::random([65, 130], 4);
    let b = HostTensor::random([65, 97], 5);
    let (ga, gb) = (g.upload(&a)?, g.upload(&b)?);
    let c = g.matmul(&ga, &gb, true, false)?;
    let got = g.download(&c)?;
    let want = cpu::matmul(&a, &b, true, false)?;
    let family = match g.gemm_kernel() {
        strata_gpu::GemmKernel::Subgroup8 => "gemm_subgroup.wgsl + layout.wgsl",
        strata_gpu::GemmKernel::Tiled => "gemm_tiled.wgsl + layout.wgsl",
    };
    rec(family, "a^T @ b, 130x65x97", diff(&got, &want), 1e-4, t);

    let params = Conv2dParams::new(1, 1);
    let x = HostTensor::random([4, 3, 13, 11], 6);
    let w = HostTensor::random([8, 3, 3, 3], 7);
    let bias = HostTensor::random([8], 8);
    let (gx, gw, gbias) = (g.upload(&x)?, g.upload(&w)?, g.upload(&bias)?);
    let algo = g.conv_algo();
    // Both convolution algorithms, whichever `auto` would pick here.
    // Winograd's transforms scale by up to 8 and 1/24 and its weight gradient sums products
    // of transformed tiles, so it rounds a few times more than im2col (6.8e-5 measured on
    // lavapipe for this case, against 9.5e-6).
    for (family, conv_algo, tol) in
        [("conv2d.wgsl", strata_gpu::ConvAlgo::Im2col, 1e-4), ("winograd.wgsl", strata_gpu::ConvAlgo::Winograd, 3e-4)]
    {
        let t = Instant::now();
        g.set_conv_algo(conv_algo);
        let y = g.conv2d(&gx, &gw, Some(&gbias), params)?;
        let dy = HostTensor::random(y.shape().clone(), 9);
        let gdy = g.upload(&dy)?;
        let grads = g.conv2d_backward(&gx, &gw, &gdy, params, true)?;
        let r = cpu::conv2d_backward(&x, &w, &dy, params)?;
        let err = diff(&g.download(&y)?, &cpu::conv2d(&x, &w, Some(&bias), params)?)
            .max(diff(&g.download(&grads.dw)?, &r.dw))
            .max(diff(&g.download(grads.dx.as_ref().expect("requested"))?, &r.dx))
            .max(diff(&g.download(&grads.db)?, &r.db));
        rec(family, "conv 3->8 3x3 forward + backward", err, tol, t);
    }
    g.set_conv_algo(algo);

    let t = Instant::now();
    let pp = Conv2dParams::new(2, 0);
    let (py, pidx) = g.max_pool2d(&gx, (2, 2), pp)?;
    let (ry, ri) = cpu::max_pool2d(&x, (2, 2), pp)?;
    let pg = geometry::max_pool2d(x.shape(), (2, 2), pp)?;
    let pdy = HostTensor::random(ry.shape().clone(), 10);
    let gpdy = g.upload(&pdy)?;
    let pdx = g.max_pool2d_backward(&gpdy, &pidx, x.shape(), (2, 2), pp)?;
    let err = diff(&g.download(&py)?, &ry).max(diff(&g.download(&pdx)?, &cpu::max_pool2d_backward(&pdy, &ri, &pg)?));
    rec("pool.wgsl", "max pool 2x2 forward + backward", err, 1e-6, t);

    let t = Instant::now();
    let logits = HostTensor::random([64, 10], 11);
    let mut rng = SplitMix64(12);
    let targets = HostTensor::new([64], (0..64).map(|_| rng.below(10) as u32).collect())?;
    let (gl, gt) = (g.upload(&logits)?, g.upload(&targets)?);
    let logp = g.log_softmax(&gl)?;
    let loss = g.nll_loss(&logp, &gt)?;
    let got = g.read_scalar(&loss)?;
    let want = cpu::nll_loss(&cpu::log_softmax(&logits)?, &targets)?;
    rec("loss.wgsl", "log_softmax + nll, 64x10", (got - want).abs(), 1e-5, t);

    let t = Instant::now();
    let n = 1000;
    let mut p = HostTensor::random([n], 13).into_data();
    let grad = HostTensor::random([n], 14);
    let (mut m, mut v, mut buf) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let gp = g.upload(&HostTensor::new([n], p.clone())?)?;
    let gg = g.upload(&grad)?;
    let (gm, gv, gbuf) = (
        g.zeros([n], strata_tensor::DType::F32)?,
        g.zeros([n], strata_tensor::DType::F32)?,
        g.zeros([n], strata_tensor::DType::F32)?,
    );
    g.adam_step(&gp, &gg, &gm, &gv, &AdamParams::default(), 1)?;
    g.sgd_step(&gp, &gg, &gbuf, &SgdParams::default(), 1)?;
    cpu::adam_step(&mut p, grad.data(), &mut m, &mut v, &AdamParams::default(), 1);
    cpu::sgd_step(&mut p, grad.data(), &mut buf, &SgdParams::default(), 1);
    rec("optim.wgsl", "adam + sgd step, 1000", diff(&g.download(&gp)?, &HostTensor::new([n], p)?), 1e-5, t);
    Ok(out)
}
