//! Journal records: what the IO layer persists so that [`crate::Scheduler::recover`] can
//! rebuild the task table after a restart.
//!
//! Records describe outcomes, not requests, so replaying them never re-runs a placement
//! decision. The live log is `Submitted`, `Placed`, `Released`, `Requeued` and `Ended`;
//! [`crate::Scheduler::snapshot`] compacts a state into `Counters`, `Submitted`, `Placed`
//! and `Aborting` records, which a log may be replaced with.

use serde::{Deserialize, Serialize};

use crate::types::{Cause, Demand, TaskId, TaskSpec};

/// One change to the persistent part of the scheduler's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalRecord {
    /// Id and sequence counters (from a snapshot), so ids are never reused after it.
    Counters {
        /// The next task id the scheduler would assign.
        next_task: u64,
        /// The next queue sequence number.
        next_seq: u64,
    },
    /// A task entered the queue (or, in a snapshot, exists).
    Submitted {
        /// The task.
        task: TaskId,
        /// Its place in FIFO order within its priority.
        seq: u64,
        /// When it was submitted, ms.
        at_ms: u64,
        /// Attempts ended before this record (0 in a live log).
        attempts: u32,
        /// Causes of those attempts' ends.
        causes: Vec<Cause>,
        /// The spec, with id and retries resolved.
        spec: TaskSpec,
    },
    /// The task's next attempt was placed on a node; it holds the demand there.
    Placed {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
        /// The node.
        node: String,
    },
    /// An attempt's resources were released (it ended, or its node was lost).
    Released {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
    },
    /// A placed task went back to its place in the queue after `cause`.
    Requeued {
        /// The task.
        task: TaskId,
        /// Why its attempt ended.
        cause: Cause,
    },
    /// The task ended and is forgotten. If it was placed and its attempt was not released,
    /// that attempt goes on holding its resources until a `Released`.
    Ended {
        /// The task.
        task: TaskId,
        /// How it ended.
        outcome: Outcome,
    },
    /// (Snapshot only.) An attempt of an ended task still holds resources while its node aborts it.
    Aborting {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
        /// The node.
        node: String,
        /// What it holds there (labels unused).
        demand: Demand,
    },
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// This attempt's result was delivered.
    Finished {
        /// The attempt.
        attempt: u32,
    },
    /// It failed for good; earlier causes are in the `Requeued` records.
    Failed {
        /// The last cause.
        cause: Cause,
    },
    /// It was cancelled.
    Cancelled,
    /// Its deadline passed.
    Expired,
}
