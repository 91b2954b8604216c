//! The error type of the tensor layer.

/// A caller's mistake detected by a shape rule or a host-tensor constructor.
///
/// Messages name the operation and the values involved, e.g.
/// `conv2d: input [32,3,28,28] has 3 channels, weight [64,1,3,3] expects 1`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// Operand shapes do not fit the operation.
    #[error("{op}: {msg}")]
    Shape {
        /// Operation name, e.g. `conv2d`.
        op: &'static str,
        /// What is wrong, naming the shapes.
        msg: String,
    },
    /// An argument other than a shape is out of range (stride 0, axis 3 of a 2-D tensor, ...).
    #[error("{op}: {msg}")]
    Argument {
        /// Operation name.
        op: &'static str,
        /// What is wrong, naming the value.
        msg: String,
    },
    /// The element count of a data buffer does not match the shape it is given.
    #[error("tensor of shape {shape} holds {expected} elements, data has {got}")]
    DataLength {
        /// The shape, formatted.
        shape: String,
        /// Elements the shape needs.
        expected: usize,
        /// Elements supplied.
        got: usize,
    },
    /// The shape's element count (or byte count) overflows the address space.
    #[error("tensor of shape {shape} has more elements than memory can address")]
    TooLarge {
        /// The shape, formatted.
        shape: String,
    },
    /// The operation does not support this dtype (yet).
    #[error("{op}: dtype {dtype} is not supported")]
    DType {
        /// Operation name.
        op: &'static str,
        /// The dtype's name.
        dtype: &'static str,
    },
}

impl TensorError {
    /// Shorthand for [`TensorError::Shape`].
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Self::Shape { op, msg: msg.into() }
    }

    /// Shorthand for [`TensorError::Argument`].
    pub fn argument(op: &'static str, msg: impl Into<String>) -> Self {
        Self::Argument { op, msg: msg.into() }
    }
}
