//! Map-reduce over data shards on the cluster's task queue.
//!
//! [`map_reduce`] submits one task of a registered map function per [`Shard`] (all at
//! once; a shard may name the node already holding its data, and placement prefers that
//! node), then combines the partial results by a tree of tasks of a registered reduce
//! function. Both run on the cluster's executors, so a map function reaches its node's
//! GPU actor through [`TaskContext::gpu`].
//!
//! The tree's shape is fixed by shard index alone: a range of shards is split into
//! `fan_in` contiguous, near-equal ranges, each combined recursively, and a reduce task
//! gets its children's results in shard order. Which node ran what, and in which order
//! tasks finished, never changes what is summed with what, so a reduce that is
//! deterministic for given inputs gives a reproducible result. With one shard no reduce
//! runs: a reduce function must be a combiner whose output has the form of a map's (a
//! monoid), and anything to compute once at the end (a mean from sums, say) is done on
//! the result.
//!
//! - [`tiles`]: an image cut into tiles with halos, filtered (Gaussian blur and a Sobel
//!   edge map) on the nodes' GPU actors, reassembled and reduced to a histogram.
//! - [`class_stats`]: per-class mean images and a pixel histogram of a labelled image
//!   dataset whose shards the nodes read from their own disks.
//! - [`local`]: an in-process cluster on loopback to run jobs on.

pub mod class_stats;
pub mod local;
pub mod tiles;

use std::cell::RefCell;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata_tensor::HostTensor;

use crate::tasks::{
    Demand, TaskClient, TaskContext, TaskError, TaskFn, TaskFuture, TaskId, TaskInput, TaskOutcome, TaskOutput,
    TaskRegistry, TaskRequest, TaskResult, WireTensor, decode, encode,
};

/// The built-in reduce: elementwise sums of the partials' tensors, position by position
/// in shard order; their data must be equal and is kept. Registered by
/// [`register_builtins`].
pub const SUM: &str = "mapreduce.sum";

/// One shard of a job: the map function's input, and the node holding its data.
#[derive(Clone, Debug, Default)]
pub struct Shard {
    /// Arguments for the map function, encoded by the application.
    pub args: Vec<u8>,
    /// Tensor inputs (data that travels with the task).
    pub tensors: Vec<HostTensor<f32>>,
    /// Nodes that already hold this shard's data, with the bytes each holds.
    pub near: Vec<(String, u64)>,
}

impl Shard {
    /// A shard with these arguments and tensors.
    pub fn new(args: Vec<u8>, tensors: Vec<HostTensor<f32>>) -> Self {
        Self { args, tensors, near: Vec::new() }
    }

    /// Says that `node` holds `bytes` bytes of this shard's data (on its disk, say), so
    /// the map task is placed there when it has room.
    pub fn near(mut self, node: &str, bytes: u64) -> Self {
        self.near.push((node.to_string(), bytes));
        self
    }
}

/// How [`map_reduce`] runs its tasks.
#[derive(Clone, Debug)]
pub struct MapReduceOptions {
    /// Partial results one reduce task combines, at least 2.
    pub fan_in: usize,
    /// What a map task needs (e.g. a GPU slot and memory).
    pub map_demand: Demand,
    /// What a reduce task needs.
    pub reduce_demand: Demand,
    /// The tasks' priority.
    pub priority: i32,
    /// Extra attempts per task (`None`: the scheduler's default).
    pub retries: Option<u32>,
    /// Limit on the whole job.
    pub timeout: Duration,
    /// The first this many tensors of each map's result are side outputs: returned to
    /// the caller in [`MapRun::side`] rather than passed to the reduce (a filtered tile,
    /// say, whose histogram alone is reduced).
    pub side_tensors: usize,
}

impl Default for MapReduceOptions {
    fn default() -> Self {
        Self {
            fan_in: 2,
            map_demand: Demand::default(),
            reduce_demand: Demand::default(),
            priority: 0,
            retries: None,
            timeout: Duration::from_secs(600),
            side_tensors: 0,
        }
    }
}

