//! Task functions and the executor service every node runs.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use strata_gpu::{GpuHandle, Op, TensorId};
use strata_net::{NodeHandle, Service, ServiceFuture, ServiceRequest, ServiceResponse};
use strata_sched::NodeResources;
use strata_tensor::HostTensor;

use super::{EXEC_SERVICE, TaskBody, TaskId, WireTensor, decode, encode};

/// Where and as what a task function runs.
#[derive(Clone)]
pub struct TaskContext {
    /// The node running it.
    pub node: String,
    /// The node's GPU actor, if it has one.
    pub gpu: Option<GpuHandle>,
    /// The task.
    pub task: TaskId,
    /// The attempt (from 1).
    pub attempt: u32,
}

/// A task function's input.
#[derive(Clone, Debug, Default)]
pub struct TaskInput {
    /// Arguments, encoded by the application.
    pub args: Vec<u8>,
    /// Tensor inputs.
    pub tensors: Vec<HostTensor<f32>>,
}

/// A task function's result.
#[derive(Clone, Debug, Default)]
pub struct TaskOutput {
    /// Data, encoded by the application.
    pub data: Vec<u8>,
    /// Tensors.
    pub tensors: Vec<HostTensor<f32>>,
}

/// What a task function returns: its output or an error message for the submitter.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<TaskOutput, String>>>>;

/// A task function, registered by name on every node.
pub trait TaskFn: Send + Sync + 'static {
    /// Runs one attempt.
    fn run(&self, ctx: TaskContext, input: TaskInput) -> TaskFuture;
}

impl<F> TaskFn for F
where
    F: Fn(TaskContext, TaskInput) -> TaskFuture + Send + Sync + 'static,
{
    fn run(&self, ctx: TaskContext, input: TaskInput) -> TaskFuture {
        self(ctx, input)
    }
}

/// Task functions by name. Register the same names on every node at start-up.
#[derive(Clone, Default)]
pub struct TaskRegistry {
    fns: Arc<RwLock<HashMap<String, Arc<dyn TaskFn>>>>,
}

impl TaskRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `f` under `name`, replacing an earlier one.
    pub fn register(&self, name: &str, f: impl TaskFn) -> &Self {
        self.fns.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), Arc::new(f));
        self
    }

    /// A registry with the built-in functions every `strata node` offers: `noop` (returns
    /// nothing), `echo` (returns its arguments and tensors), `sleep` (arguments: a number
    /// of milliseconds as text) and `fail` (fails with its arguments as the message).
    pub fn with_builtins() -> Self {
        let r = Self::new();
        r.register("noop", |_: TaskContext, _: TaskInput| -> TaskFuture {
            Box::pin(async { Ok(TaskOutput::default()) })
        });
        r.register("echo", |_: TaskContext, input: TaskInput| -> TaskFuture {
            Box::pin(async move { Ok(TaskOutput { data: input.args, tensors: input.tensors }) })
        });
        r.register("sleep", |_: TaskContext, input: TaskInput| -> TaskFuture {
            Box::pin(async move {
                let text = String::from_utf8_lossy(&input.args).to_string();
                let ms: u64 = text.trim().parse().map_err(|e| format!("sleep: {text:?} is not milliseconds: {e}"))?;
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                Ok(TaskOutput::default())
            })
        });
        r.register("fail", |_: TaskContext, input: TaskInput| -> TaskFuture {
            Box::pin(async move { Err(String::from_utf8_lossy(&input.args).to_string()) })
        });
        r
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.fns.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    fn get(&self, name: &str) -> Option<Arc<dyn TaskFn>> {
        self.fns.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }
}

/// The scheduler's request to run one attempt.
#[derive(Serialize, Deserialize)]
pub(crate) struct RunRequest {
    pub(crate) task: TaskId,
    pub(crate) attempt: u32,
    pub(crate) body: TaskBody,
}

/// An attempt's end, as the executor reports it.
#[derive(Serialize, Deserialize)]
pub(crate) enum RunReply {
    Finished {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        tensors: Vec<WireTensor>,
    },
    /// The task itself failed; `retryable` is false for mistakes another attempt would
    /// repeat (an unknown function, bad inputs).
    Failed { message: String, retryable: bool },
}

