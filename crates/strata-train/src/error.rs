//! The error type of training.

use strata_collective::CollectiveError;
use strata_gpu::GpuError;
use strata_nn::NnError;

/// Why training stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// The model, data or checkpoint.
    #[error(transparent)]
    Nn(#[from] NnError),
    /// The GPU.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A collective operation (a peer failed, the network broke).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The replicas' parameters differ.
    #[error("parameters diverged at step {step}: rank {rank} has checksum {theirs:#018x}, rank 0 has {ours:#018x}")]
    Diverged {
        /// Optimiser step.
        step: u64,
        /// The differing rank.
        rank: usize,
        /// Its checksum.
        theirs: u64,
        /// Rank 0's checksum.
        ours: u64,
    },
    /// A pipeline stage's node failed or left during a step.
    #[error("pipeline stage {stage} of replica {replica} (node {node}) was lost: {reason}")]
    StageLost {
        /// The node.
        node: String,
        /// Its stage.
        stage: usize,
        /// Its replica.
        replica: usize,
        /// What happened.
        reason: String,
    },
    /// A training setting is invalid.
    #[error("training: {0}")]
    Config(String),
}
