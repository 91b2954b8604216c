//! Pipeline parallelism: every schedule and cut equal to single-node training, the
//! activation bounds, DP x PP, checkpoints per stage merged into a single-node one,
//! mistakes refused before the first step, and a lost stage stopping the others.

use std::sync::Arc;
use std::time::Duration;

use strata_collective::{Group, GroupOptions};
use strata_gpu::GpuHandle;
use strata_net::NodeHandle;
use strata_nn::data::Dataset;
use strata_nn::{ModelSpec, Optimizer, checkpoint};
use strata_tensor::HostTensor;
use strata_tensor::cpu::{AdamParams, SgdParams};
use strata_train::pipeline::{PipelineConfig, PipelineTrainer, Schedule, merge_stage_checkpoints};
use strata_train::{TrainConfig, TrainError, Trainer};

use crate::common::{self, futures_join};
use crate::net::helpers::{cluster, groups};

const MICRO: usize = 4;

fn spec() -> ModelSpec {
    ModelSpec::reference_cnn(1, 12, 12, 10)
}

fn data(n: usize) -> Arc<Dataset> {
    Arc::new(Dataset {
        name: "synthetic".into(),
        images: HostTensor::random([n, 1, 12, 12], 11).into_data(),
        labels: (0..n as u32).map(|i| (i * 7 + 3) % 10).collect(),
        sample: [1, 12, 12],
        classes: 10,
    })
}

fn adam() -> Optimizer {
    Optimizer::Adam(AdamParams::default())
}

fn sgd() -> Optimizer {
    Optimizer::Sgd(SgdParams { lr: 0.05, momentum: 0.9, ..Default::default() })
}

fn config(stages: usize, micro_batches: usize, schedule: Schedule, split: &[&str], opt: Optimizer) -> PipelineConfig {
    PipelineConfig {
        stages,
        micro_batches,
        micro_batch: MICRO,
        schedule,
        // No split points: balanced by measured layer times.
        split: (!split.is_empty()).then(|| split.iter().map(|s| s.to_string()).collect()),
        optimizer: opt,
        seed: 5,
        ..Default::default()
    }
}

/// What a pipeline run gives back: the whole model's parameters, and per node the
/// activation peak and the losses of its steps.
struct Run {
    params: Vec<HostTensor>,
    peaks: Vec<usize>,
    losses: Vec<Vec<f32>>,
}

/// Trains `steps` global batches on the first `stages * replicas` nodes.
async fn run(nodes: &[NodeHandle], gpus: &[GpuHandle], cfg: PipelineConfig, data: &Arc<Dataset>, steps: usize) -> Run {
    let world = nodes.len().max(1);
    let trainers = if nodes.is_empty() {
        vec![PipelineTrainer::new(gpus[0].clone(), None, spec(), cfg.clone()).await]
    } else {
        // Groups of these nodes only (the cluster may have more).
        let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
        let gs = nodes.iter().map(|n| Group::new(n.clone(), names.clone(), GroupOptions::default()).unwrap());
        futures_join(gs.zip(gpus).map(|(g, gpu)| PipelineTrainer::new(gpu.clone(), Some(g), spec(), cfg.clone()))).await
    };
    let mut trainers: Vec<PipelineTrainer> = trainers.into_iter().map(|t| t.unwrap()).collect();
    let global = trainers[0].global_batch();
    let order = strata_nn::data::DistributedSampler::new(data.len(), 0, 1, cfg.seed, true).indices(0);
    for step in 0..steps {
        let idx = &order[step * global..(step + 1) * global];
        let outs = futures_join(trainers.iter_mut().map(|t| t.train_step(data, idx))).await;
        for o in outs {
            o.unwrap();
        }
    }
    let params = futures_join(trainers.iter().map(|t| t.all_params())).await;
    assert_eq!(trainers.len(), world);
    Run {
        params: params.into_iter().next().unwrap().unwrap(),
        peaks: trainers.iter().map(|t| t.activation_peak()).collect(),
        losses: trainers.iter().map(|t| t.step_losses().to_vec()).collect(),
    }
}

fn max_rel_diff(a: &[HostTensor], b: &[HostTensor]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.data().iter().zip(y.data()).map(|(p, q)| (p - q).abs() / (1e-3 + q.abs())))
        .fold(0.0, f32::max)
}

