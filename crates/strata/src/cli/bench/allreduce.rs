//! `strata bench allreduce`: all-reduce across node processes on loopback, with TLS.
//!
//! The command starts `world` worker processes (`strata worker allreduce`) the way
//! torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank 0 reports the median
//! time per operation. Bus bandwidth follows nccl-tests: `bytes * 2(n-1)/n / time`.
//!
//! The references are measured in the same run with the same processes and sizes: the
//! plaintext TCP ring of [`super::tcp_ring`] (`strata worker tcp-allreduce`), and
//! PyTorch's gloo through `scripts/gloo_allreduce.py` when the Python given has torch.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use strata_collective::{Compression, Group, GroupOptions, ReduceOp};
use strata_net::NodeConfig;

use super::Figure;

/// One line of a worker's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerReport {
    /// Median seconds per all-reduce of `bytes`.
    AllReduce {
        /// Buffer size (f32 elements times 4, whatever the wire format).
        bytes: usize,
        /// Median seconds per operation on rank 0.
        seconds: f64,
        /// The wire format, when not f32 (`bf16`, `fp16`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compression: Option<String>,
        /// CPU seconds (user and system, all threads) of rank 0's process per operation,
        /// over the timed operations.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_seconds: Option<f64>,
    },
    /// Seconds to send `bytes` from rank 0 to rank 1 and get a one-element answer back.
    PointToPoint {
        /// Bytes sent.
        bytes: usize,
        /// Median seconds.
        seconds: f64,
    },
}

/// What the worker runs.
#[derive(Clone, Debug)]
pub struct WorkerPlan {
    /// Buffer sizes in MiB.
    pub sizes_mib: Vec<usize>,
    /// Timed iterations per size.
    pub iters: usize,
    /// Keep all-reducing the largest size until killed or failed (failure tests).
    pub forever: bool,
    /// Wire formats timed after the f32 all-reduce of each size.
    pub compress: Vec<Compression>,
}

/// CPU seconds (user and system) this process has used so far.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Group options with the tuning knobs for experiments applied: `STRATA_SEG_LEN`
/// (elements per segment) and `STRATA_SENDS_IN_FLIGHT`. The TCP ring reference uses the
/// same ones.
pub fn tuned_options() -> GroupOptions {
    let mut options = GroupOptions::default();
    if let Some(v) = std::env::var("STRATA_SEG_LEN").ok().and_then(|v| v.parse().ok()) {
        options.seg_len = v;
    }
    if let Some(v) = std::env::var("STRATA_SENDS_IN_FLIGHT").ok().and_then(|v| v.parse().ok()) {
        options.sends_in_flight_max = v;
    }
    options
}

