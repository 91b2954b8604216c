//! The node runtime: clusters in one process, certificate refusal, malformed frames,
//! collectives over QUIC, and clusters of `strata node` processes.

mod cluster;
pub mod helpers;
mod security;
