//! Reductions (`shaders/reduce.wgsl`): sum, mean, max, min, argmax, argmin over a whole
//! tensor (any size: chunked across bindings) or along one axis.

use bytemuck::{Pod, Zeroable};
use strata_tensor::cpu::ReduceOp;
use strata_tensor::{DType, Shape, TensorError, geometry};

use super::{expect_binding, expect_dtype, u};
use crate::{Gpu, GpuTensor, Result};

const FILE: &str = "reduce.wgsl";
/// vec4 loads per lane below which adding workgroups stops paying.
const VEC4_PER_LANE_MIN: usize = 32;
const GROUPS_MAX: usize = 1024;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    base: u32,
    part_off: u32,
    scale: f32,
    outer: u32,
    len: u32,
    inner: u32,
    _pad: u32,
}

fn op_code(op: ReduceOp) -> f64 {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => 1.0,
        ReduceOp::Min => 2.0,
        ReduceOp::ArgMax => 3.0,
        ReduceOp::ArgMin => 4.0,
    }
}

impl Gpu {
    /// Reduces `x` with `op`, over all elements (`axis: None`, result shape `[]`) or along
    /// `axis` (that dimension removed). Arg-reductions return `u32` indices.
    pub fn reduce(&mut self, x: &GpuTensor, op: ReduceOp, axis: Option<usize>) -> Result<GpuTensor> {
        expect_dtype(op.name(), "x", x, DType::F32)?;
        match axis {
            None => self.reduce_all(x, op),
            Some(a) => self.reduce_axis(x, op, a),
        }
    }

    fn reduce_all(&mut self, x: &GpuTensor, op: ReduceOp) -> Result<GpuTensor> {
        let n = x.numel();
        if n == 0 {
            return Err(TensorError::shape(op.name(), format!("tensor {} is empty", x.shape())).into());
        }
        let consts = [("OP", op_code(op))];
        let step = self.chunk_elems(4);
        let chunks: Vec<(usize, usize)> = (0..n).step_by(step).map(|o| (o, step.min(n - o))).collect();
        let groups: Vec<usize> = chunks
            .iter()
            .map(|&(_, len)| (len / 4).div_ceil(self.wg as usize * VEC4_PER_LANE_MIN).clamp(1, GROUPS_MAX))
            .collect();
        let total: usize = groups.iter().sum();
        let pv = self.empty([total], DType::F32)?;
        let pi = self.empty([total], DType::U32)?;
        let mut part_off = 0;
        for (&(off, len), &g) in chunks.iter().zip(&groups) {
            let p = Params {
                n: u(len),
                base: u(off),
                part_off: u(part_off),
                scale: 1.0,
                outer: 0,
                len: 0,
                inner: 0,
                _pad: 0,
            };
            let args = [x.arg_range(off, len), pv.arg(), pi.arg()];
            self.dispatch(op.name(), (FILE, "partials"), &consts, &p, &args, [u(g), 1, 1])?;
            part_off += g;
        }
        let outv = self.empty(Shape::scalar(), DType::F32)?;
        let outi = self.empty(Shape::scalar(), DType::U32)?;
        let scale = if op == ReduceOp::Mean { (1.0 / n as f64) as f32 } else { 1.0 };
        let p = Params { n: u(total), base: 0, part_off: 0, scale, outer: 0, len: 0, inner: 0, _pad: 0 };
        let args = [pv.arg(), pi.arg(), outv.arg(), outi.arg()];
        self.dispatch(op.name(), (FILE, "finish"), &consts, &p, &args, [1, 1, 1])?;
        Ok(if op.is_arg() { outi } else { outv })
    }

    fn reduce_axis(&mut self, x: &GpuTensor, op: ReduceOp, axis: usize) -> Result<GpuTensor> {
        geometry::axis(op.name(), x.shape(), axis)?;
        expect_binding(op.name(), "x", x, self.info().max_storage_binding_bytes)?;
        let (outer, len, inner) = x.shape().split_at_axis(axis);
        let out_shape = x.shape().without_axis(axis);
        let outputs = outer * inner;
        let outv = self.empty(out_shape.clone(), DType::F32)?;
        let outi = self.empty(out_shape, DType::U32)?;
        let scale = if op == ReduceOp::Mean { (1.0 / len as f64) as f32 } else { 1.0 };
        let p = Params { n: 0, base: 0, part_off: 0, scale, outer: u(outer), len: u(len), inner: u(inner), _pad: 0 };
        let consts = [("OP", op_code(op))];
        let args = [x.arg(), outv.arg(), outi.arg()];
        if outputs >= 1024 || len < 256 {
            self.dispatch(op.name(), (FILE, "axis_lane"), &consts, &p, &args, [self.grid(outputs, 1), 1, 1])?;
        } else {
            let gx = outputs.min(65535);
            let gy = outputs.div_ceil(65535);
            self.dispatch(op.name(), (FILE, "axis_group"), &consts, &p, &args, [u(gx), u(gy), 1])?;
        }
        Ok(if op.is_arg() { outi } else { outv })
    }

    /// Sum of all elements, read back to the host.
    pub fn sum_to_host(&mut self, x: &GpuTensor) -> Result<f32> {
        let s = self.reduce(x, ReduceOp::Sum, None)?;
        self.read_scalar(&s)
    }
}
