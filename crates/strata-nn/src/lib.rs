//! Neural-network layers, models, optimisers, data loading and checkpoints.
//!
//! A [`ModelSpec`] describes a sequential model; [`Model`] binds it to a GPU actor and
//! turns training steps into [`strata_gpu::Op`] programs, so parameters, activations and
//! gradients stay on the device and a step crosses to the host only for the batch, the
//! loss and (in data-parallel training) the gradient buckets.

pub mod checkpoint;
pub mod data;
mod error;
mod model;
mod optim;
mod stage;

pub use error::NnError;
pub use model::{BUCKET_BYTES_DEFAULT, Bucket, Layer, Model, ModelSpec, ParamSlot};
pub use optim::Optimizer;
pub use stage::{Accumulate, Cut, StageModel};

/// Result type of this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;
