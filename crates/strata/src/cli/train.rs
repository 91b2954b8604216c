//! `strata train` and `strata demo`: data-parallel training of the reference CNN.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use strata_collective::{Group, GroupOptions};
use strata_gpu::{GpuHandle, GpuOptions};
use strata_nn::data::{self, Dataset};
use strata_nn::{ModelSpec, Optimizer};
use strata_tensor::cpu::{AdamParams, SgdParams};
use strata_train::{StepTimes, TrainConfig, Trainer};

use crate::cli::node::NodeArgs;

/// Settings of `strata train`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Directory with IDX (MNIST, Fashion-MNIST) or CIFAR-10 binary files.
    #[arg(long, default_value = data::FASHION_MNIST_DIR)]
    pub data: PathBuf,
    /// Model (only the reference CNN for now).
    #[arg(long, default_value = "reference-cnn")]
    pub model: String,
    /// Epochs to train (counting epochs already in a resumed checkpoint).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Samples per step on each worker.
    #[arg(long, default_value_t = 64, value_parser = crate::cli::args::count(1, 1 << 20))]
    pub batch_size: usize,
    /// `adam` or `sgd` (with momentum).
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// Learning rate (default: 1e-3 for Adam, 1e-2 for SGD).
    #[arg(long, value_parser = crate::cli::args::finite_positive(1e3))]
    pub lr: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, value_parser = crate::cli::args::finite_in(0.0, 1.0))]
    pub momentum: f32,
    /// Seed of the shuffling and of the initialisation (`--seed` names the member to
    /// join through, as for `strata node`).
    #[arg(long, default_value_t = 0)]
    pub shuffle_seed: u64,
    /// Number of nodes (default: WORLD_SIZE, else 1).
    #[arg(long, value_parser = crate::cli::args::count(1, u64::from(u32::MAX)))]
    pub nodes: Option<usize>,
    /// Directory for one checkpoint per epoch (safetensors).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the latest checkpoint in --checkpoint-dir.
    #[arg(long)]
    pub resume: bool,
    /// Train on the first N training samples only.
    #[arg(long, value_parser = crate::cli::args::positive())]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test samples only.
    #[arg(long, value_parser = crate::cli::args::positive())]
    pub test_limit: Option<usize>,
    /// Write a PNG plot of loss and accuracy per epoch here (rank 0).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Compare replica checksums every N steps (0: never).
    #[arg(long, default_value_t = 50)]
    pub checksum_every: u64,
    /// Gradients on the wire as bf16 or fp16 (half the bytes), with error feedback; none
    /// keeps f32.
    #[arg(long, default_value = "none")]
    pub compress: strata_collective::Compression,
    /// Stop after this many steps of the first epoch and report throughput (benchmark).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub bench_steps: Option<u64>,
    /// One JSON object per epoch instead of text.
    #[arg(long)]
    pub json: bool,
    /// Cluster settings for multi-node training (certificates, torchrun variables).
    #[command(flatten)]
    pub node: NodeArgs,
}

/// One epoch as printed with `--json`.
#[derive(Serialize)]
struct EpochLine {
    epoch: u64,
    train_loss: f64,
    train_accuracy: f64,
    test_loss: f64,
    test_accuracy: f64,
    samples: usize,
    train_seconds: f64,
    eval_seconds: f64,
    samples_per_second: f64,
}

/// Throughput report of `--bench-steps`.
#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct BenchLine {
    /// Nodes.
    pub world: usize,
    /// Samples per second over all nodes (timed steps only).
    pub samples_per_second: f64,
    /// Mean seconds per step.
    pub step_seconds: f64,
    /// Of which GPU work and transfers.
    pub compute_seconds: f64,
    /// Of which all-reduce not hidden by the backward pass.
    pub comm_exposed_seconds: f64,
    /// Of which waiting for data.
    pub data_seconds: f64,
    /// From process start to the end of the first step.
    pub first_step_seconds: f64,
}

fn optimizer(args: &TrainArgs) -> Result<Optimizer> {
    Ok(match args.optimizer.as_str() {
        "adam" => Optimizer::Adam(AdamParams { lr: args.lr.unwrap_or(1e-3), ..Default::default() }),
        "sgd" => {
            Optimizer::Sgd(SgdParams { lr: args.lr.unwrap_or(1e-2), momentum: args.momentum, ..Default::default() })
        }
        other => bail!("unknown optimizer {other:?} (adam or sgd)"),
    })
}

