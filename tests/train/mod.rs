//! Data-parallel training: equivalence with a single rank, checkpoints, and models that
//! do not fit their data.

use std::sync::Arc;
use std::time::Duration;

use strata_collective::{Compression, Group, GroupOptions};
use strata_gpu::{ConvAlgo, GpuHandle, GpuOptions};
use strata_nn::data::{Batch, Dataset};
use strata_nn::{Layer, ModelSpec, Optimizer};
use strata_tensor::cpu::{AdamParams, SgdParams};
use strata_tensor::{HostTensor, SplitMix64};
use strata_train::{Balance, StepStats, TrainConfig, Trainer};

mod pipeline;

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

    // The comparison's tolerance assumes both runs compute their gradients with the same
    // arithmetic up to summation order. Winograd rounds differently at each batch size
    // (and `Auto` may choose differently for 32 and 64), and Adam turns the relative
    // error of a near-zero gradient into a parameter difference of up to its learning
    // rate; so both runs use im2col here, and the kernel tests hold Winograd to the
    // CPU reference.
    let options = GpuOptions { conv_algo: Some(ConvAlgo::Im2col), ..common::pinned_gpu_options() };
    let solo_gpu = GpuHandle::start(&options).unwrap();
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
        let gpu = GpuHandle::start(&options).unwrap();
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

fn synthetic(n: usize, seed: u64) -> Arc<Dataset> {
    let mut rng = SplitMix64(seed);
    Arc::new(Dataset {
        name: "synthetic".into(),
        images: HostTensor::random([n, 1, 12, 12], seed).into_data(),
        labels: (0..n).map(|_| rng.below(10) as u32).collect(),
        sample: [1, 12, 12],
        classes: 10,
    })
}

/// SGD with momentum: the update is linear in the gradient, so the parameters' distance
/// from single-node training measures the gradients' rounding differences themselves.
/// (Adam's first steps move each parameter by about `lr * sign(g)`, so a rounding-level
/// change of a near-zero gradient can move it by `2 * lr`, and an elementwise comparison
/// of Adam runs is either loose or flaky.)
fn sgd_config(batch: usize, balance: Balance) -> TrainConfig {
    TrainConfig {
        optimizer: Optimizer::Sgd(SgdParams { lr: 0.05, ..Default::default() }),
        balance,
        rebalance_every: 2,
        ..config(batch)
    }
}

/// Largest difference of any parameter from `want`, and the largest distance any
/// parameter of `want` moved from its initial value.
fn distance(got: &[HostTensor], want: &[HostTensor]) -> (f32, f32) {
    let init = spec().init(7);
    let diff = got.iter().zip(want).map(|(g, w)| g.max_abs_diff(w).unwrap()).fold(0.0, f32::max);
    let moved = want.iter().zip(&init).map(|(w, i)| w.max_abs_diff(i).unwrap()).fold(0.0, f32::max);
    (diff, moved)
}

/// One node's epoch on `data` with a global batch of 64 (SGD).
async fn solo_epoch(data: &Arc<Dataset>) -> Vec<HostTensor> {
    let gpu = GpuHandle::start(&common::pinned_gpu_options()).unwrap();
    let mut solo = Trainer::new(gpu.clone(), None, spec(), sgd_config(64, Balance::Equal)).await.unwrap();
    let (_, _, samples, _, _) = solo.train_epoch(data, |_| {}).await.unwrap();
    assert_eq!(samples, data.len());
    let params = solo.params().await.unwrap();
    gpu.shutdown().await;
    params
}