/// A partial or final result: encoded data and tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Partial {
    /// Data, encoded by the application.
    pub data: Vec<u8>,
    /// Tensors.
    pub tensors: Vec<HostTensor<f32>>,
}

impl From<Partial> for TaskOutput {
    fn from(p: Partial) -> Self {
        TaskOutput { data: p.data, tensors: p.tensors }
    }
}

/// Where a map task ran and what it returned on the side.
#[derive(Clone, Debug)]
pub struct MapRun {
    /// The node that ran the attempt whose result counted.
    pub node: String,
    /// That attempt (from 1).
    pub attempt: u32,
    /// The map's side outputs (see [`MapReduceOptions::side_tensors`]).
    pub side: Vec<HostTensor<f32>>,
}

/// Where a reduce task ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReduceRun {
    /// The shards whose results it combined.
    pub shards: Range<usize>,
    /// The node that ran it.
    pub node: String,
}

/// A finished job.
#[derive(Clone, Debug)]
pub struct MapReduceOutput {
    /// The combined result of all shards.
    pub result: Partial,
    /// Every shard's map task, by shard index.
    pub maps: Vec<MapRun>,
    /// Every reduce task, root last.
    pub reduces: Vec<ReduceRun>,
}

/// Which task of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The map task of a shard.
    Map {
        /// The shard's index.
        shard: usize,
    },
    /// The reduce task combining a range of shards.
    Reduce {
        /// The shards.
        shards: Range<usize>,
    },
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Map { shard } => write!(f, "map task of shard {shard}"),
            Stage::Reduce { shards } => write!(f, "reduce task of shards {}..{}", shards.start, shards.end),
        }
    }
}