#[actix_rt::test]
async fn every_schedule_and_cut_equals_single_node_training() {
    if common::gpu().is_none() {
        return;
    }
    const STEPS: usize = 2;
    let data = data(64);
    let gpus: Vec<GpuHandle> =
        (0..4).map(|_| GpuHandle::start(&crate::common::pinned_gpu_options()).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 4).await;

    // The reference: one node accumulating the same micro-batches (Adam, bitwise).
    let solo = run(&[], &gpus[..1], config(1, 4, Schedule::OneFOneB, &[], adam()), &data, STEPS).await;
    let solo_m2 = run(&[], &gpus[..1], config(1, 2, Schedule::GPipe, &[], adam()), &data, STEPS).await;
    // Any cut gives bitwise the same result, so the balanced one (by timing) is checked too.
    let cases: [(usize, usize, Schedule, &[&str]); 7] = [
        (2, 4, Schedule::GPipe, &["conv2"]),
        (3, 4, Schedule::GPipe, &[]),
        (2, 4, Schedule::OneFOneB, &["fc1"]),
        (2, 4, Schedule::ZeroBubble, &["conv2"]),
        (3, 4, Schedule::ZeroBubble, &["pool1", "flatten"]),
        (3, 4, Schedule::OneFOneB, &["conv2", "fc2"]),
        (3, 2, Schedule::ZeroBubble, &["conv2", "fc1"]),
    ];
    for (stages, m, schedule, split) in cases {
        let r = run(&nodes[..stages], &gpus[..stages], config(stages, m, schedule, split, adam()), &data, STEPS).await;
        let want = if m == 4 { &solo } else { &solo_m2 };
        assert!(r.params == want.params, "{schedule} S={stages} m={m} {split:?}: parameters differ from one node's");
        assert_eq!(r.losses[stages - 1], want.losses[0], "{schedule} S={stages} m={m}: losses");
        for (s, &peak) in r.peaks.iter().enumerate() {
            let bound = schedule.activation_bound(stages, s, m);
            // GPipe and 1F1B reach their bound whatever the timing; ZB holds at least
            // 1F1B's count and defers more weight work only when a stage would wait.
            let least = if schedule == Schedule::ZeroBubble { (stages - s).min(m) } else { bound };
            assert!(
                (least..=bound).contains(&peak),
                "{schedule} S={stages} m={m}: stage {s} held {peak}, expected {least}..={bound}"
            );
        }
    }
    // 1F1B's bound is S - i per stage; GPipe holds every micro-batch.
    assert_eq!(Schedule::OneFOneB.activation_bound(3, 0, 4), 3);
    assert_eq!(Schedule::OneFOneB.activation_bound(3, 2, 4), 1);

    // DP x PP: 2 stages x 2 replicas equal one node on the same global batches (SGD; the
    // replicas' average changes the summation order, so within a tolerance).
    let single = run(&[], &gpus[..1], config(1, 8, Schedule::OneFOneB, &[], sgd()), &data, STEPS).await;
    let dpp = run(&nodes, &gpus, config(2, 4, Schedule::ZeroBubble, &["conv2"], sgd()), &data, STEPS).await;
    let d = max_rel_diff(&dpp.params, &single.params);
    assert!(d < 1e-4, "DP x PP differs from one node by {d}");

    // And one node without micro-batches at all: the data-parallel trainer on the whole
    // global batch (one loss over 32 samples instead of a mean of 8 means of 4).
    let gpu = gpus[0].clone();
    let tc = TrainConfig { batch: 32, optimizer: sgd(), seed: 5, checksum_every: 0, ..Default::default() };
    let mut t = Trainer::new(gpu, None, spec(), tc).await.unwrap();
    let order = strata_nn::data::DistributedSampler::new(data.len(), 0, 1, 5, true).indices(0);
    for step in 0..STEPS {
        t.step(data.batch(&order[step * 32..(step + 1) * 32])).await.unwrap();
    }
    let plain = t.params().await.unwrap();
    let d = max_rel_diff(&single.params, &plain);
    assert!(d < 1e-4, "accumulated micro-batches differ from one batch by {d}");
    for n in &nodes {
        n.shutdown().await;
    }
    for g in gpus {
        g.shutdown().await;
    }
}

