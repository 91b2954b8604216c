//! Remote GPUs: a two-node cluster on loopback (fresh certificates in a temporary
//! directory), where node "alpha" runs a program on node "beta"'s GPU, gets a mistake
//! back as a typed error naming beta, and has beta copy the result straight to alpha's GPU.
//!
//! `cargo run --release -p strata-examples --example remote_gpu`

use std::time::Duration;

use anyhow::Result;
use strata_cluster::remote_gpu::{GpuService, GpuServiceOptions, RemoteGpu};
use strata_gpu::{GpuHandle, GpuOptions, Op};
use strata_net::{Node, NodeConfig, tls};
use strata_tensor::HostTensor;
use strata_tensor::cpu::{self, ReduceOp};

#[actix::main]
async fn main() -> Result<()> {
    // A cluster CA and one certificate per node.
    let certs = tempfile::tempdir()?;
    tls::create_ca(certs.path(), "strata")?;
    for name in ["alpha", "beta"] {
        tls::issue_node(certs.path(), name, &["127.0.0.1".into()])?;
    }
    let config = |name: &str| NodeConfig {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        cert_dir: Some(certs.path().to_path_buf()),
        ..Default::default()
    };
    let alpha = Node::start(config("alpha")).await?;
    let beta = Node::start(NodeConfig { seed: Some(alpha.local_addr().to_string()), ..config("beta") }).await?;
    for node in [&alpha, &beta] {
        node.wait_for_members(2, Duration::from_secs(10)).await?;
    }
    // Each node serves its GPU actor to the cluster.
    let mut gpus = Vec::new();
    for node in [&alpha, &beta] {
        let gpu = GpuHandle::start(&GpuOptions::from_env())?;
        GpuService::register(node, gpu.clone(), GpuServiceOptions::default()).await?;
        gpus.push(gpu);
    }

    // From alpha, beta's GPU by name: upload, run, download.
    let on_beta = RemoteGpu::on_node(&alpha, "beta").await?;
    println!("alpha drives beta's GPU ({})", on_beta.device());
    let (ha, hb) = (HostTensor::random([256, 128], 1), HostTensor::random([128, 64], 2));
    let a = on_beta.upload(ha.clone()).await?;
    let b = on_beta.upload(hb.clone()).await?;
    let c = on_beta.new_tensor();
    on_beta.run(vec![Op::MatMul { a: a.id(), b: b.id(), trans_a: false, trans_b: false, out: c.id() }]).await?;
    let product = on_beta.download::<f32>(&c).await?;
    let diff = product.max_abs_diff(&cpu::matmul(&ha, &hb, false, false)?).unwrap_or(f32::NAN);
    println!("a @ b on beta: {} (largest difference from the CPU reference {diff:.2e})", product.shape());

    // A mistake on beta comes back as the GPU actor's typed error, naming beta.
    let wrong = Op::MatMul { a: a.id(), b: a.id(), trans_a: false, trans_b: false, out: on_beta.new_id() };
    println!("a wrong shape is refused: {}", on_beta.run(vec![wrong]).await.unwrap_err());

    // Beta sends the product straight to alpha's GPU, where the copy belongs to the same
    // caller; alpha reduces it there.
    let on_alpha = RemoteGpu::on_node(&alpha, "alpha").await?;
    let copy = on_beta.copy_to(&c, &on_alpha).await?;
    let mean = on_alpha.new_tensor();
    on_alpha.run(vec![Op::Reduce { x: copy.id(), op: ReduceOp::Mean, axis: None, out: mean.id() }]).await?;
    let mean = on_alpha.download::<f32>(&mean).await?.data()[0];
    let want = product.data().iter().map(|v| *v as f64).sum::<f64>() / product.data().len() as f64;
    println!("mean of the copy on alpha: {mean:.6} (from the downloaded product: {want:.6})");

    // Dropping the handles frees the tensors; leaving stops each node's service.
    drop((a, b, c, copy, on_beta, on_alpha));
    for node in [&alpha, &beta] {
        node.shutdown().await;
    }
    for gpu in &gpus {
        gpu.shutdown().await;
    }
    Ok(())
}