/// Errors of [`map_reduce`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MapReduceError {
    /// The job has no shards.
    #[error("map_reduce of {map:?} needs at least one shard")]
    NoShards {
        /// The map function.
        map: String,
    },
    /// The fan-in is below 2.
    #[error("map_reduce fan-in {fan_in} is below 2")]
    FanIn {
        /// The fan-in asked for.
        fan_in: usize,
    },
    /// Submitting or waiting for a task failed (the scheduler, the network, the time).
    #[error("{stage} ({function}): {source}")]
    Task {
        /// Which task.
        stage: Stage,
        /// Its function.
        function: String,
        /// What went wrong.
        #[source]
        source: TaskError,
    },
    /// A task ended without a result: it failed, expired or was cancelled.
    #[error("{stage} ({function}) failed: {cause}")]
    Failed {
        /// Which task.
        stage: Stage,
        /// Its function.
        function: String,
        /// Why, as the scheduler reported it.
        cause: String,
    },
    /// A task's result does not fit the job (too few tensors, an undecodable tensor).
    #[error("{stage} ({function}) returned a bad result: {reason}")]
    BadResult {
        /// Which task.
        stage: Stage,
        /// Its function.
        function: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The reduce task's arguments: each partial's data and tensor count, in shard order;
/// the tensors follow one another in the task's tensor inputs.
#[derive(Serialize, Deserialize)]
struct ReduceArgs {
    parts: Vec<PartHeader>,
}

#[derive(Serialize, Deserialize)]
struct PartHeader {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    tensors: u32,
}

/// The partials a reduce task was given, in shard order (for reduce functions).
pub fn reduce_inputs(input: TaskInput) -> Result<Vec<Partial>, String> {
    let args: ReduceArgs = decode(&input.args).map_err(|e| format!("malformed reduce arguments: {e}"))?;
    let want: usize = args.parts.iter().map(|p| p.tensors as usize).sum();
    if want != input.tensors.len() {
        return Err(format!("reduce arguments name {want} tensors, the task has {}", input.tensors.len()));
    }
    let mut tensors = input.tensors.into_iter();
    Ok(args
        .parts
        .into_iter()
        .map(|p| Partial { data: p.data, tensors: tensors.by_ref().take(p.tensors as usize).collect() })
        .collect())
}

/// A task function from a synchronous combiner of partials (run on the executor's
/// thread; for cheap arithmetic such as sums).
pub fn reducer<F>(f: F) -> impl TaskFn
where
    F: Fn(Vec<Partial>) -> Result<Partial, String> + Send + Sync + 'static,
{
    move |_: TaskContext, input: TaskInput| -> TaskFuture {
        let r = reduce_inputs(input).and_then(&f).map(TaskOutput::from);
        Box::pin(async move { r })
    }
}

/// Sums the partials' tensors elementwise in the order given (the [`SUM`] reduce).
pub fn sum_partials(parts: Vec<Partial>) -> Result<Partial, String> {
    let mut parts = parts.into_iter();
    let mut acc = parts.next().ok_or("nothing to sum")?;
    for (i, p) in parts.enumerate() {
        if p.data != acc.data {
            return Err(format!("partial {} has data unlike partial 0's; sum keeps equal data only", i + 1));
        }
        if p.tensors.len() != acc.tensors.len() {
            return Err(format!("partial {} has {} tensors, partial 0 {}", i + 1, p.tensors.len(), acc.tensors.len()));
        }
        for (j, (a, t)) in acc.tensors.iter_mut().zip(&p.tensors).enumerate() {
            if a.shape() != t.shape() {
                return Err(format!("tensor {j} of partial {} is {}, of partial 0 {}", i + 1, t.shape(), a.shape()));
            }
            for (x, y) in a.data_mut().iter_mut().zip(t.data()) {
                *x += *y;
            }
        }
    }
    Ok(acc)
}

/// Registers the built-in reduce [`SUM`].
pub fn register_builtins(registry: &TaskRegistry) {
    registry.register(SUM, reducer(sum_partials));
}

/// Runs task function `map` on every shard and combines the results by a tree of tasks
/// of `reduce` (see the module documentation for the tree and the result's form).
///
/// The map tasks are all submitted before any result is awaited, so they run as the
/// cluster has room; a reduce task is submitted as soon as its inputs are in, and is
/// placed preferably where the largest of them was made. The first task that fails
/// fails the job with an error naming it; the job's other tasks are then cancelled.
pub async fn map_reduce(
    client: &TaskClient,
    shards: Vec<Shard>,
    map: &str,
    reduce: &str,
    options: &MapReduceOptions,
) -> Result<MapReduceOutput, MapReduceError> {
    if shards.is_empty() {
        return Err(MapReduceError::NoShards { map: map.to_string() });
    }
    if options.fan_in < 2 {
        return Err(MapReduceError::FanIn { fan_in: options.fan_in });
    }
    let job = Job {
        client,
        map,
        reduce,
        options,
        deadline: Instant::now() + options.timeout,
        submitted: RefCell::new(Vec::new()),
        maps: RefCell::new(vec![None; shards.len()]),
        reduces: RefCell::new(Vec::new()),
    };
    let n = shards.len();
    let result = job.run(shards).await;
    match result {
        Ok(root) => {
            let maps = job.maps.into_inner().into_iter().map(|m| m.expect("every map finished")).collect();
            Ok(MapReduceOutput { result: root.partial, maps, reduces: job.reduces.into_inner() })
        }
        Err(e) => {
            // Best effort: the job is lost, so free the cluster of its other tasks.
            let ids: Vec<TaskId> = job.submitted.borrow().clone();
            for id in ids {
                let _ = client.cancel(id).await;
            }
            tracing::debug!("map_reduce over {n} shards failed: {e}");
            Err(e)
        }
    }
}

/// A result on its way up the tree, with where it was made.
struct Part {
    partial: Partial,
    node: String,
    bytes: u64,
}

struct Job<'a> {
    client: &'a TaskClient,
    map: &'a str,
    reduce: &'a str,
    options: &'a MapReduceOptions,
    deadline: Instant,
    submitted: RefCell<Vec<TaskId>>,
    maps: RefCell<Vec<Option<MapRun>>>,
    reduces: RefCell<Vec<ReduceRun>>,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, MapReduceError>> + 'a>>;

impl<'a> Job<'a> {
    fn function(&self, stage: &Stage) -> String {
        match stage {
            Stage::Map { .. } => self.map.to_string(),
            Stage::Reduce { .. } => self.reduce.to_string(),
        }
    }

    fn request(&self, name: &str, args: Vec<u8>, tensors: &[HostTensor<f32>], demand: &Demand) -> TaskRequest {
        let mut r = TaskRequest::function(name, args, tensors).priority(self.options.priority).demand(demand.clone());
        if let Some(n) = self.options.retries {
            r = r.retries(n);
        }
        r
    }

    async fn submit(&self, stage: &Stage, request: TaskRequest) -> Result<TaskId, MapReduceError> {
        let id = self.client.submit(request).await.map_err(|source| MapReduceError::Task {
            stage: stage.clone(),
            function: self.function(stage),
            source,
        })?;
        self.submitted.borrow_mut().push(id);
        Ok(id)
    }

    async fn finish(&self, stage: &Stage, id: TaskId) -> Result<TaskResult, MapReduceError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let outcome = self.client.wait(id, left).await.map_err(|source| MapReduceError::Task {
            stage: stage.clone(),
            function: self.function(stage),
            source,
        })?;
        let failed =
            |cause: String| MapReduceError::Failed { stage: stage.clone(), function: self.function(stage), cause };
        match outcome {
            TaskOutcome::Finished(r) => Ok(r),
            TaskOutcome::Failed(cause) => Err(failed(cause)),
            TaskOutcome::Expired => Err(failed("its deadline passed".into())),
            TaskOutcome::Cancelled => Err(failed("it was cancelled".into())),
        }
    }

    fn bad(&self, stage: &Stage, reason: String) -> MapReduceError {
        MapReduceError::BadResult { stage: stage.clone(), function: self.function(stage), reason }
    }

    fn tensors(&self, stage: &Stage, wire: &[WireTensor]) -> Result<Vec<HostTensor<f32>>, MapReduceError> {
        wire.iter()
            .enumerate()
            .map(|(i, t)| t.to_host().map_err(|e| self.bad(stage, format!("tensor {i}: {e}"))))
            .collect()
    }

    async fn run(&self, shards: Vec<Shard>) -> Result<Part, MapReduceError> {
        let mut ids = Vec::with_capacity(shards.len());
        for (i, s) in shards.into_iter().enumerate() {
            let stage = Stage::Map { shard: i };
            let mut request = self.request(self.map, s.args, &s.tensors, &self.options.map_demand);
            for (node, bytes) in &s.near {
                request = request.near(node, *bytes);
            }
            ids.push(self.submit(&stage, request).await?);
        }
        self.combine(&ids, 0..ids.len()).await
    }

    /// The result of shards `range`: a map's, or a reduce task's over the children's.
    fn combine<'b>(&'b self, ids: &'b [TaskId], range: Range<usize>) -> Boxed<'b, Part> {
        Box::pin(async move {
            if range.len() == 1 {
                return self.map_result(range.start, ids[range.start]).await;
            }
            let children: Vec<Boxed<'b, Part>> =
                split(range.clone(), self.options.fan_in).into_iter().map(|r| self.combine(ids, r)).collect();
            let parts = TryJoinAll::new(children).await?;
            let stage = Stage::Reduce { shards: range.clone() };
            let mut headers = Vec::with_capacity(parts.len());
            let mut tensors = Vec::new();
            for p in &parts {
                headers.push(PartHeader { data: p.partial.data.clone(), tensors: p.partial.tensors.len() as u32 });
                tensors.extend(p.partial.tensors.iter().cloned());
            }
            let args = encode(&ReduceArgs { parts: headers });
            let mut request = self.request(self.reduce, args, &tensors, &self.options.reduce_demand);
            for p in &parts {
                request = request.near(&p.node, p.bytes);
            }
            drop(tensors);
            let id = self.submit(&stage, request).await?;
            let r = self.finish(&stage, id).await?;
            let tensors = self.tensors(&stage, &r.tensors)?;
            self.reduces.borrow_mut().push(ReduceRun { shards: range, node: r.node.clone() });
            Ok(Part { bytes: result_bytes(&r), node: r.node, partial: Partial { data: r.data, tensors } })
        })
    }

    async fn map_result(&self, shard: usize, id: TaskId) -> Result<Part, MapReduceError> {
        let stage = Stage::Map { shard };
        let r = self.finish(&stage, id).await?;
        let side = self.options.side_tensors;
        if r.tensors.len() < side {
            let reason = format!("{} tensors, fewer than the {side} side outputs asked for", r.tensors.len());
            return Err(self.bad(&stage, reason));
        }
        let mut tensors = self.tensors(&stage, &r.tensors)?;
        let rest = tensors.split_off(side);
        self.maps.borrow_mut()[shard] = Some(MapRun { node: r.node.clone(), attempt: r.attempt, side: tensors });
        let bytes = r.data.len() as u64 + rest.iter().map(|t| t.data().len() as u64 * 4).sum::<u64>();
        Ok(Part { partial: Partial { data: r.data, tensors: rest }, node: r.node, bytes })
    }
}

