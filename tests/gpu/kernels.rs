//! Every kernel family against its CPU reference, on awkward shapes.

use strata_gpu::{ConvAlgo, GemmKernel, Gpu, Op, TensorId};
use strata_tensor::cpu::{self, AdamParams, ReduceOp, SgdParams};
use strata_tensor::geometry::{self, Conv2dParams};
use strata_tensor::{HostTensor, Shape, SplitMix64};

use crate::common::{assert_close, both_gemm_kernels, gemm_kernels, gpu_required, gpu_with, max_abs};
use crate::gpu_or_skip;

fn up(g: &mut Gpu, t: &HostTensor) -> strata_gpu::GpuTensor {
    g.upload(t).unwrap()
}

fn down(g: &mut Gpu, t: &strata_gpu::GpuTensor) -> HostTensor {
    g.download(t).unwrap()
}

const SIZES: &[&[usize]] = &[&[1], &[3], &[5], &[64], &[1023], &[7, 9], &[2, 3, 5, 7]];

#[test]
fn elementwise_matches_reference() {
    let mut g = gpu_or_skip!();
    for (i, dims) in SIZES.iter().enumerate() {
        let a = HostTensor::random(dims.to_vec(), 10 + i as u64);
        let b = HostTensor::random(dims.to_vec(), 20 + i as u64);
        let (ga, gb) = (up(&mut g, &a), up(&mut g, &b));
        let r = g.add(&ga, &gb).unwrap();
        assert_close("add", &down(&mut g, &r), &cpu::add(&a, &b).unwrap(), 0.0, 0.0);
        let r = g.sub(&ga, &gb).unwrap();
        assert_close("sub", &down(&mut g, &r), &cpu::sub(&a, &b).unwrap(), 0.0, 0.0);
        let r = g.mul(&ga, &gb).unwrap();
        assert_close("mul", &down(&mut g, &r), &cpu::mul(&a, &b).unwrap(), 0.0, 0.0);
        let r = g.scale(&ga, -2.5).unwrap();
        assert_close("scale", &down(&mut g, &r), &cpu::scale(&a, -2.5), 0.0, 0.0);
        let r = g.relu(&ga).unwrap();
        assert_close("relu", &down(&mut g, &r), &cpu::relu(&a), 0.0, 0.0);
        let r = g.relu_backward(&ga, &gb).unwrap();
        assert_close("relu_backward", &down(&mut g, &r), &cpu::relu_backward(&a, &b).unwrap(), 0.0, 0.0);
        let y = g.copy(&gb).unwrap();
        g.axpy(0.5, &ga, &y).unwrap();
        assert_close("axpy", &down(&mut g, &y), &cpu::axpy(0.5, &a, &b).unwrap(), 1e-6, 1e-6);
        g.axpy(1.0, &y.clone(), &y).unwrap();
        assert_close("axpy aliased", &down(&mut g, &y), &cpu::scale(&cpu::axpy(0.5, &a, &b).unwrap(), 2.0), 1e-6, 1e-6);
        g.fill(&y, 3.25).unwrap();
        assert!(down(&mut g, &y).data().iter().all(|&v| v == 3.25));
        if dims.len() >= 2 {
            let bias = HostTensor::random([dims[1]], 30);
            let gbias = up(&mut g, &bias);
            let r = g.add_channel_bias(&ga, &gbias).unwrap();
            assert_close("bias", &down(&mut g, &r), &cpu::add_channel_bias(&a, &bias).unwrap(), 0.0, 0.0);
        }
    }
    let (p, q) = (up(&mut g, &HostTensor::random([2, 3], 1)), up(&mut g, &HostTensor::random([3, 2], 1)));
    let e = g.add(&p, &q).unwrap_err();
    assert_eq!(e.to_string(), "add: operands [2,3] and [3,2] differ in shape");
}

