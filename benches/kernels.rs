//! Criterion benchmarks of the GPU kernels, each group pairing the GPU with the CPU
//! reference that `strata bench kernels` compares against. Throughput is in elements
//! per second where an element is one floating-point operation (conv, matmul) or one
//! byte (sum, memcpy), so criterion's `Gelem/s` reads as GFLOP/s or GB/s.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use strata::cli::bench::cpu::{CpuConv, sgemm};
use strata_gpu::Gpu;
use strata_tensor::HostTensor;
use strata_tensor::cpu::ReduceOp;
use strata_tensor::geometry::{self, Conv2dParams};

fn gpu() -> Option<Gpu> {
    match Gpu::from_env() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("no GPU adapter, GPU benchmarks skipped: {e}");
            None
        }
    }
}

fn conv(c: &mut Criterion) {
    let mut gpu = gpu();
    let params = Conv2dParams::new(1, 1);
    let (x, w) = (HostTensor::random([64, 64, 14, 14], 1), HostTensor::random([128, 64, 3, 3], 2));
    let g = geometry::conv2d(x.shape(), w.shape(), None, params).expect("valid shapes");
    let dy = HostTensor::random(g.output_shape(), 3);
    let mut group = c.benchmark_group("conv2d_fwd_bwd 64->128@14x14 b64");
    group.throughput(Throughput::Elements((3.0 * g.forward_flops()) as u64));
    group.sample_size(10);
    if let Some(gpu) = gpu.as_mut() {
        let (gx, gw, gdy) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&dy).unwrap());
        group.bench_function(BenchmarkId::new("gpu", gpu.info().name.clone()), |b| {
            b.iter(|| {
                let y = gpu.conv2d(&gx, &gw, None, params).unwrap();
                let grads = gpu.conv2d_backward(&gx, &gw, &gdy, params, true).unwrap();
                gpu.sync().unwrap();
                (y, grads)
            })
        });
    }
    let mut cpu = CpuConv::new(g);
    let mut y = vec![0.0; g.output_shape().numel()];
    let (mut dw, mut dx) = (vec![0.0; w.data().len()], vec![0.0; x.data().len()]);
    group.bench_function("cpu im2col+sgemm", |b| {
        b.iter(|| {
            cpu.forward(x.data(), w.data(), &mut y);
            cpu.backward(x.data(), w.data(), dy.data(), &mut dw, &mut dx);
        })
    });
    group.finish();
}

fn matmul(c: &mut Criterion) {
    let mut gpu = gpu();
    let n = 1024;
    let (a, b) = (HostTensor::random([n, n], 4), HostTensor::random([n, n], 5));
    let mut group = c.benchmark_group("matmul 1024^3");
    group.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    group.sample_size(10);
    if let Some(gpu) = gpu.as_mut() {
        let (ga, gb) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
        group.bench_function("gpu", |bch| {
            bch.iter(|| {
                let c = gpu.matmul(&ga, &gb, false, false).unwrap();
                gpu.sync().unwrap();
                c
            })
        });
    }
    let mut out = vec![0.0; n * n];
    group.bench_function("cpu sgemm", |bch| {
        bch.iter(|| sgemm(n, n, n, a.data(), n, 1, b.data(), n, 1, &mut out, n, false))
    });
    group.finish();
}

fn sum(c: &mut Criterion) {
    let mut gpu = gpu();
    let len = 16 << 20;
    let mut group = c.benchmark_group("sum 16M f32");
    group.throughput(Throughput::Bytes((len * 4) as u64));
    group.sample_size(10);
    if let Some(gpu) = gpu.as_mut() {
        let gx = gpu.upload(&HostTensor::random([len], 6)).unwrap();
        group.bench_function("gpu", |b| {
            b.iter(|| {
                let s = gpu.reduce(&gx, ReduceOp::Sum, None).unwrap();
                gpu.sync().unwrap();
                s
            })
        });
    }
    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    group.bench_function("memcpy reference", |b| b.iter(|| dst.copy_from_slice(std::hint::black_box(&src))));
    group.finish();
}

criterion_group!(benches, conv, matmul, sum);
criterion_main!(benches);