/// The worker: joins, forms the group of all ranks, times all-reduces; rank 0 prints
/// one JSON report per line.
pub async fn worker(config: NodeConfig, plan: WorkerPlan) -> Result<()> {
    let world = config.world_size.context("the worker needs WORLD_SIZE")? as usize;
    let (node, _) = crate::cli::node::start(config, None).await?;
    let group = Group::form(node.clone(), world, Duration::from_secs(30), tuned_options()).await?;
    let barrier = || async { group.all_reduce(vec![0.0], ReduceOp::Sum).await.map(|_| ()) };
    if plan.forever {
        let mut buf = vec![1.0f32; plan.sizes_mib.iter().max().copied().unwrap_or(16) << 18];
        let mut n = 0u64;
        loop {
            buf = group.all_reduce(buf, ReduceOp::Sum).await?;
            buf.iter_mut().for_each(|v| *v = 1.0);
            n += 1;
            if n == 1 && group.rank() == 0 {
                println!("{{\"kind\":\"running\"}}");
                std::io::stdout().flush()?;
            }
        }
    }
    let wires: Vec<Compression> = [Compression::None]
        .into_iter()
        .chain(plan.compress.iter().copied().filter(|c| *c != Compression::None))
        .collect();
    for &mib in &plan.sizes_mib {
        let len = mib << 18;
        for &wire in &wires {
            let mut buf = Some(vec![1.0f32; len]);
            let mut times = Vec::with_capacity(plan.iters);
            let mut cpu = 0.0;
            for i in 0..plan.iters + 2 {
                // Sums of ones stay exact in every wire format.
                buf.as_mut().expect("buffer returned").iter_mut().for_each(|v| *v = 1.0);
                barrier().await?;
                let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
                let input = buf.take().expect("buffer returned");
                let out = match wire {
                    Compression::None => group.all_reduce(input, ReduceOp::Sum).await?,
                    w => group.all_reduce_compressed(input, ReduceOp::Sum, w).await?,
                };
                let t = start.elapsed().as_secs_f64();
                if i >= 2 {
                    times.push(t);
                    cpu += process_cpu_seconds() - cpu_start;
                }
                if i == 0 && out.iter().any(|v| *v != group.world() as f32) {
                    anyhow::bail!("all_reduce of {mib} MiB ({}): a sum of ones is not {}", wire.name(), group.world());
                }
                buf = Some(out);
            }
            times.sort_by(f64::total_cmp);
            if group.rank() == 0 {
                let report = WorkerReport::AllReduce {
                    bytes: len * 4,
                    seconds: times[times.len() / 2],
                    compression: (wire != Compression::None).then(|| wire.name().to_string()),
                    cpu_seconds: Some(cpu / plan.iters as f64),
                };
                println!("{}", serde_json::to_string(&report)?);
            }
        }
    }
    if group.world() >= 2 && group.rank() <= 1 {
        let len = 64usize << 18;
        let mut data = vec![1.0f32; len];
        let mut times = Vec::new();
        for _ in 0..plan.iters.max(3) + 1 {
            if group.rank() == 0 {
                let start = Instant::now();
                data = group.send(1, data).await?;
                group.recv(1, 1).await?;
                times.push(start.elapsed().as_secs_f64());
            } else {
                data = group.recv_into(0, data).await?;
                group.send(0, vec![0.0]).await?;
            }
        }
        if group.rank() == 0 {
            times.remove(0);
            times.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::to_string(&WorkerReport::PointToPoint { bytes: len * 4, seconds: times[times.len() / 2] })?
            );
        }
    }
    barrier().await?;
    if std::env::var_os("STRATA_NET_STATS").is_some() {
        for m in group.members().iter().filter(|m| *m != node.name()) {
            if let Ok(l) = node.peer(m).await {
                let s = l.stats();
                eprintln!(
                    "{} -> {m}: mtu {} cwnd {} lost {} sent {} datagrams {}",
                    node.name(),
                    s.path.current_mtu,
                    s.path.cwnd,
                    s.path.lost_packets,
                    s.udp_tx.bytes,
                    s.udp_tx.datagrams
                );
            }
        }
    }
    node.shutdown().await;
    Ok(())
}

/// Bytes per second of one TCP stream over loopback (the reference transport).
pub fn tcp_loopback_bytes_per_second(total: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..total / chunk.len() {
            s.write_all(&chunk)?;
        }
        Ok(())
    });
    let (mut conn, _) = listener.accept()?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut got = 0;
    while got < total {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = start.elapsed().as_secs_f64();
    sender.join().map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    Ok(got as f64 / secs)
}

/// Options of the all-reduce benchmark.
#[derive(Clone, Debug)]
pub struct AllReduceBench {
    /// Node counts.
    pub worlds: Vec<usize>,
    /// Buffer sizes in MiB.
    pub sizes_mib: Vec<usize>,
    /// Timed iterations per size.
    pub iters: usize,
    /// Python interpreter for the PyTorch gloo reference; empty skips it.
    pub python: String,
    /// Wire formats measured besides f32.
    pub compress: Vec<Compression>,
}

impl Default for AllReduceBench {
    fn default() -> Self {
        Self {
            worlds: vec![2, 4],
            sizes_mib: vec![1, 16, 64],
            iters: 7,
            python: "python3".into(),
            compress: vec![Compression::Bf16],
        }
    }
}

/// `scripts/gloo_allreduce.py`, built in so the benchmark finds it from any directory.
const GLOO_SCRIPT: &str = include_str!("../../../../../scripts/gloo_allreduce.py");

/// Name of the plaintext TCP ring reference in figures.
pub const TCP_RING: &str = "tcp ring (plaintext, same algorithm), same run";
/// Name of the PyTorch gloo reference in figures.
pub const GLOO: &str = "pytorch gloo, same run";

