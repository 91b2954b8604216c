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

pub use conv::Conv2dGrads;

use strata_tensor::DType;

use crate::{GpuError, GpuTensor, Result};

/// Workgroups for a grid-stride kernel of `items` work items at `per_group` items per
/// workgroup, capped so that dispatches stay far below the per-dimension limit.
pub(crate) fn groups_for(items: usize, per_group: usize) -> u32 {
    items.div_ceil(per_group).clamp(1, 4096) as u32
}

/// Fails unless `t` has dtype `want`.
pub(crate) fn expect_dtype(
    op: &'static str,
    what: &'static str,
    t: &GpuTensor,
    want: DType,
) -> Result<()> {
    if t.dtype() != want {
        return Err(GpuError::DType {
            op,
            what,
            got: t.dtype().name(),
            expected: want.name(),
        });
    }
    Ok(())
}

/// Fails unless `t` fits one storage binding.
pub(crate) fn expect_binding(
    op: &'static str,
    what: &'static str,
    t: &GpuTensor,
    limit_bytes: u64,
) -> Result<()> {
    let bytes = t.size_bytes().next_multiple_of(16);
    if bytes > limit_bytes {
        return Err(GpuError::BindingTooLarge {
            op,
            what,
            bytes,
            limit_bytes,
        });
    }
    Ok(())
}

/// `u32` conversion of a size that the caller has bounded by a binding limit.
pub(crate) fn u(v: usize) -> u32 {
    u32::try_from(v).expect("sizes are bounded by binding limits well below 2^32")
}