/// Packs encoded bytes as f32 payload (8-byte length, then the bytes, zero-padded), so
/// messages of any size travel as tensor data rather than in the capped header.
pub(crate) fn pack(bytes: &[u8]) -> Vec<f32> {
    let mut v = Vec::with_capacity(8 + bytes.len() + 3);
    v.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    v.extend_from_slice(bytes);
    v.resize(v.len().next_multiple_of(4), 0);
    v.chunks_exact(4).map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
}

/// The bytes [`pack`] packed.
pub(crate) fn unpack(payload: &[f32]) -> Result<Vec<u8>, String> {
    let bytes: Vec<u8> = payload.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).ok_or("payload too short")?;
    let len = usize::try_from(len).map_err(|_| "payload length overflows")?;
    bytes.get(8..8usize.saturating_add(len)).map(<[u8]>::to_vec).ok_or_else(|| "payload shorter than its length".into())
}

/// Catches a panic while polling the inner future, turning it into an error.
struct CatchUnwind(TaskFuture);

impl Future for CatchUnwind {
    type Output = Result<TaskOutput, String>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(panic) => Poll::Ready(Err(format!("the task panicked: {}", panic_message(&panic)))),
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What this node offers the scheduler.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Tasks that may run at once for their GPU slots.
    pub gpu_slots: u32,
    /// Tasks that may run at once for their CPU slots.
    pub cpu_slots: u32,
    /// GPU memory offered, bytes (default: the device's largest buffer).
    pub gpu_mem_bytes: Option<u64>,
    /// Labels such as `backend=vulkan`.
    pub labels: Vec<(String, String)>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self { gpu_slots: 1, cpu_slots: cpus, gpu_mem_bytes: None, labels: Vec::new() }
    }
}

/// The executor service: reports the node's resources and runs attempts.
pub struct ExecService {
    node: String,
    gpu: Option<GpuHandle>,
    registry: TaskRegistry,
    resources: NodeResources,
}

impl ExecService {
    /// Registers the executor on `node` with its GPU actor (if any) and task functions.
    pub fn register(node: &NodeHandle, gpu: Option<GpuHandle>, registry: TaskRegistry, options: ExecOptions) {
        let mut resources = match &gpu {
            Some(g) => {
                let info = g.info();
                let mem = options.gpu_mem_bytes.unwrap_or(info.max_buffer_bytes);
                NodeResources::new(mem, options.gpu_slots, options.cpu_slots)
                    .label("backend", info.backend.to_lowercase())
                    .label("device", info.device_type.to_lowercase())
            }
            None => NodeResources::new(0, 0, options.cpu_slots),
        };
        for (k, v) in &options.labels {
            resources = resources.label(k.clone(), v.clone());
        }
        let svc = Self { node: node.name().to_string(), gpu, registry, resources };
        node.register_service(EXEC_SERVICE, Arc::new(svc));
    }

    fn run(&self, req: RunRequest) -> Pin<Box<dyn Future<Output = RunReply>>> {
        let ctx = TaskContext { node: self.node.clone(), gpu: self.gpu.clone(), task: req.task, attempt: req.attempt };
        match req.body {
            TaskBody::Function { name, args, tensors } => {
                let Some(f) = self.registry.get(&name) else {
                    let known = self.registry.names().join(", ");
                    let message = format!("no task function named {name:?} on {} (registered: {known})", self.node);
                    return Box::pin(async move { RunReply::Failed { message, retryable: false } });
                };
                let tensors = match tensors.iter().map(WireTensor::to_host).collect::<Result<Vec<_>, _>>() {
                    Ok(t) => t,
                    Err(e) => {
                        let message = format!("task {name:?}: bad input tensor: {e}");
                        return Box::pin(async move { RunReply::Failed { message, retryable: false } });
                    }
                };
                let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| f.run(ctx, TaskInput { args, tensors }))) {
                    Ok(fut) => CatchUnwind(fut),
                    Err(p) => {
                        let message = format!("the task panicked: {}", panic_message(&p));
                        return Box::pin(async move { RunReply::Failed { message, retryable: true } });
                    }
                };
                Box::pin(async move {
                    match fut.await {
                        Ok(out) => RunReply::Finished {
                            data: out.data,
                            tensors: out.tensors.iter().map(WireTensor::from_host).collect(),
                        },
                        Err(message) => RunReply::Failed { message, retryable: true },
                    }
                })
            }
            TaskBody::Program { inputs, ops, outputs } => {
                let Some(gpu) = ctx.gpu else {
                    let message = format!("node {} has no GPU for a program task", self.node);
                    return Box::pin(async move { RunReply::Failed { message, retryable: false } });
                };
                Box::pin(async move {
                    match run_program(&gpu, inputs, ops, outputs).await {
                        Ok(tensors) => RunReply::Finished { data: Vec::new(), tensors },
                        Err(message) => RunReply::Failed { message, retryable: false },
                    }
                })
            }
        }
    }
}

