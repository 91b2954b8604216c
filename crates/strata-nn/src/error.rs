//! The error type of the neural-network layer.

use std::path::PathBuf;

use strata_gpu::GpuError;
use strata_tensor::TensorError;

/// What can go wrong building models, loading data or checkpoints.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NnError {
    /// A layer's shapes do not fit its input.
    #[error("model {model}: layer {layer}: {source}")]
    Layer {
        /// Model name.
        model: String,
        /// Layer name.
        layer: String,
        /// The shape error.
        source: TensorError,
    },
    /// The model and the data disagree (input shape, class count).
    #[error("model {model} does not fit the data: {message}")]
    DataMismatch {
        /// Model name.
        model: String,
        /// What differs.
        message: String,
    },
    /// A data file is missing, truncated or of the wrong kind.
    #[error("{}: {message}", path.display())]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint cannot be written, read or used for this model.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A pipeline cut that does not fit the model (too many stages, an unknown split
    /// point, a checkpoint of another cut).
    #[error("model {model}: pipeline cut: {message}")]
    Cut {
        /// Model name.
        model: String,
        /// What is wrong.
        message: String,
    },
    /// The GPU refused.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A tensor error.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}
