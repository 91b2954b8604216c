//! `strata bench sched`: the task queue's speed, each figure against a reference
//! measured in the same run.
//!
//! - placements per second of the sans-IO scheduler (10,000 queued tasks, 100 simulated
//!   nodes of mixed sizes), against ordering the same keys in a binary heap (the cost of
//!   priority order alone);
//! - one empty task's round trip (submitted by an operator, placed on another node
//!   process, result returned), against a plain request on the same connection;
//! - empty tasks with 64 in flight, against the same number of plain requests.

use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use strata_cluster::tasks::{Demand, TaskClient, TaskOutcome, TaskRequest};
use strata_net::OperatorClient;

use super::Figure;

/// What to run.
#[derive(Clone, Debug)]
pub struct SchedBench {
    /// Placements timed by the "placements" case.
    pub placements: u64,
    /// Round trips timed one at a time.
    pub round_trips: usize,
    /// Tasks timed with 64 in flight.
    pub pipelined: usize,
}

impl Default for SchedBench {
    fn default() -> Self {
        Self { placements: 1_000_000, round_trips: 300, pipelined: 5_000 }
    }
}

fn figure(case: &str, unit: &'static str, value: f64, seconds: f64, reference: &str, rv: f64, target: f64) -> Figure {
    Figure {
        case: case.to_string(),
        unit,
        value,
        seconds,
        reference: reference.to_string(),
        reference_value: rv,
        ratio: value / rv,
        target: Some(target),
    }
}

/// Placements per second, against a binary heap ordering the same number of keys.
pub fn placements(n: u64) -> Figure {
    let r = strata_sched::bench::bench_placements(10_000, 100, n);
    // The reference: push and pop (priority, sequence) keys through a heap holding
    // 10,000, as many times as there were placements.
    let start = Instant::now();
    let mut heap: BinaryHeap<(i32, std::cmp::Reverse<u64>)> =
        (0..10_000u64).map(|i| ((i % 7) as i32, std::cmp::Reverse(i))).collect();
    for i in 0..n {
        let top = heap.pop().expect("the heap holds 10,000 keys");
        heap.push((top.0, std::cmp::Reverse(top.1.0 + 10_000 + i)));
    }
    std::hint::black_box(&heap);
    let heap_rate = n as f64 / start.elapsed().as_secs_f64();
    let rate = r.per_second();
    figure(
        "placements (10,000 queued, 100 nodes)",
        "placements/s",
        rate,
        1.0 / rate,
        "binary heap pop+push of the same keys, same run",
        heap_rate,
        100_000.0,
    )
}

/// Kills the node processes when the benchmark ends, however it ends.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a scheduler node and a worker node as processes of this binary; returns them
/// and the scheduler's address.
fn start_nodes(exe: &Path, certs: &Path) -> Result<(Nodes, String)> {
    strata_net::tls::create_ca(certs, "bench")?;
    for n in ["sched", "worker"] {
        strata_net::tls::issue_node(certs, n, &["127.0.0.1".into()])?;
    }
    strata_net::tls::issue_operator(certs, "admin")?;
    let sched = format!("127.0.0.1:{}", free_port()?);
    let worker = format!("127.0.0.1:{}", free_port()?);
    let journal = certs.join("journal");
    let common = |name: &str, listen: &str| {
        let mut c = Command::new(exe);
        c.args(["node", "--name", name, "--listen", listen, "--cert-dir"]).arg(certs).arg("--no-gpu");
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let mut nodes = Nodes(Vec::new());
    nodes.0.push(common("sched", &sched).arg("--scheduler").arg("--journal").arg(&journal).spawn()?);
    nodes.0.push(common("worker", &worker).args(["--seed", &sched, "--label", "role=worker"]).spawn()?);
    Ok((nodes, sched))
}

async fn connect(addr: &str, certs: &Path) -> Result<Arc<OperatorClient>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match OperatorClient::connect(addr, Some(certs), "admin", "strata", Duration::from_secs(5)).await {
            Ok(c) => return Ok(Arc::new(c)),
            Err(e) if Instant::now() >= deadline => return Err(e).context("connecting to the scheduler"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn empty_task() -> TaskRequest {
    TaskRequest::function("noop", Vec::new(), &[]).demand(Demand::default().label("role", "worker"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The round-trip and pipelined cases over two node processes on loopback.
pub async fn over_processes(opts: &SchedBench, on: &mut dyn FnMut(&Figure)) -> Result<()> {
    let exe: PathBuf = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let (_nodes, addr) = start_nodes(&exe, dir.path())?;
    let op = connect(&addr, dir.path()).await?;
    let client = TaskClient::operator(op.clone());
    // Warm up until the worker has joined and runs tasks.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.run(empty_task().deadline_ms(2_000), Duration::from_secs(5)).await {
            Ok(TaskOutcome::Finished(_)) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("the worker never ran a task: {other:?}"),
        }
    }
    for _ in 0..20 {
        client.run(empty_task(), Duration::from_secs(10)).await?;
    }

    // One at a time.
    let mut rt = Vec::with_capacity(opts.round_trips);
    let mut plain = Vec::with_capacity(opts.round_trips);
    for _ in 0..opts.round_trips {
        let t = Instant::now();
        match client.run(empty_task(), Duration::from_secs(10)).await? {
            TaskOutcome::Finished(r) if r.node == "worker" => {}
            other => anyhow::bail!("unexpected outcome {other:?}"),
        }
        rt.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        op.members().await?;
        plain.push(t.elapsed().as_secs_f64());
    }
    let (task_s, plain_s) = (median(rt), median(plain));
    on(&figure(
        "empty task round trip (2 node processes, mTLS)",
        "ms",
        task_s * 1e3,
        task_s,
        "plain request on the same connection, same run",
        plain_s * 1e3,
        1.0,
    ));

    // Many in flight.
    let pipelined = |n: usize, task: bool| {
        let (client, op) = (client.clone(), op.clone());
        async move {
            let t = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                while set.len() >= 64 {
                    set.join_next().await.expect("in flight")??;
                }
                let (client, op) = (client.clone(), op.clone());
                set.spawn_local(async move {
                    if task {
                        client.run(empty_task(), Duration::from_secs(60)).await.map(|_| ()).map_err(anyhow::Error::from)
                    } else {
                        op.members().await.map(|_| ()).map_err(anyhow::Error::from)
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            Ok::<f64, anyhow::Error>(n as f64 / t.elapsed().as_secs_f64())
        }
    };
    let tasks_rate = pipelined(opts.pipelined, true).await?;
    let plain_rate = pipelined(opts.pipelined, false).await?;
    on(&figure(
        "empty tasks pipelined (64 in flight)",
        "tasks/s",
        tasks_rate,
        1.0 / tasks_rate,
        "plain requests, 64 in flight, same run",
        plain_rate,
        8_000.0,
    ));
    Ok(())
}