#[actix_rt::test]
async fn mistakes_are_refused_before_the_first_step() {
    if common::gpu().is_none() {
        return;
    }
    let gpu = GpuHandle::start(&crate::common::pinned_gpu_options()).unwrap();
    let err = |r: Result<PipelineTrainer, TrainError>| r.err().expect("refused").to_string();
    let e = err(PipelineTrainer::new(gpu.clone(), None, spec(), config(20, 4, Schedule::GPipe, &[], adam())).await);
    assert!(
        e.contains("20 pipeline stages asked for, but the model has 11 layers that can be cut into at most 8 stages"),
        "{e}"
    );
    let e = err(PipelineTrainer::new(
        gpu.clone(),
        None,
        spec(),
        PipelineConfig { stages: 2, ..config(1, 4, Schedule::GPipe, &[], adam()) },
    )
    .await);
    assert!(e.contains("1 nodes cannot hold 2-stage pipelines"), "{e}");
    // Split points are checked against the model whatever the world.
    let cut = spec().cut_at(&["conv9".into()]).unwrap_err().to_string();
    assert!(cut.contains("split point \"conv9\" names no layer (layers: conv1, relu1, pool1"), "{cut}");
    let cut = spec().cut_at(&["relu2".into()]).unwrap_err().to_string();
    assert!(cut.contains("split point \"relu2\" is a ReLU fused into \"conv2\""), "{cut}");
    let cut = spec().cut_at(&["fc1".into(), "conv2".into()]).unwrap_err().to_string();
    assert!(cut.contains("split point \"conv2\" is not after the previous split point"), "{cut}");

    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let gpus = [gpu.clone(), GpuHandle::start(&crate::common::pinned_gpu_options()).unwrap()];
    let gs = groups(&nodes, GroupOptions::default()).await;
    let outs = futures_join(gs.into_iter().zip(&gpus).map(|(g, gpu)| {
        let mut c = config(2, 4, Schedule::GPipe, &["conv2"], adam());
        c.split = Some(vec!["conv2".into(), "fc1".into()]);
        PipelineTrainer::new(gpu.clone(), Some(g), spec(), c)
    }))
    .await;
    for o in outs {
        let e = err(o);
        assert!(e.contains("2 split points given for 2 stages"), "{e}");
    }
    // Stages that disagree on the settings (here the micro-batch count) refuse to start.
    let gs = groups(&nodes, GroupOptions::default()).await;
    let outs = futures_join(gs.into_iter().zip(&gpus).enumerate().map(|(i, (g, gpu))| {
        let c = config(2, 2 + 2 * i, Schedule::GPipe, &["conv2"], adam());
        PipelineTrainer::new(gpu.clone(), Some(g), spec(), c)
    }))
    .await;
    for o in outs {
        let e = err(o);
        assert!(e.contains("runs another model or other pipeline settings than this node"), "{e}");
    }
    for n in &nodes {
        n.shutdown().await;
    }
    gpus[1].shutdown().await;
    gpu.shutdown().await;
}

