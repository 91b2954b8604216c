//! The `strata` node binary.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use strata::bench;
use strata_gpu::{AdapterRequest, Gpu, GpuOptions};

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
    /// The main demo (for now: the kernel check).
    Demo,
    /// Benchmarks that print figures and ratios against references measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Convolution, matrix multiply and reductions on the GPU against CPU references.
    Kernels {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Timed iterations per case (the median is reported).
        #[arg(long, default_value_t = 7)]
        iters: usize,
        /// Run only the cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match &cli.command {
        Command::Info => info(&cli.device),
        Command::Check { json } => check(&cli.device, *json),
        Command::Demo => check(&cli.device, false),
        Command::Bench { what: BenchCommand::Kernels { json, iters, filter } } => {
            bench_kernels(&cli.device, *json, *iters, filter.clone())
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
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
    let results = strata::check::run(&mut gpu)?;
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
    let profile = gpu.profile();
    if !profile.is_empty() {
        println!("\nper-kernel wall time (STRATA_PROFILE):");
        for (kernel, calls, secs) in profile {
            println!("  {kernel:<36} {calls:>6} calls {:>10.1} ms", secs * 1e3);
        }
    }
    Ok(())
}
