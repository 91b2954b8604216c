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
use strata_train::{Balance, StepTimes, TrainConfig, Trainer};

use crate::cli::node::NodeArgs;

/// Settings of `strata train`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Directory with IDX (MNIST, Fashion-MNIST) or CIFAR-10 binary files.
    #[arg(long, default_value = data::FASHION_MNIST_DIR)]
    pub data: PathBuf,
    /// Model: reference-cnn, or mlp (6 hidden layers of 512 features, whose equal layers
    /// make balanced pipeline stages).
    #[arg(long, default_value = "reference-cnn")]
    pub model: String,
    /// Epochs to train (counting epochs already in a resumed checkpoint).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Samples per step on each worker.
    #[arg(long, default_value_t = 64, value_parser = crate::cli::args::count(1, 1 << 20))]
    pub batch_size: usize,
    /// How each step's global batch (batch size x nodes) is divided between nodes:
    /// `equal` (each takes its shard, as PyTorch's DistributedSampler deals it),
    /// `measured` (in proportion to each node's measured throughput, re-measured as
    /// training goes, for nodes of different speed), or fixed weights such as `3:1`.
    /// Gradients are weighted by each node's share, so the update is that of one node on
    /// the global batch. Default `equal`: the run then depends on the seed alone, never on
    /// timings.
    #[arg(long, default_value = "equal", value_parser = parse_balance)]
    pub balance: Balance,
    /// With `--balance measured`, re-decide the shares every N steps.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rebalance_every: u64,
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
    /// Pipeline parallelism.
    #[command(flatten)]
    pub pipeline: crate::cli::pipeline::PipelineArgs,
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
    /// How the global batch was divided (`--balance`).
    #[serde(default)]
    pub balance: String,
    /// Samples per node of the last global batch.
    #[serde(default)]
    pub split: Vec<usize>,
    /// With `--balance measured`, each node's smoothed throughput (samples/s of its own
    /// forward and backward passes).
    #[serde(default)]
    pub rates: Vec<f64>,
    /// Mean compute seconds per step of each node.
    #[serde(default)]
    pub node_compute_seconds: Vec<f64>,
    /// Mean exposed all-reduce seconds per step of each node (waiting for the others).
    #[serde(default)]
    pub node_comm_exposed_seconds: Vec<f64>,
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    s.parse().map_err(|e: strata_train::TrainError| e.to_string())
}