#[test]
fn reductions_match_reference() {
    let mut g = gpu_or_skip!();
    let ops = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min, ReduceOp::ArgMax, ReduceOp::ArgMin];
    for (i, n) in [1usize, 2, 7, 64, 1000, 100_003].into_iter().enumerate() {
        let x = HostTensor::random([n], 40 + i as u64);
        let gx = up(&mut g, &x);
        for op in ops {
            let r = g.reduce(&gx, op, None).unwrap();
            let want = cpu::reduce_all(&x, op).unwrap();
            let got = if op.is_arg() {
                f64::from(g.download::<u32>(&r).unwrap().data()[0])
            } else {
                f64::from(g.read_scalar(&r).unwrap())
            };
            let tol = if op.is_arg() { 0.0 } else { 1e-5 * (n as f64).sqrt() + 1e-6 };
            assert!((got - want).abs() <= tol, "{} of {n}: {got} vs {want}", op.name());
        }
    }
    // Ties go to the first index.
    let x = HostTensor::new([6], vec![1.0, 5.0, -2.0, 5.0, -2.0, 0.0]).unwrap();
    let gx = up(&mut g, &x);
    let am = g.reduce(&gx, ReduceOp::ArgMax, None).unwrap();
    assert_eq!(g.download::<u32>(&am).unwrap().data(), &[1]);
    let am = g.reduce(&gx, ReduceOp::ArgMin, None).unwrap();
    assert_eq!(g.download::<u32>(&am).unwrap().data(), &[2]);
    // Along an axis: lane path, group path (few outputs, long axis), every axis of a 3-D tensor.
    for (dims, seed) in
        [(vec![3, 5, 7], 1u64), (vec![2, 5000], 2), (vec![5000, 3], 3), (vec![1, 1], 4), (vec![4, 1, 3], 5)]
    {
        let x = HostTensor::random(dims.clone(), seed);
        let gx = up(&mut g, &x);
        for axis in 0..dims.len() {
            for op in ops {
                let r = g.reduce(&gx, op, Some(axis)).unwrap();
                if op.is_arg() {
                    let want = cpu::arg_reduce_axis(&x, op, axis).unwrap();
                    assert_eq!(g.download::<u32>(&r).unwrap(), want, "{} axis {axis} of {dims:?}", op.name());
                } else {
                    let want = cpu::reduce_axis(&x, op, axis).unwrap();
                    assert_close(
                        &format!("{} axis {axis} of {dims:?}", op.name()),
                        &down(&mut g, &r),
                        &want,
                        1e-5,
                        1e-5,
                    );
                }
            }
        }
    }
    let d = gx_dummy(&mut g);
    let e = g.reduce(&d, ReduceOp::Sum, Some(2)).unwrap_err();
    assert_eq!(e.to_string(), "sum: axis 2 is out of range for [2,3]");
}

fn gx_dummy(g: &mut Gpu) -> strata_gpu::GpuTensor {
    g.upload(&HostTensor::random([2, 3], 9)).unwrap()
}

fn matmul_cases() -> Vec<(usize, usize, usize)> {
    vec![(1, 1, 1), (3, 5, 7), (17, 33, 65), (16, 64, 64), (130, 9, 10), (64, 576, 128), (5, 1000, 3), (100, 4, 260)]
}

#[test]
fn matmul_matches_reference_with_both_kernels() {
    for kernel in gemm_kernels() {
        let mut g = gpu_with(Some(kernel)).expect("kernel list comes from a working device");
        for (i, (m, k, n)) in matmul_cases().into_iter().enumerate() {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = HostTensor::random(if ta { [k, m] } else { [m, k] }, 100 + i as u64);
                let b = HostTensor::random(if tb { [n, k] } else { [k, n] }, 200 + i as u64);
                let want = cpu::matmul(&a, &b, ta, tb).unwrap();
                let (ga, gb) = (up(&mut g, &a), up(&mut g, &b));
                let got = g.matmul(&ga, &gb, ta, tb).unwrap();
                let what = format!("{kernel:?} matmul {m}x{k}x{n} ta={ta} tb={tb}");
                assert_close(&what, &down(&mut g, &got), &want, 1e-4, 1e-5 * (k as f32).sqrt());
            }
        }
        let (p, q) = (up(&mut g, &HostTensor::random([2, 3], 1)), up(&mut g, &HostTensor::random([4, 5], 1)));
        let e = g.matmul(&p, &q, false, false).unwrap_err();
        assert!(e.to_string().starts_with("matmul: inner dimensions differ"), "{e}");
    }
}

