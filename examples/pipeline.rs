//! Pipeline-parallel training from an application: a 6-layer MLP cut into 3 stages, one
//! per node (each with its own GPU actor), trained with the zero-bubble schedule on
//! synthetic data, then compared with the same training on one node, its timeline
//! written as a Chrome trace and its stage checkpoints merged into one.
//!
//!     cargo run --release -p strata-examples --example pipeline [-- OUT_DIR]
//!
//! Three nodes run in this process on loopback with fresh certificates; across machines
//! each node would be its own process (as `strata train --pipeline-stages` does), and the
//! code of a stage is the same.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use strata::nn::data::Dataset;
use strata::nn::{ModelSpec, Optimizer};
use strata::prelude::*;
use strata::train::pipeline::{PipelineConfig, PipelineTrainer, Schedule, merge_stage_checkpoints};

const STAGES: usize = 3;

fn synthetic(n: usize) -> Arc<Dataset> {
    // 512 features per sample, labels a simple function of the features.
    let images = HostTensor::random([n, 1, 16, 32], 7).into_data();
    let labels = images.chunks(512).map(|x| (x.iter().take(64).sum::<f32>().abs() * 10.0) as u32 % 10).collect();
    Arc::new(Dataset { name: "synthetic".into(), images, labels, sample: [1, 16, 32], classes: 10 })
}

#[actix::main]
async fn main() -> Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "out/pipeline-example".into()));
    let certs = tempfile::tempdir()?;
    strata::net::tls::create_ca(certs.path(), "pipeline")?;
    let names: Vec<String> = (0..STAGES).map(|i| format!("stage-{i}")).collect();
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for n in &names {
        strata::net::tls::issue_node(certs.path(), n, &["127.0.0.1".into()])?;
        let config = NodeConfig {
            name: n.clone(),
            seed: nodes.first().map(|f| f.local_addr().to_string()),
            cert_dir: Some(certs.path().to_path_buf()),
            ..Default::default()
        };
        nodes.push(Node::start(config).await?);
    }
    for n in &nodes {
        n.wait_for_members(STAGES, Duration::from_secs(10)).await?;
    }
    let spec = ModelSpec::mlp([1, 16, 32], 512, 6, 10);
    let config = PipelineConfig {
        stages: STAGES,
        micro_batches: 6,
        micro_batch: 16,
        schedule: Schedule::ZeroBubble,
        split: None, // balanced by each layer's measured time on each stage's adapter
        optimizer: Optimizer::Sgd(strata::tensor::cpu::SgdParams { lr: 0.05, momentum: 0.9, ..Default::default() }),
        checkpoint_dir: Some(out.join("checkpoints")),
        ..Default::default()
    };
    let data = synthetic(96 * 8);
    let mut trainers = Vec::new();
    let mut gpus = Vec::new();
    for n in &nodes {
        let gpu = GpuHandle::start(&GpuOptions::from_env()).context("opening a GPU adapter")?;
        let group = Group::new(n.clone(), names.clone(), GroupOptions::default())?;
        trainers.push(PipelineTrainer::new(gpu.clone(), Some(group), spec.clone(), config.clone()));
        gpus.push(gpu);
    }
    // Every stage's setup runs at once (they measure layers and agree on the cut together).
    let (a, b, c) = (trainers.remove(0), trainers.remove(0), trainers.remove(0));
    let (a, b, c) = tokio::join!(a, b, c);
    let mut stages = [a?, b?, c?];
    println!("cut before {:?} (balanced by measured time)", stages[0].cut().names(&spec));

    // One epoch: every stage runs the same steps; the last stage knows the loss.
    let [a, b, c] = &mut stages;
    let mut step = 0;
    let (ra, rb, rc) = tokio::join!(
        a.train_epoch(&data, |_| {}),
        b.train_epoch(&data, |_| {}),
        c.train_epoch(&data, |s| {
            println!(
                "step {step}: loss {:.4}, the last stage held at most {} micro-batches",
                s.loss, s.activation_peak
            );
            step += 1;
        })
    );
    ra?;
    rb?;
    let (loss, accuracy, samples, time) = rc?;
    println!(
        "epoch: mean loss {loss:.4}, accuracy {:.1}%, {samples} samples in {:.1} s",
        accuracy * 100.0,
        time.as_secs_f64()
    );

    // The timeline of every stage, gathered; the bubble of the steps after the first.
    let [a, b, c] = &stages;
    let (t, _, _) = tokio::join!(a.gather_timeline(), b.gather_timeline(), c.gather_timeline());
    let timeline = t?;
    if let Some(bubble) = timeline.bubble(1) {
        println!(
            "bubble {:.3} (ZB-H1's formula (S-1)/(3m) = {:.3}), {:.0} ms per step",
            bubble.fraction,
            Schedule::ZeroBubble.bubble_formula(STAGES, config.micro_batches),
            bubble.step_seconds * 1e3
        );
    }
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("timeline.json"), timeline.chrome_trace())?;
    println!("timeline {} (open in https://ui.perfetto.dev)", out.join("timeline.json").display());

    // Per-stage checkpoints, merged into the layout of a single-node checkpoint.
    let (ra, rb, rc) = tokio::join!(
        a.checkpoint(Default::default()),
        b.checkpoint(Default::default()),
        c.checkpoint(Default::default())
    );
    for r in [ra, rb, rc] {
        println!("stage checkpoint {}", r?.map(|p| p.display().to_string()).unwrap_or_default());
    }
    let merged = merge_stage_checkpoints(&out.join("checkpoints"), &out.join("merged"))?;
    println!("merged checkpoint {} (loads as a single-node checkpoint would)", merged.display());
    for n in &nodes {
        n.shutdown().await;
    }
    for g in gpus {
        g.shutdown().await;
    }
    Ok(())
}
