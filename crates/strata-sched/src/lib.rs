//! The cluster task queue, sans IO.
//!
//! [`Scheduler`] is a state machine in the manner of quinn-proto: the IO layer feeds it
//! events ([`Scheduler::submit`], [`Scheduler::node_up`], [`Scheduler::node_lost`],
//! [`Scheduler::task_finished`], [`Scheduler::task_failed`], [`Scheduler::cancel`],
//! [`Scheduler::tick`]) and polls it for work ([`Scheduler::poll_placement`]), outcomes
//! ([`Scheduler::poll_event`]) and records to persist ([`Scheduler::poll_journal`]). It
//! holds no socket, no runtime and no clock: every call takes the time as milliseconds on
//! a clock the caller chooses (use one that survives restarts, such as UNIX time, if the
//! journal does). Tasks are opaque to it apart from their [`Demand`], priority, input
//! locations, deadline and retry budget.
//!
//! # Rules
//!
//! - **Order.** Higher priority first; within a priority, submission order. A task that
//!   goes back to the queue after a failed attempt keeps its place.
//! - **Fit.** A task is placed on a live node whose free resources (capacity minus what
//!   placed attempts hold) cover its GPU memory, GPU slots and CPU slots, and which carries
//!   all its labels. Among those: the node holding the most bytes of its inputs, then the
//!   best fit (least GPU memory left over, then GPU slots, then CPU slots, so CPU-only tasks
//!   fill the nodes with the least GPU memory and keep the large GPUs free), then the node
//!   reported first.
//! - **No head-of-line blocking.** Each poll examines up to
//!   [`SchedulerConfig::lookahead`] waiting tasks in order and places the first that fits,
//!   so a large task at the head does not hold back smaller ones that fit elsewhere. The
//!   tasks it passed over are *bypassed*.
//! - **Aging.** A task bypassed for [`SchedulerConfig::max_bypass_wait_ms`] since its first
//!   bypass, or [`SchedulerConfig::max_bypasses`] times, is *starving*: it reserves one live
//!   node that could hold it (the one closest to holding it now; a node reserved by a task
//!   behind it may be taken over). No task behind it in queue order starts on that node
//!   any more, so the node drains to it.
//! - **Bounded queue.** A submit while [`SchedulerConfig::queue_bound`] tasks wait is
//!   refused with [`SchedError::QueueFull`], naming the bound; the IO layer may retry until
//!   the task's own deadline.
//! - **Infeasible demands** (no live node could hold them even idle, labels included) are
//!   refused at submit with [`SchedError::Infeasible`], whose message names the demand and
//!   the largest live node's capacity. A waiting task that becomes unplaceable because
//!   nodes were lost or shrank waits for [`SchedulerConfig::unplaceable_grace_ms`] for a
//!   node that could hold it to come up, then fails with that cause.
//! - **Release.** An attempt's resources are released when its node reports it finished
//!   or failed, or when the node is lost. A task cancelled or expired while placed ends at
//!   once ([`Event::Cancelled`], [`Event::DeadlineExpired`]) and the IO layer gets
//!   [`Event::Abort`]; the attempt keeps its resources until the node reports its end or is
//!   lost, so a node is never over-committed by work it is still doing.
//! - **Retries.** A retryable failure or a lost node sends the task back to its place
//!   while attempts remain (`1 + retries` in all); then it fails for good with
//!   [`Event::Failed`] carrying every cause, oldest first.
//!
//! # Guarantees
//!
//! - **Capacity.** The resources held on a node never exceed its capacity when placed
//!   (a node that shrinks below what it holds gets nothing new until enough is released).
//! - **Exactly once.** A placement is identified by (task, attempt). A report is acted on
//!   ([`Delivery::Deliver`]) only for the attempt placed last and only once; a report from
//!   an attempt whose node was declared lost, or that was superseded, cancelled or expired,
//!   is [`Delivery::Late`], and a repeated result is [`Delivery::Duplicate`] (or `Late` once
//!   it is no longer remembered). Every task ends exactly once: delivered, failed, expired
//!   or cancelled.
//! - **No starvation by later work.** Once a task holds a reservation, only tasks ahead
//!   of it in queue order can start on its node: a finite set, fixed when it reserved
//!   except for higher-priority tasks submitted later. With one priority level and one
//!   starving task per node, a task therefore starts within `max_bypass_wait_ms` (or
//!   `max_bypasses` placements) of its first bypass plus the longest running time of the
//!   attempts on its reserved node, provided that node stays live. Strict priority is
//!   kept: a sustained stream of higher-priority work can delay lower-priority tasks
//!   indefinitely. A task further back than `lookahead` is neither placed nor bypassed
//!   until the tasks ahead of it move.
//!
//! # Persistence
//!
//! Every change to tasks and placements is a [`JournalRecord`]. The IO layer appends the
//! polled records to its database before it carries out the placements and events polled
//! with them, and may replace the log by a [`Scheduler::snapshot`]. After a restart,
//! [`Scheduler::recover`] rebuilds every waiting task in order and every placed attempt on
//! its node. Nodes are not journalled: each must report again with [`Scheduler::node_up`];
//! one that has not within [`SchedulerConfig::recovery_grace_ms`] is treated as lost, so
//! its attempts are retried (counted) rather than waited for forever. Aging and
//! reservations are soft state and start over after a restart.
//!
//! # Cost
//!
//! A poll examines at most `lookahead` tasks; a task that found no node is rechecked only
//! against the nodes that gained free resources since, so a poll costs
//! O(lookahead + nodes) at worst and usually O(nodes) for the one task placed. Node loss
//! and shrinkage cost O(waiting tasks x nodes) to find tasks that became unplaceable.
//! [`bench::bench_placements`] measures placements per second.

pub mod bench;
mod error;
mod journal;
mod scheduler;
mod types;

pub use error::SchedError;
pub use journal::{JournalRecord, Outcome};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use types::{
    Cause, CauseChain, Delivery, Demand, Event, InputLocation, NodeResources, NodeStatus, Placement, TaskId, TaskInfo,
    TaskSpec, TaskState, Usage,
};

#[cfg(test)]
mod tests;