#[test]
fn linear_forward_and_backward_match_reference() {
    for kernel in gemm_kernels() {
        let mut g = gpu_with(Some(kernel)).unwrap();
        for (batch, fin, fout) in [(1, 3, 2), (64, 6272, 10), (7, 13, 512)] {
            let x = HostTensor::random([batch, fin], 1);
            let w = HostTensor::random([fout, fin], 2);
            let b = HostTensor::random([fout], 3);
            let dy = HostTensor::random([batch, fout], 4);
            let (gx, gw, gb, gdy) = (up(&mut g, &x), up(&mut g, &w), up(&mut g, &b), up(&mut g, &dy));
            let y = g.linear(&gx, &gw, Some(&gb)).unwrap();
            let tol = 1e-5 * (fin as f32).sqrt();
            assert_close("linear", &down(&mut g, &y), &cpu::linear(&x, &w, Some(&b)).unwrap(), 1e-4, tol);
            let (dx, dw, db) = g.linear_backward(&gx, &gw, &gdy).unwrap();
            let (rx, rw, rb) = cpu::linear_backward(&x, &w, &dy).unwrap();
            assert_close("linear dx", &down(&mut g, &dx), &rx, 1e-4, tol);
            assert_close("linear dw", &down(&mut g, &dw), &rw, 1e-4, 1e-5 * (batch as f32).sqrt());
            assert_close("linear db", &down(&mut g, &db), &rb, 1e-4, 1e-5 * (batch as f32).sqrt());
        }
        let (p, q) = (up(&mut g, &HostTensor::random([2, 3], 1)), up(&mut g, &HostTensor::random([4, 5], 1)));
        let e = g.linear(&p, &q, None).unwrap_err();
        assert_eq!(e.to_string(), "linear: input [2,3] has 3 features, weight [4,5] expects 5");
    }
}

/// (input shape, weight shape, stride, padding)
fn conv_cases() -> Vec<([usize; 4], [usize; 4], usize, usize)> {
    vec![
        ([1, 1, 5, 5], [1, 1, 3, 3], 1, 1),
        ([2, 3, 7, 9], [4, 3, 3, 3], 1, 1),
        ([1, 3, 9, 7], [5, 3, 5, 3], 2, 2),
        ([3, 2, 6, 6], [3, 2, 1, 1], 1, 0),
        ([2, 1, 28, 28], [64, 1, 3, 3], 1, 1),
        ([2, 64, 14, 14], [128, 64, 3, 3], 1, 1),
        ([1, 2, 4, 4], [2, 2, 4, 4], 1, 0),
        ([2, 3, 8, 5], [2, 3, 3, 2], 3, 1),
    ]
}

