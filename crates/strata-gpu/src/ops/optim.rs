//! Optimiser steps (`shaders/optim.wgsl`), in place and chunked across bindings.

use bytemuck::{Pod, Zeroable};
use strata_tensor::cpu::{AdamParams, SgdParams};
use strata_tensor::{DType, TensorError, geometry};

use super::{expect_dtype, u};
use crate::{Gpu, GpuTensor, Result};

const FILE: &str = "optim.wgsl";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    first: u32,
    nesterov: u32,
    _pad: [u32; 2],
}

impl Gpu {
    fn check_state(&self, op: &'static str, ts: &[(&'static str, &GpuTensor)]) -> Result<()> {
        for (what, t) in ts {
            expect_dtype(op, what, t, DType::F32)?;
            geometry::same_shape(op, ts[0].1.shape(), t.shape())?;
        }
        let first = ts[0].1;
        if ts[1..].iter().any(|(_, t)| t.same_storage(first)) {
            return Err(TensorError::argument(op, "parameter and optimiser state must be distinct tensors").into());
        }
        Ok(())
    }

    /// One Adam step (PyTorch's rule) at 1-based `step`, updating `param`, `m`, `v` in place.
    pub fn adam_step(
        &mut self,
        param: &GpuTensor,
        grad: &GpuTensor,
        m: &GpuTensor,
        v: &GpuTensor,
        h: &AdamParams,
        step: u32,
    ) -> Result<()> {
        const OP: &str = "adam_step";
        if step == 0 {
            return Err(TensorError::argument(OP, "steps are counted from 1").into());
        }
        self.check_state(OP, &[("param", param), ("grad", grad), ("m", m), ("v", v)])?;
        let bc1 = 1.0 - h.beta1.powi(step as i32);
        let bc2 = 1.0 - h.beta2.powi(step as i32);
        let base = Params {
            n: 0,
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            step_size: h.lr / bc1,
            bc2_sqrt: bc2.sqrt(),
            first: 0,
            nesterov: 0,
            _pad: [0; 2],
        };
        let step_elems = self.chunk_elems(4);
        for off in (0..param.numel()).step_by(step_elems) {
            let len = step_elems.min(param.numel() - off);
            let p = Params { n: u(len), ..base };
            let args =
                [param.arg_range(off, len), grad.arg_range(off, len), m.arg_range(off, len), v.arg_range(off, len)];
            self.dispatch(OP, (FILE, "adam"), &[], &p, &args, [self.grid(len, 16), 1, 1])?;
        }
        Ok(())
    }

    /// One SGD step (PyTorch's rule, momentum buffer `buf`) at 1-based `step`, in place.
    pub fn sgd_step(
        &mut self,
        param: &GpuTensor,
        grad: &GpuTensor,
        buf: &GpuTensor,
        h: &SgdParams,
        step: u32,
    ) -> Result<()> {
        const OP: &str = "sgd_step";
        self.check_state(OP, &[("param", param), ("grad", grad), ("momentum buffer", buf)])?;
        let base = Params {
            n: 0,
            lr: h.lr,
            beta1: h.momentum,
            beta2: h.dampening,
            eps: 0.0,
            weight_decay: h.weight_decay,
            step_size: 0.0,
            bc2_sqrt: 0.0,
            first: u32::from(step <= 1),
            nesterov: u32::from(h.nesterov),
            _pad: [0; 2],
        };
        let step_elems = self.chunk_elems(4);
        for off in (0..param.numel()).step_by(step_elems) {
            let len = step_elems.min(param.numel() - off);
            let p = Params { n: u(len), ..base };
            let args = [param.arg_range(off, len), grad.arg_range(off, len), buf.arg_range(off, len)];
            self.dispatch(OP, (FILE, "sgd"), &[], &p, &args, [self.grid(len, 16), 1, 1])?;
        }
        Ok(())
    }
}