fn result_bytes(r: &TaskResult) -> u64 {
    r.data.len() as u64 + r.tensors.iter().map(|t| t.data.len() as u64).sum::<u64>()
}

/// `range` in at most `k` contiguous ranges whose lengths differ by one at most, the
/// longer first.
fn split(range: Range<usize>, k: usize) -> Vec<Range<usize>> {
    let n = range.len();
    let parts = k.min(n);
    let (base, extra) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = range.start;
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Polls every future until all succeed (results in order) or one fails (its error;
/// the rest are dropped).
struct TryJoinAll<'a, T> {
    futures: Vec<Option<Boxed<'a, T>>>,
    results: Vec<Option<T>>,
}

impl<'a, T> TryJoinAll<'a, T> {
    fn new(futures: Vec<Boxed<'a, T>>) -> Self {
        let results = futures.iter().map(|_| None).collect();
        Self { futures: futures.into_iter().map(Some).collect(), results }
    }
}

// Results are never pinned (only the boxed futures are), so moving the struct is fine.
impl<T> Unpin for TryJoinAll<'_, T> {}

impl<T> Future for TryJoinAll<'_, T> {
    type Output = Result<Vec<T>, MapReduceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        for (slot, result) in this.futures.iter_mut().zip(this.results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(Ok(v)) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
        }
        if this.futures.iter().all(Option::is_none) {
            Poll::Ready(Ok(this.results.iter_mut().map(|r| r.take().expect("every future finished")).collect()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_splits_ranges_by_index_alone() {
        assert_eq!(split(0..5, 2), vec![0..3, 3..5]);
        assert_eq!(split(0..3, 2), vec![0..2, 2..3]);
        assert_eq!(split(4..9, 3), vec![4..6, 6..8, 8..9]);
        assert_eq!(split(0..2, 4), vec![0..1, 1..2]);
    }

    #[test]
    fn reduce_inputs_round_trip_and_sums_check_their_operands() {
        let t = |v: Vec<f32>| HostTensor::new(vec![v.len()], v).unwrap();
        let parts = [
            Partial { data: b"x".to_vec(), tensors: vec![t(vec![1.0, 2.0])] },
            Partial { data: b"x".to_vec(), tensors: vec![t(vec![10.0, 20.0])] },
        ];
        let args = encode(&ReduceArgs {
            parts: parts.iter().map(|p| PartHeader { data: p.data.clone(), tensors: 1 }).collect(),
        });
        let tensors = parts.iter().flat_map(|p| p.tensors.clone()).collect();
        let back = reduce_inputs(TaskInput { args: args.clone(), tensors }).unwrap();
        assert_eq!(back, parts);
        assert_eq!(sum_partials(back).unwrap().tensors[0].data(), &[11.0, 22.0]);
        let e = reduce_inputs(TaskInput { args, tensors: vec![] }).unwrap_err();
        assert_eq!(e, "reduce arguments name 2 tensors, the task has 0");
        let e = sum_partials(vec![parts[0].clone(), Partial { data: b"x".to_vec(), tensors: vec![t(vec![1.0])] }]);
        assert_eq!(e.unwrap_err(), "tensor 0 of partial 1 is [1], of partial 0 [2]");
    }
}