#[test]
fn conv2d_matches_reference_with_both_kernels_and_algorithms() {
    for (kernel, algo) in gemm_kernels().into_iter().flat_map(|k| [(k, ConvAlgo::Im2col), (k, ConvAlgo::Winograd)]) {
        let mut g = gpu_with(Some(kernel)).unwrap();
        g.set_conv_algo(algo);
        for (i, (xs, ws, s, p)) in conv_cases().into_iter().enumerate() {
            let params = Conv2dParams::new(s, p);
            let x = HostTensor::random(xs, 300 + i as u64);
            let w = HostTensor::random(ws, 400 + i as u64);
            let b = HostTensor::random([ws[0]], 500 + i as u64);
            let (gx, gw, gb) = (up(&mut g, &x), up(&mut g, &w), up(&mut g, &b));
            let what = format!("{kernel:?} {algo:?} conv2d x{xs:?} w{ws:?} s{s} p{p}");
            let y = g.conv2d(&gx, &gw, Some(&gb), params).unwrap();
            let want = cpu::conv2d(&x, &w, Some(&b), params).unwrap();
            let k = (ws[1] * ws[2] * ws[3]) as f32;
            assert_close(&what, &down(&mut g, &y), &want, 1e-4, 1e-5 * k.sqrt());
            let dy = HostTensor::random(want.shape().clone(), 600 + i as u64);
            let gdy = up(&mut g, &dy);
            let grads = g.conv2d_backward(&gx, &gw, &gdy, params, true).unwrap();
            let r = cpu::conv2d_backward(&x, &w, &dy, params).unwrap();
            let pix = (want.shape().dim(0) * want.shape().dim(2) * want.shape().dim(3)) as f32;
            assert_close(
                &format!("{what} dx"),
                &down(&mut g, grads.dx.as_ref().unwrap()),
                &r.dx,
                1e-4,
                1e-5 * (ws[0] as f32 * k).sqrt(),
            );
            assert_close(&format!("{what} dw"), &down(&mut g, &grads.dw), &r.dw, 1e-4, 1e-5 * pix.sqrt());
            assert_close(&format!("{what} db"), &down(&mut g, &grads.db), &r.db, 1e-4, 1e-5 * pix.sqrt());
            let no_dx = g.conv2d_backward(&gx, &gw, &gdy, params, false).unwrap();
            assert!(no_dx.dx.is_none());
            // Fused ReLU, and a kept patch matrix reused by the backward pass.
            let opts = strata_gpu::ConvForward { relu: true, keep_col: true };
            let (yr, col) = g.conv2d_with(&gx, &gw, Some(&gb), params, opts).unwrap();
            assert_close(&format!("{what} relu"), &down(&mut g, &yr), &cpu::relu(&want), 1e-4, 1e-5 * k.sqrt());
            // im2col keeps its patch matrix, Winograd its input transform.
            let winograd = algo == ConvAlgo::Winograd && ws[2..] == [3, 3] && s == 1;
            let col = col.expect("small batches fit one chunk");
            assert_eq!(col.shape().rank(), if winograd { 3 } else { 2 }, "{what}: kept {}", col.shape());
            let again = g.conv2d_backward_with(&gx, &gw, &gdy, params, true, Some(&col)).unwrap();
            assert_close(
                &format!("{what} dw from kept patches"),
                &down(&mut g, &again.dw),
                &r.dw,
                1e-4,
                1e-5 * pix.sqrt(),
            );
            assert_close(&format!("{what} dw without dx"), &down(&mut g, &no_dx.dw), &r.dw, 1e-4, 1e-5 * pix.sqrt());
        }
        let (p, q) =
            (up(&mut g, &HostTensor::random([32, 3, 28, 28], 1)), up(&mut g, &HostTensor::random([64, 1, 3, 3], 1)));
        let bad = g.conv2d(&p, &q, None, Conv2dParams::new(1, 1));
        assert_eq!(
            bad.unwrap_err().to_string(),
            "conv2d: input [32,3,28,28] has 3 channels, weight [64,1,3,3] expects 1"
        );
    }
}

#[test]
fn conv2d_splits_the_batch_when_the_patch_matrix_is_large() {
    let mut g = gpu_or_skip!();
    // Force chunks of a few images: the result must not depend on the chunking.
    g.set_scratch_limit(64 * 9 * 14 * 14 * 4 * 3);
    let params = Conv2dParams::new(1, 1);
    let x = HostTensor::random([7, 64, 14, 14], 1);
    let w = HostTensor::random([16, 64, 3, 3], 2);
    let dy = HostTensor::random([7, 16, 14, 14], 3);
    let (gx, gw) = (up(&mut g, &x), up(&mut g, &w));
    let y = g.conv2d(&gx, &gw, None, params).unwrap();
    assert_close("chunked conv2d", &down(&mut g, &y), &cpu::conv2d(&x, &w, None, params).unwrap(), 1e-4, 1e-4);
    let gdy = up(&mut g, &dy);
    let grads = g.conv2d_backward(&gx, &gw, &gdy, params, true).unwrap();
    let r = cpu::conv2d_backward(&x, &w, &dy, params).unwrap();
    assert_close("chunked dx", &down(&mut g, grads.dx.as_ref().unwrap()), &r.dx, 1e-4, 1e-4);
    assert_close("chunked dw", &down(&mut g, &grads.dw), &r.dw, 1e-4, 1e-3);
}