/// Two ranks' epoch on `data` (32 per rank, so a global batch of 64) under `balance`, the
/// second rank on `gpu1`; returns both ranks' parameters and samples per step.
async fn pair_epoch(
    data: &Arc<Dataset>,
    balance: Balance,
    gpu1: GpuOptions,
) -> ([Vec<HostTensor>; 2], [Vec<usize>; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let mut trainers = Vec::new();
    for (r, node) in nodes.iter().enumerate() {
        let g = Group::form(node.clone(), 2, Duration::from_secs(10), GroupOptions::default()).await.unwrap();
        let gpu = GpuHandle::start(&if r == 1 { gpu1.clone() } else { common::pinned_gpu_options() }).unwrap();
        trainers.push(Trainer::new(gpu, Some(g), spec(), sgd_config(32, balance.clone())));
    }
    let (a, b) = (trainers.remove(0), trainers.remove(0));
    let (a, b) = tokio::join!(a, b);
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    let (mut s0, mut s1) = (Vec::new(), Vec::new());
    let (r0, r1) = tokio::join!(
        a.train_epoch(data, |s: &StepStats| s0.push(s.samples)),
        b.train_epoch(data, |s: &StepStats| s1.push(s.samples))
    );
    assert_eq!(r0.unwrap().2, data.len());
    assert_eq!(r1.unwrap().2, data.len());
    let params = [a.params().await.unwrap(), b.params().await.unwrap()];
    assert_eq!(params[0], params[1], "the two ranks must hold bitwise identical parameters");
    for t in [&a, &b] {
        t.gpu().shutdown().await;
    }
    for n in &nodes {
        n.shutdown().await;
    }
    (params, [s0, s1])
}

/// How close weighted shares come to one node on the global batch: every parameter
/// within 1e-5 of the distance the parameters moved. Each rank's gradient sums its own
/// slice of the batch and the all-reduce adds the two, so the summation order differs
/// from one node's and the gradients differ by rounding (a few ulp, relative 1e-7 to
/// 1e-6 after the cancellation in a sum of 64 terms); three SGD steps carry that into the
/// parameters. The unweighted mean of a 48 and a 16 sample mean misses by far more.
const SHARE_TOLERANCE: f32 = 1e-5;

#[actix_rt::test]
async fn shares_of_3_to_1_weighted_by_size_train_as_one_node_on_the_global_batch() {
    if common::gpu().is_none() {
        return;
    }
    // 136 samples: global batches of 64, 64 and 8.
    let data = synthetic(136, 11);
    let want = solo_epoch(&data).await;
    let (params, samples) = pair_epoch(&data, Balance::Fixed(vec![3.0, 1.0]), common::pinned_gpu_options()).await;
    assert_eq!(samples, [vec![48, 48, 6], vec![16, 16, 2]]);
    let (diff, moved) = distance(&params[0], &want);
    eprintln!("3:1 shares vs one node: max |diff| {diff:e}, parameters moved up to {moved:e}");
    assert!(moved > 1e-2, "training moved the parameters (by {moved})");
    assert!(diff <= SHARE_TOLERANCE * moved, "3:1 shares differ from one node by {diff:e} (moved {moved:e})");

    // The same slices averaged without weights (each rank's mean counted once) are not
    // the global batch's gradient: the comparison above can fail.
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let mut unweighted = Vec::new();
    for node in &nodes {
        let g = Group::form(node.clone(), 2, Duration::from_secs(10), GroupOptions::default()).await.unwrap();
        let gpu = GpuHandle::start(&common::pinned_gpu_options()).unwrap();
        unweighted.push(Trainer::new(gpu, Some(g), spec(), sgd_config(32, Balance::Equal)));
    }
    let (a, b) = (unweighted.remove(0), unweighted.remove(0));
    let (a, b) = tokio::join!(a, b);
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    let order = strata_nn::data::DistributedSampler::new(data.len(), 0, 1, 7, true).indices(0);
    for global in order.chunks(64) {
        let cut = global.len() * 3 / 4;
        let (r0, r1) = tokio::join!(a.step(data.batch(&global[..cut])), b.step(data.batch(&global[cut..])));
        r0.unwrap();
        r1.unwrap();
    }
    let (diff_unweighted, _) = distance(&a.params().await.unwrap(), &want);
    eprintln!("unweighted 3:1 vs one node: max |diff| {diff_unweighted:e}");
    assert!(diff_unweighted > 100.0 * SHARE_TOLERANCE * moved, "unweighted means differ by only {diff_unweighted:e}");
    // A share that does not fit the global batch is refused.
    let e = a.step_share(batch(8, 1), 4).await.unwrap_err().to_string();
    assert_eq!(e, "training: rank 0 of 2 cannot take 8 samples as its share of a global batch of 4");
    for t in [&a, &b] {
        t.gpu().shutdown().await;
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Measured shares: whatever split the timings give (they are never asserted), every
/// global batch is divided without loss or overlap, the replicas agree, and training
/// equals one node's. The second rank runs on the GL adapter when there is one (llvmpipe
/// next to lavapipe here, several times slower), so the split really moves.
#[actix_rt::test]
async fn measured_shares_divide_every_global_batch_and_train_as_one_node() {
    if common::gpu().is_none() {
        return;
    }
    // Six global batches of 64 and one of 8: rebalancing after steps 2, 4 and 6.
    let data = synthetic(392, 12);
    let want = solo_epoch(&data).await;
    let gl = strata_gpu::AdapterRequest { backend: Some("gl".into()), adapter: None };
    let gpu1 = match strata_gpu::list_adapters(&gl) {
        Ok(a) if !a.is_empty() => GpuOptions { adapter: gl, ..common::pinned_gpu_options() },
        _ => common::pinned_gpu_options(),
    };
    let (params, samples) = pair_epoch(&data, Balance::Measured, gpu1).await;
    let sums: Vec<usize> = samples[0].iter().zip(&samples[1]).map(|(a, b)| a + b).collect();
    assert_eq!(sums, [64, 64, 64, 64, 64, 64, 8], "samples per step: {samples:?}");
    assert_eq!(&samples[0][..2], [32, 32], "the first round is split equally");
    eprintln!("measured shares per step: {samples:?}");
    let (diff, moved) = distance(&params[0], &want);
    eprintln!("measured shares vs one node: max |diff| {diff:e}, parameters moved up to {moved:e}");
    assert!(diff <= SHARE_TOLERANCE * moved, "measured shares differ from one node by {diff:e} (moved {moved:e})");
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
            let gpu = GpuHandle::start(&common::pinned_gpu_options()).unwrap();
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
    let gpu = GpuHandle::start(&common::pinned_gpu_options()).unwrap();
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

/// Ranks may choose different convolution algorithms (each times its own device): their
/// local gradients then round differently, but parameters only see the all-reduced
/// average, so the replicas stay bitwise identical (checked by the trainer every step
/// and here at the end).
#[actix_rt::test]
async fn replicas_stay_identical_when_ranks_compute_convolutions_differently() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let mut trainers = Vec::new();
    for (node, algo) in nodes.iter().zip([ConvAlgo::Winograd, ConvAlgo::Im2col]) {
        let g = Group::form(node.clone(), 2, Duration::from_secs(10), GroupOptions::default()).await.unwrap();
        let gpu = GpuHandle::start(&GpuOptions { conv_algo: Some(algo), ..common::pinned_gpu_options() }).unwrap();
        trainers.push(Trainer::new(gpu, Some(g), spec(), config(16)));
    }
    let (a, b) = (trainers.remove(0), trainers.remove(0));
    let (mut a, mut b) = tokio::join!(a, b);
    let (a, b) = (a.as_mut().unwrap(), b.as_mut().unwrap());
    for s in 0..3 {
        let (h0, h1) = halves(&batch(32, 200 + s));
        let (r0, r1) = tokio::join!(a.step(h0), b.step(h1));
        r0.unwrap();
        r1.unwrap();
    }
    let (p0, p1) = (a.params().await.unwrap(), b.params().await.unwrap());
    assert_eq!(p0, p1, "the two ranks must hold bitwise identical parameters");
    for t in [&*a, &*b] {
        t.gpu().shutdown().await;
    }
    for n in &nodes {
        n.shutdown().await;
    }
}
