//! A complete cluster application: it joins a cluster (or, with no arguments, makes a
//! small one of its own on loopback), registers a task function on its node, and submits
//! tasks with priorities and resource demands to the cluster's task queue.
//!
//! Alone (a 3-node cluster in this process, fresh certificates in a temp dir):
//!     cargo run --release -p strata-examples --example cluster_app
//! Joining running `strata node` processes (the scheduler node's name as the second
//! argument; `strata cert --dir certs app-1` issues this node's certificate):
//!     cargo run --release -p strata-examples --example cluster_app -- \
//!         certs node-1 127.0.0.1:7001 app-1
//!
//! Task functions are found by name on whichever node runs the task, so every node of
//! the cluster must register the same names: here every node is this program.

use std::time::Duration;

use anyhow::{Context, Result};
use strata::prelude::*;

/// The task: sum of squares of its tensor input, computed on the node's GPU actor when
/// it has one (a program of GPU ops), else on the CPU.
fn sum_of_squares(ctx: TaskContext, input: TaskInput) -> TaskFuture {
    Box::pin(async move {
        let x = input.tensors.into_iter().next().ok_or("sum_of_squares needs a tensor")?;
        let value = match ctx.gpu {
            Some(gpu) => {
                let xi = gpu.upload(x).await.map_err(|e| e.to_string())?;
                let (sq, s) = (gpu.new_id(), gpu.new_id());
                let ops = vec![
                    Op::Mul { a: xi, b: xi, out: sq },
                    Op::Reduce { x: sq, op: strata::tensor::cpu::ReduceOp::Sum, axis: None, out: s },
                ];
                gpu.run(ops).await.map_err(|e| e.to_string())?;
                let v = gpu.download::<f32>(s).await.map_err(|e| e.to_string())?.data()[0];
                gpu.free(vec![xi, sq, s]).await.map_err(|e| e.to_string())?;
                v
            }
            None => x.data().iter().map(|v| v * v).sum(),
        };
        Ok(TaskOutput { data: format!("{value} on {}", ctx.node).into_bytes(), tensors: vec![] })
    })
}

fn registry() -> TaskRegistry {
    let r = TaskRegistry::with_builtins();
    r.register("sum_of_squares", sum_of_squares);
    r
}

#[actix::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _tmp;
    let (node, scheduler, extra) = if let [certs, scheduler, seed, name] = args.as_slice() {
        let config = NodeConfig {
            name: name.clone(),
            seed: Some(seed.clone()),
            cert_dir: Some(certs.into()),
            ..Default::default()
        };
        let node = Node::start(config).await.context("joining the cluster")?;
        node.wait_for_members(2, Duration::from_secs(10)).await?;
        ExecService::register(&node, None, registry(), ExecOptions::default());
        (node, scheduler.clone(), Vec::new())
    } else {
        // A cluster of our own: three nodes, the first runs the scheduler; node-2 has the
        // GPU and is labelled, so tasks that ask for a GPU slot go there.
        let dir = tempfile::tempdir()?;
        strata::net::tls::create_ca(dir.path(), "app")?;
        for n in ["node-1", "node-2", "node-3"] {
            strata::net::tls::issue_node(dir.path(), n, &["127.0.0.1".into()])?;
        }
        let gpu = GpuHandle::start(&GpuOptions::from_env()).ok();
        let mut nodes: Vec<NodeHandle> = Vec::new();
        for n in ["node-1", "node-2", "node-3"] {
            let config = NodeConfig {
                name: n.into(),
                seed: nodes.first().map(|f| f.local_addr().to_string()),
                cert_dir: Some(dir.path().to_path_buf()),
                ..Default::default()
            };
            nodes.push(Node::start(config).await?);
        }
        for n in &nodes {
            n.wait_for_members(3, Duration::from_secs(10)).await?;
        }
        for (i, n) in nodes.iter().enumerate() {
            let g = if i == 1 { gpu.clone() } else { None };
            ExecService::register(n, g, registry(), ExecOptions { cpu_slots: 1, ..Default::default() });
        }
        SchedulerService::start(&nodes[0], SchedulerOptions::new(dir.path().join("journal")))
            .await
            .map_err(anyhow::Error::msg)?;
        let node = nodes[0].clone();
        _tmp = dir;
        (node, "node-1".to_string(), nodes)
    };
    println!("node {} is up; the scheduler runs on {scheduler}", node.name());
    let client = TaskClient::member(node.clone(), &scheduler);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Tasks with priorities and demands: the urgent one asks for a GPU slot.
    let x = HostTensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0])?;
    let mut ids = Vec::new();
    for (prio, gpu) in [(0, false), (5, false), (9, true)] {
        let demand = if gpu { Demand::gpu_mem(1 << 20).gpu_slots(1) } else { Demand::default().cpu_slots(1) };
        let task =
            TaskRequest::function("sum_of_squares", vec![], std::slice::from_ref(&x)).priority(prio).demand(demand);
        let id = client.submit(task).await?;
        println!("submitted task {id} (priority {prio}, gpu: {gpu})");
        ids.push(id);
    }
    for id in ids {
        match client.wait(id, Duration::from_secs(60)).await? {
            TaskOutcome::Finished(r) => println!("task {id}: {}", String::from_utf8_lossy(&r.data)),
            other => println!("task {id}: {other:?}"),
        }
    }
    // A mistake reaches the submitter as a value, and the cluster keeps serving.
    match client.run(TaskRequest::function("no_such_task", vec![], &[]), Duration::from_secs(30)).await? {
        TaskOutcome::Failed(m) => println!("an unknown task fails: {m}"),
        other => println!("unexpected: {other:?}"),
    }
    for row in client.list().await? {
        println!(
            "  {:>3} {:<16} prio {:>2} {:<9} on {:<7} attempts {} wait {} ms",
            row.id.0,
            row.label,
            row.priority,
            row.state,
            row.node.as_deref().unwrap_or("-"),
            row.attempts,
            row.wait_ms
        );
    }
    for n in extra.iter().rev() {
        n.shutdown().await;
    }
    if extra.is_empty() {
        node.shutdown().await;
    }
    Ok(())
}
