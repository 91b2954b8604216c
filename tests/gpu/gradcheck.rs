//! Finite-difference checks of the backward passes: the analytic gradient of
//! `L = sum(f(x) * r)` from the GPU backward kernels against central differences of the
//! GPU forward kernels.

use strata_gpu::{ConvAlgo, Gpu, GpuTensor};
use strata_tensor::geometry::Conv2dParams;
use strata_tensor::{HostTensor, SplitMix64};

use crate::gpu_or_skip;

const EPS: f32 = 1e-2;

/// Compares `analytic` with central differences of `loss` at `x`, element by element.
fn check(what: &str, x: &HostTensor, analytic: &HostTensor, mut loss: impl FnMut(&HostTensor) -> f32) {
    assert_eq!(x.shape(), analytic.shape());
    for i in 0..x.data().len() {
        let mut xp = x.clone();
        xp.data_mut()[i] += EPS;
        let mut xm = x.clone();
        xm.data_mut()[i] -= EPS;
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * EPS);
        let an = analytic.data()[i];
        assert!((fd - an).abs() <= 1e-2 + 1e-2 * an.abs(), "{what}: d/dx[{i}] analytic {an}, finite difference {fd}");
    }
}

fn weighted_sum(g: &mut Gpu, y: &GpuTensor, r: &HostTensor) -> f32 {
    let ry = g.upload(r).unwrap();
    let p = g.mul(y, &ry).unwrap();
    g.sum_to_host(&p).unwrap()
}

#[test]
fn conv2d_gradients() {
    let mut g = gpu_or_skip!();
    for algo in [ConvAlgo::Im2col, ConvAlgo::Winograd] {
        g.set_conv_algo(algo);
        conv2d_gradients_on(&mut g, algo);
    }
}

fn conv2d_gradients_on(g: &mut Gpu, algo: ConvAlgo) {
    let params = Conv2dParams::new(1, 1);
    let x = HostTensor::random([2, 2, 5, 4], 1);
    let w = HostTensor::random([3, 2, 3, 3], 2);
    let b = HostTensor::random([3], 3);
    let r = HostTensor::random([2, 3, 5, 4], 4);
    let (gx, gw) = (g.upload(&x).unwrap(), g.upload(&w).unwrap());
    let gr = g.upload(&r).unwrap();
    let grads = g.conv2d_backward(&gx, &gw, &gr, params, true).unwrap();
    let (dx, dw, db) = (
        g.download(grads.dx.as_ref().unwrap()).unwrap(),
        g.download(&grads.dw).unwrap(),
        g.download(&grads.db).unwrap(),
    );
    let mut loss = |x: &HostTensor, w: &HostTensor, b: &HostTensor| {
        let (gx, gw, gb) = (g.upload(x).unwrap(), g.upload(w).unwrap(), g.upload(b).unwrap());
        let y = g.conv2d(&gx, &gw, Some(&gb), params).unwrap();
        weighted_sum(g, &y, &r)
    };
    check(&format!("{algo:?} conv2d dx"), &x, &dx, |xv| loss(xv, &w, &b));
    check(&format!("{algo:?} conv2d dw"), &w, &dw, |wv| loss(&x, wv, &b));
    check(&format!("{algo:?} conv2d db"), &b, &db, |bv| loss(&x, &w, bv));
}

#[test]
fn linear_gradients() {
    let mut g = gpu_or_skip!();
    let x = HostTensor::random([3, 5], 1);
    let w = HostTensor::random([4, 5], 2);
    let b = HostTensor::random([4], 3);
    let r = HostTensor::random([3, 4], 4);
    let (gx, gw) = (g.upload(&x).unwrap(), g.upload(&w).unwrap());
    let gr = g.upload(&r).unwrap();
    let (dx, dw, db) = g.linear_backward(&gx, &gw, &gr).unwrap();
    let (dx, dw, db) = (g.download(&dx).unwrap(), g.download(&dw).unwrap(), g.download(&db).unwrap());
    let mut loss = |x: &HostTensor, w: &HostTensor, b: &HostTensor| {
        let (gx, gw, gb) = (g.upload(x).unwrap(), g.upload(w).unwrap(), g.upload(b).unwrap());
        let y = g.linear(&gx, &gw, Some(&gb)).unwrap();
        weighted_sum(&mut g, &y, &r)
    };
    check("linear dx", &x, &dx, |v| loss(v, &w, &b));
    check("linear dw", &w, &dw, |v| loss(&x, v, &b));
    check("linear db", &b, &db, |v| loss(&x, &w, v));
}

/// Distinct values at least 0.05 apart, so a perturbation of EPS never changes a winner.
fn spaced(shape: [usize; 4], seed: u64) -> HostTensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    HostTensor::new(shape, v).unwrap()
}

#[test]
fn max_pool_gradients() {
    let mut g = gpu_or_skip!();
    for (k, s, p) in [(2, 2, 0), (3, 2, 1)] {
        let params = Conv2dParams::new(s, p);
        let x = spaced([1, 2, 5, 6], 7);
        let gx = g.upload(&x).unwrap();
        let (y, idx) = g.max_pool2d(&gx, (k, k), params).unwrap();
        let r = HostTensor::random(y.shape().clone(), 8);
        let gr = g.upload(&r).unwrap();
        let dx = g.max_pool2d_backward(&gr, &idx, x.shape(), (k, k), params).unwrap();
        let dx = g.download(&dx).unwrap();
        check(&format!("max_pool2d k{k} s{s} p{p}"), &x, &dx, |v| {
            let gv = g.upload(v).unwrap();
            let (y, _) = g.max_pool2d(&gv, (k, k), params).unwrap();
            weighted_sum(&mut g, &y, &r)
        });
    }
}

#[test]
fn log_softmax_nll_gradients() {
    let mut g = gpu_or_skip!();
    let x = HostTensor::random([4, 6], 1);
    let targets = g.upload(&HostTensor::new([4], vec![0u32, 5, 2, 2]).unwrap()).unwrap();
    let gx = g.upload(&x).unwrap();
    let logp = g.log_softmax(&gx).unwrap();
    let dlogp = g.nll_loss_backward(logp.shape(), &targets).unwrap();
    let dx = g.log_softmax_backward(&logp, &dlogp).unwrap();
    let dx = g.download(&dx).unwrap();
    check("log_softmax + nll", &x, &dx, |v| {
        let gv = g.upload(v).unwrap();
        let lp = g.log_softmax(&gv).unwrap();
        let l = g.nll_loss(&lp, &targets).unwrap();
        g.read_scalar(&l).unwrap()
    });
}
