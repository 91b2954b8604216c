//! The cluster task queue: tasks ordered by priority and placed by resource demand on
//! the nodes of a cluster, with their state journalled so that nothing is lost or done
//! twice when nodes or the scheduler die.
//!
//! - A **task** is a named task function that the application registers on every node
//!   at start-up ([`TaskRegistry`]; Rust cannot ship closures, so functions are found by
//!   name, a static form of Ray's remote functions) or a program of GPU [`Op`]s run on
//!   the node's GPU actor. It has inline tensor inputs, a resource [`Demand`], a
//!   priority, a deadline and a retry budget ([`TaskRequest`]).
//! - Every node runs the **executor** service ([`ExecService`], service `"exec"`): it
//!   reports the node's resources and runs the attempts the scheduler places on it. A
//!   task that fails or panics is an error for its submitter; the node keeps serving.
//! - One node per cluster runs the **scheduler** service ([`SchedulerService`], service
//!   `"sched"`), chosen by the operator (`strata node --scheduler`): it drives the
//!   sans-IO [`strata_sched::Scheduler`] with the cluster's membership, calls executors,
//!   journals every change in a redb database before acting on it, and answers
//!   submitters. Killed and restarted on the same journal, it recovers every queued and
//!   running task; submitters reattach by task id.
//! - [`TaskClient`] is the submitter's side, from a member node or an operator.

mod client;
mod exec;
mod journal;
mod service;

use serde::{Deserialize, Serialize};
use strata_gpu::{Op, TensorId};
use strata_tensor::HostTensor;

pub use client::TaskClient;
pub use exec::{ExecOptions, ExecService, TaskContext, TaskFn, TaskFuture, TaskInput, TaskOutput, TaskRegistry};
pub use service::{SchedulerOptions, SchedulerService};
pub use strata_sched::{Demand, NodeResources, TaskId};

/// The executor service's name on every node.
pub const EXEC_SERVICE: &str = "exec";
/// The scheduler service's name on the scheduler node.
pub const SCHED_SERVICE: &str = "sched";

/// A tensor as tasks carry it on the wire: shape and little-endian f32 data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements' bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Encodes a host tensor.
    pub fn from_host(t: &HostTensor<f32>) -> Self {
        Self { shape: t.shape().dims().to_vec(), data: bytemuck::cast_slice(t.data()).to_vec() }
    }

    /// Decodes into a host tensor, checking that the data fits the shape.
    pub fn to_host(&self) -> Result<HostTensor<f32>, String> {
        if !self.data.len().is_multiple_of(4) {
            return Err(format!("tensor data of {} bytes is not whole f32 elements", self.data.len()));
        }
        let data: Vec<f32> = self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        HostTensor::new(self.shape.clone(), data).map_err(|e| e.to_string())
    }
}

/// What a task runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TaskBody {
    /// A task function registered under `name` on every node.
    Function {
        /// The function's name.
        name: String,
        /// Its arguments, encoded by the application.
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
        /// Its tensor inputs.
        tensors: Vec<WireTensor>,
    },
    /// A program of GPU operations: `inputs` are uploaded under their handles, `ops` run
    /// atomically on the node's GPU actor, and `outputs` come back. Handles are the
    /// submitter's own; the executor maps them to fresh ones on the node.
    Program {
        /// Inline inputs.
        inputs: Vec<(TensorId, WireTensor)>,
        /// The operations.
        ops: Vec<Op>,
        /// The handles whose tensors are the result.
        outputs: Vec<TensorId>,
    },
}

impl TaskBody {
    /// A short name for listings.
    pub fn label(&self) -> String {
        match self {
            TaskBody::Function { name, .. } => name.clone(),
            TaskBody::Program { ops, .. } => format!("program of {} ops", ops.len()),
        }
    }
}