#[actix_rt::test]
async fn stage_checkpoints_resume_refuse_another_cut_and_merge_into_one_model() {
    if common::gpu().is_none() {
        return;
    }
    let data = data(48);
    let ck = tempfile::tempdir().unwrap();
    let gpus = [
        GpuHandle::start(&crate::common::pinned_gpu_options()).unwrap(),
        GpuHandle::start(&crate::common::pinned_gpu_options()).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let cfg = PipelineConfig {
        checkpoint_dir: Some(ck.path().to_path_buf()),
        ..config(2, 4, Schedule::OneFOneB, &["fc1"], adam())
    };
    let start = |cfg: PipelineConfig| {
        let (nodes, gpus) = (nodes.clone(), gpus.clone());
        async move {
            let gs = groups(&nodes, GroupOptions::default()).await;
            futures_join(
                gs.into_iter()
                    .zip(&gpus)
                    .map(|(g, gpu)| PipelineTrainer::new(gpu.clone(), Some(g), spec(), cfg.clone())),
            )
            .await
        }
    };
    let mut ts: Vec<PipelineTrainer> = start(cfg.clone()).await.into_iter().map(|t| t.unwrap()).collect();
    let outs = futures_join(ts.iter_mut().map(|t| t.train_epoch(&data, |_| {}))).await;
    for o in outs {
        assert_eq!(o.unwrap().2, 48, "three steps of 16 samples");
    }
    let saved = futures_join(ts.iter().map(|t| t.checkpoint(Default::default()))).await;
    for (s, p) in saved.into_iter().enumerate() {
        assert_eq!(p.unwrap().unwrap(), ck.path().join(format!("stage-{s}/epoch-1")));
    }
    let params = futures_join(ts.iter().map(|t| t.all_params())).await.remove(0).unwrap();

    // Resuming restores every stage.
    let resumed: Vec<PipelineTrainer> =
        start(PipelineConfig { resume: true, ..cfg.clone() }).await.into_iter().map(|t| t.unwrap()).collect();
    assert_eq!((resumed[0].epoch(), resumed[0].step_count()), (1, 3));
    let again = futures_join(resumed.iter().map(|t| t.all_params())).await.remove(0).unwrap();
    assert!(again == params, "resumed parameters differ");

    // Another cut is refused before any step, naming both cuts.
    let other = PipelineConfig { resume: true, split: Some(vec!["conv2".into()]), ..cfg.clone() };
    for o in start(other).await {
        let e = o.err().expect("refused").to_string();
        assert!(
            e.contains(
                "was written by a pipeline cut before [fc1] of model reference-cnn, this run cuts before [conv2]"
            ),
            "{e}"
        );
    }

    // The stage checkpoints merge into the layout of a single-node checkpoint.
    let merged = tempfile::tempdir().unwrap();
    let path = merge_stage_checkpoints(ck.path(), merged.path()).unwrap();
    assert_eq!(path, merged.path().join("epoch-1"));
    let one = checkpoint::load(&path).unwrap();
    assert_eq!(one.params_for(&spec(), &path).unwrap(), params);
    assert!(!one.state.info.contains_key("pipeline_cut"));
    assert_eq!(one.optimizer.len(), 2 * spec().params().len());
    for n in &nodes {
        n.shutdown().await;
    }
    for g in gpus {
        g.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_lost_stage_stops_the_others_naming_it() {
    if common::gpu().is_none() {
        return;
    }
    let data = data(64);
    let gpus: Vec<GpuHandle> =
        (0..3).map(|_| GpuHandle::start(&crate::common::pinned_gpu_options()).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let gs = groups(&nodes, GroupOptions::default()).await;
    let cfg = config(3, 4, Schedule::OneFOneB, &["conv2", "fc1"], adam());
    let ts = futures_join(
        gs.into_iter().zip(&gpus).map(|(g, gpu)| PipelineTrainer::new(gpu.clone(), Some(g), spec(), cfg.clone())),
    )
    .await;
    let mut ts: Vec<PipelineTrainer> = ts.into_iter().map(|t| t.unwrap()).collect();
    let global = ts[0].global_batch();
    let order: Vec<usize> = (0..data.len()).collect();
    // One full step, then node-2 (the last stage) vanishes during the second.
    let outs = futures_join(ts.iter_mut().map(|t| t.train_step(&data, &order[..global]))).await;
    for o in outs {
        o.unwrap();
    }
    let mut last = ts.pop().unwrap();
    let killer = async {
        // Let the step start, then kill the last stage's node and stop its work.
        let _ =
            tokio::time::timeout(Duration::from_millis(30), last.train_step(&data, &order[global..2 * global])).await;
        nodes[2].abort().await;
    };
    let started = std::time::Instant::now();
    let (outs, ()) =
        tokio::join!(futures_join(ts.iter_mut().map(|t| t.train_step(&data, &order[global..2 * global]))), killer);
    for (s, o) in outs.into_iter().enumerate() {
        let e = o.err().unwrap_or_else(|| panic!("stage {s} finished a step without stage 2"));
        let text = e.to_string();
        assert!(matches!(&e, TrainError::StageLost { node, stage: 2, .. } if node == "node-2"), "stage {s}: {text}");
        assert!(text.starts_with("pipeline stage 2 of replica 0 (node node-2) was lost"), "{text}");
    }
    // Within the failure timeout (1 s in these tests) and the grace to name it.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    for n in &nodes[..2] {
        n.shutdown().await;
    }
    for g in gpus {
        g.shutdown().await;
    }
}
