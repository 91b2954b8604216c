//! The `strata` node binary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use strata::cli::bench;
use strata::cli::node::NodeArgs;
use strata_gpu::{AdapterRequest, Gpu, GpuOptions};
use strata_net::MemberState;

/// Strata: a cross-vendor distributed GPU compute runtime.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// GPU backend: vulkan, metal, dx12 or gl (default: any).
    #[arg(long, global = true, env = "STRATA_BACKEND")]
    backend: Option<String>,
    /// Use the adapter whose name contains this text (default: the best one).
    #[arg(long, global = true, env = "STRATA_ADAPTER")]
    adapter: Option<String>,
}

impl DeviceArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            adapter: AdapterRequest { backend: self.backend.clone(), adapter: self.adapter.clone() },
            ..GpuOptions::from_env()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List the adapters and describe the one Strata would use.
    Info,
    /// Open the adapter, run every kernel family once and compare with the CPU reference.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A 2-node cluster on loopback training the reference CNN on Fashion-MNIST.
    Demo {
        #[command(flatten)]
        args: strata::cli::demo::DemoArgs,
    },
    /// Train a model, on one node or data-parallel across nodes.
    Train {
        #[command(flatten)]
        args: Box<strata::cli::train::TrainArgs>,
    },
    /// Run a cluster node until SIGINT/SIGTERM.
    Node {
        #[command(flatten)]
        node: NodeArgs,
        /// Do not open a GPU adapter on this node.
        #[arg(long)]
        no_gpu: bool,
        /// Run the cluster's task scheduler on this node (one node per cluster).
        #[arg(long)]
        scheduler: bool,
        /// Where the scheduler journals its queue (default: ./journal-<node name>).
        #[arg(long, requires = "scheduler")]
        journal: Option<PathBuf>,
        /// Tasks queued at most; a submit beyond is refused.
        #[arg(long, requires = "scheduler", value_parser = strata::cli::args::count(1, 10_000_000))]
        queue_bound: Option<usize>,
        /// Labels this node's executor offers to tasks, KEY=VALUE (besides backend and device).
        #[arg(long = "label", value_parser = strata::cli::tasks::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Submit a task to the cluster's scheduler (operator certificates only).
    Submit {
        #[command(flatten)]
        op: strata::cli::tasks::OperatorArgs,
        /// Task function registered on the nodes (built in: noop, echo, sleep, fail).
        task: String,
        /// Arguments passed to the function, as text.
        #[arg(long, default_value = "")]
        args: String,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// CPU slots the task needs.
        #[arg(long, default_value_t = 0)]
        cpus: u32,
        /// GPU slots the task needs.
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// GPU memory the task needs, MiB.
        #[arg(long, default_value_t = 0)]
        gpu_mem_mib: u64,
        /// Labels the node must carry, KEY=VALUE (for example backend=vulkan).
        #[arg(long = "label", value_parser = strata::cli::tasks::parse_label)]
        labels: Vec<(String, String)>,
        /// The task expires this many ms after submission.
        #[arg(long, value_parser = strata::cli::args::count(1, 86_400_000))]
        deadline_ms: Option<usize>,
        /// Extra attempts after the first.
        #[arg(long, value_parser = strata::cli::args::count(0, 1000))]
        retries: Option<usize>,
        /// Number of copies to submit.
        #[arg(long, default_value_t = 1, value_parser = strata::cli::args::count(1, 1_000_000))]
        count: usize,
        /// Wait for the outcomes and print them.
        #[arg(long)]
        wait: bool,
    },
    /// List the scheduler's queued, running and finished tasks (operator certificates only).
    Queue {
        #[command(flatten)]
        op: strata::cli::tasks::OperatorArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task (operator certificates only).
    Cancel {
        #[command(flatten)]
        op: strata::cli::tasks::OperatorArgs,
        /// The task's id.
        id: u64,
    },
    /// Create a cluster CA (if missing), node certificates and operator certificates.
    ///
    /// A node certificate lets its holder join as that one node; an operator certificate
    /// (default: "admin") lets a tool query and submit work, never join as a member.
    Cert {
        /// Certificate directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Cluster name recorded in the CA certificate.
        #[arg(long, default_value = "strata")]
        cluster: String,
        /// Operator certificates to issue.
        #[arg(long = "operator", value_name = "NAME", default_value = "admin")]
        operators: Vec<String>,
        /// Node certificates: NAME, or NAME=SAN,SAN... to add host names or IP
        /// addresses to that node's certificate only (for example node-1=10.0.0.5).
        #[arg(value_name = "NODE[=SAN,...]")]
        names: Vec<String>,
    },
    /// Show the members of a running cluster, as one node sees them.
    Status {
        /// Address of any node.
        #[arg(long)]
        node: String,
        /// Certificate directory (omit for --insecure-dev clusters).
        #[arg(long)]
        cert_dir: Option<PathBuf>,
        /// Operator certificate to authenticate with.
        #[arg(long = "as", default_value = "admin")]
        as_name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoints: merge a pipeline's stage checkpoints into one single-node checkpoint.
    Checkpoint {
        #[command(subcommand)]
        what: CheckpointCommand,
    },
    /// Internal: benchmark worker processes.
    #[command(hide = true)]
    Worker {
        #[command(subcommand)]
        what: WorkerCommand,
    },
    /// Benchmarks that print figures and ratios against references measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// Time all-reduces in a cluster formed from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
    Allreduce {
        #[command(flatten)]
        node: Box<NodeArgs>,
        /// Buffer sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = strata::cli::args::count(1, 1024))]
        sizes: Vec<usize>,
        /// Timed iterations per size.
        #[arg(long, default_value_t = 7, value_parser = strata::cli::args::positive())]
        iters: usize,
        /// All-reduce the largest size until stopped.
        #[arg(long)]
        forever: bool,
        /// Wire formats to time after f32, comma-separated: bf16, fp16 (none: only f32).
        #[arg(long, value_delimiter = ',', default_value = "none")]
        compress: Vec<strata::collective::Compression>,
    },
    /// Time all-reduces over the plaintext TCP ring (the benchmark's reference).
    TcpAllreduce {
        /// Buffer sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        sizes: Vec<usize>,
        /// Timed iterations per size.
        #[arg(long, default_value_t = 7)]
        iters: usize,
    },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Merge the newest epoch every stage has (`DIR/stage-S/epoch-N`, as `strata train
    /// --pipeline-stages` writes them) into `OUT/epoch-N`, the layout and PyTorch names of
    /// a single-node checkpoint.
    Merge {
        /// The pipeline's checkpoint directory.
        dir: PathBuf,
        /// Where the merged checkpoint goes.
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Pipeline schedules across stage processes (one lavapipe thread each): the measured
    /// bubble against each schedule's formula, throughput and activation peaks.
    Pipeline {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Stage counts (2, 3 or 6).
        #[arg(long, value_delimiter = ',', default_value = "2,3", value_parser = strata::cli::args::count(1, 6))]
        stages: Vec<usize>,
        /// Micro-batches per step.
        #[arg(long, default_value_t = 8, value_parser = strata::cli::args::count(1, 256))]
        micro_batches: usize,
        /// Timed steps per case (after 2 warm-up steps).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..1000))]
        steps: u64,
        /// Write each case's timeline (Chrome trace JSON and PNG) into this directory.
        #[arg(long)]
        timelines: Option<PathBuf>,
    },
    /// Convolution, matrix multiply and reductions on the GPU against CPU references.
    Kernels {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Timed iterations per case (the median is reported).
        #[arg(long, default_value_t = 7, value_parser = strata::cli::args::positive())]
        iters: usize,
        /// Run only the cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Training throughput of the reference CNN on 1 and 2 node processes, and on 2 nodes
    /// of different speed (one on the Vulkan adapter, one on the GL adapter) with an equal
    /// and a measured split of the global batch.
    Train {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Timed steps per configuration (after 2 warm-up steps; 8 with a measured split,
        /// which settles in two rounds of 3 steps).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        /// Leave out the heterogeneous nodes (three runs with a node on the slower GL adapter).
        #[arg(long)]
        skip_heterogeneous: bool,
        /// Data directory.
        #[arg(long, default_value = strata_nn::data::FASHION_MNIST_DIR)]
        data: PathBuf,
    },
    /// The task queue: placements of the sans-IO scheduler, and empty tasks between node
    /// processes (one at a time and pipelined), each against a reference in the same run.
    Sched {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Placements timed by the "placements" case.
        #[arg(long, default_value_t = 1_000_000, value_parser = strata::cli::args::count(1000, 100_000_000))]
        placements: usize,
        /// Round trips timed one at a time.
        #[arg(long, default_value_t = 300, value_parser = strata::cli::args::count(1, 1_000_000))]
        round_trips: usize,
        /// Tasks timed with 64 in flight.
        #[arg(long, default_value_t = 5000, value_parser = strata::cli::args::count(64, 10_000_000))]
        pipelined: usize,
        /// Image size of the map-reduce tiles case, WIDTHxHEIGHT.
        #[arg(long, default_value = "1920x1080", value_parser = strata::cli::tasks::parse_size)]
        image: (usize, usize),
        /// Timed runs of the map-reduce case (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = strata::cli::args::positive())]
        iters: usize,
    },
    /// All-reduce across node processes on loopback (mutual TLS), against a plaintext TCP
    /// ring and PyTorch gloo measured in the same run.
    Allreduce {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Node counts.
        #[arg(long, value_delimiter = ',', default_value = "2,4", value_parser = strata::cli::args::count(2, 64))]
        worlds: Vec<usize>,
        /// Buffer sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = strata::cli::args::count(1, 1024))]
        sizes: Vec<usize>,
        /// Timed iterations per size (the median is reported).
        #[arg(long, default_value_t = 7, value_parser = strata::cli::args::positive())]
        iters: usize,
        /// Python with PyTorch for the gloo reference ("" skips it).
        #[arg(long, env = "STRATA_PYTHON", default_value = "python3")]
        python: String,
        /// Compressed all-reduces measured besides f32, comma-separated: bf16, fp16 (none:
        /// only f32); their busBW counts f32 bytes.
        #[arg(long, value_delimiter = ',', default_value = "bf16")]
        compress: Vec<strata::collective::Compression>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match &cli.command {
        Command::Info => info(&cli.device),
        Command::Check { json } => check(&cli.device, *json),
        Command::Demo { args } => strata::cli::demo::run(args),
        Command::Train { args } => {
            let started = std::time::Instant::now();
            actix::System::new().block_on(strata::cli::train::run((**args).clone(), cli.device.options(), started))
        }
        Command::Bench { what: BenchCommand::Pipeline { json, stages, micro_batches, steps, timelines } } => {
            let json = *json;
            strata::cli::pipeline::bench(stages, *micro_batches, *steps, timelines.as_deref(), |f| {
                if json {
                    println!("{}", serde_json::to_string(f).expect("figures serialise"));
                } else {
                    println!(
                        "{}  ({:.0} samples/s, activation peaks {:?})",
                        f.figure.line(),
                        f.samples_per_s,
                        f.activation_peak
                    );
                }
            })
            .map(|_| ())
        }
        Command::Checkpoint { what: CheckpointCommand::Merge { dir, out } } => {
            let path = strata::cli::pipeline::merge(dir, out)?;
            println!("merged {} into {}", dir.display(), path.display());
            Ok(())
        }
        Command::Bench { what: BenchCommand::Train { json, steps, data, skip_heterogeneous } } => {
            print_figures(*json, |on| strata::cli::demo::bench(data, *steps, !skip_heterogeneous, on).map(|_| ()))
        }
        Command::Bench { what: BenchCommand::Sched { json, placements, round_trips, pipelined, image, iters } } => {
            let opts = bench::sched::SchedBench {
                placements: *placements as u64,
                round_trips: *round_trips,
                pipelined: *pipelined,
            };
            print_figures(*json, |on| {
                on(&bench::sched::placements(opts.placements));
                actix::System::new().block_on(bench::sched::over_processes(&opts, on))?;
                let gpu = cli.device.options();
                let tiles = actix::System::new()
                    .block_on(bench::mapreduce::mapreduce_tiles_case(image.0, image.1, *iters, &gpu))?;
                on(&tiles);
                Ok(())
            })
        }
        Command::Bench { what: BenchCommand::Kernels { json, iters, filter } } => {
            bench_kernels(&cli.device, *json, *iters, filter.clone())
        }
        Command::Bench { what: BenchCommand::Allreduce { json, worlds, sizes, iters, python, compress } } => {
            let opts = bench::allreduce::AllReduceBench {
                worlds: worlds.clone(),
                sizes_mib: sizes.clone(),
                iters: *iters,
                python: python.clone(),
                compress: compress.clone(),
            };
            print_figures(*json, |on| {
                let report = bench::allreduce::run(&opts, on)?;
                // On stderr with --json, so stdout stays one figure per line.
                for line in report.cpu_lines().into_iter().chain([report.references_line()]) {
                    if *json { eprintln!("{line}") } else { println!("{line}") }
                }
                Ok(())
            })
        }
        Command::Node { node, no_gpu, scheduler, journal, queue_bound, labels } => {
            let config = node.config()?;
            let gpu = (!no_gpu).then(|| cli.device.options());
            let scheduler = scheduler.then(|| {
                let dir = journal.clone().unwrap_or_else(|| PathBuf::from(format!("journal-{}", config.name)));
                let mut o = strata_cluster::tasks::SchedulerOptions::new(dir);
                if let Some(b) = queue_bound {
                    o.config.queue_bound = *b;
                }
                o
            });
            let exec = strata_cluster::tasks::ExecOptions { labels: labels.clone(), ..Default::default() };
            actix::System::new().block_on(strata::cli::node::run_node(config, gpu, exec, scheduler))
        }
        Command::Submit {
            op,
            task,
            args,
            priority,
            cpus,
            gpus,
            gpu_mem_mib,
            labels,
            deadline_ms,
            retries,
            count,
            wait,
        } => {
            let mut demand = strata_cluster::tasks::Demand::gpu_mem(gpu_mem_mib.saturating_mul(1 << 20))
                .gpu_slots(*gpus)
                .cpu_slots(*cpus);
            for (k, v) in labels {
                demand = demand.label(k.clone(), v.clone());
            }
            let mut req = strata_cluster::tasks::TaskRequest::function(task, args.as_bytes().to_vec(), &[])
                .priority(*priority)
                .demand(demand);
            if let Some(d) = deadline_ms {
                req = req.deadline_ms(*d as u64);
            }
            if let Some(r) = retries {
                req = req.retries(*r as u32);
            }
            actix::System::new().block_on(strata::cli::tasks::submit(op, req, *count, *wait))
        }
        Command::Queue { op, json } => actix::System::new().block_on(strata::cli::tasks::queue(op, *json)),
        Command::Cancel { op, id } => actix::System::new().block_on(strata::cli::tasks::cancel(op, *id)),
        Command::Cert { dir, cluster, operators, names } => cert(dir, cluster, operators, names),
        Command::Status { node, cert_dir, as_name, json } => status(node, cert_dir.as_deref(), as_name, *json),
        Command::Worker { what: WorkerCommand::Allreduce { node, sizes, iters, forever, compress } } => {
            let config = node.config()?;
            let plan = bench::allreduce::WorkerPlan {
                sizes_mib: sizes.clone(),
                iters: *iters,
                forever: *forever,
                compress: compress.clone(),
            };
            actix::System::new().block_on(bench::allreduce::worker(config, plan))
        }
        Command::Worker { what: WorkerCommand::TcpAllreduce { sizes, iters } } => {
            bench::tcp_ring::worker(&bench::allreduce::WorkerPlan {
                sizes_mib: sizes.clone(),
                iters: *iters,
                forever: false,
                compress: Vec::new(),
            })
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only for a person at a terminal; files and pipes get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn open(device: &DeviceArgs) -> Result<Gpu> {
    Gpu::new(&device.options()).context("opening the GPU adapter (see `strata info`; on Debian, `apt-get install mesa-vulkan-drivers` provides the lavapipe software adapter)")
}

fn info(device: &DeviceArgs) -> Result<()> {
    let opts = device.options();
    let adapters = strata_gpu::list_adapters(&opts.adapter)?;
    println!("adapters:");
    for a in &adapters {
        println!("  {} ({:?}, {:?})", a.name, a.backend, a.device_type);
    }
    let gpu = open(device)?;
    println!("\nselected:\n{}", gpu.info());
    println!("gemm kernel    {:?}", gpu.gemm_kernel());
    Ok(())
}

fn check(device: &DeviceArgs, json: bool) -> Result<()> {
    let mut gpu = open(device)?;
    if !json {
        println!("{}\n", gpu.info());
    }
    let results = strata::cli::check::run(&mut gpu)?;
    let mut failed = 0;
    for r in &results {
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!(
                "{}  {:<34} {:<36} max |err| {:.2e} (tol {:.0e})  {:>7.1} ms",
                if r.passed() { "ok  " } else { "FAIL" },
                r.family,
                r.what,
                r.max_abs_err,
                r.tolerance,
                r.millis
            );
        }
        failed += usize::from(!r.passed());
    }
    if failed > 0 {
        bail!("{failed} kernel families disagree with the CPU reference");
    }
    if !json {
        println!("\nall {} kernel families agree with the CPU reference", results.len());
    }
    Ok(())
}

fn bench_kernels(device: &DeviceArgs, json: bool, iters: usize, filter: Option<String>) -> Result<()> {
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet that could read the environment.
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", "2") };
    }
    let mut gpu = open(device)?;
    if !json {
        println!("{} ({}), gemm {:?}\n", gpu.info().name, gpu.info().backend, gpu.gemm_kernel());
    }
    let opts = bench::kernels::BenchOptions { iters, filter, ..Default::default() };
    bench::kernels::run(&mut gpu, opts, |f| {
        if json {
            println!("{}", serde_json::to_string(f).expect("figures serialise"));
        } else {
            println!("{}", f.line());
        }
    })?;
    // What the `auto` cases chose, and the times they chose on.
    for c in gpu.conv_choices() {
        let line = format!(
            "conv algorithm for {}: {} (im2col {:.1} ms, winograd {:.1} ms)",
            c.case,
            c.algo.name(),
            c.im2col_s * 1e3,
            c.winograd_s * 1e3
        );
        if json { eprintln!("{line}") } else { println!("{line}") }
    }
    let profile = gpu.profile();
    if !profile.is_empty() {
        println!("\nper-kernel wall time (STRATA_PROFILE):");
        for k in profile {
            println!(
                "  {:<56} {:>6} calls {:>10.1} ms wall {:>10.1} ms cpu {:>8.2} ms cpu fastest call",
                k.kernel,
                k.calls,
                k.wall_s * 1e3,
                k.cpu_s * 1e3,
                k.cpu_min_s * 1e3
            );
        }
    }
    Ok(())
}

fn print_figures(json: bool, run: impl FnOnce(&mut dyn FnMut(&bench::Figure)) -> Result<()>) -> Result<()> {
    let mut on = |f: &bench::Figure| {
        if json {
            println!("{}", serde_json::to_string(f).expect("figures serialise"));
        } else {
            println!("{}", f.line());
        }
    };
    run(&mut on)
}

fn cert(dir: &std::path::Path, cluster: &str, operators: &[String], nodes: &[String]) -> Result<()> {
    use strata_net::tls;
    // Check every argument before writing anything.
    let mut plan = Vec::new();
    for spec in nodes {
        let (name, sans) = match spec.split_once('=') {
            Some((n, s)) => (n, s.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()),
            None => (spec.as_str(), Vec::new()),
        };
        tls::check_name(name)?;
        plan.push((name.to_string(), Some(sans)));
    }
    for name in operators {
        tls::check_name(name)?;
        anyhow::ensure!(!plan.iter().any(|(n, _)| n == name), "{name:?} is named both as a node and as an operator");
        plan.push((name.clone(), None));
    }
    if !dir.join(tls::CA_CERT_FILE).exists() {
        tls::create_ca(dir, cluster)?;
        println!(
            "created cluster CA {} (keep {} off the nodes)",
            dir.join(tls::CA_CERT_FILE).display(),
            dir.join(tls::CA_KEY_FILE).display()
        );
    }
    for (name, sans) in plan {
        let path = tls::node_files(dir, &name).0;
        if path.exists() {
            println!("kept {} (already there)", path.display());
            continue;
        }
        match sans {
            Some(sans) => {
                tls::issue_node(dir, &name, &sans)?;
                println!("issued node certificate {}", path.display());
            }
            None => {
                tls::issue_operator(dir, &name)?;
                println!("issued operator certificate {}", path.display());
            }
        }
    }
    Ok(())
}

fn status(node: &str, cert_dir: Option<&std::path::Path>, as_name: &str, json: bool) -> Result<()> {
    let records =
        actix::System::new().block_on(strata_net::query_status(node, cert_dir, as_name, Duration::from_secs(10)))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<7} {:<22} {:<5} {:<36} {:<8} {:<10} {:>10} {:>10}",
        "NAME", "STATE", "ADDRESS", "RANK", "ADAPTER", "BACKEND", "TYPE", "GPU FREE", "GPU USED"
    );
    let mib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{} MiB", b >> 20));
    for r in &records {
        let i = &r.info;
        let (adapter, backend, ty) = i
            .adapter
            .as_ref()
            .map_or(("-", "-", "-"), |a| (a.name.as_str(), a.backend.as_str(), a.device_type.as_str()));
        let state = match r.state {
            MemberState::Alive => "alive",
            MemberState::Failed => "failed",
            MemberState::Left => "left",
        };
        println!(
            "{:<12} {:<7} {:<22} {:<5} {:<36} {:<8} {:<10} {:>10} {:>10}",
            i.name,
            state,
            i.addr,
            i.rank.map_or("-".to_string(), |r| r.to_string()),
            adapter,
            backend,
            ty,
            mib(i.gpu_free_bytes),
            mib(i.gpu_used_bytes)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap's own consistency checks over every subcommand: duplicate option names (as
    /// `strata train` once had two `--seed`s), clashing short flags, bad defaults. They
    /// run in release builds because the workspace turns debug assertions on for clap.
    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }
}
