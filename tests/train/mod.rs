//! Data-parallel training: equivalence with a single rank, checkpoints, and models that
//! do not fit their data.

use std::sync::Arc;
use std::time::Duration;

use strata_collective::{Compression, Group, GroupOptions};
use strata_gpu::{GpuHandle, GpuOptions};
use strata_nn::data::{Batch, Dataset};
use strata_nn::{Layer, ModelSpec, Optimizer};
use strata_tensor::cpu::{AdamParams, SgdParams};
use strata_tensor::{HostTensor, SplitMix64};
use strata_train::{TrainConfig, Trainer};

use crate::common;
use crate::net::helpers::cluster;

fn batch(n: usize, seed: u64) -> Batch {
    let mut rng = SplitMix64(seed);
    Batch {
        x: HostTensor::random([n, 1, 12, 12], seed),
        y: HostTensor::new([n], (0..n).map(|_| rng.below(10) as u32).collect()).unwrap(),
    }
}

fn halves(b: &Batch) -> (Batch, Batch) {
    let n = b.y.data().len() / 2;
    let px = b.x.data().len() / b.y.data().len();
    let part = |r: std::ops::Range<usize>| Batch {
        x: HostTensor::new([r.len(), 1, 12, 12], b.x.data()[r.start * px..r.end * px].to_vec()).unwrap(),
        y: HostTensor::new([r.len()], b.y.data()[r.clone()].to_vec()).unwrap(),
    };
    (part(0..n), part(n..2 * n))
}

fn spec() -> ModelSpec {
    ModelSpec::reference_cnn(1, 12, 12, 10)
}

fn config(batch: usize) -> TrainConfig {
    TrainConfig {
        batch,
        optimizer: Optimizer::Adam(AdamParams::default()),
        seed: 7,
        checksum_every: 1,
        ..Default::default()
    }
}

