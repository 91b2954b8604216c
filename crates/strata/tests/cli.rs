//! The `strata` binary as users run it: node processes forming a cluster, `strata
//! status`, torchrun-style workers, and a worker killed in the middle of an all-reduce.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STRATA: &str = env!("CARGO_BIN_EXE_strata");

fn strata(dir: &Path) -> Command {
    let mut c = Command::new(STRATA);
    c.current_dir(dir).env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    let out = strata(dir).args(args).output().expect("strata runs");
    assert!(out.status.success(), "strata {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the children when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sigterm(c: &Child) {
    // SAFETY: sending a signal to a child process we own.
    unsafe { libc_kill(c.id() as i32, 15) };
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn three_node_processes_form_a_cluster_that_status_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(d, &["cert", "--dir", "certs", "node-1", "node-2", "node-3"]);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seed = format!("127.0.0.1:{}", ports[0]);
    let mut procs = Procs(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let name = format!("node-{}", i + 1);
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["node", "--name", &name, "--listen", &listen, "--cert-dir", "certs", "--no-gpu"];
        if i > 0 {
            args.extend(["--seed", &seed]);
        }
        let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
        let mut child = strata(d);
        child.args(&args).env("RUST_LOG", "strata_net=debug");
        procs.0.push(child.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap());
    }
    let logs = || -> String {
        (1..=3).map(|i| std::fs::read_to_string(d.join(format!("node-{i}.log"))).unwrap_or_default()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let out = strata(d).args(["status", "--node", &seed, "--cert-dir", "certs", "--json"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.matches("\"Alive\"").count() == 3 {
            break text;
        }
        assert!(Instant::now() < deadline, "the cluster did not form: {text} {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    };
    for n in ["node-1", "node-2", "node-3"] {
        assert!(status.contains(&format!("\"name\": \"{n}\"")), "{n} missing from {status}");
    }
    // Roles: the operator certificate never joins, and a node certificate is no operator's.
    let out = strata(d)
        .args([
            "node",
            "--name",
            "admin",
            "--listen",
            "127.0.0.1:0",
            "--seed",
            &seed,
            "--cert-dir",
            "certs",
            "--no-gpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is an operator certificate; this needs a node certificate"),
        "{err}"
    );
    let out = strata(d).args(["status", "--node", &seed, "--cert-dir", "certs", "--as", "node-2"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is a node certificate; this needs an operator certificate"),
        "{err}"
    );
    assert!(!status.contains("admin"), "an operator is listed as a member: {status}");
    // The table form names every member too, as seen from another node.
    let other = format!("127.0.0.1:{}", ports[2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = String::from_utf8(run(d, &["status", "--node", &other, "--cert-dir", "certs"]).stdout).unwrap();
        if table.lines().filter(|l| l.contains(" alive ")).count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "node-3 never saw all members: {table}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // SIGTERM makes a node leave; the others see it go.
    sigterm(&procs.0[2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = String::from_utf8(run(d, &["status", "--node", &seed, "--cert-dir", "certs"]).stdout).unwrap();
        if table.lines().any(|l| l.starts_with("node-3") && l.contains(" left ")) {
            break;
        }
        assert!(Instant::now() < deadline, "node-3 never left: {table}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn workers(d: &Path, world: usize, extra: &[&str]) -> Procs {
    run(d, &["cert", "--dir", "certs"]);
    let names: Vec<String> = (0..world).map(|r| format!("rank-{r}")).collect();
    let mut args = vec!["cert", "--dir", "certs"];
    args.extend(names.iter().map(String::as_str));
    run(d, &args);
    let port = free_port().to_string();
    let mut procs = Procs(Vec::new());
    for r in 0..world {
        let child = strata(d)
            .args(["worker", "allreduce", "--cert-dir", "certs", "--failure-timeout-ms", "2000"])
            .args(extra)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        procs.0.push(child);
    }
    procs
}

#[test]
fn torchrun_style_workers_all_reduce() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = workers(dir.path(), 3, &["--sizes", "1", "--iters", "2"]);
    let outs: Vec<Output> = procs.0.drain(..).map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let report = String::from_utf8_lossy(&outs[0].stdout);
    assert!(report.contains("\"kind\":\"all_reduce\",\"bytes\":1048576"), "{report}");
    assert!(report.contains("\"kind\":\"point_to_point\""), "{report}");
}

#[test]
fn a_worker_killed_mid_all_reduce_fails_the_others_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = workers(dir.path(), 3, &["--sizes", "16", "--forever"]);
    // Wait until rank 0 reports that all-reduces are running.
    let stdout = procs.0[0].stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let Some(Ok(line)) = lines.next() else {
        let out = wait_timeout(&mut procs.0[0], Duration::from_secs(5));
        panic!("rank 0 stopped before reporting: {}", String::from_utf8_lossy(&out.stderr));
    };
    assert!(line.contains("running"), "{line}");
    let killed = Instant::now();
    procs.0[2].kill().unwrap();
    procs.0[2].wait().unwrap();
    for r in [0usize, 1] {
        let out = wait_timeout(&mut procs.0[r], Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {r} should fail");
        assert!(stderr.contains("rank-2"), "rank {r} should name the dead peer: {stderr}");
    }
    // Failure timeout (2 s) plus process exit, well under the 5 s default.
    assert!(killed.elapsed() < Duration::from_secs(8), "took {:?}", killed.elapsed());
}

#[test]
fn bench_allreduce_measures_the_tcp_ring_reference_and_says_gloo_did_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["bench", "allreduce", "--json", "--worlds", "2", "--sizes", "1", "--iters", "1"];
    let out = strata(dir.path()).args(args).args(["--python", "/nonexistent/python3"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let figures: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ring: Vec<_> = figures.iter().filter(|f| f["case"] == "all_reduce 1 MiB x2 nodes (busBW)").collect();
    assert_eq!(ring.len(), 1, "one reference ran, so one line per case: {figures:?}");
    let f = ring[0];
    assert!(f["reference"].as_str().unwrap().starts_with("tcp ring"), "{f}");
    let reference = f["reference_value"].as_f64().unwrap();
    assert!(reference > 0.0, "{f}");
    assert_eq!(f["target"].as_f64(), Some(reference), "{f}");
    let ratio = f["value"].as_f64().unwrap() / reference;
    assert!((f["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9, "{f}");
    assert!(
        stderr.contains("references: tcp-ring (measured), gloo (not available: /nonexistent/python3: "),
        "{stderr}"
    );
    // The compressed all-reduce (bf16 by default) next to it, counted in f32 bytes and
    // held to no target; CPU time per operation for both and for the reference.
    let bf16: Vec<_> =
        figures.iter().filter(|f| f["case"] == "all_reduce 1 MiB x2 nodes bf16 (busBW in f32 bytes)").collect();
    assert_eq!(bf16.len(), 1, "{figures:?}");
    assert!(bf16[0]["value"].as_f64().unwrap() > 0.0 && bf16[0]["target"].is_null(), "{}", bf16[0]);
    assert!(stderr.contains("cpu ms per op, rank 0 process, all_reduce 1 MiB x2 nodes (busBW): strata "), "{stderr}");
    assert!(stderr.contains(", tcp ring "), "{stderr}");
}

fn wait_timeout(c: &mut Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while c.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "process {} did not exit within {limit:?}", c.id());
        std::thread::sleep(Duration::from_millis(50));
    }
    use std::io::Read;
    let mut stderr = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let mut stdout = Vec::new();
    if let Some(mut o) = c.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    Output { status: c.wait().unwrap(), stdout, stderr: stderr.into_bytes() }
}

/// A tiny IDX dataset (12x12 images) in `dir`.
fn tiny_idx(dir: &Path, train: usize, test: usize) {
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut img = 0x0000_0803u32.to_be_bytes().to_vec();
        for v in [n as u32, 12, 12] {
            img.extend_from_slice(&v.to_be_bytes());
        }
        img.extend((0..n * 144).map(|i| ((i * 37) % 256) as u8));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        let mut lab = 0x0000_0801u32.to_be_bytes().to_vec();
        lab.extend_from_slice(&(n as u32).to_be_bytes());
        lab.extend((0..n).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

#[test]
fn a_worker_killed_mid_training_stops_the_other_and_the_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("data")).unwrap();
    tiny_idx(&d.join("data"), 256, 32);
    run(d, &["cert", "--dir", "certs", "rank-0", "rank-1"]);
    let port = free_port().to_string();
    let mut procs = Procs(Vec::new());
    for r in 0..2 {
        let child = strata(d)
            .args([
                "train",
                "--data",
                "data",
                "--epochs",
                "1000",
                "--batch-size",
                "16",
                "--checkpoint-dir",
                "ck",
                "--cert-dir",
                "certs",
            ])
            .args(["--failure-timeout-ms", "2000", "--json"])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        procs.0.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !d.join("ck/latest").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    procs.0[1].kill().unwrap();
    procs.0[1].wait().unwrap();
    let out = wait_timeout(&mut procs.0[0], Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("rank-1"), "the survivor should name the dead worker: {stderr}");
    assert!(killed.elapsed() < Duration::from_secs(10), "took {:?}", killed.elapsed());
    // The last checkpoint is intact: one more epoch resumes from it on a single node.
    let latest = std::fs::read_to_string(d.join("ck/latest")).unwrap();
    let done: u64 = latest.trim().trim_start_matches("epoch-").parse().unwrap();
    let target = (done + 1).to_string();
    let out = run(
        d,
        &["train", "--data", "data", "--epochs", &target, "--batch-size", "16", "--checkpoint-dir", "ck", "--resume"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("resumed from a checkpoint after epoch {done}")), "{text}");
    assert!(text.contains(&format!("epoch {target}:")), "{text}");
    assert!(d.join(format!("ck/epoch-{target}/model.safetensors")).exists());
}

/// Arguments, environment variables, and the text the error must contain.
type Refusal<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

/// Runs `strata args` expecting it to refuse: a non-zero exit whose stderr holds `want`
/// and no panic.
#[track_caller]
fn refused(dir: &Path, args: &[&str], env: &[(&str, &str)], want: &str) {
    let mut c = strata(dir);
    c.args(args).env_remove("RANK").env_remove("WORLD_SIZE").env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("strata runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "strata {args:?} should fail; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "strata {args:?} panicked: {stderr}");
    assert!(stderr.contains(want), "strata {args:?}: expected {want:?} in: {stderr}");
}

#[test]
fn out_of_range_values_and_missing_files_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("data")).unwrap();
    tiny_idx(&d.join("data"), 16, 4);
    let huge = u64::MAX.to_string();
    let cases: &[Refusal] = &[
        // `--seed` is the member to join through, as for `strata node`; it used to clash
        // with the shuffling seed and refuse an address as "invalid digit".
        (&["train", "--seed", "127.0.0.1:7001", "--data", "missing"], &[], "missing: no such directory"),
        (&["train", "--data", "data", "--nodes", "0"], &[], "invalid value '0' for '--nodes <NODES>'"),
        (&["train", "--data", "data"], &[("WORLD_SIZE", "0")], "WORLD_SIZE=\"0\" is not a node count"),
        (&["train", "--data", "data", "--batch-size", "0"], &[], "invalid value '0' for '--batch-size <BATCH_SIZE>'"),
        (&["train", "--data", "data", "--epochs", "0"], &[], "invalid value '0' for '--epochs <EPOCHS>'"),
        (&["train", "--data", "data", "--train-limit", "0"], &[], "invalid value '0' for '--train-limit"),
        (&["train", "--data", "data", "--test-limit", "0"], &[], "invalid value '0' for '--test-limit"),
        (&["train", "--data", "data", "--bench-steps", "0"], &[], "invalid value '0' for '--bench-steps"),
        (&["train", "--data", "data", "--lr", "NaN"], &[], "NaN is not a finite number above 0"),
        (&["train", "--data", "data", "--momentum=-1"], &[], "-1 is not a finite number in [0, 1]"),
        (
            &["train", "--data", "data", "--balance", "3:0"],
            &[],
            "balance \"3:0\" is not equal, measured or positive weights such as 3:1",
        ),
        (
            &["train", "--data", "data", "--balance", "3:1"],
            &[],
            "training: balance 3:1 gives 2 weights for a world of 1",
        ),
        (&["train", "--data", "data", "--rebalance-every", "0"], &[], "invalid value '0' for '--rebalance-every"),
        (
            &[
                "train",
                "--data",
                "data",
                "--nodes",
                "2",
                "--name",
                "a",
                "--insecure-dev",
                "--failure-timeout-ms",
                &huge,
            ],
            &[],
            "failure timeout of 18446744073709551615 ms exceeds the maximum of 3600000 ms (1 hour)",
        ),
        (&["node", "--name", "a", "--insecure-dev", "--failure-timeout-ms", &huge], &[], "exceeds the maximum"),
        (
            &["node", "--name", "a", "--insecure-dev", "--heartbeat-ms", "0"],
            &[],
            "heartbeat interval must be at least 1 ms",
        ),
        (&["node", "--config", "missing.toml"], &[], "reading missing.toml"),
        (&["worker", "allreduce", "--iters", "0"], &[], "invalid value '0' for '--iters <ITERS>'"),
        (&["worker", "allreduce", "--sizes", "0"], &[], "invalid value '0' for '--sizes <SIZES>'"),
        (&["bench", "allreduce", "--worlds", "1"], &[], "invalid value '1' for '--worlds <WORLDS>'"),
        (&["bench", "allreduce", "--sizes", "1,99999"], &[], "invalid value '99999' for '--sizes <SIZES>'"),
        (
            &["bench", "allreduce", "--compress", "int8"],
            &[],
            "unknown compression \"int8\": expected none, bf16 or fp16",
        ),
        (&["train", "--compress", "fp8"], &[], "unknown compression \"fp8\": expected none, bf16 or fp16"),
        (&["bench", "kernels", "--iters", "0"], &[], "invalid value '0' for '--iters <ITERS>'"),
        (&["bench", "train", "--steps", "0"], &[], "invalid value '0' for '--steps <STEPS>'"),
        (&["demo", "--epochs", "0"], &[], "invalid value '0' for '--epochs <EPOCHS>'"),
        (&["demo", "--train-limit", "0"], &[], "invalid value '0' for '--train-limit"),
        (&["demo", "--data", "missing"], &[], "no data in missing"),
        (&["status", "--node", "nowhere"], &[], "invalid socket address"),
        (
            &["train", "--data", "data", "--pipeline-stages", "20"],
            &[],
            "20 pipeline stages asked for, but the model has 11 layers",
        ),
        (&["train", "--data", "data", "--pipeline-stages", "2"], &[], "1 nodes cannot hold 2-stage pipelines"),
        (&["train", "--data", "data", "--pipeline-stages", "0"], &[], "invalid value '0' for '--pipeline-stages"),
        (
            &["train", "--data", "data", "--pipeline-stages", "1", "--batch-size", "10", "--micro-batches", "4"],
            &[],
            "--batch-size 10 does not split into 4 equal micro-batches",
        ),
        (
            &["train", "--data", "data", "--schedule", "pipedream"],
            &[],
            "unknown schedule \"pipedream\" (gpipe, 1f1b or zb)",
        ),
        (&["train", "--data", "data", "--model", "resnet"], &[], "unknown model \"resnet\" (reference-cnn or mlp)"),
        (&["checkpoint", "merge", "missing", "out"], &[], "no stage checkpoint in missing/stage-0"),
        (&["bench", "pipeline", "--stages", "7"], &[], "invalid value '7' for '--stages <STAGES>'"),
    ];
    for (args, env, want) in cases {
        refused(d, args, env, want);
    }
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(vec![
        strata(dir.path())
            .args(["-v", "node", "--name", "a", "--insecure-dev", "--listen", "127.0.0.1:0", "--no-gpu"])
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ]);
    let stderr = procs.0[0].stderr.take().unwrap();
    // The node logs its listening address at info level, then runs until stopped.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let done = line.contains("listening on");
            let _ = tx.send(line);
            if done {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        lines.push(line);
        if lines.last().unwrap().contains("listening on") {
            break;
        }
    }
    let text = lines.join("\n");
    assert!(text.contains("INFO") && text.contains("listening on"), "no info log line: {text}");
    assert!(!text.contains('\u{1b}'), "ANSI escape codes in piped logs: {text:?}");
}

/// Starts `strata node` processes named `names`, the first with the scheduler; returns
/// them and the first's address. Logs go to `<name>.log` in `d`.
fn task_cluster(d: &Path, names: &[&str]) -> (Procs, Vec<String>) {
    let mut args = vec!["cert", "--dir", "certs"];
    args.extend(names);
    run(d, &args);
    let addrs: Vec<String> = names.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut procs = Procs(Vec::new());
    for (i, name) in names.iter().enumerate() {
        procs.0.push(start_task_node(d, name, &addrs[i], (i > 0).then(|| addrs[0].as_str()), i == 0));
    }
    (procs, addrs)
}

fn start_task_node(d: &Path, name: &str, listen: &str, seed: Option<&str>, scheduler: bool) -> Child {
    let mut args = vec!["node", "--name", name, "--listen", listen, "--cert-dir", "certs", "--no-gpu"];
    args.extend(["--heartbeat-ms", "300", "--failure-timeout-ms", "3000"]);
    if let Some(s) = seed {
        args.extend(["--seed", s]);
    }
    if scheduler {
        args.extend(["--scheduler", "--journal", "journal"]);
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join(format!("{name}.log"))).unwrap();
    strata(d).args(&args).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
}

fn queue_rows(d: &Path, addr: &str) -> Vec<serde_json::Value> {
    let out = strata(d).args(["queue", "--node", addr, "--cert-dir", "certs", "--json"]).output().unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Waits until the scheduler lists `n` executors' worth of capacity: a no-op task finishes.
fn wait_ready(d: &Path, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = strata(d)
            .args(["submit", "--node", addr, "--cert-dir", "certs", "noop", "--wait", "--deadline-ms", "5000"])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "the scheduler never ran a task: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 9,999 small tasks from 3 submitting processes over 3 node processes, one node killed
/// with SIGKILL mid-run: every task's result arrives exactly once, and the tasks that were
/// on the killed node ran again (attempts counted).
#[test]
fn thousands_of_tasks_survive_a_killed_node_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut procs, addrs) = task_cluster(d, &["node-1", "node-2", "node-3"]);
    wait_ready(d, &addrs[0]);
    let per = 3333;
    let submitters: Vec<Child> = (0..3)
        .map(|_| {
            strata(d)
                .args(["submit", "--node", &addrs[0], "--cert-dir", "certs", "sleep", "--args", "5", "--cpus", "1"])
                .args(["--count", &per.to_string(), "--wait", "--retries", "3"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Kill node-3 once it has run a good share of the work.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = queue_rows(d, &addrs[0]);
        let on3 = rows.iter().filter(|r| r["node"] == "node-3" && r["state"] == "finished").count();
        if on3 >= 300 {
            break;
        }
        assert!(Instant::now() < deadline, "node-3 never ran 300 tasks");
        std::thread::sleep(Duration::from_millis(100));
    }
    procs.0[2].kill().unwrap();
    let mut seen = std::collections::HashMap::<u64, u32>::new();
    let mut attempts = std::collections::HashMap::<u64, u32>::new();
    // Read each submitter's output as it comes (thousands of lines fill a pipe).
    let (tx, rx) = std::sync::mpsc::channel();
    let pids: Vec<u32> = submitters.iter().map(Child::id).collect();
    for s in submitters {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s.wait_with_output());
        });
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    for _ in 0..3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(out) = rx.recv_timeout(left) else {
            for pid in &pids {
                // SAFETY: signalling our own children.
                unsafe { libc_kill(*pid as i32, 9) };
            }
            panic!("the submitters did not finish within 240 s");
        };
        let out = out.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "a submitter failed: {}\n{}", String::from_utf8_lossy(&out.stderr), text);
        for line in text.lines().filter(|l| l.contains(" finished on ")) {
            // "task N finished on NODE (attempt K): "
            let id: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            let attempt: u32 = line.split("(attempt ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
            *seen.entry(id).or_default() += 1;
            attempts.insert(id, attempt);
        }
    }
    assert_eq!(seen.len(), 3 * per, "every task's result arrives");
    assert!(seen.values().all(|&n| n == 1), "no result arrives twice");
    // The listing agrees: nothing lost, nothing pending, and the attempt each result
    // came from is the attempt count the scheduler recorded. (Whether node-3 was running
    // anything at the instant it died is up to timing; the tasks it was running are the
    // ones with attempts above 1.)
    let rows = queue_rows(d, &addrs[0]);
    let sleeps: Vec<_> = rows.iter().filter(|r| r["label"] == "sleep").collect();
    assert_eq!(sleeps.len(), 3 * per);
    assert!(sleeps.iter().all(|r| r["state"] == "finished"));
    for r in &sleeps {
        let id = r["id"].as_u64().unwrap();
        assert_eq!(r["attempts"].as_u64(), Some(u64::from(attempts[&id])), "task {id}: {r}");
    }
    let retried = attempts.values().filter(|&&a| a > 1).count();
    eprintln!("{retried} task(s) ran again after node-3 was killed");
}

/// The scheduler's process is killed with tasks queued and running, and restarted on
/// its journal: every task finishes exactly once.
#[test]
fn a_killed_scheduler_restarts_on_its_journal_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut procs, addrs) = task_cluster(d, &["node-1", "node-2"]);
    wait_ready(d, &addrs[0]);
    let out = run(
        d,
        &[
            "submit",
            "--node",
            &addrs[0],
            "--cert-dir",
            "certs",
            "sleep",
            "--args",
            "300",
            "--cpus",
            "2",
            "--count",
            "12",
        ],
    );
    let ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("submitted task ").map(|n| n.parse().unwrap()))
        .collect();
    assert_eq!(ids.len(), 12);
    std::thread::sleep(Duration::from_millis(700));
    procs.0[0].kill().unwrap();
    let _ = procs.0[0].wait();
    procs.0[0] = start_task_node(d, "node-1", &addrs[0], Some(&addrs[1]), true);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = queue_rows(d, &addrs[0]);
        let done: Vec<_> = rows.iter().filter(|r| r["label"] == "sleep" && r["state"] == "finished").collect();
        if done.len() == ids.len() {
            let mut got: Vec<u64> = done.iter().map(|r| r["id"].as_u64().unwrap()).collect();
            got.sort();
            assert_eq!(got, ids, "each task once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tasks did not all finish after the restart: {rows:?}\n{}",
            std::fs::read_to_string(d.join("node-1.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts a `strata train` process of a torchrun-style world.
fn train_rank(d: &Path, rank: usize, world: usize, port: &str, args: &[&str]) -> Child {
    strata(d)
        .arg("train")
        .args(args)
        .args(["--cert-dir", "certs", "--failure-timeout-ms", "2000"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_pipeline_stage_killed_mid_step_stops_the_others_and_the_stages_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("data")).unwrap();
    tiny_idx(&d.join("data"), 192, 32);
    run(d, &["cert", "--dir", "certs", "rank-0", "rank-1", "rank-2"]);
    let common = [
        "--data",
        "data",
        "--batch-size",
        "16",
        "--pipeline-stages",
        "3",
        "--micro-batches",
        "4",
        "--schedule",
        "zb",
        "--split",
        "conv2,fc1",
        "--checkpoint-dir",
        "ck",
    ];
    let port = free_port().to_string();
    let mut args = common.to_vec();
    args.extend(["--epochs", "1000", "--json"]);
    let mut procs = Procs((0..3).map(|r| train_rank(d, r, 3, &port, &args)).collect());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(0..3).all(|s| d.join(format!("ck/stage-{s}/latest")).exists()) {
        assert!(Instant::now() < deadline, "no checkpoint of every stage appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The middle stage dies: both neighbours stop, naming it.
    let killed = Instant::now();
    procs.0[1].kill().unwrap();
    procs.0[1].wait().unwrap();
    for r in [0, 2] {
        let out = wait_timeout(&mut procs.0[r], Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {r} went on without stage 1");
        assert!(
            stderr.contains("pipeline stage 1 of replica 0 (node rank-1) was lost"),
            "rank {r} should name the lost stage: {stderr}"
        );
    }
    assert!(killed.elapsed() < Duration::from_secs(10), "took {:?}", killed.elapsed());
    // Every stage resumes from the newest epoch they all have, and trains one more.
    let done: u64 = (0..3)
        .map(|s| {
            let l = std::fs::read_to_string(d.join(format!("ck/stage-{s}/latest"))).unwrap();
            l.trim().trim_start_matches("epoch-").parse::<u64>().unwrap()
        })
        .min()
        .unwrap();
    let target = (done + 1).to_string();
    let port = free_port().to_string();
    let mut args = common.to_vec();
    args.extend(["--epochs", &target, "--resume"]);
    let mut procs = Procs((0..3).map(|r| train_rank(d, r, 3, &port, &args)).collect());
    let outs: Vec<Output> = procs.0.iter_mut().map(|c| wait_timeout(c, Duration::from_secs(120))).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let text = String::from_utf8_lossy(&outs[0].stdout);
    assert!(text.contains(&format!("resumed from a checkpoint after epoch {done}")), "{text}");
    assert!(text.contains(&format!("epoch {target}:")), "{text}");
    // The stages' checkpoints merge into a single-node one, which single-node training resumes.
    let out = run(d, &["checkpoint", "merge", "ck", "merged"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("merged/epoch-{target}")));
    let next = (done + 2).to_string();
    let out = run(
        d,
        &["train", "--data", "data", "--epochs", &next, "--batch-size", "16", "--checkpoint-dir", "merged", "--resume"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("resumed from a checkpoint after epoch {target}")), "{text}");
}