/// What the benchmark produced: the figures and which references ran.
#[derive(Clone, Debug, Default)]
pub struct AllReduceReport {
    /// Every figure, in the order they were made.
    pub figures: Vec<Figure>,
    /// `(reference, what happened)`, e.g. `("gloo", "not available: python3 has no torch")`.
    pub references: Vec<(&'static str, String)>,
    /// CPU time per operation of rank 0's process: `(case, [(implementation, ms)])`.
    pub cpu: Vec<(String, Vec<(&'static str, f64)>)>,
}

impl AllReduceReport {
    /// One line naming the references and whether they ran.
    pub fn references_line(&self) -> String {
        let parts: Vec<String> = self.references.iter().map(|(r, how)| format!("{r} ({how})")).collect();
        format!("references: {}", parts.join(", "))
    }

    /// One line per case with the CPU milliseconds rank 0's process spent per operation.
    pub fn cpu_lines(&self) -> Vec<String> {
        self.cpu
            .iter()
            .map(|(case, by)| {
                let parts: Vec<String> = by.iter().map(|(who, ms)| format!("{who} {ms:.1}")).collect();
                format!("cpu ms per op, rank 0 process, {case}: {}", parts.join(", "))
            })
            .collect()
    }
}

/// Bus bandwidth in GB/s as nccl-tests computes it.
fn bus_gbps(bytes: usize, seconds: f64, world: usize) -> f64 {
    bytes as f64 * 2.0 * (world - 1) as f64 / world as f64 / seconds / 1e9
}

/// Starts `world` torchrun-style processes of `command`; only rank 0's stdout is piped.
fn spawn_ranks(command: impl Fn() -> Command, world: usize, port: u16) -> Result<Vec<Child>> {
    (0..world)
        .map(|r| {
            command()
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .stdout(if r == 0 { Stdio::piped() } else { Stdio::null() })
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {r}"))
        })
        .collect()
}

/// Reads rank 0's reports as they come, then waits for every rank to succeed.
fn collect_reports(mut children: Vec<Child>, what: &str, mut on_report: impl FnMut(WorkerReport)) -> Result<()> {
    let world = children.len();
    let stdout = children[0].stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        if let Ok(report) = serde_json::from_str::<WorkerReport>(&line?) {
            on_report(report);
        }
    }
    for (r, mut c) in children.into_iter().enumerate() {
        let status = c.wait()?;
        if !status.success() {
            bail!("{what} worker {r} of {world} exited with {status}");
        }
    }
    Ok(())
}

/// Seconds per all-reduce, and CPU seconds of rank 0's process if measured, by size in bytes.
type Timings = Vec<(usize, f64, Option<f64>)>;

/// The TCP ring reference: seconds per all-reduce by size in bytes.
fn tcp_ring_seconds(exe: &std::path::Path, world: usize, opts: &AllReduceBench) -> Result<Timings> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let sizes = opts.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let command = || {
        let mut c = Command::new(exe);
        c.args(["worker", "tcp-allreduce", "--sizes", &sizes, "--iters", &opts.iters.to_string()]);
        c
    };
    let mut out = Vec::new();
    collect_reports(spawn_ranks(command, world, port)?, "tcp ring", |r| {
        if let WorkerReport::AllReduce { bytes, seconds, cpu_seconds, .. } = r {
            out.push((bytes, seconds, cpu_seconds));
        }
    })?;
    Ok(out)
}

/// Whether `python` can run the gloo reference; the reason when it cannot.
fn gloo_available(python: &str) -> Result<(), String> {
    if python.is_empty() {
        return Err("not requested".into());
    }
    let probe = "import sys\ntry:\n import torch.distributed as d\nexcept ImportError:\n sys.exit(3)\n\
                 sys.exit(0 if d.is_available() and d.is_gloo_available() else 4)";
    match Command::new(python).args(["-c", probe]).stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Err(e) => Err(format!("not available: {python}: {e}")),
        Ok(s) if s.code() == Some(3) => Err(format!("not available: {python} has no torch")),
        Ok(s) if s.code() == Some(4) => Err(format!("not available: {python}'s torch has no gloo")),
        Ok(s) if !s.success() => Err(format!("not available: {python} exited with {s}")),
        Ok(_) => Ok(()),
    }
}

/// The gloo reference: seconds per all-reduce by size in bytes, through
/// `scripts/gloo_allreduce.py`.
fn gloo_seconds(python: &str, world: usize, opts: &AllReduceBench) -> Result<Timings> {
    #[derive(Deserialize)]
    struct Line {
        bytes: usize,
        seconds: f64,
        #[serde(default)]
        cpu_seconds: Option<f64>,
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("gloo_allreduce.py");
    std::fs::write(&script, GLOO_SCRIPT)?;
    let sizes = opts.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(python)
        .arg(&script)
        .args(["--world", &world.to_string(), "--sizes", &sizes, "--iters", &opts.iters.to_string()])
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {python} gloo_allreduce.py"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!("gloo_allreduce.py with {world} processes exited with {}: {last}", out.status);
    }
    let lines = String::from_utf8_lossy(&out.stdout);
    Ok(lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .map(|l| (l.bytes, l.seconds, l.cpu_seconds))
        .collect())
}

