//! Operations on device tensors, one module per kernel family.
//!
//! Each public method checks shapes and dtypes first (so a caller's mistake records
//! nothing), then records one or more dispatches. Results stay on the device.

mod conv;
mod elementwise;
mod gemm;
mod loss;
mod optim;
mod pool;
mod reduce;
pub(crate) mod winograd;

pub use conv::{BackwardParts, Conv2dGrads, ConvForward};
pub(crate) use winograd::ConvKey;
pub use winograd::{ConvAlgo, ConvChoice};

use strata_tensor::DType;

use crate::{GpuError, GpuTensor, Result};

/// Most workgroups of one grid-stride dispatch; lanes loop over the rest.
const GRID_GROUPS_MAX: usize = 4096;

impl crate::Gpu {
    /// Workgroups for a grid-stride kernel over `items` work items, aiming at about
    /// `per_lane` items per lane.
    pub(crate) fn grid(&self, items: usize, per_lane: usize) -> u32 {
        items.div_ceil(per_lane.max(1) * self.wg as usize).clamp(1, GRID_GROUPS_MAX) as u32
    }

    /// Grid for kernels whose y coordinate walks `planes` (rows, images, channels) and
    /// whose x coordinate walks `items` per plane with about `per_lane` items per lane.
    /// On a CPU adapter each workgroup has a fixed start-up cost, so the grid is capped
    /// near a thousand workgroups and lanes loop over the remaining planes.
    pub(crate) fn plane_grid(&self, items: usize, per_lane: usize, planes: usize) -> [u32; 3] {
        let x = self.grid(items, per_lane);
        let y_max = if self.info().is_cpu() { (CPU_GROUPS_TARGET / x as usize).max(1) } else { 65535 };
        [x, planes.clamp(1, y_max) as u32, 1]
    }
}

/// Workgroups a CPU adapter needs to keep its threads busy with room to balance.
const CPU_GROUPS_TARGET: usize = 1024;

/// Fails unless `t` has dtype `want`.
pub(crate) fn expect_dtype(op: &'static str, what: &'static str, t: &GpuTensor, want: DType) -> Result<()> {
    if t.dtype() != want {
        return Err(GpuError::DType { op, what, got: t.dtype().name(), expected: want.name() });
    }
    Ok(())
}

/// Fails unless `t` fits one storage binding.
pub(crate) fn expect_binding(op: &'static str, what: &'static str, t: &GpuTensor, limit_bytes: u64) -> Result<()> {
    let bytes = t.size_bytes().next_multiple_of(16);
    if bytes > limit_bytes {
        return Err(GpuError::BindingTooLarge { op, what, bytes, limit_bytes });
    }
    Ok(())
}

/// `u32` conversion of a size that the caller has bounded by a binding limit.
pub(crate) fn u(v: usize) -> u32 {
    u32::try_from(v).expect("sizes are bounded by binding limits well below 2^32")
}
