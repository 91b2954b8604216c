//! `strata submit`, `strata queue` and `strata cancel`: the task queue from the command
//! line, as an operator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use strata_cluster::tasks::{TaskClient, TaskId, TaskOutcome, TaskRequest};
use strata_net::OperatorClient;

/// How to reach the scheduler.
#[derive(clap::Args, Clone, Debug)]
pub struct OperatorArgs {
    /// Address of the scheduler's node.
    #[arg(long)]
    pub node: String,
    /// Certificate directory (omit for --insecure-dev clusters).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// Operator certificate to authenticate with.
    #[arg(long = "as", default_value = "admin")]
    pub as_name: String,
    /// Cluster name.
    #[arg(long, default_value = "strata")]
    pub cluster: String,
}

/// Parses `WIDTHxHEIGHT` (each 1 to 16384).
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s.split_once('x').ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let num = |v: &str| match v.parse::<usize>() {
        Ok(n) if (1..=16384).contains(&n) => Ok(n),
        _ => Err(format!("{v:?} in {s:?} is not a size from 1 to 16384")),
    };
    Ok((num(w)?, num(h)?))
}

/// Parses `KEY=VALUE`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

async fn client(op: &OperatorArgs) -> Result<TaskClient> {
    let c =
        OperatorClient::connect(&op.node, op.cert_dir.as_deref(), &op.as_name, &op.cluster, Duration::from_secs(10))
            .await
            .with_context(|| format!("connecting to {} as operator {}", op.node, op.as_name))?;
    Ok(TaskClient::operator(Arc::new(c)))
}

/// Requests kept in flight at once by `submit --count`.
const IN_FLIGHT: usize = 64;

/// Submits `count` copies of `req`, up to 64 at a time; with `wait`, prints each outcome.
pub async fn submit(op: &OperatorArgs, req: TaskRequest, count: usize, wait: bool) -> Result<()> {
    let c = client(op).await?;
    let mut ids = Vec::with_capacity(count);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..count {
        while set.len() >= IN_FLIGHT {
            ids.push(set.join_next().await.expect("a submit in flight")??);
        }
        let (c, req) = (c.clone(), req.clone());
        set.spawn_local(async move { c.submit(req).await });
    }
    while let Some(r) = set.join_next().await {
        ids.push(r??);
    }
    ids.sort();
    for id in &ids {
        println!("submitted task {id}");
    }
    if !wait {
        return Ok(());
    }
    let mut failed = 0;
    let mut waits = tokio::task::JoinSet::new();
    let mut pending = ids.into_iter();
    loop {
        while waits.len() < IN_FLIGHT {
            let Some(id) = pending.next() else { break };
            let c = c.clone();
            waits.spawn_local(async move { (id, c.wait(id, Duration::from_secs(24 * 3600)).await) });
        }
        let Some(done) = waits.join_next().await else { break };
        let (id, outcome) = done?;
        match outcome? {
            TaskOutcome::Finished(r) => println!(
                "task {id} finished on {} (attempt {}): {}",
                r.node,
                r.attempt,
                String::from_utf8_lossy(&r.data)
            ),
            other => {
                failed += 1;
                println!("task {id} {}", describe(&other));
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} task(s) did not finish");
    Ok(())
}

fn describe(o: &TaskOutcome) -> String {
    match o {
        TaskOutcome::Finished(r) => format!("finished on {}", r.node),
        TaskOutcome::Failed(m) => format!("failed: {m}"),
        TaskOutcome::Expired => "expired".into(),
        TaskOutcome::Cancelled => "cancelled".into(),
    }
}

/// Prints the queue.
pub async fn queue(op: &OperatorArgs, json: bool) -> Result<()> {
    let rows = client(op).await?.list().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>8} {:<20} {:>5} {:<10} {:<12} {:>8} {:>9} {:>9}",
        "ID", "TASK", "PRIO", "STATE", "NODE", "ATTEMPTS", "WAIT ms", "RUN ms"
    );
    for r in rows {
        println!(
            "{:>8} {:<20} {:>5} {:<10} {:<12} {:>8} {:>9} {:>9}",
            r.id.0,
            r.label,
            r.priority,
            r.state,
            r.node.as_deref().unwrap_or("-"),
            r.attempts,
            r.wait_ms,
            r.run_ms.map_or("-".to_string(), |m| m.to_string())
        );
    }
    Ok(())
}

/// Cancels task `id`.
pub async fn cancel(op: &OperatorArgs, id: u64) -> Result<()> {
    client(op).await?.cancel(TaskId(id)).await?;
    println!("cancelled task {id}");
    Ok(())
}