/// Winograd cases (input shape, output channels, padding): planes smaller than a tile
/// and not multiples of it, tile rows of 4 and 8 tiles (the kernels' row-sharing path)
/// and of other counts, padding 0 to 2, one image and several, channel counts that are
/// not multiples of 4, and the reference CNN's second layer. The last three run the
/// row-sharing input transform (rows of 4 tiles, reading vec4s) with padding 0 and 2,
/// forward and in the input gradient, on tensors whose sizes are not multiples of 4.
/// Planes 13 to 16 wide with whole vec4s under each tile row take the output transform
/// that stores rows as vec4 (widths 13, 14, 15 and 16 among these cases); those with 2
/// or 4 tile rows take the input transforms that give a lane 2 or 4 tile rows, the last
/// two also with a chunk shorter than the others when chunked.
fn winograd_cases() -> Vec<([usize; 4], usize, usize)> {
    vec![
        ([1, 1, 3, 3], 1, 1),
        ([2, 3, 7, 9], 5, 1),
        ([3, 5, 6, 5], 7, 0),
        ([1, 2, 5, 11], 3, 2),
        ([2, 6, 4, 4], 2, 1),
        ([2, 13, 17, 10], 6, 0),
        ([2, 3, 6, 30], 5, 1),
        ([3, 64, 14, 14], 128, 1),
        ([1, 5, 7, 14], 3, 2),
        ([2, 3, 5, 16], 6, 2),
        ([1, 7, 6, 16], 5, 0),
        ([1, 3, 8, 13], 6, 1),
        ([2, 2, 4, 15], 3, 1),
        ([3, 5, 8, 14], 96, 1),
        ([3, 7, 13, 16], 64, 1),
    ]
}

#[test]
fn winograd_matches_reference_forward_and_input_gradient() {
    for kernel in gemm_kernels() {
        let mut g = gpu_with(Some(kernel)).unwrap();
        g.set_conv_algo(ConvAlgo::Winograd);
        for chunked in [false, true] {
            if chunked {
                // Room for the transforms of about one image of the largest case.
                g.set_scratch_limit(36 * 16 * 128 * 4 + 1024);
            }
            for (i, (xs, co, p)) in winograd_cases().into_iter().enumerate() {
                let params = Conv2dParams::new(1, p);
                let ws = [co, xs[1], 3, 3];
                let what = format!("{kernel:?} winograd x{xs:?} w{ws:?} p{p} chunked {chunked}");
                let x = HostTensor::random(xs, 900 + i as u64);
                let w = HostTensor::random(ws, 910 + i as u64);
                let b = HostTensor::random([co], 920 + i as u64);
                let (gx, gw, gb) = (up(&mut g, &x), up(&mut g, &w), up(&mut g, &b));
                let want = cpu::conv2d(&x, &w, Some(&b), params).unwrap();
                let k = (xs[1] * 9) as f32;
                let opts = strata_gpu::ConvForward { relu: true, keep_col: true };
                let (y, kept) = g.conv2d_with(&gx, &gw, Some(&gb), params, opts).unwrap();
                assert_close(&what, &down(&mut g, &y), &cpu::relu(&want), 1e-4, 1e-5 * k.sqrt());
                match &kept {
                    Some(v) => assert_eq!(v.shape().dims()[0], 36, "{what}: kept {}", v.shape()),
                    None => assert!(chunked, "{what}: one chunk keeps the input transform"),
                }
                let y = g.conv2d(&gx, &gw, None, params).unwrap();
                let want = cpu::conv2d(&x, &w, None, params).unwrap();
                assert_close(&format!("{what} no bias"), &down(&mut g, &y), &want, 1e-4, 1e-5 * k.sqrt());
                let dy = HostTensor::random(want.shape().clone(), 930 + i as u64);
                let gdy = up(&mut g, &dy);
                let grads = g.conv2d_backward(&gx, &gw, &gdy, params, true).unwrap();
                let r = cpu::conv2d_backward(&x, &w, &dy, params).unwrap();
                let dx = down(&mut g, grads.dx.as_ref().unwrap());
                assert_close(&format!("{what} dx"), &dx, &r.dx, 1e-4, 1e-5 * (co as f32 * k).sqrt());
                let pix = (want.shape().dim(0) * want.shape().dim(2) * want.shape().dim(3)) as f32;
                assert_close(&format!("{what} dw"), &down(&mut g, &grads.dw), &r.dw, 1e-4, 1e-5 * pix.sqrt());
                assert_close(&format!("{what} db"), &down(&mut g, &grads.db), &r.db, 1e-4, 1e-5 * pix.sqrt());
                let again = g.conv2d_backward_with(&gx, &gw, &gdy, params, false, kept.as_ref()).unwrap();
                assert_close(
                    &format!("{what} dw from kept V"),
                    &down(&mut g, &again.dw),
                    &r.dw,
                    1e-4,
                    1e-5 * pix.sqrt(),
                );
            }
        }
    }
}

