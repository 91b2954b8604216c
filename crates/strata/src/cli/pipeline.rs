//! `strata train --pipeline-stages S`: pipeline-parallel training on torchrun-style
//! processes (rank `r * S + s` is stage `s` of replica `r`), `strata demo --pipeline`, and
//! `strata bench pipeline`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use strata_collective::Group;
use strata_gpu::GpuHandle;
use strata_nn::ModelSpec;
use strata_nn::data::Dataset;
use strata_train::pipeline::{PipelineConfig, PipelineTrainer, Schedule};

use crate::cli::bench::Figure;
use crate::cli::train::TrainArgs;

/// Pipeline settings of `strata train`.
#[derive(clap::Args, Clone, Debug)]
pub struct PipelineArgs {
    /// Cut the model into this many stages, one per node process (the node count must be a
    /// multiple: S stages times R replicas, DP x PP).
    #[arg(long, value_parser = crate::cli::args::count(1, 64))]
    pub pipeline_stages: Option<usize>,
    /// Micro-batches per step; `--batch-size` (per replica) is split among them.
    #[arg(long, default_value_t = 4, value_parser = crate::cli::args::count(1, 4096))]
    pub micro_batches: usize,
    /// Pipeline schedule: gpipe, 1f1b or zb (zero bubble, ZB-H1).
    #[arg(long, default_value = "1f1b", value_parser = Schedule::parse)]
    pub schedule: Schedule,
    /// Layers that start stages 1.. (S - 1 names, e.g. conv2,fc1); by default the stages
    /// are balanced by each layer's time measured on each stage's own adapter.
    #[arg(long, value_delimiter = ',')]
    pub split: Vec<String>,
    /// Memory each stage may use (parameters, gradients, optimiser state and the
    /// activations it holds), MiB; the balanced cut keeps to it.
    #[arg(long, value_parser = crate::cli::args::count(1, 1 << 30))]
    pub stage_memory_mib: Option<usize>,
    /// Write the pipeline's timeline here as Chrome trace JSON (Perfetto,
    /// chrome://tracing), and a Gantt chart of it next to it (same name, .png).
    #[arg(long)]
    pub timeline: Option<PathBuf>,
}

/// The report of `strata train --pipeline-stages S --bench-steps N --json` (rank 0).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PipelineBenchLine {
    /// Stages.
    pub stages: usize,
    /// Replicas.
    pub replicas: usize,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// The schedule's name.
    pub schedule: String,
    /// Measured idle fraction over the timed steps.
    pub bubble: f64,
    /// The schedule's formula for it.
    pub formula: f64,
    /// Samples per second over all replicas.
    pub samples_per_s: f64,
    /// Mean seconds per step.
    pub step_seconds: f64,
    /// Most micro-batches each stage held (replica 0).
    pub activation_peak: Vec<usize>,
    /// The cut: the layers that start stages 1...
    pub cut: Vec<String>,
}

