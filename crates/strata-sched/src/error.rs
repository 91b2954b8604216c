//! The error type of the scheduler.

use crate::types::{Demand, NodeResources, TaskId};

/// Why the scheduler refused a request. Every refusal leaves its state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// The queue is at its bound.
    #[error("submit refused: the queue holds {queued} tasks, its bound is {bound}")]
    QueueFull {
        /// Tasks waiting.
        queued: usize,
        /// [`crate::SchedulerConfig::queue_bound`].
        bound: usize,
    },
    /// No live node could ever hold the demand, even if idle.
    #[error("submit refused: {}", infeasible_message(.demand, .largest))]
    Infeasible {
        /// The task's demand.
        demand: Demand,
        /// The largest live node (by GPU memory, then GPU slots, then CPU slots) and its capacity.
        largest: Option<(String, NodeResources)>,
    },
    /// A task with this id is queued or running, or finished recently.
    #[error("submit refused: task id {task} is already in use")]
    DuplicateTask {
        /// The id.
        task: TaskId,
    },
    /// The deadline is not in the future.
    #[error("submit refused: the deadline {deadline_ms} ms is not after now ({now_ms} ms)")]
    DeadlinePassed {
        /// The task's deadline.
        deadline_ms: u64,
        /// The time passed in.
        now_ms: u64,
    },
    /// No such task is queued or running.
    #[error("{op}: no task {task} is queued or running")]
    UnknownTask {
        /// The operation.
        op: &'static str,
        /// The id.
        task: TaskId,
    },
    /// No such node is live.
    #[error("{op}: node {node} is not live")]
    UnknownNode {
        /// The operation.
        op: &'static str,
        /// The node's name.
        node: String,
    },
    /// A journal record contradicts the records before it.
    #[error("recover: journal record {index} cannot be applied: {reason}")]
    Journal {
        /// The record's position in the sequence, from 0.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn infeasible_message(demand: &Demand, largest: &Option<(String, NodeResources)>) -> String {
    match largest {
        Some((name, capacity)) => format!(
            "no node of the cluster could ever meet the demand of {demand}; the largest live node, {name}, has {capacity}"
        ),
        None => format!("no node of the cluster could ever meet the demand of {demand}; the cluster has no live node"),
    }
}
