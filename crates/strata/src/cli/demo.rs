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

/// Starts `world` `strata train` processes torchrun-style and waits for them; rank `r`
/// also gets the environment variables `env(r)` (e.g. its own `STRATA_BACKEND`).
pub(crate) fn launch(
    world: usize,
    args: &[String],
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
    rank0_stdout: Stdio,
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
        c.arg("train").args(args).envs(env(r));
        if world > 1 {
            c.arg("--cert-dir").arg(tmp.path()).env("RANK", r.to_string()).env("WORLD_SIZE", world.to_string());
            c.env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
            // All ranks run on this machine, as torchrun would say.
            c.env("LOCAL_WORLD_SIZE", world.to_string());
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
        launch(2, &a, |_| Vec::new(), Stdio::inherit())?;
        println!(
            "done: stage checkpoints in {} (merge with `strata checkpoint merge`), plot in {}, timeline in {} (open in https://ui.perfetto.dev or chrome://tracing) and {}",
            ck.display(),
            plot.display(),
            timeline.display(),
            timeline.with_extension("png").display()
        );
        return Ok(());
    }
    launch(2, &a, |_| Vec::new(), Stdio::inherit())?;
    println!("done: checkpoints in {}, plot in {}", ck.display(), plot.display());
    Ok(())
}

/// One `strata train --bench-steps` run of `world` processes; rank `r` opens the adapter of
/// `backends[r]` (`None`: the default choice).
fn bench_run(
    data: &Path,
    steps: u64,
    world: usize,
    backends: &[Option<&'static str>],
    extra: &[&str],
) -> Result<BenchLine> {
    let mut a: Vec<String> = vec![
        "--data".into(),
        data.display().to_string(),
        "--train-limit".into(),
        "8000".into(),
        "--test-limit".into(),
        "100".into(),
        "--bench-steps".into(),
        steps.to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    let env = |r: usize| match backends.get(r).copied().flatten() {
        Some(b) => vec![("STRATA_BACKEND", b.to_string())],
        None => Vec::new(),
    };
    let outs = launch(world, &a, env, Stdio::piped())?;
    let text = String::from_utf8_lossy(&outs[0].stdout).to_string();
    text.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no report from the workers: {text}"))
}

fn step_text(l: &BenchLine) -> String {
    format!(
        "step {:.0} ms: compute {:.0}, exposed comm {:.0}, data {:.0}; first step after {:.1} s",
        l.step_seconds * 1e3,
        l.compute_seconds * 1e3,
        l.comm_exposed_seconds * 1e3,
        l.data_seconds * 1e3,
        l.first_step_seconds
    )
}

/// Training throughput of the reference CNN on `data`: one node, then two; then, with
/// `heterogeneous`, one node on the GL adapter alone and two nodes of different speed
/// (rank 0 on Vulkan, rank 1 on GL: lavapipe and llvmpipe here) with an equal and a
/// measured split of the global batch.
pub fn bench(data: &Path, steps: u64, heterogeneous: bool, mut on_figure: impl FnMut(&Figure)) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let mut emit = |f: Figure| {
        on_figure(&f);
        out.push(f);
    };
    let one = bench_run(data, steps, 1, &[], &[])?;
    let two = bench_run(data, steps, 2, &[], &[])?;
    for l in [&one, &two] {
        emit(Figure {
            case: format!("train reference CNN x{} nodes ({})", l.world, step_text(l)),
            unit: "samples/s",
            value: l.samples_per_second,
            seconds: l.step_seconds,
            reference: "1 node, same run".into(),
            reference_value: one.samples_per_second,
            ratio: l.samples_per_second / one.samples_per_second,
            target: (l.world == 2).then_some(200.0),
        });
    }
    if !heterogeneous {
        return Ok(out);
    }
    let has = |backend: &str| {
        let request = strata_gpu::AdapterRequest { backend: Some(backend.into()), adapter: None };
        strata_gpu::list_adapters(&request).is_ok_and(|a| !a.is_empty())
    };
    if !(has("vulkan") && has("gl")) {
        eprintln!("heterogeneous case skipped: it needs a Vulkan and a GL adapter");
        return Ok(out);
    }
    let (vk, gl) = (Some("vulkan"), Some("gl"));
    let gl_one = bench_run(data, steps, 1, &[gl], &[])?;
    emit(Figure {
        case: format!("train reference CNN x1 node on the GL adapter ({})", step_text(&gl_one)),
        unit: "samples/s",
        value: gl_one.samples_per_second,
        seconds: gl_one.step_seconds,
        reference: "1 node on the default adapter, same run".into(),
        reference_value: one.samples_per_second,
        ratio: gl_one.samples_per_second / one.samples_per_second,
        target: None,
    });
    let equal = bench_run(data, steps, 2, &[vk, gl], &["--balance", "equal"])?;
    let measured = bench_run(data, steps, 2, &[vk, gl], &["--balance", "measured", "--rebalance-every", "3"])?;
    // The best a split can do: both nodes busy all the time, at their rates alone.
    let ideal = one.samples_per_second + gl_one.samples_per_second;
    for (l, reference, reference_value) in [
        (&equal, "1 node on Vulkan, same run".to_string(), one.samples_per_second),
        (&measured, "equal split on the same two nodes, same run".to_string(), equal.samples_per_second),
    ] {
        emit(Figure {
            case: format!(
                "train reference CNN x2 nodes, Vulkan + GL, {} split {:?}{} ({}; per node compute {:.0?} ms, exposed comm {:.0?} ms; sum of the two alone {:.1})",
                l.balance,
                l.split,
                if l.rates.is_empty() { String::new() } else { format!(" from measured {:.1?} samples/s", l.rates) },
                step_text(l),
                l.node_compute_seconds.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                l.node_comm_exposed_seconds.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                ideal
            ),
            unit: "samples/s",
            value: l.samples_per_second,
            seconds: l.step_seconds,
            reference,
            reference_value,
            ratio: l.samples_per_second / reference_value,
            target: None,
        });
    }
    Ok(out)
}
