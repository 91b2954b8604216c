//! Data-parallel training: every rank holds the whole model on its GPU actor, trains on
//! its own shard of each epoch, and all-reduces (averages) gradients after every step,
//! as PyTorch's DistributedDataParallel does.
//!
//! Gradients are averaged in buckets, last layers first: as soon as the backward pass
//! has produced a bucket, it is downloaded and all-reduced over QUIC while the GPU actor
//! goes on with the earlier layers. Rank 0's initial parameters are broadcast, and the
//! replicas are compared by checksum every few steps.

mod error;
pub mod pipeline;
mod trainer;

pub use error::TrainError;
pub use trainer::{EpochStats, StepStats, StepTimes, TrainConfig, Trainer};
