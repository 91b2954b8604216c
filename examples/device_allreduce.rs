//! Collectives on device tensors: three nodes on loopback (fresh certificates in a
//! temporary directory), each with its own GPU actor, compute a gradient-like tensor on
//! their GPUs and average it with `Group::all_reduce_tensor`, which reads the tensor
//! from the GPU actor into the ring piece by piece and writes each averaged piece back.
//! The example checks the result against the CPU, then times the device path against
//! the host path an application would otherwise write (download, all-reduce, upload).
//!
//! `cargo run --release -p strata-examples --example device_allreduce`

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use strata::net::tls;
use strata::prelude::*;
use strata::tensor::cpu;

const NODES: usize = 3;

#[actix::main]
async fn main() -> Result<()> {
    // The inputs and their mean computed on the CPU, and the GPU actors, come first: both
    // block the calling thread for seconds, and the nodes' actors, which answer
    // heartbeats, run on this one (a node silent for 3 s counts as failed).
    let w = HostTensor::random([256, 2048], 7);
    let xs: Vec<HostTensor> = (0..NODES).map(|i| HostTensor::random([512, 256], i as u64)).collect();
    let mut want = cpu::matmul(&xs[0], &w, false, false)?;
    for x in &xs[1..] {
        want = cpu::add(&want, &cpu::matmul(x, &w, false, false)?)?;
    }
    let want = cpu::scale(&want, 1.0 / NODES as f32);
    let gpus: Vec<GpuHandle> =
        (0..NODES).map(|_| GpuHandle::start(&GpuOptions::from_env())).collect::<Result<_, _>>()?;
    let certs = tempfile::tempdir()?;
    tls::create_ca(certs.path(), "strata")?;
    let names: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    for name in &names {
        tls::issue_node(certs.path(), name, &["127.0.0.1".into()])?;
    }
    let config = |name: &str| NodeConfig {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        cert_dir: Some(certs.path().to_path_buf()),
        ..Default::default()
    };
    let first = Node::start(config(&names[0])).await?;
    let mut nodes = vec![first.clone()];
    for name in &names[1..] {
        nodes.push(Node::start(NodeConfig { seed: Some(first.local_addr().to_string()), ..config(name) }).await?);
    }
    for node in &nodes {
        node.wait_for_members(NODES, Duration::from_secs(10)).await?;
    }
    let groups: Vec<Group> = nodes
        .iter()
        .map(|n| Group::new(n.clone(), names.clone(), GroupOptions::default()))
        .collect::<Result<_, _>>()?;
    println!("{NODES} nodes, each with its GPU actor on {}", gpus[0].info().name);

    // Every node computes x_i @ w on its GPU: a [512, 2048] tensor (4 MiB) per node.
    let mut outs = Vec::new();
    for (x, gpu) in xs.iter().zip(&gpus) {
        let (xi, wi, out) = (gpu.upload(x.clone()).await?, gpu.upload(w.clone()).await?, gpu.new_id());
        gpu.run(vec![Op::MatMul { a: xi, b: wi, trans_a: false, trans_b: false, out }]).await?;
        outs.push(out);
    }
    let len = 512 * 2048;

    // The mean over the nodes, in place on each GPU; bf16 on the wire would halve the
    // bytes (`.wire(Compression::Bf16)`).
    let spec = TensorReduce::new(ReduceOp::Mean);
    let runs = groups.iter().zip(&gpus).zip(&outs).map(|((g, gpu), &id)| g.all_reduce_tensor(gpu, id, id, len, &spec));
    for r in join(runs).await {
        r?;
    }
    let results: Vec<HostTensor> = join(gpus.iter().zip(&outs).map(|(gpu, &id)| gpu.download::<f32>(id)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let diff = results[0].max_abs_diff(&want).unwrap_or(f32::NAN);
    ensure!(results.iter().all(|r| r.data() == results[0].data()), "the nodes' results differ");
    ensure!(diff < 1e-3, "largest difference from the CPU mean {diff}");
    println!("mean of {len} elements over {NODES} nodes: bitwise equal on every node, {diff:.2e} from the CPU");

    // Device path against the host path, a few times each.
    for round in 0..3 {
        let t = Instant::now();
        let runs =
            groups.iter().zip(&gpus).zip(&outs).map(|((g, gpu), &id)| g.all_reduce_tensor(gpu, id, id, len, &spec));
        for r in join(runs).await {
            r?;
        }
        let device = t.elapsed();
        let t = Instant::now();
        let runs = groups.iter().zip(&gpus).zip(&outs).map(|((g, gpu), &id)| async move {
            let host = gpu.download::<f32>(id).await?.into_data();
            let reduced = g.all_reduce(host, ReduceOp::Mean).await?;
            gpu.upload_as(id, HostTensor::new([len], reduced)?).await?;
            anyhow::Ok(())
        });
        for r in join(runs).await {
            r?;
        }
        let host = t.elapsed();
        println!(
            "round {round}: all_reduce_tensor {:.1} ms, download + all_reduce + upload {:.1} ms",
            device.as_secs_f64() * 1e3,
            host.as_secs_f64() * 1e3
        );
    }
    for gpu in &gpus {
        gpu.shutdown().await;
    }
    for node in &nodes {
        node.shutdown().await;
    }
    Ok(())
}

/// Runs futures concurrently (the nodes of this process must all take part at once) and
/// returns their outputs in order.
async fn join<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("finished")).collect()
}