#[test]
fn conv_algo_auto_times_each_geometry_once_and_keeps_programs_atomic() {
    let mut g = gpu_or_skip!();
    g.set_conv_algo(ConvAlgo::Auto);
    let params = Conv2dParams::new(1, 1);
    let x = HostTensor::random([2, 8, 10, 10], 1);
    let w = HostTensor::random([16, 8, 3, 3], 2);
    let dy = HostTensor::random([2, 16, 10, 10], 3);
    let (gx, gw, gdy) = (up(&mut g, &x), up(&mut g, &w), up(&mut g, &dy));
    // Work recorded before the first use must come through the timing runs intact.
    let pending = g.scale(&gx, 2.0).unwrap();
    let y = g.conv2d(&gx, &gw, None, params).unwrap();
    let choices = g.conv_choices();
    assert_eq!(choices.len(), 1, "{choices:?}");
    assert_eq!(choices[0].case, "[2,8,10,10] -> 16, padding (1, 1), forward");
    assert!(choices[0].algo != ConvAlgo::Auto && choices[0].im2col_s > 0.0 && choices[0].winograd_s > 0.0);
    assert_close("pending work", &down(&mut g, &pending), &cpu::scale(&x, 2.0), 0.0, 0.0);
    let want = cpu::conv2d(&x, &w, None, params).unwrap();
    assert_close("auto conv2d", &down(&mut g, &y), &want, 1e-4, 1e-5 * 72f32.sqrt());
    let grads = g.conv2d_backward(&gx, &gw, &gdy, params, true).unwrap();
    let r = cpu::conv2d_backward(&x, &w, &dy, params).unwrap();
    assert_close("auto dx", &down(&mut g, grads.dx.as_ref().unwrap()), &r.dx, 1e-4, 1e-5 * (16.0 * 72f32).sqrt());
    assert_close("auto dw", &down(&mut g, &grads.dw), &r.dw, 1e-4, 1e-5 * 200f32.sqrt());
    let cases: Vec<String> = g.conv_choices().into_iter().map(|c| c.case).collect();
    let geometry = "[2,8,10,10] -> 16, padding (1, 1)";
    assert_eq!(cases, ["forward", "input gradient", "weight gradient"].map(|d| format!("{geometry}, {d}")));
    // Known geometries are not timed again; other filters are never timed.
    g.conv2d(&gx, &gw, None, params).unwrap();
    g.conv2d_backward(&gx, &gw, &gdy, params, true).unwrap();
    g.conv2d(&gx, &gw, None, Conv2dParams::new(2, 1)).unwrap();
    let w1 = up(&mut g, &HostTensor::random([4, 8, 1, 1], 4));
    g.conv2d(&gx, &w1, None, Conv2dParams::new(1, 0)).unwrap();
    assert_eq!(g.conv_choices().len(), 3);

    // A program whose Adam step precedes a first-use convolution and which then fails
    // leaves the parameter unchanged: the timing runs submitted none of its work.
    let mut ex = strata_gpu::Executor::new(g);
    let t = TensorId;
    let param = HostTensor::random([16, 8, 3, 3], 5);
    ex.upload(t(1), &param).unwrap();
    ex.upload(t(2), &HostTensor::random([16, 8, 3, 3], 6)).unwrap();
    ex.upload(t(3), &HostTensor::<f32>::zeros([16, 8, 3, 3])).unwrap();
    ex.upload(t(4), &HostTensor::<f32>::zeros([16, 8, 3, 3])).unwrap();
    ex.upload(t(5), &HostTensor::random([1, 8, 6, 6], 7)).unwrap();
    let program = vec![
        Op::AdamStep { param: t(1), grad: t(2), m: t(3), v: t(4), hyper: AdamParams::default(), step: 1 },
        Op::Conv2d { x: t(5), w: t(1), bias: None, params, out: t(6), relu: true, col: Some(t(7)) },
        Op::Add { a: t(6), b: t(99), out: t(8) },
    ];
    assert!(ex.run(&program).is_err());
    assert_eq!(ex.gpu().conv_choices().len(), 4, "the new geometry was timed");
    assert_eq!(ex.download::<f32>(t(1)).unwrap(), param, "a failed program changed a parameter");
    assert!(ex.get(t(6)).is_err());
}

