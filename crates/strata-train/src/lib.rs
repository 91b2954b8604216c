//! Data-parallel training: every rank holds the whole model on its GPU actor, trains on
//! its own share of each step's global batch, and all-reduces gradients after every
//! step, as PyTorch's DistributedDataParallel does.
//!
//! Gradients are reduced in buckets, last layers first: as soon as the backward pass
//! has produced a bucket, it is downloaded and all-reduced over QUIC while the GPU actor
//! goes on with the earlier layers. Rank 0's initial parameters are broadcast, and the
//! replicas are compared by checksum every few steps.
//!
//! Ranks of different speed can share the global batch in proportion to their measured
//! throughput ([`Balance::Measured`]); each rank's gradient is then weighted by its part
//! of the global batch, so the update is that of one node on the whole batch.

pub mod balance;
mod error;
pub mod pipeline;
mod trainer;

pub use balance::Balance;
pub use error::TrainError;
pub use trainer::{EpochStats, StepStats, StepTimes, TrainConfig, Trainer};