#[actix_rt::test]
async fn two_ranks_of_32_reach_the_parameters_of_one_rank_of_64() {
    if common::gpu().is_none() {
        return;
    }
    const STEPS: u64 = 3;
    let batches: Vec<Batch> = (0..STEPS).map(|s| batch(64, 100 + s)).collect();

    let solo_gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
    let mut solo = Trainer::new(solo_gpu, None, spec(), config(64)).await.unwrap();
    for b in &batches {
        solo.step(b.clone()).await.unwrap();
    }
    let want = solo.params().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let mut trainers = Vec::new();
    for node in &nodes {
        let g = Group::form(node.clone(), 2, Duration::from_secs(10), GroupOptions::default()).await.unwrap();
        let gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
        trainers.push(Trainer::new(gpu, Some(g), spec(), config(32)));
    }
    let (a, b) = (trainers.remove(0), trainers.remove(0));
    let (mut a, mut b) = tokio::join!(a, b);
    let (a, b) = (a.as_mut().unwrap(), b.as_mut().unwrap());
    for full in &batches {
        let (h0, h1) = halves(full);
        let (r0, r1) = tokio::join!(a.step(h0), b.step(h1));
        r0.unwrap();
        r1.unwrap();
    }
    let (p0, p1) = (a.params().await.unwrap(), b.params().await.unwrap());
    for ((x, y), w) in p0.iter().zip(&p1).zip(&want) {
        assert_eq!(x, y, "the two ranks must hold bitwise identical parameters");
        common::assert_close("2x32 vs 1x64", x, w, 1e-3, 2e-5);
    }
    // Training moved the parameters: the comparison is not vacuous.
    let init = spec().init(7);
    assert!(want.iter().zip(&init).any(|(w, i)| w.max_abs_diff(i).unwrap() > 1e-3));
    for t in [&*a, &*b, &solo] {
        t.gpu().shutdown().await;
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn compressed_gradients_keep_replicas_bitwise_identical() {
    if common::gpu().is_none() {
        return;
    }
    const STEPS: u64 = 4;
    let batches: Vec<Batch> = (0..STEPS).map(|s| batch(64, 200 + s)).collect();
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let mut params = Vec::new();
    for wire in [Compression::None, Compression::Bf16] {
        let mut trainers = Vec::new();
        for node in &nodes {
            let g = Group::form(node.clone(), 2, Duration::from_secs(10), GroupOptions::default()).await.unwrap();
            let gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
            // Checksums every step: a replica that drifts fails its step.
            // SGD: parameters move in proportion to the gradients, so the two runs'
            // difference measures what compression changed (Adam would normalise it away
            // for large gradients and amplify it for tiny ones).
            let sgd = Optimizer::Sgd(SgdParams { lr: 0.05, momentum: 0.9, ..Default::default() });
            let cfg = TrainConfig { compression: wire, optimizer: sgd, ..config(32) };
            trainers.push(Trainer::new(gpu, Some(g), spec(), cfg));
        }
        let (a, b) = (trainers.remove(0), trainers.remove(0));
        let (mut a, mut b) = tokio::join!(a, b);
        let (a, b) = (a.as_mut().unwrap(), b.as_mut().unwrap());
        for full in &batches {
            let (h0, h1) = halves(full);
            let (r0, r1) = tokio::join!(a.step(h0), b.step(h1));
            r0.unwrap_or_else(|e| panic!("{wire:?}: {e}"));
            r1.unwrap_or_else(|e| panic!("{wire:?}: {e}"));
        }
        let (p0, p1) = (a.params().await.unwrap(), b.params().await.unwrap());
        assert_eq!(p0, p1, "{wire:?}: the two ranks must hold bitwise identical parameters");
        params.push(p0);
        for t in [&*a, &*b] {
            t.gpu().shutdown().await;
        }
    }
    // Compression changed the arithmetic (the comparison is not vacuous) but not the
    // course of training: each tensor moved from its initial value by much more than the
    // two runs differ.
    assert_ne!(params[0], params[1], "bf16 gradients gave bitwise the f32 result");
    let init = spec().init(7);
    let dist = |a: &HostTensor, b: &HostTensor| -> f64 {
        a.data().iter().zip(b.data()).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt()
    };
    for ((f, c), i) in params[0].iter().zip(&params[1]).zip(&init) {
        let (moved, apart) = (dist(f, i), dist(f, c));
        assert!(moved > 0.0 && apart < 0.05 * moved, "moved {moved:e} from init, bf16 and f32 runs {apart:e} apart");
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn checkpoints_resume_and_refuse_another_model() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { checkpoint_dir: Some(dir.path().to_path_buf()), ..config(16) };
    let gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
    let mut t = Trainer::new(gpu.clone(), None, spec(), cfg.clone()).await.unwrap();
    let data = Arc::new(Dataset {
        name: "synthetic".into(),
        images: HostTensor::random([40, 1, 12, 12], 3).into_data(),
        labels: (0..40).map(|i| i % 10).collect(),
        sample: [1, 12, 12],
        classes: 10,
    });
    t.train_epoch(&data, |_| {}).await.unwrap();
    let saved = t.checkpoint(Default::default()).await.unwrap().unwrap();
    assert!(saved.join("model.safetensors").exists());
    let params = t.params().await.unwrap();

    let resumed = Trainer::new(gpu.clone(), None, spec(), TrainConfig { resume: true, ..cfg.clone() }).await.unwrap();
    assert_eq!((resumed.epoch(), resumed.step_count()), (1, 3));
    assert_eq!(resumed.params().await.unwrap(), params);

    // The same checkpoint for a model with other shapes is refused, naming the parameter.
    let other = ModelSpec::reference_cnn(3, 12, 12, 10);
    let e =
        Trainer::new(gpu.clone(), None, other, TrainConfig { resume: true, ..cfg }).await.err().unwrap().to_string();
    assert!(e.contains("parameter conv1.weight has shape [64,1,3,3], model reference-cnn expects [64,3,3,3]"), "{e}");
    gpu.shutdown().await;
}

#[test]
fn models_that_do_not_fit_their_data_fail_before_training() {
    let e = ModelSpec::reference_cnn(1, 28, 28, 10).check_data([3, 32, 32], 10).unwrap_err().to_string();
    assert_eq!(
        e,
        "model reference-cnn does not fit the data: it takes samples of [1, 28, 28] (C, H, W), the data has [3, 32, 32]"
    );
    let e = ModelSpec::reference_cnn(1, 28, 28, 10).check_data([1, 28, 28], 100).unwrap_err().to_string();
    assert!(e.contains("it predicts 10 classes, the data has 100"), "{e}");
    let mut bad = ModelSpec::reference_cnn(1, 28, 28, 10);
    bad.layers[7].1 = Layer::Linear { in_features: 6000, out_features: 512 };
    let e = bad.shapes(4).unwrap_err().to_string();
    assert_eq!(
        e,
        "model reference-cnn: layer fc1: linear: input [4,6272] has 6272 features, weight [512,6000] expects 6000"
    );
    // The same definition works for CIFAR-shaped input.
    ModelSpec::reference_cnn(3, 32, 32, 10).check_data([3, 32, 32], 10).unwrap();
}
