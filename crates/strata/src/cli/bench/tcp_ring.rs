//! A plaintext TCP ring all-reduce: the same-run reference of `strata bench allreduce`.
//!
//! It drives the ring machine [`strata_collective::Group`] runs (reduce-scatter then
//! all-gather, the same segments and sends in flight, the same f32 additions in the same
//! order) over one TCP connection to the right neighbour and one from the left, with no
//! encryption: what a gloo-like transport gets on this machine. Each rank has a sender
//! thread (frames to the right) and a receiver thread (frames from the left); the
//! caller's thread adds, as the QUIC driver's task does.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Socket, Type};
use strata_collective::{Algorithm, AllReduce, GroupOptions, Machine, Rank, Received, ReduceOp, SendData};
use strata_wire::ChunkTag;

use super::allreduce::{WorkerPlan, WorkerReport, process_cpu_seconds, tuned_options};

/// Frame header: operation number, step, segment, element count (u32 little-endian each).
const HEADER: usize = 16;

/// Largest segment a frame may announce, in elements (a garbled header fails, not OOMs).
const FRAME_ELEMS_MAX: usize = 1 << 28;

/// Socket buffer size for the ring's connections: `STRATA_TCP_BUF` bytes, 0 (the
/// default) leaving the kernel's autotuning alone, which was the faster on loopback here.
fn socket_buffer() -> usize {
    std::env::var("STRATA_TCP_BUF").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

enum Event {
    /// A frame from the left neighbour; `data[..len]` holds its elements.
    Frame { op: u32, tag: ChunkTag, data: Vec<f32>, len: usize },
    /// The sender handed a frame to the kernel; its buffer comes back for reuse.
    Written(Vec<u8>),
    /// The left neighbour closed its connection between frames.
    Closed,
    /// A connection failed, with the reason.
    Failed(String),
}

/// One rank's place in a TCP ring.
pub struct TcpRing {
    rank: Rank,
    world: usize,
    options: GroupOptions,
    op: u32,
    to_right: Sender<Vec<u8>>,
    events: Receiver<Event>,
    recycle: Sender<Vec<f32>>,
    spare: Vec<Vec<u8>>,
    /// Frames of the next operation that arrived while this one waited for its sends.
    early: VecDeque<Event>,
    /// The left neighbour closed its connection (fine once nothing more is expected).
    left_closed: bool,
}

impl TcpRing {
    /// Joins a ring torchrun-style: rank 0 listens on `master`, the others dial it.
    pub fn connect(rank: Rank, world: usize, master: SocketAddr, options: GroupOptions) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("tcp ring: rank {rank} is outside a world of {world}");
        }
        if rank == 0 {
            let listener = TcpListener::bind(master).with_context(|| format!("tcp ring: listening on {master}"))?;
            Self::master(listener, world, options)
        } else {
            Self::join(rank, world, master, options)
        }
    }

    /// Rank 0: collects every rank's ring address on `listener`, then sends the table back.
    pub fn master(listener: TcpListener, world: usize, options: GroupOptions) -> Result<Self> {
        let deadline = Instant::now() + options.timeout;
        let ring = ring_listener(listener.local_addr()?.ip())?;
        let mut addrs = vec![None; world];
        addrs[0] = Some(ring.local_addr()?);
        let mut joined = Vec::new();
        listener.set_nonblocking(true)?;
        while joined.len() + 1 < world {
            let mut conn = accept_until(&listener, deadline, "tcp ring rendezvous")?;
            conn.set_read_timeout(Some(options.timeout))?;
            let mut line = String::new();
            BufReader::new(&mut conn).read_line(&mut line)?;
            let (r, addr) = line
                .trim()
                .split_once(' ')
                .and_then(|(r, a)| Some((r.parse::<usize>().ok()?, a.parse::<SocketAddr>().ok()?)))
                .ok_or_else(|| anyhow!("tcp ring rendezvous: bad greeting {line:?}"))?;
            if r == 0 || r >= world || addrs[r].is_some() {
                bail!("tcp ring rendezvous: rank {r} is unexpected in a world of {world}");
            }
            addrs[r] = Some(addr);
            joined.push(conn);
        }
        let addrs: Vec<SocketAddr> = addrs.into_iter().flatten().collect();
        let table = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ") + "\n";
        for mut conn in joined {
            conn.write_all(table.as_bytes())?;
        }
        Self::wire(0, world, &addrs, ring, options, deadline)
    }

    /// Ranks above 0: dial `master` (retrying until the timeout), announce the ring
    /// address, read the table.
    pub fn join(rank: Rank, world: usize, master: SocketAddr, options: GroupOptions) -> Result<Self> {
        let deadline = Instant::now() + options.timeout;
        let mut conn = loop {
            match TcpStream::connect(master) {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("tcp ring rendezvous: dialling rank 0 at {master}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let ring = ring_listener(conn.local_addr()?.ip())?;
        writeln!(conn, "{rank} {}", ring.local_addr()?)?;
        conn.set_read_timeout(Some(options.timeout))?;
        let mut line = String::new();
        BufReader::new(&mut conn).read_line(&mut line).context("tcp ring rendezvous: reading the table")?;
        let addrs = line
            .split_whitespace()
            .map(|a| a.parse::<SocketAddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("tcp ring rendezvous: bad table {line:?}"))?;
        if addrs.len() != world {
            bail!("tcp ring rendezvous: the table has {} addresses for a world of {world}", addrs.len());
        }
        Self::wire(rank, world, &addrs, ring, options, deadline)
    }

    /// Connects to the right neighbour, accepts the left one and starts the two threads.
    fn wire(
        rank: Rank,
        world: usize,
        addrs: &[SocketAddr],
        ring: TcpListener,
        options: GroupOptions,
        deadline: Instant,
    ) -> Result<Self> {
        let (to_right, frames) = mpsc::channel::<Vec<u8>>();
        let (events_tx, events) = mpsc::channel();
        let (recycle, spares) = mpsc::channel();
        let this = Self {
            rank,
            world,
            options,
            op: 0,
            to_right,
            events,
            recycle,
            spare: Vec::new(),
            early: VecDeque::new(),
            left_closed: false,
        };
        if world == 1 {
            return Ok(this);
        }
        let (left, right) = (this.left(), (rank + 1) % world);
        let out = dial(addrs[right], deadline).with_context(|| format!("tcp ring: dialling rank {right}"))?;
        (&out).write_all(&(rank as u32).to_le_bytes())?;
        ring.set_nonblocking(true)?;
        let mut input = accept_until(&ring, deadline, "tcp ring: waiting for the left neighbour")?;
        let mut who = [0u8; 4];
        input.set_read_timeout(Some(this.options.timeout))?;
        input.read_exact(&mut who).context("tcp ring: reading the left neighbour's rank")?;
        if u32::from_le_bytes(who) as usize != left {
            bail!("tcp ring: rank {rank} was dialled by rank {} instead of rank {left}", u32::from_le_bytes(who));
        }
        input.set_read_timeout(None)?;
        for s in [&out, &input] {
            s.set_nodelay(true)?;
        }
        let tx = events_tx.clone();
        std::thread::Builder::new()
            .name(format!("tcp-ring-send-{rank}"))
            .spawn(move || send_loop(out, right, frames, tx))?;
        std::thread::Builder::new()
            .name(format!("tcp-ring-recv-{rank}"))
            .spawn(move || recv_loop(input, left, spares, events_tx))?;
        Ok(this)
    }

    /// This rank.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    fn left(&self) -> Rank {
        (self.rank + self.world - 1) % self.world
    }

    /// Sums `buf` across the ring; every rank gets the same bits back.
    pub fn all_reduce(&mut self, buf: Vec<f32>) -> Result<Vec<f32>> {
        let (rank, left) = (self.rank, self.left());
        let mut m = AllReduce::new(rank, self.world, buf, ReduceOp::Sum, Algorithm::Ring, self.options.seg_len)?;
        let op = self.op;
        self.op = self.op.wrapping_add(1);
        let mut stashed = std::mem::take(&mut self.early);
        let mut in_flight = 0;
        // Received segments the machine forwards later (the all-gather's).
        let mut kept: HashMap<ChunkTag, (Vec<f32>, usize)> = HashMap::new();
        loop {
            while in_flight < self.options.sends_in_flight_max.max(1) {
                let Some(a) = m.poll_send() else { break };
                let mut frame = self.spare.pop().unwrap_or_default();
                frame.clear();
                let forwarded = match &a.data {
                    SendData::Bytes(_) => None,
                    SendData::Forward(tag) => Some(
                        kept.remove(tag)
                            .ok_or_else(|| anyhow!("all_reduce on rank {rank}: nothing kept for {tag:?}"))?,
                    ),
                };
                let data: &[u8] = match (&a.data, &forwarded) {
                    (_, Some((v, len))) => bytemuck::cast_slice(&v[..*len]),
                    (SendData::Bytes(b), None) => b,
                    (SendData::Forward(_), None) => unreachable!("a forward without data failed above"),
                };
                for w in [op, a.tag.step, a.tag.segment, (data.len() / 4) as u32] {
                    frame.extend_from_slice(&w.to_le_bytes());
                }
                frame.extend_from_slice(data);
                if let Some((v, _)) = forwarded {
                    let _ = self.recycle.send(v);
                }
                if self.to_right.send(frame).is_err() {
                    // The sender stopped on an error it reported (or the receiver saw the
                    // neighbour go); say that rather than the symptom.
                    let why = self
                        .events
                        .recv_timeout(Duration::from_secs(1))
                        .ok()
                        .into_iter()
                        .chain(self.events.try_iter())
                        .find_map(|e| match e {
                            Event::Failed(why) => Some(why),
                            Event::Closed => Some(format!("rank {left} closed the connection")),
                            _ => None,
                        })
                        .unwrap_or_else(|| "the sender thread stopped".into());
                    bail!("all_reduce on rank {rank}: {why}");
                }
                in_flight += 1;
            }
            // Done like the QUIC driver: every segment received and every send accepted
            // by the transport.
            if m.is_done() && in_flight == 0 {
                return Ok(m.take_result());
            }
            let event = match stashed.pop_front() {
                Some(e) => e,
                None if self.left_closed && !m.waiting_on().is_empty() => {
                    bail!("all_reduce on rank {rank}: rank {left} closed the connection")
                }
                None => match self.events.recv_timeout(self.options.timeout) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => {
                        bail!("all_reduce on rank {rank}: nothing from rank {left} for {:?}", self.options.timeout)
                    }
                    Err(RecvTimeoutError::Disconnected) => bail!("all_reduce on rank {rank}: the ring threads stopped"),
                },
            };
            match event {
                Event::Written(frame) => {
                    in_flight -= 1;
                    self.spare.push(frame);
                }
                // The left neighbour finished and went on: everything it had for this
                // operation came before (one ordered stream), so keep it for the next.
                Event::Frame { op: got, .. } if got == op.wrapping_add(1) => self.early.push_back(event),
                Event::Frame { op: got, tag, data, len } => {
                    if got != op {
                        bail!("all_reduce on rank {rank}: rank {left} sent a frame of operation {got} during {op}");
                    }
                    match m.on_receive(left, tag, &[bytemuck::cast_slice(&data[..len])])? {
                        Received::Keep => {
                            kept.insert(tag, (data, len));
                        }
                        Received::Done => {
                            let _ = self.recycle.send(data);
                        }
                    }
                }
                Event::Closed => self.left_closed = true,
                Event::Failed(why) => bail!("all_reduce on rank {rank}: {why}"),
            }
        }
    }
}

