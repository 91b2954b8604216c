//! `strata bench kernels`: convolution, matrix multiply and reductions on the GPU, each
//! against a CPU reference measured in the same run.

use strata_gpu::{ConvAlgo, Gpu, GpuError};
use strata_tensor::cpu::ReduceOp;
use strata_tensor::geometry::{self, Conv2dParams};
use strata_tensor::{HostTensor, Shape};

use super::cpu::{CpuConv, memcpy_bandwidth, sgemm};
use super::{Figure, median_seconds};

/// How long to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Untimed iterations before timing.
    pub warmup: usize,
    /// Timed iterations (the median is reported).
    pub iters: usize,
    /// Run only cases whose name contains this text.
    pub filter: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { warmup: 2, iters: 7, filter: None }
    }
}

/// Target for convolution forward+backward on the 64->128 layer (GFLOP/s, counted as
/// direct-convolution FLOPs whatever the algorithm), with the algorithm chosen by
/// measurement (issue 10).
pub const CONV_FWD_BWD_TARGET_GFLOPS: f64 = 45.0;
/// Target for the reduction's bandwidth as a fraction of memory-copy bandwidth.
pub const SUM_TARGET_COPY_FRACTION: f64 = 0.5;

const CPU_REF: &str = "cpu im2col+sgemm";

/// The reference CNN's two convolution layers at batch 64: (name, input, weight).
pub fn conv_cases() -> Vec<(&'static str, [usize; 4], [usize; 4])> {
    vec![("1->64@28x28 b64", [64, 1, 28, 28], [64, 1, 3, 3]), ("64->128@14x14 b64", [64, 64, 14, 14], [128, 64, 3, 3])]
}

/// The convolution algorithms each convolution case runs with, by case-name suffix.
const CONV_ALGOS: [(ConvAlgo, &str); 3] =
    [(ConvAlgo::Im2col, "im2col"), (ConvAlgo::Winograd, "winograd"), (ConvAlgo::Auto, "auto")];

/// Runs every kernel case and returns its figures; `on_figure` sees each as it is made.
pub fn run(gpu: &mut Gpu, opts: BenchOptions, mut on_figure: impl FnMut(&Figure)) -> Result<Vec<Figure>, GpuError> {
    let mut out = Vec::new();
    let wanted = |case: &str| opts.filter.as_deref().is_none_or(|f| case.contains(f));
    let algo = gpu.conv_algo();
    for (name, xs, ws) in conv_cases() {
        let algos: Vec<_> =
            CONV_ALGOS.iter().filter(|(_, a)| wanted(&format!("conv2d_fwd_bwd {name} {a}"))).copied().collect();
        if !algos.is_empty() {
            for f in conv_figures(gpu, &opts, name, xs, ws, &algos)? {
                on_figure(&f);
                out.push(f);
            }
        }
    }
    gpu.set_conv_algo(algo);
    if wanted("matmul 1024x1024x1024") {
        let f = matmul_figure(gpu, &opts, 1024)?;
        on_figure(&f);
        out.push(f);
    }
    let copy_bps = (wanted("sum") || wanted("adam")).then(|| memcpy_bandwidth(256 << 20, opts.iters));
    if let Some(copy_bps) = copy_bps.filter(|_| wanted("sum")) {
        for m in [16usize, 64] {
            let f = sum_figure(gpu, &opts, m << 20, copy_bps)?;
            on_figure(&f);
            out.push(f);
        }
    }
    if let Some(copy_bps) = copy_bps.filter(|_| wanted("adam")) {
        let f = adam_figure(gpu, &opts, 6272 * 512, copy_bps)?;
        on_figure(&f);
        out.push(f);
    }
    Ok(out)
}

/// One Adam step over `len` parameters (the reference CNN's largest weight), in GB/s of
/// the seven streams it reads or writes (parameter, gradient, both moments).
fn adam_figure(gpu: &mut Gpu, opts: &BenchOptions, len: usize, copy_bps: f64) -> Result<Figure, GpuError> {
    let h = strata_tensor::cpu::AdamParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let param = gpu.upload(&HostTensor::random([len], 1))?;
    let grad = gpu.upload(&strata_tensor::cpu::scale(&HostTensor::random([len], 2), 1e-3))?;
    let m = gpu.upload(&HostTensor::new([len], vec![0.0; len])?)?;
    let v = gpu.upload(&HostTensor::new([len], vec![0.0; len])?)?;
    let mut step = 0;
    let s = median_seconds(opts.warmup, opts.iters, || {
        step += 1;
        gpu.adam_step(&param, &grad, &m, &v, &h, step)?;
        gpu.sync()
    })?;
    Ok(bandwidth_figure(format!("adam {:.1}M params", len as f64 / 1e6), 7 * 4 * len, s, copy_bps, None))
}

