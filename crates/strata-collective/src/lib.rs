//! Collective operations as sans-IO state machines.
//!
//! A machine owns its rank's buffer and answers two questions: what to send next
//! ([`Machine::poll_send`]) and what to do with data that arrived
//! ([`Machine::on_receive`]). It never touches a socket or a clock; the driver in
//! `strata-net` moves the bytes, and the tests here move them through in-memory queues
//! in shuffled orders.
//!
//! [`Group`] runs the machines over a node's QUIC links.
//!
//! Every algorithm fixes its summation order, so all ranks end with bitwise identical
//! results: the ring reduces each chunk in ring order and then copies the finished chunk
//! around; the tree reduces at the root and broadcasts. A compressed all-reduce
//! ([`Compression`]) rounds in the same places on every rank, so it stays bitwise
//! identical too.

mod device;
mod driver;
mod error;
mod machines;

pub use device::{PIECE_LEN_DEFAULT, TensorReduce};
pub use driver::{Group, GroupOptions};
pub use error::CollectiveError;
pub use machines::{
    Algorithm, AllGather, AllReduce, Broadcast, Compression, Machine, Received, Recv, ReduceOp, ReduceScatter, Send,
    SendAction, SendData, TREE_BYTES_MAX_DEFAULT,
};

/// A participant's index in a group, `0..world`.
pub type Rank = usize;

#[cfg(test)]
mod tests;
