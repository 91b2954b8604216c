//! The error type of the GPU layer.

use strata_tensor::TensorError;

use crate::TensorId;

/// Everything the GPU layer can refuse or fail at.
///
/// A caller's mistake (a wrong shape, an unknown handle, a tensor too large for a binding,
/// a memory budget exceeded) is an error value; the device stays usable afterwards.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// No adapter matched the request.
    #[error("no GPU adapter matches {request}; available: {available}")]
    NoAdapter {
        /// The request, formatted.
        request: String,
        /// The adapters that exist, formatted.
        available: String,
    },
    /// The adapter refused to create a device.
    #[error("requesting a device from adapter {adapter} failed: {reason}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// The driver's reason.
        reason: String,
    },
    /// A shape or argument error from the tensor layer.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// A handle that names no tensor on this device.
    #[error("{op}: unknown tensor {id}")]
    UnknownTensor {
        /// Operation name.
        op: &'static str,
        /// The handle.
        id: TensorId,
    },
    /// An operand has a dtype the operation does not take.
    #[error("{op}: operand {what} has dtype {got}, expected {expected}")]
    DType {
        /// Operation name.
        op: &'static str,
        /// Which operand.
        what: &'static str,
        /// The dtype found.
        got: &'static str,
        /// The dtype expected.
        expected: &'static str,
    },
    /// An allocation would exceed the memory budget or the device's memory.
    #[error(
        "out of GPU memory: allocating {requested_bytes} bytes with {in_use_bytes} in use (limit {limit_bytes} bytes)"
    )]
    OutOfMemory {
        /// Bytes asked for.
        requested_bytes: u64,
        /// Bytes held by live tensors.
        in_use_bytes: u64,
        /// The limit that was hit (budget or device).
        limit_bytes: u64,
    },
    /// An operand is larger than one storage binding and the operation cannot split it.
    #[error(
        "{op}: operand {what} needs {bytes} bytes, more than the device's storage binding limit of {limit_bytes} bytes"
    )]
    BindingTooLarge {
        /// Operation name.
        op: &'static str,
        /// Which operand.
        what: &'static str,
        /// Bytes the operand needs.
        bytes: u64,
        /// `max_storage_buffer_binding_size`.
        limit_bytes: u64,
    },
    /// A tensor is larger than the largest buffer the device can create.
    #[error("tensor of {bytes} bytes exceeds the device's buffer size limit of {limit_bytes} bytes")]
    BufferTooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// `max_buffer_size`.
        limit_bytes: u64,
    },
    /// A dispatch grid exceeds the device's workgroup-count limit.
    #[error("{op}: problem too large for one dispatch ({what})")]
    DispatchTooLarge {
        /// Operation name.
        op: &'static str,
        /// What overflowed.
        what: String,
    },
    /// wgpu reported an error (validation, internal, device lost).
    #[error("wgpu error: {0}")]
    Wgpu(String),
    /// Reading a buffer back failed.
    #[error("reading a buffer back failed: {0}")]
    Readback(String),
    /// The device or the GPU actor did not answer within the limit.
    #[error("{op}: the GPU did not answer within {millis} ms")]
    Timeout {
        /// What waited.
        op: &'static str,
        /// The limit.
        millis: u64,
    },
    /// The GPU actor is gone (its thread stopped).
    #[error("the GPU actor is not running")]
    ActorGone,
    /// An element range that does not lie within the tensor.
    #[error("{op}: elements {start}..{end} are not within a tensor of {len} elements")]
    Range {
        /// The operation.
        op: &'static str,
        /// First element of the range.
        start: usize,
        /// One past its last element.
        end: usize,
        /// The tensor's element count.
        len: usize,
    },
}

/// Result type of this crate.
pub type Result<T, E = GpuError> = std::result::Result<T, E>;
