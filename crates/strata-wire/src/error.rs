//! The error type of the wire layer.

/// Why a frame was refused. After any of these the stream carrying the frame is reset;
/// the connection and the node go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The header length exceeds `header_bytes_max`.
    #[error("frame header of {bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    HeaderTooLarge {
        /// Declared header length.
        bytes: u64,
        /// `header_bytes_max`.
        limit_bytes: u64,
    },
    /// The payload length exceeds `frame_bytes_max`.
    #[error("frame payload of {bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    FrameTooLarge {
        /// Declared payload length.
        bytes: u64,
        /// `frame_bytes_max`.
        limit_bytes: u64,
    },
    /// The header is not valid MessagePack for a [`crate::Header`].
    #[error("malformed frame header: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {got} (this node speaks {supported})")]
    Version {
        /// The version in the frame.
        got: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// The payload length disagrees with what the header describes.
    #[error("{what}: header describes {expected} payload bytes, frame carries {got}")]
    PayloadLength {
        /// Which message.
        what: &'static str,
        /// Bytes the header implies.
        expected: u64,
        /// Bytes declared.
        got: u64,
    },
    /// A tensor's shape describes more bytes than a `u64` holds.
    #[error("tensor of shape {shape} is larger than any payload can be")]
    ShapeTooLarge {
        /// The shape, formatted.
        shape: String,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({missing} more bytes expected)")]
    Truncated {
        /// Bytes still missing.
        missing: u64,
    },
    /// Encoding a header failed (a bug, not a peer's fault).
    #[error("encoding a frame header failed: {0}")]
    Encode(String),
}
