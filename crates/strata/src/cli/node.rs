//! `strata node`: a node process with its GPU actor, printing membership changes until
//! it is told to stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use strata_gpu::{GpuHandle, GpuOptions};
use strata_net::{MembershipEvent, Node, NodeConfig, NodeExtras, NodeHandle};
use strata_wire::AdapterSummary;

/// Node settings from flags, layered over a TOML file and torchrun's variables.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NodeArgs {
    /// TOML file with node settings (keys as in `NodeConfig`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node name (default with RANK set: rank-N).
    #[arg(long)]
    pub name: Option<String>,
    /// UDP address to listen on.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address peers should dial, if not the listen address.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Peer addresses to dial, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// A member to join through.
    #[arg(long)]
    pub seed: Option<String>,
    /// Directory with ca.pem and <name>.pem/.key (see `strata cert`).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// Cluster name.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Run without authentication (development only; warns loudly).
    #[arg(long)]
    pub insecure_dev: bool,
    /// Heartbeat interval in ms.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a member is declared failed, in ms.
    #[arg(long)]
    pub failure_timeout_ms: Option<u64>,
}

impl NodeArgs {
    /// The node configuration: defaults, then `--config`, then torchrun's variables,
    /// then flags.
    pub fn config(&self) -> Result<NodeConfig> {
        let mut c = match &self.config {
            Some(p) => NodeConfig::from_toml_file(p)?,
            None => NodeConfig::default(),
        };
        c.apply_torchrun_env(|k| std::env::var(k).ok())?;
        if let Some(v) = &self.name {
            c.name = v.clone();
        }
        if let Some(v) = &self.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &self.advertise {
            c.advertise = Some(v.clone());
        }
        if !self.peers.is_empty() {
            c.peers = self.peers.clone();
        }
        if let Some(v) = &self.seed {
            c.seed = Some(v.clone());
        }
        if let Some(v) = &self.cert_dir {
            c.cert_dir = Some(v.clone());
        }
        if let Some(v) = &self.cluster {
            c.cluster = v.clone();
        }
        if self.insecure_dev {
            c.insecure_dev = true;
        }
        if let Some(v) = self.heartbeat_ms {
            c.heartbeat_ms = v;
        }
        if let Some(v) = self.failure_timeout_ms {
            c.failure_timeout_ms = v;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Starts the GPU actor (when an adapter opens) and the node.
pub async fn start(config: NodeConfig, gpu_options: Option<GpuOptions>) -> Result<(NodeHandle, Option<GpuHandle>)> {
    let gpu = match gpu_options {
        Some(o) => match GpuHandle::start(&o) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!("no GPU on this node: {e}");
                None
            }
        },
        None => None,
    };
    let mut extras = NodeExtras::default();
    if let Some(g) = &gpu {
        let i = g.info();
        extras.adapter = Some(AdapterSummary {
            name: i.name.clone(),
            backend: i.backend.clone(),
            device_type: i.device_type.clone(),
        });
        let (free, used) = (Arc::new(AtomicU64::new(i.max_buffer_bytes)), Arc::new(AtomicU64::new(0)));
        let (f, u) = (free.clone(), used.clone());
        extras.resources = Some(Arc::new(move || (f.load(Ordering::Relaxed), u.load(Ordering::Relaxed))));
        let (g, cap) = (g.clone(), i.max_buffer_bytes);
        actix::spawn(async move {
            loop {
                if let Ok(s) = g.stats().await {
                    used.store(s.pool.in_use_bytes, Ordering::Relaxed);
                    free.store(cap.saturating_sub(s.pool.in_use_bytes), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let node = Node::start_with(config, extras).await.context("starting the node")?;
    Ok((node, gpu))
}

/// Runs `strata node` until SIGINT or SIGTERM, then leaves the cluster. Every node runs
/// the task executor with the built-in task functions; `scheduler` makes this node the
/// cluster's scheduler.
pub async fn run_node(
    config: NodeConfig,
    gpu_options: Option<GpuOptions>,
    exec: strata_cluster::tasks::ExecOptions,
    scheduler: Option<strata_cluster::tasks::SchedulerOptions>,
) -> Result<()> {
    let (node, gpu) = start(config, gpu_options).await?;
    use strata_cluster::tasks::{ExecService, SchedulerService, TaskRegistry};
    ExecService::register(&node, gpu.clone(), TaskRegistry::with_builtins(), exec);
    // Members and operators reach this node's GPU as a remote GPU actor.
    if let Some(g) = &gpu {
        strata_cluster::remote_gpu::GpuService::register(&node, g.clone(), Default::default())
            .await
            .map_err(|e| anyhow::anyhow!("serving the GPU: {e}"))?;
    }
    let _scheduler = match scheduler {
        Some(o) => {
            let dir = o.journal_dir.display().to_string();
            let s =
                SchedulerService::start(&node, o).await.map_err(|e| anyhow::anyhow!("starting the scheduler: {e}"))?;
            println!("scheduler on {} (journal in {dir})", node.name());
            Some(s)
        }
        None => None,
    };
    let adapter = gpu.as_ref().map_or("no GPU".to_string(), |g| format!("{} ({})", g.info().name, g.info().backend));
    println!("node {} listening on {} with {adapter}", node.name(), node.info().addr);
    let mut events = node.subscribe().await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(MembershipEvent::Joined(i)) => println!("member {} joined ({})", i.name, i.addr),
                Some(MembershipEvent::Failed { name, silent_ms }) => println!("member {name} failed (silent for {silent_ms} ms)"),
                Some(MembershipEvent::Left(name)) => println!("member {name} left"),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    println!("node {} leaving", node.name());
    node.shutdown().await;
    if let Some(g) = gpu {
        g.shutdown().await;
    }
    Ok(())
}
