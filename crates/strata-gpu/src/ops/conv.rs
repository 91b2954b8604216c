//! 2-D convolution as im2col + GEMM (`shaders/conv2d.wgsl` and the GEMM kernels).
//!
//! The patch matrix is built for a chunk of images at a time so that it fits one
//! storage binding and a scratch budget; inputs and outputs are bound whole.

use bytemuck::{Pod, Zeroable};
use strata_tensor::geometry::{self, Conv2dParams, ConvGeometry};
use strata_tensor::{DType, TensorError};

use super::gemm::{Fused, Mat};
use super::winograd::Direction;
use super::{expect_binding, expect_dtype, u};
use crate::{GemmKernel, Gpu, GpuError, GpuTensor, Result};

const FILE: &str = "conv2d.wgsl";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    ci: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    ho: u32,
    wo: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    n0: u32,
    nb: u32,
    p_ld: u32,
    co: u32,
    co_ld: u32,
    relu: u32,
    _pad: [u32; 3],
}

/// Options of a convolution's forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvForward {
    /// Apply ReLU to the output (fused into the output pass).
    pub relu: bool,
    /// Keep what the backward pass can reuse: the patch matrix (im2col) or the input
    /// transform (Winograd).
    pub keep_col: bool,
}

/// Gradients of a convolution on the device.
#[derive(Debug)]
pub struct Conv2dGrads {
    /// Gradient with respect to the input (`None` when not requested).
    pub dx: Option<GpuTensor>,
    /// Gradient with respect to the weight `[co, ci, kh, kw]`.
    pub dw: GpuTensor,
    /// Gradient with respect to the bias `[co]`.
    pub db: GpuTensor,
}

/// What [`Gpu::conv2d_backward_parts`] and [`Gpu::linear_backward_parts`] computed.
#[derive(Debug)]
pub struct BackwardParts {
    /// Gradient with respect to the input, when requested.
    pub dx: Option<GpuTensor>,
    /// Gradients with respect to the weight and the bias, when requested.
    pub weight: Option<(GpuTensor, GpuTensor)>,
}

pub(super) struct Plan {
    pub(super) g: ConvGeometry,
    /// Images per chunk.
    pub(super) nb: usize,
    /// Row stride of the patch matrix for a full chunk.
    pub(super) p_ld: usize,
}

impl Plan {
    fn params(&self, n0: usize, nb: usize) -> Params {
        let g = &self.g;
        Params {
            ci: u(g.ci),
            h: u(g.h),
            w: u(g.w),
            kh: u(g.kh),
            kw: u(g.kw),
            ho: u(g.ho),
            wo: u(g.wo),
            sh: u(g.params.stride.0),
            sw: u(g.params.stride.1),
            ph: u(g.params.padding.0),
            pw: u(g.params.padding.1),
            n0: u(n0),
            nb: u(nb),
            p_ld: u(self.p_ld),
            co: u(g.co),
            co_ld: u(g.co.next_multiple_of(4)),
            relu: 0,
            _pad: [0; 3],
        }
    }

    /// `(first image, images)` of each chunk.
    pub(super) fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.g.n).step_by(self.nb).map(|n0| (n0, self.nb.min(self.g.n - n0)))
    }
}

impl Gpu {
    /// Whether the GEMM reads and writes the NCHW tensors in place (the subgroup kernel's
    /// batched columns), which needs each image's pixels to be whole vec4s.
    fn gemm_reads_nchw(&self, pixels: usize) -> bool {
        self.gemm == GemmKernel::Subgroup8 && pixels.is_multiple_of(4)
    }

    pub(super) fn conv_plan(&self, op: &'static str, g: ConvGeometry) -> Result<Plan> {
        let limit = (self.info().max_storage_binding_bytes as usize).min(self.scratch_bytes_max);
        let pix = g.ho * g.wo;
        let rows = g.patch_len().max(g.co);
        let per_image = rows * pix * 4;
        let nb = (limit / per_image.max(1)).clamp(1, g.n);
        let p_ld = (nb * pix).next_multiple_of(4);
        if rows * p_ld * 4 > self.info().max_storage_binding_bytes as usize {
            return Err(GpuError::BindingTooLarge {
                op,
                what: "patch matrix of one image",
                bytes: (rows * p_ld * 4) as u64,
                limit_bytes: self.info().max_storage_binding_bytes,
            });
        }
        Ok(Plan { g, nb, p_ld })
    }