/// Runs `strata train` on this node.
pub async fn run(args: TrainArgs, gpu_options: GpuOptions, started: Instant) -> Result<()> {
    let world = match (args.nodes, std::env::var("WORLD_SIZE")) {
        (Some(n), _) => n,
        (None, Ok(v)) => match v.parse::<u32>() {
            Ok(n) if n > 0 => n as usize,
            _ => bail!("WORLD_SIZE={v:?} is not a node count (a number from 1)"),
        },
        (None, Err(_)) => 1,
    };
    // Cluster settings are checked before the data loads, so a mistake there fails at once.
    let node_config = if world > 1 { Some(args.node.config()?) } else { None };
    let (mut train, mut test) =
        data::load_dir(&args.data).with_context(|| format!("loading data from {}", args.data.display()))?;
    if let Some(n) = args.train_limit {
        train = train.truncate(n);
    }
    if let Some(n) = args.test_limit {
        test = test.truncate(n);
    }
    if args.model != "reference-cnn" {
        bail!("unknown model {:?} (reference-cnn)", args.model);
    }
    let [c, h, w] = train.sample;
    let spec = ModelSpec::reference_cnn(c, h, w, train.classes);
    // A model that does not fit the data fails here, before any step.
    spec.check_data(train.sample, train.classes)?;
    let gpu = GpuHandle::start(&gpu_options).context("opening the GPU")?;
    let result = train_on(&args, node_config, &gpu, world, spec, train, test, started).await;
    // Release the device before the process exits (also after an error), so exit does not
    // race the driver's teardown.
    gpu.shutdown().await;
    result
}

async fn train_on(
    args: &TrainArgs,
    node_config: Option<strata_net::NodeConfig>,
    gpu: &GpuHandle,
    world: usize,
    spec: ModelSpec,
    train: Dataset,
    test: Dataset,
    started: Instant,
) -> Result<()> {
    let (group, node) = if let Some(mut config) = node_config {
        config.world_size = Some(u32::try_from(world).context("node count")?);
        let (node, _) = crate::cli::node::start(config, None).await?;
        let g = Group::form(node.clone(), world, Duration::from_secs(60), GroupOptions::default()).await?;
        (Some(g), Some(node))
    } else {
        (None, None)
    };
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let config = TrainConfig {
        batch: args.batch_size,
        optimizer: optimizer(args)?,
        seed: args.shuffle_seed,
        checkpoint_dir: args.checkpoint_dir.clone(),
        resume: args.resume,
        checksum_every: args.checksum_every,
        compression: args.compress,
        ..Default::default()
    };
    let mut trainer = Trainer::new(gpu.clone(), group, spec, config).await?;
    let result = epochs(args, &mut trainer, gpu, world, rank, train, test, started).await;
    if let Some(n) = node {
        n.shutdown().await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn epochs(
    args: &TrainArgs,
    trainer: &mut Trainer,
    gpu: &GpuHandle,
    world: usize,
    rank: usize,
    train: Dataset,
    test: Dataset,
    started: Instant,
) -> Result<()> {
    let (train, test) = (Arc::new(train), Arc::new(test));
    if rank == 0 && !args.json && args.bench_steps.is_none() {
        println!(
            "training {} on {} ({} train / {} test samples) on {} node(s), {} per node per step, {} on {}",
            trainer.model().spec().name,
            args.data.display(),
            train.len(),
            test.len(),
            world,
            args.batch_size,
            args.optimizer,
            gpu.info().name
        );
        if trainer.epoch() > 0 {
            println!("resumed from a checkpoint after epoch {} (step {})", trainer.epoch(), trainer.step_count());
        }
    }
    if let Some(steps) = args.bench_steps {
        return bench(trainer, &train, steps, world, started).await;
    }
    let mut history: Vec<(u64, f64, f64, f64)> = Vec::new();
    while trainer.epoch() < args.epochs {
        let epoch = trainer.epoch() + 1;
        let per_rank = train.len().div_ceil(world);
        let bar = (rank == 0 && !args.json).then(|| progress(per_rank as u64 * world as u64, epoch, args.epochs));
        let mut done = 0u64;
        let t0 = Instant::now();
        let (loss, acc, samples, train_time, times) = trainer
            .train_epoch(&train, |s| {
                done += (s.samples * world) as u64;
                if let Some(b) = &bar {
                    b.set_position(done);
                    b.set_message(format!(
                        "loss {:.4}  {:.0} samples/s",
                        s.loss,
                        done as f64 / t0.elapsed().as_secs_f64()
                    ));
                }
            })
            .await?;
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let e0 = Instant::now();
        let (test_loss, test_acc) = trainer.evaluate(&test).await?;
        let eval_time = e0.elapsed();
        let mut info = HashMap::new();
        info.insert("optimizer".into(), args.optimizer.clone());
        info.insert("data".into(), args.data.display().to_string());
        let saved = trainer.checkpoint(info).await?;
        history.push((epoch, loss, test_loss, test_acc));
        if rank == 0 {
            let rate = samples as f64 / train_time.as_secs_f64();
            if args.json {
                let line = EpochLine {
                    epoch,
                    train_loss: loss,
                    train_accuracy: acc,
                    test_loss,
                    test_accuracy: test_acc,
                    samples,
                    train_seconds: train_time.as_secs_f64(),
                    eval_seconds: eval_time.as_secs_f64(),
                    samples_per_second: rate,
                };
                println!("{}", serde_json::to_string(&line)?);
            } else {
                println!(
                    "epoch {epoch}: train loss {loss:.4} accuracy {:.2}% | test loss {test_loss:.4} accuracy {:.2}% | {samples} samples in {:.1} s ({rate:.0} samples/s; compute {:.0}%, exposed all-reduce {:.0}%, data {:.0}%), eval {:.1} s",
                    acc * 100.0,
                    test_acc * 100.0,
                    train_time.as_secs_f64(),
                    share(&times, times.compute),
                    share(&times, times.comm_exposed),
                    share(&times, times.data),
                    eval_time.as_secs_f64()
                );
                if let Some(p) = saved {
                    println!("checkpoint {}", p.display());
                }
            }
        }
    }
    if rank == 0
        && let Some(path) = &args.plot
    {
        crate::cli::plot::loss_and_accuracy(path, &history)?;
        if !args.json {
            println!("plot {}", path.display());
        }
    }
    Ok(())
}

fn share(t: &StepTimes, part: Duration) -> f64 {
    let total = (t.compute + t.comm_exposed + t.data).as_secs_f64();
    if total > 0.0 { part.as_secs_f64() / total * 100.0 } else { 0.0 }
}

fn progress(total: u64, epoch: u64, epochs: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "epoch {epoch}/{epochs} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}}]"
    ))
    .expect("valid template");
    bar.set_style(style);
    bar
}