/// Runs pipeline training on this node (the group is formed; `None` on one node).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    args: &TrainArgs,
    group: Option<Group>,
    gpu: &GpuHandle,
    spec: ModelSpec,
    train: Dataset,
    test: Dataset,
    started: Instant,
) -> Result<()> {
    let p = &args.pipeline;
    let stages = p.pipeline_stages.unwrap_or(1);
    let world = group.as_ref().map_or(1, |g| g.world());
    let rank = group.as_ref().map_or(0, |g| g.rank());
    if !args.batch_size.is_multiple_of(p.micro_batches) {
        bail!(
            "--batch-size {} does not split into {} equal micro-batches (it is the samples per step per replica)",
            args.batch_size,
            p.micro_batches
        );
    }
    let bench = args.bench_steps;
    let config = PipelineConfig {
        stages,
        micro_batches: p.micro_batches,
        micro_batch: args.batch_size / p.micro_batches,
        schedule: p.schedule,
        split: (!p.split.is_empty()).then(|| p.split.clone()),
        stage_memory_bytes: p.stage_memory_mib.map(|m| m as u64 * (1 << 20)),
        optimizer: crate::cli::train::optimizer(args)?,
        seed: args.shuffle_seed,
        checkpoint_dir: args.checkpoint_dir.clone(),
        resume: args.resume,
        timeline_steps: bench.map_or(64, |n| n + 2),
        eval_batch: 250,
    };
    let mut t = PipelineTrainer::new(gpu.clone(), group, spec, config).await?;
    let (train, test) = (Arc::new(train), Arc::new(test));
    if rank == 0 && !args.json && bench.is_none() {
        println!(
            "training {} on {} ({} train / {} test samples) as a {stages}-stage pipeline x {} replica(s) on {world} node(s): schedule {}, {} micro-batches of {} per replica per step, cut before {:?}, {} on {}",
            t.stage().spec().name,
            args.data.display(),
            train.len(),
            test.len(),
            world / stages,
            p.schedule,
            p.micro_batches,
            args.batch_size / p.micro_batches,
            t.cut().names(t.stage().spec()),
            args.optimizer,
            gpu.info().name
        );
        if t.epoch() > 0 {
            println!("resumed from a checkpoint after epoch {} (step {})", t.epoch(), t.step_count());
        }
    }
    if let Some(steps) = bench {
        return bench_steps(&mut t, p.timeline.as_deref(), &train, steps, rank, started).await;
    }
    let mut history: Vec<(u64, f64, f64, f64)> = Vec::new();
    while t.epoch() < args.epochs {
        let epoch = t.epoch() + 1;
        // Rank 0 (stage 0) shows progress; only the last stage knows the loss.
        let bar = (rank == 0 && !args.json).then(|| {
            crate::cli::train::progress((train.len() / t.global_batch() * t.global_batch()) as u64, epoch, args.epochs)
        });
        let t0 = Instant::now();
        let mut done = 0u64;
        let (loss, acc, samples, train_time) = t
            .train_epoch(&train, |s| {
                done += s.samples as u64;
                if let Some(b) = &bar {
                    b.set_position(done);
                    let rate = done as f64 / t0.elapsed().as_secs_f64();
                    b.set_message(if s.loss.is_finite() {
                        format!("loss {:.4}  {rate:.0} samples/s", s.loss)
                    } else {
                        format!("{rate:.0} samples/s")
                    });
                }
            })
            .await?;
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let e0 = Instant::now();
        let (test_loss, test_acc) = t.evaluate(&test).await?;
        let mut info = HashMap::new();
        info.insert("optimizer".into(), args.optimizer.clone());
        info.insert("data".into(), args.data.display().to_string());
        let saved = t.checkpoint(info).await?;
        history.push((epoch, loss, test_loss, test_acc));
        if rank == 0 {
            let rate = samples as f64 / train_time.as_secs_f64();
            if args.json {
                let line = serde_json::json!({
                    "epoch": epoch, "train_loss": loss, "train_accuracy": acc, "test_loss": test_loss,
                    "test_accuracy": test_acc, "samples": samples, "train_seconds": train_time.as_secs_f64(),
                    "eval_seconds": e0.elapsed().as_secs_f64(), "samples_per_second": rate,
                });
                println!("{line}");
            } else {
                println!(
                    "epoch {epoch}: train loss {loss:.4} accuracy {:.2}% | test loss {test_loss:.4} accuracy {:.2}% | {samples} samples in {:.1} s ({rate:.0} samples/s), eval {:.1} s",
                    acc * 100.0,
                    test_acc * 100.0,
                    train_time.as_secs_f64(),
                    e0.elapsed().as_secs_f64()
                );
            }
        }
        if let Some(p) = saved
            && !args.json
        {
            println!("stage {} checkpoint {}", t.position().0, p.display());
        }
    }
    // Every node takes part in gathering; rank 0 writes.
    let steps = t.gather_step_losses().await?;
    let timeline = t.gather_timeline().await?;
    if rank == 0 {
        if let Some(path) = &args.plot {
            crate::cli::plot::training(path, &history, &steps)?;
            if !args.json {
                println!("plot {}", path.display());
            }
        }
        if let Some(path) = &p.timeline {
            write_timeline(path, &timeline)?;
            if !args.json {
                println!("timeline {} and {}", path.display(), path.with_extension("png").display());
            }
        }
    }
    Ok(())
}

