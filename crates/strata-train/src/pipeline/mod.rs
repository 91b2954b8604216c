//! Pipeline-style model parallelism: a sequential model cut into stages on different
//! nodes, micro-batches flowing forward as activations and back as activation gradients
//! over QUIC, with the GPipe, 1F1B and zero-bubble (ZB-H1) schedules, and stages replicated
//! for data parallelism (DP x PP).
//!
//! - `schedule`: the schedules as sans-IO plans, and a simulator.
//! - `partition`: balanced cuts from measured layer times and memory.
//! - `timeline`: what each stage did when; Chrome trace export; the bubble.
//! - [`PipelineTrainer`]: one stage of one replica on this node.
//!
//! Ranks are laid out replica-major: rank `r * S + s` is stage `s` of replica `r`.
//! Every step, each replica takes `m` micro-batches of its share of the global batch;
//! each stage accumulates its weight gradients over them in micro-batch order, scales by
//! `1/m`, averages them with the same stage of the other replicas, and steps its optimiser.

mod partition;
mod runner;
mod schedule;
mod timeline;

pub use partition::{Balanced, UnitCost, balance};
pub use runner::{PipelineConfig, PipelineStats, PipelineTrainer, merge_stage_checkpoints};
pub use schedule::{Action, Next, Schedule, SimCosts, SimResult, StagePlan, Work, simulate};
pub use timeline::{Bubble, Event, EventKind, Timeline, decode as decode_events, encode as encode_events, now_us};
