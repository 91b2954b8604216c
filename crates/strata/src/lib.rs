//! Strata: a cross-vendor distributed GPU compute runtime.
//!
//! An application depends on this crate and finds the whole cluster API here:
//!
//! - [`net`]: start or join a cluster ([`net::Node::start`], [`net::NodeConfig`]),
//!   members, mailboxes, application services, and [`net::OperatorClient`] for tools.
//! - [`gpu`]: the local GPU actor ([`gpu::GpuHandle`]) and its programs of [`gpu::Op`]s.
//! - [`cluster`]: the cluster as one machine: the task queue ([`cluster::tasks`]: task
//!   functions by name, priorities, resource demands, [`cluster::tasks::TaskClient`]),
//!   remote GPU actors and map-reduce.
//! - [`collective`]: all-reduce (of host buffers, or of device tensors straight from and
//!   back to a GPU actor: [`collective::Group::all_reduce_tensor`]), broadcast, all-gather,
//!   reduce-scatter, send/recv.
//! - [`nn`] and [`train`]: models, data, checkpoints, data-parallel training.
//! - [`sched`]: the sans-IO scheduler under the task queue.
//!
//! [`prelude`] gathers the names most programs need. The `cli` module holds the code of
//! the `strata` binary's commands and is not part of the API.

#[doc(hidden)]
pub mod cli;

pub use strata_cluster as cluster;
pub use strata_collective as collective;
pub use strata_gpu as gpu;
pub use strata_net as net;
pub use strata_nn as nn;
pub use strata_sched as sched;
pub use strata_tensor as tensor;
pub use strata_train as train;
pub use strata_wire as wire;

/// The names most cluster applications need.
pub mod prelude {
    pub use strata_cluster::tasks::{
        Demand, ExecOptions, ExecService, SchedulerOptions, SchedulerService, TaskClient, TaskContext, TaskFuture,
        TaskInput, TaskOutcome, TaskOutput, TaskRegistry, TaskRequest,
    };
    pub use strata_collective::{Compression, Group, GroupOptions, ReduceOp, TensorReduce};
    pub use strata_gpu::{GpuHandle, GpuOptions, Op, TensorId};
    pub use strata_net::{Node, NodeConfig, NodeHandle, OperatorClient};
    pub use strata_tensor::HostTensor;
}
