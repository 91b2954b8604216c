//! The values the scheduler takes in and hands out.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A task's identity, unique for the scheduler's lifetime (journalled across restarts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a task needs from the node that runs it. Amounts are consumed while the task
/// runs; labels are requirements the node must carry (`backend=vulkan`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// GPU memory, bytes.
    pub gpu_mem_bytes: u64,
    /// GPU slots (devices or device shares, as the IO layer counts them).
    pub gpu_slots: u32,
    /// CPU slots.
    pub cpu_slots: u32,
    /// Labels the node must carry with exactly these values.
    pub labels: BTreeMap<String, String>,
}

impl Demand {
    /// A demand of `gpu_mem_bytes` bytes of GPU memory and nothing else yet.
    pub fn gpu_mem(gpu_mem_bytes: u64) -> Self {
        Self { gpu_mem_bytes, ..Self::default() }
    }

    /// Sets the GPU slots.
    pub fn gpu_slots(mut self, slots: u32) -> Self {
        self.gpu_slots = slots;
        self
    }

    /// Sets the CPU slots.
    pub fn cpu_slots(mut self, slots: u32) -> Self {
        self.cpu_slots = slots;
        self
    }

    /// Requires the label `key=value` on the node.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

impl fmt::Display for Demand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_amounts(f, self.gpu_mem_bytes, self.gpu_slots, self.cpu_slots, &self.labels)
    }
}

/// What a node offers: its total capacity (not what is free) and its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    /// GPU memory, bytes.
    pub gpu_mem_bytes: u64,
    /// GPU slots.
    pub gpu_slots: u32,
    /// CPU slots.
    pub cpu_slots: u32,
    /// Labels the node carries.
    pub labels: BTreeMap<String, String>,
}

impl NodeResources {
    /// A node with this capacity and no labels.
    pub fn new(gpu_mem_bytes: u64, gpu_slots: u32, cpu_slots: u32) -> Self {
        Self { gpu_mem_bytes, gpu_slots, cpu_slots, labels: BTreeMap::new() }
    }

    /// Adds the label `key=value`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

impl fmt::Display for NodeResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_amounts(f, self.gpu_mem_bytes, self.gpu_slots, self.cpu_slots, &self.labels)
    }
}

/// Resource amounts in use on a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// GPU memory, bytes.
    pub gpu_mem_bytes: u64,
    /// GPU slots.
    pub gpu_slots: u32,
    /// CPU slots.
    pub cpu_slots: u32,
}

fn write_amounts(
    f: &mut fmt::Formatter<'_>,
    mem: u64,
    gpus: u32,
    cpus: u32,
    labels: &BTreeMap<String, String>,
) -> fmt::Result {
    write!(f, "{} of gpu memory, {} gpu slot{}, {} cpu slot{}", Bytes(mem), gpus, plural(gpus), cpus, plural(cpus))?;
    if labels.is_empty() {
        return Ok(());
    }
    write!(f, ", labels ")?;
    for (i, (k, v)) in labels.iter().enumerate() {
        write!(f, "{}{k}={v}", if i == 0 { "" } else { "," })?;
    }
    Ok(())
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A byte count for messages: exact below 1 KiB, else one decimal in binary units.
pub(crate) struct Bytes(pub(crate) u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} bytes", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// Where part of a task's input already lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputLocation {
    /// The node holding it.
    pub node: String,
    /// Its size, bytes.
    pub bytes: u64,
}

/// A task as submitted. The scheduler reads the demand, priority, inputs, deadline and
/// retry budget; `name` and `payload` are carried for the IO layer and never interpreted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The id to use; `None` lets the scheduler assign one.
    pub id: Option<TaskId>,
    /// A label for messages: a task function's name, or what a program does.
    pub name: String,
    /// Opaque to the scheduler: e.g. a MessagePack `Op` program with its inline inputs.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Higher runs first.
    pub priority: i32,
    /// Resources and labels the task needs.
    pub demand: Demand,
    /// Inputs already resident on nodes (placement prefers the node holding the most bytes).
    pub inputs: Vec<InputLocation>,
    /// The task must end by this time (ms, on the caller's clock), or it is expired.
    pub deadline_ms: Option<u64>,
    /// Extra attempts after the first; `None` takes [`crate::SchedulerConfig::default_retries`].
    pub retries: Option<u32>,
}