#[test]
fn max_pool_matches_reference() {
    let mut g = gpu_or_skip!();
    for (i, (xs, k, s, p)) in [
        ([1, 1, 4, 4], 2, 2, 0),
        ([2, 3, 7, 9], 2, 2, 0),
        ([1, 2, 9, 7], 3, 2, 1),
        ([2, 64, 28, 28], 2, 2, 0),
        ([1, 1, 1, 1], 1, 1, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let params = Conv2dParams::new(s, p);
        let x = HostTensor::random(xs, 700 + i as u64);
        let gx = up(&mut g, &x);
        let (y, idx) = g.max_pool2d(&gx, (k, k), params).unwrap();
        let (ry, ri) = cpu::max_pool2d(&x, (k, k), params).unwrap();
        assert_close("max_pool2d", &down(&mut g, &y), &ry, 0.0, 0.0);
        assert_eq!(g.download::<u32>(&idx).unwrap(), ri);
        let dy = HostTensor::random(ry.shape().clone(), 800 + i as u64);
        let gdy = up(&mut g, &dy);
        let dx = g.max_pool2d_backward(&gdy, &idx, x.shape(), (k, k), params).unwrap();
        let geo = geometry::max_pool2d(x.shape(), (k, k), params).unwrap();
        assert_close(
            "max_pool2d_backward",
            &down(&mut g, &dx),
            &cpu::max_pool2d_backward(&dy, &ri, &geo).unwrap(),
            1e-6,
            1e-6,
        );
        // With a ReLU before the pool: no gradient where the pool input is not positive.
        let dx = g.max_pool2d_relu_backward(&gdy, &idx, x.shape(), (k, k), params, Some(&gx)).unwrap();
        let want = cpu::relu_backward(&x, &cpu::max_pool2d_backward(&dy, &ri, &geo).unwrap()).unwrap();
        assert_close("max_pool2d_relu_backward", &down(&mut g, &dx), &want, 1e-6, 1e-6);
    }
}

#[test]
fn loss_head_matches_reference() {
    let mut g = gpu_or_skip!();
    let mut rng = SplitMix64(5);
    for (rows, classes) in [(1, 1), (1, 10), (64, 10), (33, 7), (5, 1000)] {
        let x = HostTensor::random([rows, classes], rows as u64 * 31 + classes as u64);
        let x = cpu::scale(&x, 8.0);
        let targets = HostTensor::new([rows], (0..rows).map(|_| rng.below(classes as u64) as u32).collect()).unwrap();
        let (gx, gt) = (up(&mut g, &x), g.upload(&targets).unwrap());
        let logp = g.log_softmax(&gx).unwrap();
        let rlogp = cpu::log_softmax(&x).unwrap();
        assert_close("log_softmax", &down(&mut g, &logp), &rlogp, 1e-5, 1e-5);
        let loss = g.nll_loss(&logp, &gt).unwrap();
        let rl = cpu::nll_loss(&rlogp, &targets).unwrap();
        assert!((g.read_scalar(&loss).unwrap() - rl).abs() <= 1e-5 * (1.0 + rl.abs()));
        let dlogp = g.nll_loss_backward(logp.shape(), &gt).unwrap();
        let rd = cpu::nll_loss_backward(rlogp.shape(), &targets).unwrap();
        assert_close("nll backward", &down(&mut g, &dlogp), &rd, 0.0, 0.0);
        let dx = g.log_softmax_backward(&logp, &dlogp).unwrap();
        assert_close(
            "log_softmax backward",
            &down(&mut g, &dx),
            &cpu::log_softmax_backward(&rlogp, &rd).unwrap(),
            1e-5,
            1e-6,
        );
        let c = g.correct_count(&gx, &gt).unwrap();
        assert_eq!(g.read_scalar(&c).unwrap() as u32, cpu::accuracy_count(&x, &targets).unwrap());
    }
    let (p, q) =
        (up(&mut g, &HostTensor::random([4, 10], 1)), g.upload(&HostTensor::new([5], vec![0u32; 5]).unwrap()).unwrap());
    let e = g.nll_loss(&p, &q).unwrap_err();
    assert_eq!(e.to_string(), "nll_loss: targets [5] must be [4] for logits [4,10]");
}

#[test]
fn optimisers_match_reference_over_several_steps() {
    let mut g = gpu_or_skip!();
    for n in [1usize, 5, 1000] {
        let mut p = HostTensor::random([n], 1).into_data();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let h = AdamParams { weight_decay: 0.01, ..AdamParams::default() };
        let gp = g.upload(&HostTensor::new([n], p.clone()).unwrap()).unwrap();
        let gm = g.zeros([n], strata_tensor::DType::F32).unwrap();
        let gv = g.zeros([n], strata_tensor::DType::F32).unwrap();
        for step in 1..=5 {
            let grad = HostTensor::random([n], 10 + step as u64);
            cpu::adam_step(&mut p, grad.data(), &mut m, &mut v, &h, step);
            let gg = up(&mut g, &grad);
            g.adam_step(&gp, &gg, &gm, &gv, &h, step).unwrap();
        }
        assert_close("adam", &down(&mut g, &gp), &HostTensor::new([n], p).unwrap(), 1e-5, 1e-6);

        for nesterov in [false, true] {
            let mut p = HostTensor::random([n], 2).into_data();
            let mut buf = vec![0.0; n];
            let h = SgdParams {
                nesterov,
                dampening: if nesterov { 0.0 } else { 0.1 },
                weight_decay: 1e-3,
                ..SgdParams::default()
            };
            let gp = g.upload(&HostTensor::new([n], p.clone()).unwrap()).unwrap();
            let gb = g.zeros([n], strata_tensor::DType::F32).unwrap();
            for step in 1..=5 {
                let grad = HostTensor::random([n], 20 + step as u64);
                cpu::sgd_step(&mut p, grad.data(), &mut buf, &h, step);
                let gg = up(&mut g, &grad);
                g.sgd_step(&gp, &gg, &gb, &h, step).unwrap();
            }
            assert_close("sgd", &down(&mut g, &gp), &HostTensor::new([n], p).unwrap(), 1e-5, 1e-6);
        }
    }
}

#[test]
fn both_gemm_kernels_agree_on_the_reference_cnn_shapes() {
    if !both_gemm_kernels(&gemm_kernels(), gpu_required()).unwrap_or_else(|e| panic!("{e}")) {
        return;
    }
    let x = HostTensor::random([4, 64, 14, 14], 1);
    let w = HostTensor::random([128, 64, 3, 3], 2);
    let mut outs = Vec::new();
    for k in [GemmKernel::Tiled, GemmKernel::Subgroup8] {
        let mut g = gpu_with(Some(k)).unwrap();
        let (gx, gw) = (up(&mut g, &x), up(&mut g, &w));
        let y = g.conv2d(&gx, &gw, None, Conv2dParams::new(1, 1)).unwrap();
        outs.push(down(&mut g, &y));
    }
    assert_close("tiled vs subgroup", &outs[0], &outs[1], 1e-4, 1e-4 * max_abs(&outs[1]));
    let _ = Shape::scalar();
}

#[test]
fn a_missing_gemm_kernel_fails_the_comparison_when_a_gpu_is_required() {
    let both = [GemmKernel::Tiled, GemmKernel::Subgroup8];
    assert_eq!(both_gemm_kernels(&both, true), Ok(true));
    assert_eq!(both_gemm_kernels(&[GemmKernel::Tiled], false), Ok(false));
    assert_eq!(
        both_gemm_kernels(&[GemmKernel::Tiled], true),
        Err("STRATA_REQUIRE_GPU=1 but the adapter runs only [Tiled] of the two GEMM kernels".to_string())
    );
    assert!(both_gemm_kernels(&[], true).is_err());
}
