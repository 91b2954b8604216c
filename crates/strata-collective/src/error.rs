//! The error type of collective operations.

use crate::Rank;

/// Why a collective operation failed on this rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CollectiveError {
    /// A peer sent something the algorithm did not expect (a bug or a mismatched call).
    #[error("collective {op}: unexpected data from rank {from}: {message}")]
    Protocol {
        /// Operation name.
        op: &'static str,
        /// The sender.
        from: Rank,
        /// What was wrong.
        message: String,
    },
    /// A peer of the group failed, left, or lost its connection during the operation.
    #[error("collective {op}: peer {peer} failed: {reason}")]
    PeerFailed {
        /// Operation name.
        op: &'static str,
        /// The peer's node name.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// Another rank gave up on the operation.
    #[error("collective {op}: aborted by {peer}: {message}")]
    Aborted {
        /// Operation name.
        op: &'static str,
        /// The rank's node name.
        peer: String,
        /// Its reason.
        message: String,
    },
    /// Nothing arrived for longer than the operation's timeout.
    #[error("collective {op}: no data for {millis} ms while waiting on {waiting_on:?}")]
    Timeout {
        /// Operation name.
        op: &'static str,
        /// Nodes it was waiting on.
        waiting_on: Vec<String>,
        /// The timeout.
        millis: u64,
    },
    /// The node runtime refused.
    #[error("collective: {0}")]
    Net(#[from] strata_net::NetError),
    /// The GPU actor holding the operation's tensor failed (reading, writing, or a tensor
    /// of another length than the call said).
    #[error("collective {op} on a device tensor: {message}")]
    Device {
        /// Operation name.
        op: &'static str,
        /// The device's error.
        message: String,
    },
    /// The arguments do not fit the operation.
    #[error("collective {op}: {message}")]
    Argument {
        /// Operation name.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
}