/// A task as an application submits it.
#[derive(Clone, Debug)]
pub struct TaskRequest {
    /// What it runs.
    pub body: TaskBody,
    /// Higher runs first; FIFO within a priority.
    pub priority: i32,
    /// Resources and labels it needs.
    pub demand: Demand,
    /// Time it may take from submission before it expires, ms.
    pub deadline_ms: Option<u64>,
    /// Extra attempts after the first (`None`: the scheduler's default).
    pub retries: Option<u32>,
    /// Nodes that already hold this task's data, with the bytes each holds: placement
    /// prefers the node holding the most.
    pub near: Vec<(String, u64)>,
}

impl TaskRequest {
    /// A call of task function `name` with encoded `args` and tensor inputs.
    pub fn function(name: &str, args: Vec<u8>, tensors: &[HostTensor<f32>]) -> Self {
        Self::new(TaskBody::Function {
            name: name.to_string(),
            args,
            tensors: tensors.iter().map(WireTensor::from_host).collect(),
        })
    }

    /// A GPU program with inline inputs.
    pub fn program(inputs: &[(TensorId, HostTensor<f32>)], ops: Vec<Op>, outputs: Vec<TensorId>) -> Self {
        Self::new(TaskBody::Program {
            inputs: inputs.iter().map(|(id, t)| (*id, WireTensor::from_host(t))).collect(),
            ops,
            outputs,
        })
    }

    fn new(body: TaskBody) -> Self {
        Self { body, priority: 0, demand: Demand::default(), deadline_ms: None, retries: None, near: Vec::new() }
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the resource demand.
    pub fn demand(mut self, demand: Demand) -> Self {
        self.demand = demand;
        self
    }

    /// Sets the time the task may take from submission, ms.
    pub fn deadline_ms(mut self, ms: u64) -> Self {
        self.deadline_ms = Some(ms);
        self
    }

    /// Says that node `node` already holds `bytes` bytes of this task's data (a shard on
    /// its disk, say): placement prefers it when it has room.
    pub fn near(mut self, node: &str, bytes: u64) -> Self {
        self.near.push((node.to_string(), bytes));
        self
    }

    /// Sets the retry budget.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }
}

/// A finished task's result: encoded data and tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The node that ran the attempt whose result was delivered.
    pub node: String,
    /// That attempt.
    pub attempt: u32,
    /// Data, encoded by the task.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Tensors.
    pub tensors: Vec<WireTensor>,
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TaskOutcome {
    /// It finished; its result.
    Finished(TaskResult),
    /// It failed for good; every cause, oldest first.
    Failed(String),
    /// Its deadline passed first.
    Expired,
    /// It was cancelled.
    Cancelled,
}

/// A row of the queue listing (`strata queue`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    /// The task.
    pub id: TaskId,
    /// What it runs.
    pub label: String,
    /// Its priority.
    pub priority: i32,
    /// `queued`, `running`, `finished`, `failed`, `expired` or `cancelled`.
    pub state: String,
    /// The node of its current or last attempt.
    pub node: Option<String>,
    /// Attempts placed so far.
    pub attempts: u32,
    /// When it was submitted, ms since the UNIX epoch.
    pub submitted_ms: u64,
    /// Time from submission to its last start (or to now, if waiting), ms.
    pub wait_ms: u64,
    /// Time of its last attempt so far, ms.
    pub run_ms: Option<u64>,
}

/// Errors of the task layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// The scheduler refused the task (queue full, infeasible demand, unknown task...).
    #[error("scheduler on {node} refused: {message}")]
    Refused {
        /// The scheduler's node.
        node: String,
        /// Its message.
        message: String,
    },
    /// The network failed.
    #[error(transparent)]
    Net(#[from] strata_net::NetError),
    /// An answer could not be decoded.
    #[error("undecodable answer from {node}: {reason}")]
    Protocol {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// Waiting for a task ran past its limit.
    #[error("task {task} did not end within {millis} ms")]
    Timeout {
        /// The task.
        task: TaskId,
        /// The limit.
        millis: u64,
    },
}

/// Milliseconds since the UNIX epoch: the scheduler's clock, which survives restarts.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("task messages serialise")
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}
