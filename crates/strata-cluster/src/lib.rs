//! Cluster compute for applications: the layer that lets an application treat a cluster
//! of GPUs as one machine.
//!
//! - [`remote_gpu`]: the GPU actor of any node, by name, used like the local one.
//! - [`tasks`]: the cluster task queue service (priority, resource demand, journalled
//!   state) and the application's client for it.
//! - [`mapreduce`]: map tasks over data shards placed near their data, combined by a
//!   deterministic tree of reduce tasks.
//!
//! Everything here speaks over node services ([`strata_net::Service`]): calls carry the
//! caller's verified identity, a deadline, and typed errors.

pub mod mapreduce;
pub mod remote_gpu;
pub mod tasks;
