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
    /// The arguments do not fit the operation.
    #[error("collective {op}: {message}")]
    Argument {
        /// Operation name.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
}
