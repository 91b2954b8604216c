//! Host-side tensor types for Strata: shapes, dtypes, host tensors, shard descriptors,
//! the shape rules every operation obeys, and CPU reference kernels.
//!
//! Every GPU kernel in `strata-gpu` has a reference here, and the GPU tests compare
//! against it. The shape rules in [`geometry`] are shared by the CPU and GPU paths, so
//! both report a caller's mistake with the same message.

pub mod cpu;
mod dtype;
mod error;
pub mod geometry;
mod host;
mod shape;
pub mod shard;

pub use dtype::{DType, Element};
pub use error::TensorError;
pub use host::{HostTensor, SplitMix64};
pub use shape::Shape;

/// Result type of this crate.
pub type Result<T, E = TensorError> = std::result::Result<T, E>;
