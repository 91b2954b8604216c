//! `strata bench allreduce`: all-reduce across node processes on loopback, with TLS.
//!
//! The command starts `world` worker processes (`strata worker allreduce`) the way
//! torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank 0 reports the median
//! time per operation. Bus bandwidth follows nccl-tests: `bytes * 2(n-1)/n / time`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use strata_collective::{Group, GroupOptions, ReduceOp};
use strata_net::NodeConfig;

use super::Figure;

/// One line of a worker's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerReport {
    /// Median seconds per all-reduce of `bytes`.
    AllReduce {
        /// Buffer size.
        bytes: usize,
        /// Median seconds per operation on rank 0.
        seconds: f64,
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
}

/// The worker: joins, forms the group of all ranks, times all-reduces; rank 0 prints
/// one JSON report per line.
pub async fn worker(config: NodeConfig, plan: WorkerPlan) -> Result<()> {
    let world = config.world_size.context("the worker needs WORLD_SIZE")? as usize;
    let (node, _) = crate::cluster::start(config, None).await?;
    let mut options = GroupOptions::default();
    // Tuning knobs for experiments: segment length (elements) and sends in flight.
    if let Some(v) = std::env::var("STRATA_SEG_LEN").ok().and_then(|v| v.parse().ok()) {
        options.seg_len = v;
    }
    if let Some(v) = std::env::var("STRATA_SENDS_IN_FLIGHT").ok().and_then(|v| v.parse().ok()) {
        options.sends_in_flight_max = v;
    }
    let group = Group::form(node.clone(), world, Duration::from_secs(30), options).await?;
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
    for &mib in &plan.sizes_mib {
        let len = mib << 18;
        let mut buf = Some(vec![1.0f32; len]);
        let mut times = Vec::with_capacity(plan.iters);
        for i in 0..plan.iters + 2 {
            barrier().await?;
            let start = Instant::now();
            let out = group.all_reduce(buf.take().expect("buffer returned"), ReduceOp::Sum).await?;
            let t = start.elapsed().as_secs_f64();
            if i >= 2 {
                times.push(t);
            }
            buf = Some(out);
        }
        times.sort_by(f64::total_cmp);
        if group.rank() == 0 {
            println!(
                "{}",
                serde_json::to_string(&WorkerReport::AllReduce { bytes: len * 4, seconds: times[times.len() / 2] })?
            );
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

/// PyTorch gloo all-reduce bus bandwidth measured on this machine (GB/s), from
/// `../shared/PLATFORM.md`: (ranks, MiB, GB/s).
pub const GLOO_BUSBW: &[(usize, usize, f64)] =
    &[(2, 1, 0.40), (2, 16, 1.32), (2, 64, 1.27), (4, 1, 0.27), (4, 16, 0.94), (4, 64, 1.06)];

/// Options of the all-reduce benchmark.
#[derive(Clone, Debug)]
pub struct AllReduceBench {
    /// Node counts.
    pub worlds: Vec<usize>,
    /// Buffer sizes in MiB.
    pub sizes_mib: Vec<usize>,
    /// Timed iterations per size.
    pub iters: usize,
}

impl Default for AllReduceBench {
    fn default() -> Self {
        Self { worlds: vec![2, 4], sizes_mib: vec![1, 16, 64], iters: 7 }
    }
}

/// Runs the benchmark; `on_figure` sees each figure as it is made.
pub fn run(opts: &AllReduceBench, mut on_figure: impl FnMut(&Figure)) -> Result<Vec<Figure>> {
    let exe = std::env::current_exe()?;
    let tcp = tcp_loopback_bytes_per_second(1 << 30)?;
    let mut out = Vec::new();
    for &world in &opts.worlds {
        let dir = tempfile::tempdir()?;
        strata_net::tls::create_ca(dir.path(), "bench")?;
        for r in 0..world {
            strata_net::tls::issue_node(dir.path(), &format!("rank-{r}"), &["127.0.0.1".into()])?;
        }
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let sizes = opts.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
        let mut children = Vec::new();
        for r in 0..world {
            let child = Command::new(&exe)
                .args(["worker", "allreduce", "--cert-dir"])
                .arg(dir.path())
                .args(["--sizes", &sizes, "--iters", &opts.iters.to_string()])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(if r == 0 { Stdio::piped() } else { Stdio::null() })
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {r}"))?;
            children.push(child);
        }
        let stdout = children[0].stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let Ok(report) = serde_json::from_str::<WorkerReport>(&line) else { continue };
            let f = match report {
                WorkerReport::AllReduce { bytes, seconds } => {
                    let bus = bytes as f64 * 2.0 * (world - 1) as f64 / world as f64 / seconds;
                    let mib = bytes >> 20;
                    let gloo = GLOO_BUSBW.iter().find(|g| g.0 == world && g.1 == mib).map(|g| g.2);
                    Figure {
                        case: format!("all_reduce {mib} MiB x{world} nodes (busBW)"),
                        unit: "GB/s",
                        value: bus / 1e9,
                        seconds,
                        reference: if gloo.is_some() { "gloo, PLATFORM.md".into() } else { "none".into() },
                        reference_value: gloo.unwrap_or(f64::NAN),
                        ratio: gloo.map_or(f64::NAN, |g| bus / 1e9 / g),
                        target: gloo,
                    }
                }
                WorkerReport::PointToPoint { bytes, seconds } => Figure {
                    case: format!("send 64 MiB shard x{world} nodes"),
                    unit: "GB/s",
                    value: bytes as f64 / seconds / 1e9,
                    seconds,
                    reference: "tcp loopback, same run".into(),
                    reference_value: tcp / 1e9,
                    ratio: bytes as f64 / seconds / tcp,
                    target: None,
                },
            };
            on_figure(&f);
            out.push(f);
        }
        for (r, mut c) in children.into_iter().enumerate() {
            let status = c.wait()?;
            if !status.success() {
                bail!("worker {r} of {world} exited with {status}");
            }
        }
    }
    Ok(out)
}