/// A listener for the left neighbour on `ip`, with the buffer size set before `listen`
/// so accepted connections inherit it.
fn ring_listener(ip: IpAddr) -> Result<TcpListener> {
    let addr = SocketAddr::new(ip, 0);
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if socket_buffer() > 0 {
        s.set_recv_buffer_size(socket_buffer())?;
        s.set_send_buffer_size(socket_buffer())?;
    }
    s.bind(&addr.into())?;
    s.listen(16)?;
    Ok(s.into())
}

fn dial(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if socket_buffer() > 0 {
        s.set_recv_buffer_size(socket_buffer())?;
        s.set_send_buffer_size(socket_buffer())?;
    }
    s.connect_timeout(&addr.into(), deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))?;
    Ok(s.into())
}

/// Accepts one connection on a non-blocking `listener`, polling until `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream> {
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("{what}: nobody connected to {} in time", listener.local_addr()?);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context(what.to_string()),
        }
    }
}

fn send_loop(mut out: TcpStream, right: Rank, frames: Receiver<Vec<u8>>, events: Sender<Event>) {
    for frame in frames {
        if let Err(e) = out.write_all(&frame) {
            let _ = events.send(Event::Failed(format!("sending to rank {right}: {e}")));
            return;
        }
        if events.send(Event::Written(frame)).is_err() {
            return;
        }
    }
    let _ = out.shutdown(Shutdown::Write);
}

