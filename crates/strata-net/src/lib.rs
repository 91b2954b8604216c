//! The node runtime of Strata: QUIC endpoints (quinn) with mutual TLS, one peer actor per
//! connection, a node actor that keeps the member list and detects failures, and the
//! routing of tensors and collective chunks to whoever waits for them.
//!
//! Protocol logic stays sans-IO: framing is `strata-wire`, membership is
//! [`membership::Membership`] (time passed in, unit-tested without sockets). The actors
//! only move bytes and call those types.

mod budget;
pub mod buffers;
pub mod config;
mod error;
pub mod membership;
mod node;
mod peer;
mod router;
pub mod service;
pub mod tls;
mod transport;

pub use budget::Charge;
pub use config::NodeConfig;
pub use error::NetError;
pub use membership::MembershipEvent;
pub use node::{Node, NodeExtras, NodeHandle, OperatorClient, SUBSCRIBER_DEPTH, query_status, query_status_in};
pub use peer::PeerLink;
pub use router::OP_INBOX_DEPTH;
pub use router::{ChunkMessage, TensorMessage};
pub use service::{Caller, Service, ServiceFuture, ServiceRequest, ServiceResponse};
pub use strata_wire::{MemberRecord, MemberState, NodeInfo};