/// Runs a program task on the GPU actor under fresh handles, atomically (one actor
/// message), and frees everything it made.
async fn run_program(
    gpu: &GpuHandle,
    inputs: Vec<(TensorId, WireTensor)>,
    mut ops: Vec<Op>,
    outputs: Vec<TensorId>,
) -> Result<Vec<WireTensor>, String> {
    let mut named: BTreeSet<TensorId> = inputs.iter().map(|(id, _)| *id).collect();
    named.extend(outputs.iter().copied());
    for op in &mut ops {
        named.extend(op.tensor_ids_mut().into_iter().map(|id| *id));
    }
    let map: HashMap<TensorId, TensorId> = named.into_iter().map(|id| (id, gpu.new_id())).collect();
    for op in &mut ops {
        for id in op.tensor_ids_mut() {
            *id = map[id];
        }
    }
    let mut hosts = Vec::with_capacity(inputs.len());
    for (id, t) in &inputs {
        hosts.push((map[id], t.to_host().map_err(|e| format!("input {id}: {e}"))?));
    }
    let outs: Vec<TensorId> = outputs.iter().map(|id| map[id]).collect();
    let all: Vec<TensorId> = map.values().copied().collect();
    let r = gpu
        .with(move |ex| {
            let result = (|| {
                for (id, t) in &hosts {
                    ex.upload(*id, t)?;
                }
                ex.run(&ops)?;
                outs.iter().map(|id| ex.download::<f32>(*id)).collect::<Result<Vec<_>, _>>()
            })();
            for id in all {
                ex.remove(id);
            }
            result
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(r.iter().map(WireTensor::from_host).collect())
}

impl Service for ExecService {
    fn call(&self, request: ServiceRequest) -> ServiceFuture {
        match request.method.as_str() {
            "resources" => {
                let data = encode(&self.resources);
                Box::pin(async move { Ok(ServiceResponse { data, payload: Vec::new() }) })
            }
            "run" => {
                if request.caller.role != strata_net::tls::Role::Node {
                    return Box::pin(async { Err("only the scheduler's node places attempts".to_string()) });
                }
                let req: RunRequest = match unpack(&request.payload).and_then(|b| decode(&b)) {
                    Ok(r) => r,
                    Err(e) => return Box::pin(async move { Err(format!("malformed run request: {e}")) }),
                };
                let fut = self.run(req);
                Box::pin(async move {
                    let reply = fut.await;
                    Ok(ServiceResponse { data: Vec::new(), payload: pack(&encode(&reply)) })
                })
            }
            other => {
                let m = format!("the executor has no method {other:?}");
                Box::pin(async move { Err(m) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_payloads_round_trip() {
        for n in [0usize, 1, 3, 4, 5, 1000] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            assert_eq!(unpack(&pack(&bytes)).unwrap(), bytes);
        }
        assert!(unpack(&[]).is_err());
        let mut short = pack(&[1, 2, 3, 4, 5, 6, 7, 8]);
        short.pop();
        assert_eq!(unpack(&short).unwrap_err(), "payload shorter than its length");
    }
}