fn recv_loop(mut input: TcpStream, left: Rank, spares: Receiver<Vec<f32>>, events: Sender<Event>) {
    let failed = |why: String| {
        let _ = events.send(Event::Failed(why));
    };
    loop {
        let mut h = [0u8; HEADER];
        match input.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                let _ = events.send(Event::Closed);
                return;
            }
            Err(e) => return failed(format!("receiving from rank {left}: {e}")),
        }
        let word = |i: usize| u32::from_le_bytes(h[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let len = word(3) as usize;
        if len > FRAME_ELEMS_MAX {
            return failed(format!("rank {left} announced a segment of {len} elements"));
        }
        let mut data = spares.try_recv().unwrap_or_default();
        if data.len() < len {
            data.resize(len, 0.0);
        }
        if let Err(e) = input.read_exact(bytemuck::cast_slice_mut(&mut data[..len])) {
            return failed(format!("receiving a segment from rank {left}: {e}"));
        }
        let tag = ChunkTag { step: word(1), segment: word(2) };
        if events.send(Event::Frame { op: word(0), tag, data, len }).is_err() {
            return;
        }
    }
}

/// The worker of `strata worker tcp-allreduce`: joins the ring from RANK, WORLD_SIZE,
/// MASTER_ADDR and MASTER_PORT, checks one all-reduce's sums, times the rest like the
/// QUIC worker (a barrier before each, median on rank 0) and prints rank 0's reports.
pub fn worker(plan: &WorkerPlan) -> Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("the tcp worker needs {k}"));
    let rank: Rank = var("RANK")?.parse().context("RANK")?;
    let world: usize = var("WORLD_SIZE")?.parse().context("WORLD_SIZE")?;
    let master = format!("{}:{}", var("MASTER_ADDR")?, var("MASTER_PORT")?);
    let master = master
        .to_socket_addrs()
        .with_context(|| format!("resolving {master}"))?
        .next()
        .ok_or_else(|| anyhow!("{master} resolves to nothing"))?;
    let mut ring = TcpRing::connect(rank, world, master, tuned_options())?;
    for &mib in &plan.sizes_mib {
        let len = mib << 18;
        // Rank r contributes r + 1, so the first sum is world(world+1)/2 everywhere.
        let mut buf = Some(vec![(rank + 1) as f32; len]);
        let want = (world * (world + 1) / 2) as f32;
        let mut times = Vec::with_capacity(plan.iters);
        let mut cpu = 0.0;
        for i in 0..plan.iters + 2 {
            ring.all_reduce(vec![0.0])?;
            let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
            let out = ring.all_reduce(buf.take().expect("buffer returned"))?;
            let t = start.elapsed().as_secs_f64();
            if i >= 2 {
                cpu += process_cpu_seconds() - cpu_start;
            }
            if i == 0 {
                if let Some(p) = out.iter().position(|v| *v != want) {
                    bail!(
                        "tcp ring all_reduce of {mib} MiB on rank {rank}: element {p} is {} instead of {want}",
                        out[p]
                    );
                }
            } else if i >= 2 {
                times.push(t);
            }
            buf = Some(out);
        }
        times.sort_by(f64::total_cmp);
        if rank == 0 {
            let report = WorkerReport::AllReduce {
                bytes: len * 4,
                seconds: times[times.len() / 2],
                compression: None,
                cpu_seconds: Some(cpu / plan.iters as f64),
            };
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    // Nobody closes its sockets while a neighbour still reads.
    ring.all_reduce(vec![0.0])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of an in-process ring of `world`, one thread per rank.
    fn on_ring<T: std::marker::Send + 'static>(
        world: usize,
        seg_len: usize,
        sends_in_flight_max: usize,
        f: impl Fn(TcpRing) -> Result<T> + std::marker::Send + Sync + Clone + 'static,
    ) -> Vec<Result<T>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap();
        let options =
            GroupOptions { seg_len, sends_in_flight_max, timeout: Duration::from_secs(20), ..Default::default() };
        let mut threads = Vec::new();
        let mut listener = Some(listener);
        for rank in 0..world {
            let (f, options, listener) = (f.clone(), options.clone(), listener.take());
            threads.push(std::thread::spawn(move || {
                let ring = match listener {
                    Some(l) => TcpRing::master(l, world, options)?,
                    None => TcpRing::join(rank, world, master, options)?,
                };
                f(ring)
            }));
        }
        threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
    }

    /// Rank `r`'s element `i`: fractions whose sum depends on the order of addition.
    fn value(r: usize, i: usize) -> f32 {
        ((i * 7919 + r * 104_729) % 1000) as f32 * 0.013 + 1.0 / (r + 3) as f32
    }

    #[test]
    fn ring_all_reduce_sums_match_and_agree_bitwise_across_ranks() {
        for world in [2, 3] {
            // 1001 elements: chunks of unequal length, each in several 64-element segments.
            let len = 1001;
            let results = on_ring(world, 64, 3, move |mut ring| {
                let r = ring.rank();
                let ints = ring.all_reduce((0..len).map(|i| (i % 17 + r) as f32).collect())?;
                let fractions = ring.all_reduce((0..len).map(|i| value(r, i)).collect())?;
                // A one-element operation (most chunks empty), like the benchmark's barrier.
                let one = ring.all_reduce(vec![r as f32])?;
                Ok((ints, fractions, one))
            });
            let results: Vec<_> = results.into_iter().map(|r| r.expect("all_reduce succeeds")).collect();
            let tri = (world * (world - 1) / 2) as f32;
            for (r, (ints, fractions, one)) in results.iter().enumerate() {
                let want: Vec<f32> = (0..len).map(|i| (i % 17 * world) as f32 + tri).collect();
                assert_eq!(ints, &want, "integer sums on rank {r} of {world}");
                assert_eq!(one, &vec![tri], "one-element sum on rank {r} of {world}");
                for (i, got) in fractions.iter().enumerate() {
                    let exact: f64 = (0..world).map(|q| value(q, i) as f64).sum();
                    assert!((*got as f64 - exact).abs() < 1e-4, "element {i} on rank {r} of {world}: {got} vs {exact}");
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(fractions), bits(&results[0].1), "rank {r} of {world} differs from rank 0");
            }
        }
    }

    #[test]
    fn back_to_back_operations_keep_their_frames_apart() {
        // One send in flight keeps segments waiting in the machine while the left
        // neighbour, already done, sends the next operation's.
        let results = on_ring(4, 16, 1, |mut ring| {
            let r = ring.rank();
            let mut sums = Vec::new();
            for op in 0..40 {
                let len = if op % 2 == 0 { 1 } else { 1000 + op };
                sums.push(ring.all_reduce(vec![(r * 100 + op) as f32; len])?);
            }
            Ok(sums)
        });
        for (r, sums) in results.into_iter().enumerate() {
            for (op, sum) in sums.expect("all_reduce succeeds").iter().enumerate() {
                let want = (600 + 4 * op) as f32;
                assert!(sum.iter().all(|v| *v == want), "operation {op} on rank {r}: {:?}", &sum[..1]);
            }
        }
    }

    #[test]
    fn a_neighbour_that_leaves_fails_the_all_reduce_with_its_rank() {
        let results = on_ring(2, 64, 3, |mut ring| {
            if ring.rank() == 1 {
                drop(ring);
                return Ok(String::new());
            }
            Ok(ring.all_reduce(vec![1.0; 4096]).expect_err("the peer left").to_string())
        });
        let message = results.into_iter().next().unwrap().unwrap();
        assert!(message.starts_with("all_reduce on rank 0: "), "{message}");
        assert!(message.contains("rank 1 closed the connection") || message.contains("sending to rank 1"), "{message}");
    }

    #[test]
    fn a_rank_outside_the_world_is_refused() {
        let e = TcpRing::connect(3, 2, "127.0.0.1:1".parse().unwrap(), GroupOptions::default()).err().unwrap();
        assert_eq!(e.to_string(), "tcp ring: rank 3 is outside a world of 2");
    }
}
