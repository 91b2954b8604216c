//! `strata demo`: a 2-node cluster on loopback training the reference CNN on
//! Fashion-MNIST, and `strata bench train`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cli::bench::Figure;
use crate::cli::train::BenchLine;

/// Settings of the demo.
#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Training samples (the full Fashion-MNIST set is 60000; the default keeps the demo
    /// to a few minutes on a 2-core machine with lavapipe).
    #[arg(long, default_value_t = 12000, value_parser = crate::cli::args::positive())]
    pub train_limit: usize,
    /// Test samples (the full set is 10000).
    #[arg(long, default_value_t = 10000, value_parser = crate::cli::args::positive())]
    pub test_limit: usize,
    /// Epochs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Where checkpoints and the plot go.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Data directory.
    #[arg(long, default_value = strata_nn::data::FASHION_MNIST_DIR)]
    pub data: PathBuf,
    /// Train as a 2-stage pipeline (one stage per process, zero-bubble schedule) and write
    /// its timeline (Chrome trace JSON and a PNG Gantt chart) next to the plot.
    #[arg(long)]
    pub pipeline: bool,
}

fn certs(dir: &Path, world: usize) -> Result<()> {
    strata_net::tls::create_ca(dir, "demo")?;
    for r in 0..world {
        strata_net::tls::issue_node(dir, &format!("rank-{r}"), &["127.0.0.1".into()])?;
    }
    Ok(())
}

/// Starts `world` `strata train` processes torchrun-style and waits for them.
fn launch(world: usize, args: &[String], rank0_stdout: Stdio) -> Result<Vec<std::process::Output>> {
    launch_env(world, args, rank0_stdout, &[])
}

/// [`launch`] with extra environment variables for every process.
pub(crate) fn launch_env(
    world: usize,
    args: &[String],
    rank0_stdout: Stdio,
    env: &[(&str, &str)],
) -> Result<Vec<std::process::Output>> {
    let exe = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    if world > 1 {
        certs(tmp.path(), world)?;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut children = Vec::new();
    let mut rank0_stdout = Some(rank0_stdout);
    for r in 0..world {
        let mut c = Command::new(&exe);
        c.arg("train").args(args).envs(env.iter().copied());
        if world > 1 {
            c.arg("--cert-dir").arg(tmp.path()).env("RANK", r.to_string()).env("WORLD_SIZE", world.to_string());
            c.env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
        } else {
            c.env_remove("RANK").env_remove("WORLD_SIZE");
        }
        let out = if r == 0 { rank0_stdout.take().expect("once") } else { Stdio::null() };
        children.push(
            c.stdout(out)
                .stderr(if r == 0 { Stdio::inherit() } else { Stdio::piped() })
                .spawn()
                .context("starting a worker")?,
        );
    }
    let mut outs = Vec::new();
    for (r, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("worker {r} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        outs.push(out);
    }
    Ok(outs)
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    if !args.data.is_dir() {
        bail!(
            "no data in {}: install Debian's dataset-fashion-mnist (scripts/bootstrap.sh does) or pass --data",
            args.data.display()
        );
    }
    if args.pipeline {
        println!(
            "strata demo --pipeline: 2 nodes on 127.0.0.1 (two processes, mutual TLS) train the reference CNN on Fashion-MNIST as a 2-stage pipeline (zero-bubble schedule, 4 micro-batches per step, stages balanced by measured layer times)"
        );
    } else {
        println!(
            "strata demo: 2 nodes on 127.0.0.1 (two processes, mutual TLS with certificates made for this run) train the reference CNN on Fashion-MNIST"
        );
    }
    if args.train_limit < 60000 {
        println!(
            "training on the first {} of the 60000 training images for {} epoch(s) to stay within a few minutes; pass --train-limit 60000 for the full set",
            args.train_limit, args.epochs
        );
    }
    let ck = args.out.join("checkpoints");
    let plot = args.out.join("training.png");
    let mut a = vec![
        "--data".into(),
        args.data.display().to_string(),
        "--epochs".into(),
        args.epochs.to_string(),
        "--train-limit".into(),
        args.train_limit.to_string(),
        "--test-limit".into(),
        args.test_limit.to_string(),
        "--checkpoint-dir".into(),
        ck.display().to_string(),
        "--plot".into(),
        plot.display().to_string(),
    ];
    if args.pipeline {
        let timeline = args.out.join("timeline.json");
        a.extend(
            ["--pipeline-stages", "2", "--micro-batches", "4", "--schedule", "zb", "--timeline"]
                .map(String::from)
                .into_iter()
                .chain([timeline.display().to_string()]),
        );
        launch(2, &a, Stdio::inherit())?;
        println!(
            "done: stage checkpoints in {} (merge with `strata checkpoint merge`), plot in {}, timeline in {} (open in https://ui.perfetto.dev or chrome://tracing) and {}",
            ck.display(),
            plot.display(),
            timeline.display(),
            timeline.with_extension("png").display()
        );
        return Ok(());
    }
    launch(2, &a, Stdio::inherit())?;
    println!("done: checkpoints in {}, plot in {}", ck.display(), plot.display());
    Ok(())
}

/// Training throughput of the reference CNN on `data`, one node then two.
pub fn bench(data: &Path, steps: u64, mut on_figure: impl FnMut(&Figure)) -> Result<Vec<Figure>> {
    let mut lines: Vec<BenchLine> = Vec::new();
    for world in [1usize, 2] {
        let a: Vec<String> = vec![
            "--data".into(),
            data.display().to_string(),
            "--train-limit".into(),
            "8000".into(),
            "--test-limit".into(),
            "100".into(),
            "--bench-steps".into(),
            steps.to_string(),
        ];
        let outs = launch(world, &a, Stdio::piped())?;
        let text = String::from_utf8_lossy(&outs[0].stdout).to_string();
        let line: BenchLine = text
            .lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("no report from the workers: {text}"))?;
        lines.push(line);
    }
    let one = lines[0].samples_per_second;
    let mut out = Vec::new();
    for l in &lines {
        let f = Figure {
            case: format!(
                "train reference CNN x{} nodes (step {:.0} ms: compute {:.0}, exposed comm {:.0}, data {:.0}; first step after {:.1} s)",
                l.world,
                l.step_seconds * 1e3,
                l.compute_seconds * 1e3,
                l.comm_exposed_seconds * 1e3,
                l.data_seconds * 1e3,
                l.first_step_seconds
            ),
            unit: "samples/s",
            value: l.samples_per_second,
            seconds: l.step_seconds,
            reference: "1 node, same run".into(),
            reference_value: one,
            ratio: l.samples_per_second / one,
            target: (l.world == 2).then_some(200.0),
        };
        on_figure(&f);
        out.push(f);
    }
    Ok(out)
}
