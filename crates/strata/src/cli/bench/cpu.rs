//! Tuned CPU reference paths for the benchmarks: im2col + sgemm from the
//! `matrixmultiply` crate (threaded), and the machine's memory-copy bandwidth.

use strata_tensor::geometry::ConvGeometry;

/// `C[m, n] = A[m, k] @ B[k, n]` (+ `C` when `accumulate`), with element strides.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs, "sgemm: A too short");
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs, "sgemm: B too short");
    assert!(c.len() >= (m - 1) * ldc + n, "sgemm: C too short");
    // SAFETY: the asserts above keep every index inside the slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            a_rs as isize,
            a_cs as isize,
            b.as_ptr(),
            b_rs as isize,
            b_cs as isize,
            if accumulate { 1.0 } else { 0.0 },
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// The patch matrix `[ci * kh * kw, n * ho * wo]` of an NCHW input.
pub fn im2col(x: &[f32], g: &ConvGeometry, col: &mut [f32]) {
    let p = g.n * g.ho * g.wo;
    let (sh, sw) = g.params.stride;
    let (ph, pw) = g.params.padding;
    for c in 0..g.ci {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &mut col[((c * g.kh + ki) * g.kw + kj) * p..][..p];
                let mut o = 0;
                for n in 0..g.n {
                    let plane = &x[(n * g.ci + c) * g.h * g.w..][..g.h * g.w];
                    for oh in 0..g.ho {
                        let ih = (oh * sh + ki) as isize - ph as isize;
                        for ow in 0..g.wo {
                            let iw = (ow * sw + kj) as isize - pw as isize;
                            row[o] = if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                                plane[ih as usize * g.w + iw as usize]
                            } else {
                                0.0
                            };
                            o += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Scatters a patch-matrix gradient back to an NCHW input gradient.
pub fn col2im(dcol: &[f32], g: &ConvGeometry, dx: &mut [f32]) {
    dx.fill(0.0);
    let p = g.n * g.ho * g.wo;
    let (sh, sw) = g.params.stride;
    let (ph, pw) = g.params.padding;
    for c in 0..g.ci {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &dcol[((c * g.kh + ki) * g.kw + kj) * p..][..p];
                let mut o = 0;
                for n in 0..g.n {
                    let plane = &mut dx[(n * g.ci + c) * g.h * g.w..][..g.h * g.w];
                    for oh in 0..g.ho {
                        let ih = (oh * sh + ki) as isize - ph as isize;
                        for ow in 0..g.wo {
                            let iw = (ow * sw + kj) as isize - pw as isize;
                            if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                                plane[ih as usize * g.w + iw as usize] += row[o];
                            }
                            o += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Scratch buffers of one CPU convolution.
pub struct CpuConv {
    g: ConvGeometry,
    col: Vec<f32>,
    ycp: Vec<f32>,
    dcol: Vec<f32>,
    dyp: Vec<f32>,
}

impl CpuConv {
    /// Buffers for geometry `g`.
    pub fn new(g: ConvGeometry) -> Self {
        let p = g.n * g.ho * g.wo;
        let k = g.patch_len();
        Self { g, col: vec![0.0; k * p], ycp: vec![0.0; g.co * p], dcol: vec![0.0; k * p], dyp: vec![0.0; g.co * p] }
    }

    /// Forward pass into `y` (NCHW), without bias.
    pub fn forward(&mut self, x: &[f32], w: &[f32], y: &mut [f32]) {
        let g = self.g;
        let (p, k, hw) = (g.n * g.ho * g.wo, g.patch_len(), g.ho * g.wo);
        im2col(x, &g, &mut self.col);
        sgemm(g.co, k, p, w, k, 1, &self.col, p, 1, &mut self.ycp, p, false);
        for n in 0..g.n {
            for c in 0..g.co {
                y[(n * g.co + c) * hw..][..hw].copy_from_slice(&self.ycp[c * p + n * hw..][..hw]);
            }
        }
    }

    /// Backward pass: weight and input gradients from the output gradient `dy`.
    pub fn backward(&mut self, x: &[f32], w: &[f32], dy: &[f32], dw: &mut [f32], dx: &mut [f32]) {
        let g = self.g;
        let (p, k, hw) = (g.n * g.ho * g.wo, g.patch_len(), g.ho * g.wo);
        im2col(x, &g, &mut self.col);
        for n in 0..g.n {
            for c in 0..g.co {
                self.dyp[c * p + n * hw..][..hw].copy_from_slice(&dy[(n * g.co + c) * hw..][..hw]);
            }
        }
        // dW [co, k] = dY' [co, p] @ col^T [p, k]
        sgemm(g.co, p, k, &self.dyp, p, 1, &self.col, 1, p, dw, k, false);
        // dcol [k, p] = W^T [k, co] @ dY' [co, p]
        sgemm(k, g.co, p, w, 1, k, &self.dyp, p, 1, &mut self.dcol, p, false);
        col2im(&self.dcol, &g, dx);
    }
}

/// Bytes per second of copying a `bytes`-sized buffer with `copy_from_slice` (median of `iters`).
pub fn memcpy_bandwidth(bytes: usize, iters: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let s = super::median_seconds::<()>(1, iters, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        Ok(())
    })
    .expect("infallible");
    bytes as f64 / s
}

#[cfg(test)]
mod tests {
    use strata_tensor::geometry::{self, Conv2dParams};
    use strata_tensor::{HostTensor, cpu};

    use super::*;

    #[test]
    fn cpu_conv_path_matches_the_reference() {
        let params = Conv2dParams::new(2, 1);
        let x = HostTensor::random([2, 3, 7, 6], 1);
        let w = HostTensor::random([4, 3, 3, 3], 2);
        let g = geometry::conv2d(x.shape(), w.shape(), None, params).unwrap();
        let mut conv = CpuConv::new(g);
        let mut y = vec![0.0; g.output_shape().numel()];
        conv.forward(x.data(), w.data(), &mut y);
        let want = cpu::conv2d(&x, &w, None, params).unwrap();
        assert!(y.iter().zip(want.data()).all(|(a, b)| (a - b).abs() < 1e-4));
        let dy = HostTensor::random(g.output_shape(), 3);
        let (mut dw, mut dx) = (vec![0.0; w.data().len()], vec![0.0; x.data().len()]);
        conv.backward(x.data(), w.data(), dy.data(), &mut dw, &mut dx);
        let r = cpu::conv2d_backward(&x, &w, &dy, params).unwrap();
        assert!(dw.iter().zip(r.dw.data()).all(|(a, b)| (a - b).abs() < 1e-4));
        assert!(dx.iter().zip(r.dx.data()).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}