    fn check_conv_operands(&self, op: &'static str, ts: &[(&'static str, &GpuTensor)]) -> Result<()> {
        for (what, t) in ts {
            expect_dtype(op, what, t, DType::F32)?;
            expect_binding(op, what, t, self.info().max_storage_binding_bytes)?;
        }
        Ok(())
    }

    pub(super) fn im2col(
        &mut self,
        op: &'static str,
        plan: &Plan,
        x: &GpuTensor,
        col: &GpuTensor,
        n0: usize,
        nb: usize,
    ) -> Result<()> {
        let g = &plan.g;
        let p = plan.params(n0, nb);
        // Runs of 4 vec4 along each patch row (see RUN in conv2d.wgsl).
        let runs = (plan.p_ld / 4).div_ceil(4);
        let groups = self.plane_grid(runs, 2, g.patch_len());
        self.dispatch(op, (FILE, "im2col"), &[], &p, &[x.arg(), col.arg()], groups)
    }

    /// 2-D convolution of NCHW `x` with `w` `[co, ci, kh, kw]` and optional bias `[co]`.
    pub fn conv2d(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        params: Conv2dParams,
    ) -> Result<GpuTensor> {
        Ok(self.conv2d_with(x, w, bias, params, ConvForward::default())?.0)
    }

    /// [`Gpu::conv2d`] with a fused ReLU and, with `keep_col`, what the backward pass can
    /// reuse (when the batch fitted one chunk; else `None`): the patch matrix, or for a
    /// 3x3 stride-1 convolution that ran Winograd (see [`Gpu::set_conv_algo`]) its input
    /// transform. [`Gpu::conv2d_backward_with`] tells the two apart by shape.
    pub fn conv2d_with(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        params: Conv2dParams,
        opts: ConvForward,
    ) -> Result<(GpuTensor, Option<GpuTensor>)> {
        const OP: &str = "conv2d";
        let g = geometry::conv2d(x.shape(), w.shape(), bias.map(|b| b.shape()), params)?;
        self.check_conv_operands(OP, &[("input", x), ("weight", w)])?;
        // Fails before anything is recorded when the patch matrix cannot be bound.
        self.conv_plan(OP, g)?;
        let limit_bytes = self.info().max_storage_binding_bytes;
        let bytes = (g.output_shape().numel() as u64 * 4).next_multiple_of(16);
        if bytes > limit_bytes {
            return Err(GpuError::BindingTooLarge { op: OP, what: "output", bytes, limit_bytes });
        }
        let zero_bias;
        let bias = match bias {
            Some(b) => b,
            None => {
                zero_bias = self.zeros([g.co], DType::F32)?;
                &zero_bias
            }
        };
        if self.conv_uses_winograd(&g, Direction::Forward) {
            return self.conv2d_winograd(&g, x, w, bias, opts.relu, opts.keep_col);
        }
        self.conv2d_im2col(&g, x, w, bias, opts.relu, opts.keep_col)
    }

    /// The forward pass by im2col + GEMM.
    pub(super) fn conv2d_im2col(
        &mut self,
        g: &ConvGeometry,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: &GpuTensor,
        relu: bool,
        keep_col: bool,
    ) -> Result<(GpuTensor, Option<GpuTensor>)> {
        const OP: &str = "conv2d";
        let g = *g;
        let plan = self.conv_plan(OP, g)?;
        let y = self.empty(g.output_shape(), DType::F32)?;
        let k = g.patch_len();
        let pix = g.ho * g.wo;
        let col = self.empty([k, plan.p_ld], DType::F32)?;
        if self.gemm_reads_nchw(pix) {
            // The GEMM writes NCHW directly, adding the bias and applying the ReLU.
            let k4 = k.next_multiple_of(4);
            let wp;
            let a = if k.is_multiple_of(4) {
                Mat::rows(w, k)
            } else {
                wp = self.empty([g.co, k4], DType::F32)?;
                self.pack_into(OP, Mat::rows(w, k), g.co, k, &wp, 0, k4, g.co, k4)?;
                Mat::rows(&wp, k4)
            };
            let (pix4, img4) = (pix / 4, g.co * pix / 4);
            for (n0, nb) in plan.chunks() {
                self.im2col(OP, &plan, x, &col, n0, nb)?;
                let c = Mat { t: &y, off: n0 * g.co * pix, ld: pix, trans: false };
                let fused = Fused { c_batch: Some((pix4, img4)), bias: Some(bias), relu, ..Fused::default() };
                self.gemm_subgroup(OP, g.co, nb * pix, k, a, Mat::rows(&col, plan.p_ld), c, false, fused)?;
            }
        } else {
            // The GEMM writes Y' [co, pixels]; a layout kernel makes it NCHW with the bias.
            let ycp = self.empty([g.co, plan.p_ld], DType::F32)?;
            for (n0, nb) in plan.chunks() {
                self.im2col(OP, &plan, x, &col, n0, nb)?;
                self.gemm_into(
                    OP,
                    g.co,
                    nb * pix,
                    k,
                    Mat::rows(w, k),
                    Mat::rows(&col, plan.p_ld),
                    Mat::rows(&ycp, plan.p_ld),
                    false,
                )?;
                let p = Params { relu: u32::from(relu), ..plan.params(n0, nb) };
                let (entry, items) =
                    if pix.is_multiple_of(4) { ("cp_to_nchw_v4", pix / 4) } else { ("cp_to_nchw", pix) };
                let groups = self.plane_grid(items, 4, nb * g.co);
                self.dispatch(OP, (FILE, entry), &[], &p, &[ycp.arg(), bias.arg(), y.arg()], groups)?;
            }
        }
        let single_chunk = plan.nb >= g.n;
        Ok((y, (keep_col && single_chunk).then_some(col)))
    }

    /// Gradients of [`Gpu::conv2d`] given the output gradient `dy`; `input_grad: false`
    /// skips `dx` (a first layer needs none).
    pub fn conv2d_backward(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        params: Conv2dParams,
        input_grad: bool,
    ) -> Result<Conv2dGrads> {
        self.conv2d_backward_with(x, w, dy, params, input_grad, None)
    }

    /// [`Gpu::conv2d_backward`] reusing what the forward pass kept (see
    /// [`Gpu::conv2d_with`]) instead of building it again, when the weight gradient
    /// runs the same algorithm as that forward pass did.
    pub fn conv2d_backward_with(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        params: Conv2dParams,
        input_grad: bool,
        saved: Option<&GpuTensor>,
    ) -> Result<Conv2dGrads> {
        let parts = self.conv2d_backward_parts(x, w, dy, params, input_grad, true, saved)?;
        let (dw, db) = parts.weight.expect("weight gradients were requested");
        Ok(Conv2dGrads { dx: parts.dx, dw, db })
    }

    /// The two halves of [`Gpu::conv2d_backward_with`], each optional: the input gradient
    /// (which the previous pipeline stage waits for) and the weight and bias gradients
    /// (which a zero-bubble schedule defers). Each half costs only its own work, and the
    /// halves equal the whole bitwise.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_backward_parts(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        params: Conv2dParams,
        input_grad: bool,
        weight_grad: bool,
        saved: Option<&GpuTensor>,
    ) -> Result<BackwardParts> {
        const OP: &str = "conv2d_backward";
        let g = geometry::conv2d(x.shape(), w.shape(), None, params)?;
        if *dy.shape() != g.output_shape() {
            return Err(
                TensorError::shape(OP, format!("output gradient {} must be {}", dy.shape(), g.output_shape())).into()
            );
        }
        self.check_conv_operands(OP, &[("input", x), ("weight", w), ("output gradient", dy)])?;
        let plan = self.conv_plan(OP, g)?;
        let dx = match input_grad {
            true if self.conv_uses_winograd(&g, Direction::InputGrad) => {
                Some(self.conv2d_input_grad_winograd(&g, w, dy)?)
            }
            true => Some(self.conv2d_input_grad_im2col(&plan, w, dy)?),
            false => None,
        };
        if !weight_grad {
            return Ok(BackwardParts { dx, weight: None });
        }
        if self.conv_uses_winograd(&g, Direction::WeightGrad) {
            let weight = self.conv2d_weight_grad_winograd(&g, x, dy, saved)?;
            return Ok(BackwardParts { dx, weight: Some(weight) });
        }
        let dw = self.conv2d_weight_grad_im2col(&plan, x, dy, saved)?;
        let db = self.empty([g.co], DType::F32)?;
        let p = plan.params(0, g.n);
        let entry = if (g.ho * g.wo).is_multiple_of(4) { "bias_grad4" } else { "bias_grad" };
        self.dispatch(OP, (FILE, entry), &[], &p, &[dy.arg(), db.arg()], [u(g.co), 1, 1])?;
        Ok(BackwardParts { dx, weight: Some((dw, db)) })
    }

    /// The weight gradient by im2col + GEMM, reusing the patch matrix `saved` when it
    /// has the right shape: dW^T += col @ dY^T per chunk, then transposed.
    pub(super) fn conv2d_weight_grad_im2col(
        &mut self,
        plan: &Plan,
        x: &GpuTensor,
        dy: &GpuTensor,
        saved: Option<&GpuTensor>,
    ) -> Result<GpuTensor> {
        const OP: &str = "conv2d_backward";
        let g = plan.g;
        let k = g.patch_len();
        let pix = g.ho * g.wo;
        let co_ld = g.co.next_multiple_of(4);
        let reuse = saved.filter(|c| plan.nb >= g.n && c.shape().dims() == [k, plan.p_ld]);
        let fresh;
        let col = match reuse {
            Some(c) => c,
            None => {
                fresh = self.empty([k, plan.p_ld], DType::F32)?;
                &fresh
            }
        };
        let dyt = self.empty([plan.p_ld, co_ld], DType::F32)?;
        let dwt = self.empty([k, co_ld], DType::F32)?;
        for (i, (n0, nb)) in plan.chunks().enumerate() {
            let p = plan.params(n0, nb);
            if reuse.is_none() {
                self.im2col(OP, plan, x, col, n0, nb)?;
            }
            self.dispatch(OP, (FILE, "nchw_to_pc"), &[], &p, &[dy.arg(), dyt.arg()], self.plane_grid(pix, 1, nb))?;
            // dW^T [k, co] (+)= col [k, np] @ dY^T [np, co]
            self.gemm_into(
                OP,
                k,
                g.co,
                nb * pix,
                Mat::rows(col, plan.p_ld),
                Mat::rows(&dyt, co_ld),
                Mat::rows(&dwt, co_ld),
                i > 0,
            )?;
        }
        let dw = self.empty([g.co, g.ci, g.kh, g.kw], DType::F32)?;
        self.pack_into(OP, Mat::transposed(&dwt, co_ld), g.co, k, &dw, 0, k, g.co, k)?;
        Ok(dw)
    }

    /// The input gradient by im2col + GEMM: dcol = W^T @ dY', then col2im.
    pub(super) fn conv2d_input_grad_im2col(&mut self, plan: &Plan, w: &GpuTensor, dy: &GpuTensor) -> Result<GpuTensor> {
        const OP: &str = "conv2d_backward";
        let g = plan.g;
        let k = g.patch_len();
        let pix = g.ho * g.wo;
        let co_ld = g.co.next_multiple_of(4);
        let direct = self.gemm_reads_nchw(pix);
        let dx = self.empty([g.n, g.ci, g.h, g.w], DType::F32)?;
        // W^T [k, co_ld] for dcol = W^T @ dY'.
        let wt = self.empty([k, co_ld], DType::F32)?;
        self.pack_into(OP, Mat::transposed(w, k), k, g.co, &wt, 0, co_ld, k, co_ld)?;
        // The subgroup GEMM reads dY' from dy in place; only the tiled path needs a copy.
        let dcp = self.empty(if direct { [1, 1] } else { [g.co, plan.p_ld] }, DType::F32)?;
        let dcol = self.empty([k, plan.p_ld], DType::F32)?;
        for (n0, nb) in plan.chunks() {
            let p = plan.params(n0, nb);
            let np = nb * pix;
            if direct {
                // dcol = W^T @ dY', reading dY' straight out of NCHW dy.
                let b = Mat { t: dy, off: n0 * g.co * pix, ld: pix, trans: false };
                let fused = Fused { b_batch: Some((pix / 4, g.co * pix / 4)), ..Fused::default() };
                self.gemm_subgroup(
                    OP,
                    k,
                    np,
                    g.co,
                    Mat::rows(&wt, co_ld),
                    b,
                    Mat::rows(&dcol, plan.p_ld),
                    false,
                    fused,
                )?;
            } else {
                let (entry, items) =
                    if pix.is_multiple_of(4) { ("nchw_to_cp_v4", pix / 4) } else { ("nchw_to_cp", pix) };
                let groups = self.plane_grid(items, 4, nb * g.co);
                self.dispatch(OP, (FILE, entry), &[], &p, &[dy.arg(), dcp.arg()], groups)?;
                // dcol [k, np] = W^T [k, co] @ dY' [co, np]
                self.gemm_into(
                    OP,
                    k,
                    np,
                    g.co,
                    Mat::rows(&wt, co_ld),
                    Mat::rows(&dcp, plan.p_ld),
                    Mat::rows(&dcol, plan.p_ld),
                    false,
                )?;
            }
            let groups = self.plane_grid(g.h, 1, nb * g.ci);
            self.dispatch(OP, (FILE, "col2im"), &[], &p, &[dcol.arg(), dx.arg()], groups)?;
        }
        Ok(dx)
    }
}