pub(crate) fn optimizer(args: &TrainArgs) -> Result<Optimizer> {
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
    strata_train::balance::Balancer::new(&args.balance, world)?;
    let (mut train, mut test) =
        data::load_dir(&args.data).with_context(|| format!("loading data from {}", args.data.display()))?;
    if let Some(n) = args.train_limit {
        train = train.truncate(n);
    }
    if let Some(n) = args.test_limit {
        test = test.truncate(n);
    }
    let [c, h, w] = train.sample;
    let spec = match args.model.as_str() {
        "reference-cnn" => ModelSpec::reference_cnn(c, h, w, train.classes),
        "mlp" => ModelSpec::mlp(train.sample, 512, 6, train.classes),
        other => bail!("unknown model {other:?} (reference-cnn or mlp)"),
    };
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
    if args.pipeline.pipeline_stages.is_some() {
        let result = crate::cli::pipeline::run(args, group, gpu, spec, train, test, started).await;
        if let Some(n) = node {
            n.shutdown().await;
        }
        return result;
    }
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let config = TrainConfig {
        batch: args.batch_size,
        balance: args.balance.clone(),
        rebalance_every: args.rebalance_every,
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
            "training {} on {} ({} train / {} test samples) on {} node(s), {} per node per step ({} split), {} on {}",
            trainer.model().spec().name,
            args.data.display(),
            train.len(),
            test.len(),
            world,
            args.batch_size,
            args.balance,
            args.optimizer,
            gpu.info().name
        );
        if trainer.epoch() > 0 {
            println!("resumed from a checkpoint after epoch {} (step {})", trainer.epoch(), trainer.step_count());
        }
    }
    if let Some(steps) = args.bench_steps {
        return bench(trainer, &train, steps, world, started, args).await;
    }
    let mut history: Vec<(u64, f64, f64, f64)> = Vec::new();
    let mut step_losses: Vec<f32> = Vec::new();
    while trainer.epoch() < args.epochs {
        let epoch = trainer.epoch() + 1;
        let per_rank = train.len().div_ceil(world);
        let bar = (rank == 0 && !args.json).then(|| progress(per_rank as u64 * world as u64, epoch, args.epochs));
        let mut done = 0u64;
        let t0 = Instant::now();
        let global = (args.batch_size * world) as u64;
        let (loss, acc, samples, train_time, times) = trainer
            .train_epoch(&train, |s| {
                step_losses.push(s.loss);
                // Every step takes one global batch, however it is divided.
                done = (done + global).min(per_rank as u64 * world as u64);
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
        crate::cli::plot::training(path, &history, &step_losses)?;
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

pub(crate) fn progress(total: u64, epoch: u64, epochs: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "epoch {epoch}/{epochs} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}}]"
    ))
    .expect("valid template");
    bar.set_style(style);
    bar
}

async fn bench(
    trainer: &mut Trainer,
    train: &Arc<Dataset>,
    steps: u64,
    world: usize,
    started: Instant,
    args: &TrainArgs,
) -> Result<()> {
    let (rank, _) = trainer.rank_world();
    let batch = trainer_batch(trainer);
    // Measured shares settle after two rounds of measurement.
    let warmup = if args.balance == Balance::Measured { 2 + 2 * args.rebalance_every } else { 2 };
    let mut ends = Vec::new();
    let mut times = StepTimes::default();
    trainer
        .train_steps(train, steps + warmup, |s| {
            ends.push(Instant::now());
            if ends.len() as u64 > warmup {
                times += s.times;
            }
        })
        .await?;
    if (ends.len() as u64) < steps + warmup {
        bail!("the benchmark needs more training samples: {} steps of {} ran", ends.len(), batch * world);
    }
    let timed = ends[ends.len() - 1] - ends[warmup as usize - 1];
    if std::env::var_os("STRATA_PROFILE").is_some() {
        let profile = trainer_gpu_profile(trainer).await?;
        for k in profile {
            eprintln!(
                "  {:<56} {:>6} calls {:>10.1} ms wall {:>10.1} ms cpu {:>8.2} ms cpu fastest call",
                k.kernel,
                k.calls,
                k.wall_s * 1e3,
                k.cpu_s * 1e3,
                k.cpu_min_s * 1e3
            );
        }
    }
    if rank == 0 {
        // What STRATA_CONV_ALGO=auto chose for each layer, on timings of this process.
        for c in trainer_conv_choices(trainer).await? {
            eprintln!(
                "conv algorithm for {}: {} (im2col {:.1} ms, winograd {:.1} ms)",
                c.case,
                c.algo.name(),
                c.im2col_s * 1e3,
                c.winograd_s * 1e3
            );
        }
    }
    // Every node's own split of its step, for the report.
    let mine =
        [(times.compute.as_secs_f64() / steps as f64) as f32, (times.comm_exposed.as_secs_f64() / steps as f64) as f32];
    let per_node = match trainer.group().filter(|g| g.world() > 1) {
        Some(g) => g.all_gather(&mine).await?,
        None => mine.to_vec(),
    };
    if rank == 0 {
        let n = steps as f64;
        let line = BenchLine {
            world,
            samples_per_second: (batch * world) as f64 * n / timed.as_secs_f64(),
            step_seconds: timed.as_secs_f64() / n,
            compute_seconds: times.compute.as_secs_f64() / n,
            comm_exposed_seconds: times.comm_exposed.as_secs_f64() / n,
            data_seconds: times.data.as_secs_f64() / n,
            first_step_seconds: ends[0].duration_since(started).as_secs_f64(),
            balance: args.balance.to_string(),
            split: trainer.split(),
            rates: trainer.balancer().rates().map(<[f64]>::to_vec).unwrap_or_default(),
            node_compute_seconds: per_node.chunks_exact(2).map(|c| f64::from(c[0])).collect(),
            node_comm_exposed_seconds: per_node.chunks_exact(2).map(|c| f64::from(c[1])).collect(),
        };
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}

async fn trainer_gpu_profile(t: &Trainer) -> Result<Vec<strata_gpu::KernelTime>> {
    Ok(t.gpu().with(|ex| ex.gpu().profile()).await?)
}

async fn trainer_conv_choices(t: &Trainer) -> Result<Vec<strata_gpu::ConvChoice>> {
    Ok(t.gpu().with(|ex| ex.gpu().conv_choices()).await?)
}

fn trainer_batch(t: &Trainer) -> usize {
    t.batch_size()
}