impl TaskSpec {
    /// A task with this name, priority 0, no demand, no inputs, no deadline, default retries.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            id: None,
            name: name.into(),
            payload: Vec::new(),
            priority: 0,
            demand: Demand::default(),
            inputs: Vec::new(),
            deadline_ms: None,
            retries: None,
        }
    }

    /// Sets the id instead of letting the scheduler choose.
    pub fn id(mut self, id: TaskId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the opaque payload.
    pub fn payload(mut self, payload: Vec<u8>) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the priority (higher runs first).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the demand.
    pub fn demand(mut self, demand: Demand) -> Self {
        self.demand = demand;
        self
    }

    /// Adds an input of `bytes` bytes resident on `node`.
    pub fn input(mut self, node: impl Into<String>, bytes: u64) -> Self {
        self.inputs.push(InputLocation { node: node.into(), bytes });
        self
    }

    /// Sets the deadline (ms, on the caller's clock).
    pub fn deadline_ms(mut self, deadline_ms: u64) -> Self {
        self.deadline_ms = Some(deadline_ms);
        self
    }

    /// Sets the retry budget (extra attempts after the first).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }
}

/// One attempt's cause of failure, or why a task could not go on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// The attempt that failed, if the cause belongs to one.
    pub attempt: Option<u32>,
    /// The node it ran on, if any.
    pub node: Option<String>,
    /// What happened.
    pub reason: String,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.attempt, &self.node) {
            (Some(a), Some(n)) => write!(f, "attempt {a} on node {n}: {}", self.reason),
            (Some(a), None) => write!(f, "attempt {a}: {}", self.reason),
            (None, _) => write!(f, "{}", self.reason),
        }
    }
}

/// The causes of a task's failures, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CauseChain(pub Vec<Cause>);

impl fmt::Display for CauseChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cause) in self.0.iter().enumerate() {
            write!(f, "{}{cause}", if i == 0 { "" } else { "; then " })?;
        }
        Ok(())
    }
}

/// An instruction to start attempt `attempt` of `task` on `node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The task.
    pub task: TaskId,
    /// The attempt, from 1; a result is accepted only for the attempt placed last.
    pub attempt: u32,
    /// The node to run it on.
    pub node: String,
}

/// What to do with a report from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The report is about the task's current attempt: act on it (deliver the result).
    Deliver,
    /// This attempt's result was already delivered: drop it.
    Duplicate,
    /// The attempt is no longer current (its node was declared lost, the task was
    /// cancelled, expired or retried, or the task is unknown): drop it.
    Late,
}

/// An outcome or instruction for the IO layer, polled with [`crate::Scheduler::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The task failed for good: its retries are spent, its failure was not retryable, or
    /// no live node could hold it for [`crate::SchedulerConfig::unplaceable_grace_ms`].
    Failed {
        /// The task.
        task: TaskId,
        /// Every cause, oldest first.
        causes: CauseChain,
    },
    /// The task's deadline passed before it finished.
    DeadlineExpired {
        /// The task.
        task: TaskId,
        /// Its deadline, ms.
        deadline_ms: u64,
    },
    /// The task was cancelled.
    Cancelled {
        /// The task.
        task: TaskId,
    },
    /// Stop this attempt on this node (its task was cancelled or expired while running).
    /// Its resources stay reserved until the node reports the attempt's end or is lost.
    Abort {
        /// The task.
        task: TaskId,
        /// The attempt.
        attempt: u32,
        /// The node running it.
        node: String,
    },
}

/// Where a task stands, for status displays and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting in the queue.
    Queued {
        /// The node reserved for it after it waited too long (see the crate docs).
        reserved_node: Option<String>,
        /// How many times a task behind it was placed while it waited.
        bypasses: u32,
        /// When a task behind it was first placed, ms.
        bypassed_since_ms: Option<u64>,
        /// Since when no live node could ever hold it, ms.
        unplaceable_since_ms: Option<u64>,
    },
    /// Placed on a node.
    Placed {
        /// The attempt.
        attempt: u32,
        /// The node.
        node: String,
        /// Whether the node reported the start.
        started: bool,
    },
}

/// A task's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// Its priority.
    pub priority: i32,
    /// Attempts placed so far.
    pub attempts: u32,
    /// Causes of earlier attempts' failures.
    pub causes: CauseChain,
    /// Where it stands.
    pub state: TaskState,
}

/// A node's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Whether the node is live (reported and not lost).
    pub live: bool,
    /// Its capacity and labels as last reported.
    pub capacity: NodeResources,
    /// What placed attempts hold on it (including attempts being aborted).
    pub used: Usage,
    /// Attempts holding resources on it.
    pub attempts: usize,
    /// The starving task it is reserved for, if any.
    pub reserved_for: Option<TaskId>,
}