/// Forward and forward+backward figures of one convolution with each of `algos`, all
/// against one CPU reference measured in the same run. FLOPs are the direct
/// convolution's, so the algorithms compare by time. The `auto` case's warm-up runs
/// include its timing of both algorithms, which a training run pays once per layer.
fn conv_figures(
    gpu: &mut Gpu,
    opts: &BenchOptions,
    name: &str,
    xs: [usize; 4],
    ws: [usize; 4],
    algos: &[(ConvAlgo, &str)],
) -> Result<Vec<Figure>, GpuError> {
    let params = Conv2dParams::new(1, 1);
    let x = HostTensor::random(xs, 1);
    let w = HostTensor::random(ws, 2);
    let g = geometry::conv2d(x.shape(), w.shape(), None, params)?;
    let flops = g.forward_flops();
    let (gx, gw) = (gpu.upload(&x)?, gpu.upload(&w)?);
    let dy = HostTensor::random(g.output_shape(), 3);
    let gdy = gpu.upload(&dy)?;

    let mut gpu_times = Vec::new();
    for &(algo, suffix) in algos {
        gpu.set_conv_algo(algo);
        // Keep the patch matrix as training does: the backward pass reuses it.
        let opts_fwd = strata_gpu::ConvForward { relu: false, keep_col: true };
        let gpu_fwd = median_seconds(opts.warmup, opts.iters, || {
            let y = gpu.conv2d(&gx, &gw, None, params)?;
            gpu.sync()?;
            drop(y);
            Ok::<(), GpuError>(())
        })?;
        let gpu_all = median_seconds(opts.warmup, opts.iters, || {
            let (y, col) = gpu.conv2d_with(&gx, &gw, None, params, opts_fwd)?;
            let grads = gpu.conv2d_backward_with(&gx, &gw, &gdy, params, true, col.as_ref())?;
            gpu.sync()?;
            drop((y, col, grads));
            Ok::<(), GpuError>(())
        })?;
        gpu_times.push((suffix, gpu_fwd, gpu_all));
    }

    let mut conv = CpuConv::new(g);
    let mut y = vec![0.0; g.output_shape().numel()];
    let (mut dw, mut dx) = (vec![0.0; w.data().len()], vec![0.0; x.data().len()]);
    let cpu_fwd = median_seconds::<()>(1, opts.iters, || {
        conv.forward(x.data(), w.data(), &mut y);
        Ok(())
    })
    .expect("infallible");
    let cpu_all = median_seconds::<()>(1, opts.iters, || {
        conv.forward(x.data(), w.data(), &mut y);
        conv.backward(x.data(), w.data(), dy.data(), &mut dw, &mut dx);
        Ok(())
    })
    .expect("infallible");
    let mut figures = Vec::new();
    for (suffix, gpu_fwd, gpu_all) in gpu_times {
        let target = (ws[1] == 64 && suffix == "auto").then_some(CONV_FWD_BWD_TARGET_GFLOPS);
        figures.push(gflops_figure(format!("conv2d_fwd {name} {suffix}"), flops, gpu_fwd, cpu_fwd, None));
        figures.push(gflops_figure(format!("conv2d_fwd_bwd {name} {suffix}"), 3.0 * flops, gpu_all, cpu_all, target));
    }
    Ok(figures)
}

fn matmul_figure(gpu: &mut Gpu, opts: &BenchOptions, n: usize) -> Result<Figure, GpuError> {
    let a = HostTensor::random([n, n], 4);
    let b = HostTensor::random([n, n], 5);
    let (ga, gb) = (gpu.upload(&a)?, gpu.upload(&b)?);
    let gpu_mm = median_seconds(opts.warmup, opts.iters, || {
        let c = gpu.matmul(&ga, &gb, false, false)?;
        gpu.sync()?;
        drop(c);
        Ok::<(), GpuError>(())
    })?;
    let mut c = vec![0.0; n * n];
    let cpu_mm = median_seconds::<()>(1, opts.iters, || {
        sgemm(n, n, n, a.data(), n, 1, b.data(), n, 1, &mut c, n, false);
        Ok(())
    })
    .expect("infallible");
    let flops = 2.0 * (n * n * n) as f64;
    Ok(Figure {
        reference: "cpu sgemm".into(),
        ..gflops_figure(format!("matmul {n}x{n}x{n}"), flops, gpu_mm, cpu_mm, None)
    })
}

fn sum_figure(gpu: &mut Gpu, opts: &BenchOptions, len: usize, copy_bps: f64) -> Result<Figure, GpuError> {
    let host = HostTensor::new(Shape::from([len]), (0..len).map(|i| (i % 7) as f32).collect())?;
    let gx = gpu.upload(&host)?;
    drop(host);
    let s = median_seconds(opts.warmup, opts.iters, || {
        let r = gpu.reduce(&gx, ReduceOp::Sum, None)?;
        gpu.sync()?;
        drop(r);
        Ok::<(), GpuError>(())
    })?;
    let target = Some(SUM_TARGET_COPY_FRACTION * copy_bps / 1e9);
    Ok(bandwidth_figure(format!("sum {}M f32", len >> 20), len * 4, s, copy_bps, target))
}

/// A figure in GB/s for `bytes` moved in `secs`, against memory-copy bandwidth.
fn bandwidth_figure(case: String, bytes: usize, secs: f64, copy_bps: f64, target: Option<f64>) -> Figure {
    let bps = bytes as f64 / secs;
    Figure {
        case,
        unit: "GB/s",
        value: bps / 1e9,
        seconds: secs,
        reference: "memcpy".into(),
        reference_value: copy_bps / 1e9,
        ratio: bps / copy_bps,
        target,
    }
}

fn gflops_figure(case: String, flops: f64, gpu_s: f64, cpu_s: f64, target: Option<f64>) -> Figure {
    Figure {
        case,
        unit: "GFLOP/s",
        value: flops / gpu_s / 1e9,
        seconds: gpu_s,
        reference: CPU_REF.into(),
        reference_value: flops / cpu_s / 1e9,
        ratio: cpu_s / gpu_s,
        target,
    }
}
