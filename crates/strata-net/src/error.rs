//! The error type of the network layer.

use strata_wire::WireError;

/// Everything the network layer can refuse or fail at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NetError {
    /// A configuration value is missing or wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// Reading or writing certificates failed.
    #[error("certificates: {0}")]
    Certificate(String),
    /// Binding the UDP socket or creating the endpoint failed.
    #[error("endpoint on {addr}: {reason}")]
    Endpoint {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Connecting to a peer failed (including a refused TLS handshake).
    #[error("connecting to {peer}: {reason}")]
    Connect {
        /// Address or name.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer is not (or no longer) connected.
    #[error("peer {0} is not connected")]
    NotConnected(String),
    /// The peer's connection broke.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost {
        /// Peer name.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A frame from the peer was refused.
    #[error("frame from {peer}: {error}")]
    Wire {
        /// Peer name.
        peer: String,
        /// The refusal.
        error: WireError,
    },
    /// The peer answered with an error.
    #[error("{peer} refused: {message}")]
    Refused {
        /// Peer name.
        peer: String,
        /// Its message.
        message: String,
    },
    /// A wait ran past its limit.
    #[error("{what} timed out after {millis} ms")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        millis: u64,
    },
    /// The node actor stopped.
    #[error("the node is shutting down")]
    NodeGone,
}