async fn bench(trainer: &mut Trainer, train: &Arc<Dataset>, steps: u64, world: usize, started: Instant) -> Result<()> {
    let (rank, _) = trainer.rank_world();
    let sampler = data::DistributedSampler::new(train.len(), rank, world, 0, true);
    let indices = sampler.indices(0);
    let batch = trainer_batch(trainer);
    let loader = data::Loader::new(train.clone(), indices, batch, 4);
    let mut times = StepTimes::default();
    let mut first = None;
    let mut timed = Duration::ZERO;
    let warmup = 2;
    for i in 0..steps + warmup {
        let t = Instant::now();
        let b = loader.next_batch().context("the benchmark needs more training samples")?;
        let waited = t.elapsed();
        let mut s = trainer.step(b).await?;
        s.times.data = waited;
        if first.is_none() {
            first = Some(started.elapsed());
        }
        if i >= warmup {
            times += s.times;
            timed += t.elapsed();
        }
    }
    if std::env::var_os("STRATA_PROFILE").is_some() {
        let profile = trainer_gpu_profile(trainer).await?;
        for (kernel, calls, secs) in profile {
            eprintln!("  {kernel:<36} {calls:>6} calls {:>10.1} ms", secs * 1e3);
        }
    }
    if rank == 0 {
        let n = steps as f64;
        let line = BenchLine {
            world,
            samples_per_second: (batch * world) as f64 * n / timed.as_secs_f64(),
            step_seconds: timed.as_secs_f64() / n,
            compute_seconds: times.compute.as_secs_f64() / n,
            comm_exposed_seconds: times.comm_exposed.as_secs_f64() / n,
            data_seconds: times.data.as_secs_f64() / n,
            first_step_seconds: first.unwrap_or_default().as_secs_f64(),
        };
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

async fn trainer_gpu_profile(t: &Trainer) -> Result<Vec<(String, u64, f64)>> {
    Ok(t.gpu().with(|ex| ex.gpu().profile()).await?)
}

fn trainer_batch(t: &Trainer) -> usize {
    t.batch_size()
}