/// Runs the benchmark; `on_figure` sees each figure as it is made. Per node count it
/// measures the references first (the TCP ring, then gloo when available), then Strata.
pub fn run(opts: &AllReduceBench, mut on_figure: impl FnMut(&Figure)) -> Result<AllReduceReport> {
    let exe = std::env::current_exe()?;
    let tcp = tcp_loopback_bytes_per_second(1 << 30)?;
    let mut gloo = gloo_available(&opts.python);
    let mut report = AllReduceReport::default();
    for &world in &opts.worlds {
        let mut references = vec![(TCP_RING, tcp_ring_seconds(&exe, world, opts)?)];
        if gloo.is_ok() {
            match gloo_seconds(&opts.python, world, opts) {
                Ok(g) => references.push((GLOO, g)),
                Err(e) => gloo = Err(format!("failed: {e:#}")),
            }
        }
        let dir = tempfile::tempdir()?;
        strata_net::tls::create_ca(dir.path(), "bench")?;
        for r in 0..world {
            strata_net::tls::issue_node(dir.path(), &format!("rank-{r}"), &["127.0.0.1".into()])?;
        }
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let sizes = opts.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
        let compress = opts.compress.iter().map(|c| c.name()).collect::<Vec<_>>().join(",");
        let command = || {
            let mut c = Command::new(&exe);
            c.args(["worker", "allreduce", "--cert-dir"]).arg(dir.path());
            c.args(["--sizes", &sizes, "--iters", &opts.iters.to_string(), "--compress", &compress]);
            c
        };
        collect_reports(spawn_ranks(command, world, port)?, "strata", |r| {
            let figures = match r {
                WorkerReport::AllReduce { bytes, seconds, compression, cpu_seconds } => {
                    let bus = bus_gbps(bytes, seconds, world);
                    let case = match &compression {
                        None => format!("all_reduce {} MiB x{world} nodes (busBW)", bytes >> 20),
                        Some(c) => format!("all_reduce {} MiB x{world} nodes {c} (busBW in f32 bytes)", bytes >> 20),
                    };
                    let mut cpu: Vec<(&'static str, f64)> = Vec::new();
                    if let Some(c) = cpu_seconds {
                        cpu.push((if compression.is_some() { "strata compressed" } else { "strata" }, c * 1e3));
                    }
                    let figures: Vec<Figure> = references
                        .iter()
                        .filter_map(|(name, times)| {
                            let &(_, s, ref_cpu) = times.iter().find(|t| t.0 == bytes)?;
                            if let (None, Some(c)) = (&compression, ref_cpu) {
                                cpu.push((if *name == TCP_RING { "tcp ring" } else { "gloo" }, c * 1e3));
                            }
                            let reference = bus_gbps(bytes, s, world);
                            Some(Figure {
                                case: case.clone(),
                                unit: "GB/s",
                                value: bus,
                                seconds,
                                reference: (*name).into(),
                                reference_value: reference,
                                ratio: bus / reference,
                                // The target of issue 10 holds the f32 all-reduce to 1.0x;
                                // compressed figures are reported next to it.
                                target: compression.is_none().then_some(reference),
                            })
                        })
                        .collect();
                    report.cpu.push((case, cpu));
                    figures
                }
                WorkerReport::PointToPoint { bytes, seconds } => vec![Figure {
                    case: format!("send 64 MiB shard x{world} nodes"),
                    unit: "GB/s",
                    value: bytes as f64 / seconds / 1e9,
                    seconds,
                    reference: "tcp loopback, same run".into(),
                    reference_value: tcp / 1e9,
                    ratio: bytes as f64 / seconds / tcp,
                    target: None,
                }],
            };
            for f in figures {
                on_figure(&f);
                report.figures.push(f);
            }
        })?;
    }
    report.references.push(("tcp-ring", "measured".into()));
    report.references.push(("gloo", gloo.map_or_else(|e| e, |()| "measured".into())));
    Ok(report)
}
