//! Max pooling (`shaders/pool.wgsl`).

use bytemuck::{Pod, Zeroable};
use strata_tensor::geometry::{self, Conv2dParams, PoolGeometry};
use strata_tensor::{DType, Shape, TensorError};

use super::{expect_binding, expect_dtype, u};
use crate::{Gpu, GpuTensor, Result};

const FILE: &str = "pool.wgsl";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    planes: u32,
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
    relu_mask: u32,
}

fn params_of(g: &PoolGeometry) -> Params {
    Params {
        planes: u(g.planes),
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
        relu_mask: 0,
    }
}

impl Gpu {
    /// Max pooling of NCHW `x`; returns the output and the `u32` index (`ih * w + iw`)
    /// of each window's winner, which the backward pass needs.
    pub fn max_pool2d(
        &mut self,
        x: &GpuTensor,
        kernel: (usize, usize),
        params: Conv2dParams,
    ) -> Result<(GpuTensor, GpuTensor)> {
        const OP: &str = "max_pool2d";
        expect_dtype(OP, "input", x, DType::F32)?;
        expect_binding(OP, "input", x, self.info().max_storage_binding_bytes)?;
        let g = geometry::max_pool2d(x.shape(), kernel, params)?;
        let y = self.empty(g.output_shape(), DType::F32)?;
        let idx = self.empty(g.output_shape(), DType::U32)?;
        let groups = self.plane_grid(g.ho, 1, g.planes);
        self.dispatch(OP, (FILE, "max_pool_forward"), &[], &params_of(&g), &[x.arg(), y.arg(), idx.arg()], groups)?;
        Ok((y, idx))
    }

    /// Gradient of [`Gpu::max_pool2d`] for an input of `input_shape`.
    pub fn max_pool2d_backward(
        &mut self,
        dy: &GpuTensor,
        indices: &GpuTensor,
        input_shape: &Shape,
        kernel: (usize, usize),
        params: Conv2dParams,
    ) -> Result<GpuTensor> {
        self.max_pool2d_relu_backward(dy, indices, input_shape, kernel, params, None)
    }

    /// As [`Gpu::max_pool2d_backward`], also applying the gradient of a ReLU that produced
    /// the pool's input `relu_output` (no gradient where it is not positive): one pass
    /// instead of two.
    pub fn max_pool2d_relu_backward(
        &mut self,
        dy: &GpuTensor,
        indices: &GpuTensor,
        input_shape: &Shape,
        kernel: (usize, usize),
        params: Conv2dParams,
        relu_output: Option<&GpuTensor>,
    ) -> Result<GpuTensor> {
        const OP: &str = "max_pool2d_backward";
        expect_dtype(OP, "output gradient", dy, DType::F32)?;
        expect_dtype(OP, "indices", indices, DType::U32)?;
        let g = geometry::max_pool2d(input_shape, kernel, params)?;
        if *dy.shape() != g.output_shape() || indices.shape() != dy.shape() {
            return Err(TensorError::shape(
                OP,
                format!("gradient {} and indices {} must be {}", dy.shape(), indices.shape(), g.output_shape()),
            )
            .into());
        }
        if let Some(r) = relu_output {
            expect_dtype(OP, "relu output", r, DType::F32)?;
            if r.shape() != input_shape {
                return Err(TensorError::shape(
                    OP,
                    format!("relu output {} must be the pool input {input_shape}", r.shape()),
                )
                .into());
            }
        }
        let dx = self.empty(input_shape.clone(), DType::F32)?;
        expect_binding(OP, "input gradient", &dx, self.info().max_storage_binding_bytes)?;
        let p = Params { relu_mask: u32::from(relu_output.is_some()), ..params_of(&g) };
        let mask = relu_output.unwrap_or(dy);
        let tiles =
            g.params.stride == (g.kh, g.kw) && g.params.padding == (0, 0) && (g.h, g.w) == (g.ho * g.kh, g.wo * g.kw);
        let (entry, rows) = if tiles { ("max_pool_backward_tiled", g.ho) } else { ("max_pool_backward", g.h) };
        let groups = self.plane_grid(rows, 1, g.planes);
        self.dispatch(OP, (FILE, entry), &[], &p, &[dy.arg(), indices.arg(), mask.arg(), dx.arg()], groups)?;
        Ok(dx)
    }
}
