//! An in-process cluster on loopback to run jobs on: examples, benchmarks, tests.
//!
//! Nodes `node-0..` with fresh certificates, an executor on each (with its GPU actor,
//! if given, its own task registry, and a label with its name), the scheduler on
//! `node-0`, and a client there.
//! Every node is a full node: the tasks reach the executors over QUIC with mutual TLS,
//! exactly as between machines.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_gpu::GpuHandle;
use strata_net::{Node, NodeConfig, NodeHandle, tls};

use crate::tasks::{
    Demand, ExecOptions, ExecService, SchedulerOptions, SchedulerService, TaskClient, TaskContext, TaskError,
    TaskFuture, TaskInput, TaskOutcome, TaskOutput, TaskRegistry, TaskRequest,
};

/// The label naming each node's executor (`node=node-1`), for tasks that must run on one.
pub const NODE_LABEL: &str = "node";
/// The task [`LocalCluster::start`] runs on every node before returning.
const PROBE: &str = "local.probe";

/// Errors starting a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Certificates or a node failed.
    #[error("local cluster: {0}")]
    Net(#[from] strata_net::NetError),
    /// The scheduler failed to start.
    #[error("local cluster: scheduler: {0}")]
    Scheduler(String),
    /// A node's executor did not run a probe task.
    #[error("local cluster: {node} is not ready: {reason}")]
    NotReady {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// No nodes were asked for.
    #[error("local cluster: needs at least one node")]
    Empty,
}

/// A running in-process cluster.
pub struct LocalCluster {
    /// The nodes, `node-i` at index i.
    pub nodes: Vec<NodeHandle>,
    /// Each node's GPU actor, if it has one.
    pub gpus: Vec<Option<GpuHandle>>,
    /// A client on `node-0`, where the scheduler runs.
    pub client: TaskClient,
    scheduler: Arc<SchedulerService>,
}

impl LocalCluster {
    /// Starts one node per entry of `gpus` inside the running actix system, keeping
    /// certificates and the scheduler's journal under `dir`; node i's executor gets
    /// `gpus[i]`, `registry(i)` and the label [`NODE_LABEL`]`=node-i`. Returns once every
    /// node sees all the others and the scheduler has run a task on each.
    ///
    /// Open the GPU actors before calling this: opening a device blocks the thread the
    /// nodes' heartbeats run on. On an error, the GPU actors given are shut down too.
    pub async fn start(
        dir: &Path,
        gpus: Vec<Option<GpuHandle>>,
        registry: impl Fn(usize) -> TaskRegistry,
        exec: ExecOptions,
    ) -> Result<Self, LocalError> {
        if gpus.is_empty() {
            return Err(LocalError::Empty);
        }
        let mut nodes = Vec::new();
        if let Err(e) = Self::start_nodes(dir, gpus.len(), &mut nodes).await {
            for g in gpus.iter().flatten() {
                g.shutdown().await;
            }
            for n in &nodes {
                n.shutdown().await;
            }
            return Err(e);
        }
        let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
        for (i, node) in nodes.iter().enumerate() {
            let r = registry(i);
            r.register(PROBE, |_: TaskContext, _: TaskInput| -> TaskFuture {
                Box::pin(async { Ok(TaskOutput::default()) })
            });
            let mut exec = exec.clone();
            exec.labels.push((NODE_LABEL.into(), names[i].clone()));
            ExecService::register(node, gpus[i].clone(), r, exec);
        }
        let scheduler = match SchedulerService::start(&nodes[0], SchedulerOptions::new(dir.join("journal"))).await {
            Ok(s) => s,
            Err(e) => {
                for g in gpus.iter().flatten() {
                    g.shutdown().await;
                }
                for n in &nodes {
                    n.shutdown().await;
                }
                return Err(LocalError::Scheduler(e));
            }
        };
        let client = TaskClient::member(nodes[0].clone(), &names[0]);
        let cluster = Self { nodes, gpus, client, scheduler };
        if let Err(e) = cluster.ready(&names).await {
            cluster.shutdown().await;
            return Err(e);
        }
        Ok(cluster)
    }

    /// Certificates and `n` nodes that all see each other, pushed onto `nodes` as they
    /// start (so the caller can stop them after an error).
    async fn start_nodes(dir: &Path, n: usize, nodes: &mut Vec<NodeHandle>) -> Result<(), LocalError> {
        let certs = dir.join("certs");
        tls::create_ca(&certs, "local")?;
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        for name in &names {
            tls::issue_node(&certs, name, &["127.0.0.1".into()])?;
        }
        let config = |name: &str, seed: Option<String>| NodeConfig {
            name: name.into(),
            listen: "127.0.0.1:0".into(),
            cert_dir: Some(certs.clone()),
            seed,
            ..Default::default()
        };
        nodes.push(Node::start(config(&names[0], None)).await?);
        let seed = nodes[0].local_addr().to_string();
        for name in &names[1..] {
            nodes.push(Node::start(config(name, Some(seed.clone()))).await?);
        }
        for node in nodes.iter() {
            node.wait_for_members(n, Duration::from_secs(20)).await?;
        }
        Ok(())
    }

    /// Waits until the scheduler places a task on every node: it learns of a node's
    /// executor when it sees the node join, and refuses a task no known node can take.
    async fn ready(&self, names: &[String]) -> Result<(), LocalError> {
        for name in names {
            let probe =
                || TaskRequest::function(PROBE, Vec::new(), &[]).demand(Demand::default().label(NODE_LABEL, name));
            let mut tries = 0;
            let id = loop {
                match self.client.submit(probe()).await {
                    Ok(id) => break id,
                    Err(TaskError::Refused { .. }) if tries < 200 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(LocalError::NotReady { node: name.clone(), reason: e.to_string() }),
                }
            };
            match self.client.wait(id, Duration::from_secs(20)).await {
                Ok(TaskOutcome::Finished(_)) => {}
                Ok(other) => return Err(LocalError::NotReady { node: name.clone(), reason: format!("{other:?}") }),
                Err(e) => return Err(LocalError::NotReady { node: name.clone(), reason: e.to_string() }),
            }
        }
        Ok(())
    }

    /// Stops the scheduler, releases the GPU devices and shuts the nodes down.
    pub async fn shutdown(self) {
        self.scheduler.stop().await;
        for g in self.gpus.iter().flatten() {
            g.shutdown().await;
        }
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}