/// Writes the Chrome trace and its Gantt chart (`.png` next to it).
pub fn write_timeline(path: &Path, timeline: &strata_train::pipeline::Timeline) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, timeline.chrome_trace()).with_context(|| format!("writing {}", path.display()))?;
    crate::cli::plot::timeline(&path.with_extension("png"), timeline)
}

async fn bench_steps(
    t: &mut PipelineTrainer,
    timeline_path: Option<&Path>,
    train: &Arc<Dataset>,
    steps: u64,
    rank: usize,
    started: Instant,
) -> Result<()> {
    let order: Vec<usize> = (0..train.len()).collect();
    let g = t.global_batch();
    let warmup = 2;
    let total = (steps + warmup) as usize;
    if order.len() < total * g {
        bail!("the benchmark needs {} training samples, the data has {}", total * g, order.len());
    }
    let mut timed = Duration::ZERO;
    for k in 0..total {
        let s = Instant::now();
        t.train_step(train, &order[k * g..(k + 1) * g]).await?;
        if k as u64 >= warmup {
            timed += s.elapsed();
        }
    }
    let timeline = t.gather_timeline().await?;
    let peaks = timeline.activation_peaks();
    let c = t.config().clone();
    if rank == 0 {
        if let Some(path) = timeline_path {
            write_timeline(path, &timeline)?;
        }
        let b = timeline.bubble(warmup).context("no timed steps")?;
        let line = PipelineBenchLine {
            stages: c.stages,
            replicas: t.position().3,
            micro_batches: c.micro_batches,
            schedule: c.schedule.name().into(),
            bubble: b.fraction,
            formula: c.schedule.bubble_formula(c.stages, c.micro_batches),
            samples_per_s: (g as f64 * steps as f64) / timed.as_secs_f64(),
            step_seconds: timed.as_secs_f64() / steps as f64,
            activation_peak: peaks.first().cloned().unwrap_or_default(),
            cut: t.cut().names(t.stage().spec()),
        };
        println!("{}", serde_json::to_string(&line)?);
        tracing::debug!("first step after {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// One case of `strata bench pipeline`: a [`Figure`] with the pipeline's extra keys.
#[derive(Serialize, Debug, Clone)]
pub struct PipelineFigure {
    /// The common fields: `value` is the measured bubble, `reference_value` the formula.
    #[serde(flatten)]
    pub figure: Figure,
    /// Samples per second over the pipeline.
    pub samples_per_s: f64,
    /// Most micro-batches each stage held at once.
    pub activation_peak: Vec<usize>,
}

/// Writes a synthetic labelled dataset of `n` samples of 1x24x32 (768 features) as IDX.
///
/// 768 input features make the stages equal: the first layer (768x512, 1.5 units of
/// work) needs no input gradient, so stage 0's forward, weight gradient and input
/// gradient add up to what a later stage's 512x512 layers cost.
fn synthetic_idx(dir: &Path, n: usize) -> Result<()> {
    for (prefix, count) in [("train", n), ("t10k", 16)] {
        let mut img = 0x0000_0803u32.to_be_bytes().to_vec();
        for v in [count as u32, 24, 32] {
            img.extend_from_slice(&v.to_be_bytes());
        }
        img.extend((0..count * 768).map(|i| ((i * 37 + i / 768) % 256) as u8));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img)?;
        let mut lab = 0x0000_0801u32.to_be_bytes().to_vec();
        lab.extend_from_slice(&(count as u32).to_be_bytes());
        lab.extend((0..count).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab)?;
    }
    Ok(())
}

/// `strata bench pipeline`: every schedule with `stages` stages (one process each, one
/// lavapipe thread each) and `micro` micro-batches of 32 samples, training the MLP on
/// 768-feature samples (stages of equal work, see `synthetic_idx`; SGD, whose step is cheap next to the micro-batches' work, as the
/// formulas leave the optimiser out), against the schedule's bubble formula.
pub fn bench(
    stage_counts: &[usize],
    micro: usize,
    steps: u64,
    timelines: Option<&Path>,
    mut on_figure: impl FnMut(&PipelineFigure),
) -> Result<Vec<PipelineFigure>> {
    let dir = tempfile::tempdir()?;
    let need = (steps as usize + 2) * micro * 32;
    synthetic_idx(dir.path(), need)?;
    let mut out = Vec::new();
    for &stages in stage_counts {
        // The MLP's fc1..fc6 are equal; fc7 (to 10 classes) is small.
        let split = match stages {
            1 => String::new(),
            2 => "fc4".into(),
            3 => "fc3,fc5".into(),
            6 => "fc2,fc3,fc4,fc5,fc6".into(),
            _ => bail!("the pipeline benchmark cuts its 6-layer MLP into 1, 2, 3 or 6 stages, not {stages}"),
        };
        for schedule in Schedule::ALL {
            let mut a: Vec<String> = [
                "--data",
                &dir.path().display().to_string(),
                "--model",
                "mlp",
                "--optimizer",
                "sgd",
                "--batch-size",
                &(micro * 32).to_string(),
                "--pipeline-stages",
                &stages.to_string(),
                "--micro-batches",
                &micro.to_string(),
                "--schedule",
                schedule.name(),
                "--bench-steps",
                &steps.to_string(),
                "--json",
            ]
            .map(String::from)
            .to_vec();
            if !split.is_empty() {
                a.extend(["--split".to_string(), split.clone()]);
            }
            if let Some(dir) = timelines {
                let path = dir.join(format!("pipeline-{}-S{stages}-m{micro}.json", schedule.name()));
                a.extend(["--timeline".to_string(), path.display().to_string()]);
            }
            let outs =
                crate::cli::demo::launch(stages, &a, |_| vec![("LP_NUM_THREADS", "1".to_string())], Stdio::piped())?;
            let text = String::from_utf8_lossy(&outs[0].stdout).to_string();
            let line: PipelineBenchLine = text
                .lines()
                .find_map(|l| serde_json::from_str(l).ok())
                .with_context(|| format!("no report from the stages: {text}"))?;
            let f = PipelineFigure {
                figure: Figure {
                    case: format!("pipeline {} S={stages} m={micro}", schedule.name()),
                    unit: "bubble",
                    value: line.bubble,
                    seconds: line.step_seconds,
                    reference: format!("the schedule's formula ({})", formula_text(schedule)),
                    reference_value: line.formula,
                    ratio: if line.formula > 0.0 { line.bubble / line.formula } else { f64::NAN },
                    target: None,
                },
                samples_per_s: line.samples_per_s,
                activation_peak: line.activation_peak,
            };
            on_figure(&f);
            out.push(f);
        }
    }
    Ok(out)
}

fn formula_text(s: Schedule) -> &'static str {
    match s {
        Schedule::GPipe | Schedule::OneFOneB => "(S-1)/(m+S-1)",
        Schedule::ZeroBubble => "(S-1)/(3m)",
    }
}

/// `strata checkpoint merge`: the stage checkpoints in `from` as one in `to`.
pub fn merge(from: &Path, to: &Path) -> Result<PathBuf> {
    Ok(strata_train::pipeline::merge_stage_checkpoints(from, to)?)
}
