//! The cluster task queue over in-process nodes: priority, resource demand, faults, and
//! a scheduler restarted on its journal.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_cluster::tasks::{
    Demand, ExecOptions, ExecService, SchedulerOptions, SchedulerService, TaskClient, TaskError, TaskInput,
    TaskOutcome, TaskOutput, TaskRegistry, TaskRequest,
};
use strata_gpu::{GpuHandle, Op, TensorId};
use strata_net::NodeHandle;
use strata_tensor::HostTensor;

use crate::net::helpers::cluster;

const WAIT: Duration = Duration::from_secs(20);

/// Task functions every node registers; `log` records the order tasks ran in.
fn registry(log: Arc<Mutex<Vec<String>>>) -> TaskRegistry {
    let r = TaskRegistry::new();
    r.register("whoami", |ctx: strata_cluster::tasks::TaskContext, _: TaskInput| {
        Box::pin(async move { Ok(TaskOutput { data: ctx.node.into_bytes(), tensors: vec![] }) })
            as strata_cluster::tasks::TaskFuture
    });
    r.register("record", move |_: strata_cluster::tasks::TaskContext, input: TaskInput| {
        let log = log.clone();
        Box::pin(async move {
            let name = String::from_utf8_lossy(&input.args).to_string();
            tokio::time::sleep(Duration::from_millis(30)).await;
            log.lock().unwrap().push(name);
            Ok(TaskOutput::default())
        }) as strata_cluster::tasks::TaskFuture
    });
    r.register("sleep", |_: strata_cluster::tasks::TaskContext, input: TaskInput| {
        Box::pin(async move {
            let ms: u64 = String::from_utf8_lossy(&input.args).parse().map_err(|e| format!("sleep: {e}"))?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(TaskOutput::default())
        }) as strata_cluster::tasks::TaskFuture
    });
    r.register("sum", |_: strata_cluster::tasks::TaskContext, input: TaskInput| {
        Box::pin(async move {
            let s: f32 = input.tensors.iter().flat_map(|t| t.data().iter()).sum();
            Ok(TaskOutput { data: vec![], tensors: vec![HostTensor::new(vec![1], vec![s]).unwrap()] })
        }) as strata_cluster::tasks::TaskFuture
    });
    r.register("panic", |_: strata_cluster::tasks::TaskContext, _: TaskInput| {
        Box::pin(async move {
            if input_is_empty() {
                panic!("boom");
            }
            Ok(TaskOutput::default())
        }) as strata_cluster::tasks::TaskFuture
    });
    r
}

/// Always true; keeps the panicking task's future typed as a result.
fn input_is_empty() -> bool {
    std::hint::black_box(true)
}

fn exec(
    node: &NodeHandle,
    gpu: Option<GpuHandle>,
    cpu_slots: u32,
    labels: &[(&str, &str)],
    log: &Arc<Mutex<Vec<String>>>,
) {
    let options = ExecOptions {
        gpu_slots: 1,
        cpu_slots,
        gpu_mem_bytes: None,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    ExecService::register(node, gpu, registry(log.clone()), options);
}

fn finished(o: TaskOutcome) -> strata_cluster::tasks::TaskResult {
    match o {
        TaskOutcome::Finished(r) => r,
        other => panic!("expected a finished task, got {other:?}"),
    }
}

#[actix_rt::test]
async fn tasks_are_ordered_by_priority_and_placed_by_demand() {
    // node-1 gets the GPU (when the machine has an adapter); node-2 is "big". The device
    // opens first: opening it blocks the thread the nodes' heartbeats run on.
    let gpu = crate::common::gpu().map(GpuHandle::from_gpu);
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    exec(&nodes[0], None, 1, &[], &log);
    exec(&nodes[1], gpu.clone(), 1, &[], &log);
    exec(&nodes[2], None, 4, &[("size", "big")], &log);
    let journal = tempfile::tempdir().unwrap();
    let _sched = SchedulerService::start(&nodes[0], SchedulerOptions::new(journal.path())).await.unwrap();
    let client = TaskClient::member(nodes[1].clone(), "node-0");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Labels place a task: only node-2 is big.
    let big = TaskRequest::function("whoami", vec![], &[]).demand(Demand::default().cpu_slots(1).label("size", "big"));
    let r = finished(client.run(big, WAIT).await.unwrap());
    assert_eq!((String::from_utf8(r.data).unwrap(), r.node.as_str(), r.attempt), ("node-2".into(), "node-2", 1));

    // Strict priority on a node with one slot: a blocker holds the slot, then a low and
    // a high priority task queue behind it; the high one runs first.
    let on_big = |name: &str, prio: i32| {
        TaskRequest::function("record", name.as_bytes().to_vec(), &[])
            .priority(prio)
            .demand(Demand::default().cpu_slots(4).label("size", "big"))
    };
    let blocker = client.submit(on_big("blocker", 0)).await.unwrap();
    let low = client.submit(on_big("low", 1)).await.unwrap();
    let high = client.submit(on_big("high", 9)).await.unwrap();
    for id in [blocker, low, high] {
        finished(client.wait(id, WAIT).await.unwrap());
    }
    assert_eq!(*log.lock().unwrap(), ["blocker", "high", "low"]);

    // Tensors in and out.
    let t = HostTensor::new(vec![3], vec![1.0, 2.0, 3.5]).unwrap();
    let r = finished(client.run(TaskRequest::function("sum", vec![], &[t.clone(), t]), WAIT).await.unwrap());
    assert_eq!(r.tensors[0].to_host().unwrap().data(), &[13.0]);

    // Bad input and faults reach the submitter; the nodes keep serving.
    let e = client.submit(TaskRequest::function("whoami", vec![], &[]).demand(Demand::default().cpu_slots(1000))).await;
    let e = e.unwrap_err().to_string();
    assert!(e.contains("1000") && e.contains("largest"), "{e}");
    match client.run(TaskRequest::function("nope", vec![], &[]), WAIT).await.unwrap() {
        TaskOutcome::Failed(m) => assert!(m.contains("no task function named \"nope\""), "{m}"),
        other => panic!("{other:?}"),
    }
    match client.run(TaskRequest::function("panic", vec![], &[]).retries(1), WAIT).await.unwrap() {
        TaskOutcome::Failed(m) => assert!(m.matches("the task panicked: boom").count() == 2, "two attempts: {m}"),
        other => panic!("{other:?}"),
    }
    match client.run(TaskRequest::function("sleep", b"5000".to_vec(), &[]).deadline_ms(300), WAIT).await.unwrap() {
        TaskOutcome::Expired => {}
        other => panic!("expected expiry, got {other:?}"),
    }
    let slow = client.submit(TaskRequest::function("sleep", b"3000".to_vec(), &[])).await.unwrap();
    client.cancel(slow).await.unwrap();
    assert_eq!(client.wait(slow, WAIT).await.unwrap(), TaskOutcome::Cancelled);
    let e = client.cancel(strata_cluster::tasks::TaskId(999_999)).await.unwrap_err();
    assert!(matches!(e, TaskError::Refused { .. }), "{e}");

    // A GPU program goes to the node with a GPU and equals the CPU reference.
    if gpu.is_some() {
        let a = HostTensor::random([16, 8], 1);
        let b = HostTensor::random([8, 4], 2);
        let (ia, ib, ic) = (TensorId(1), TensorId(2), TensorId(3));
        let ops = vec![Op::MatMul { a: ia, b: ib, trans_a: false, trans_b: false, out: ic }];
        let task = TaskRequest::program(&[(ia, a.clone()), (ib, b.clone())], ops, vec![ic])
            .demand(Demand::gpu_mem(1 << 20).gpu_slots(1));
        let r = finished(client.run(task, WAIT).await.unwrap());
        assert_eq!(r.node, "node-1");
        let want = strata_tensor::cpu::matmul(&a, &b, false, false).unwrap();
        let got = r.tensors[0].to_host().unwrap();
        for (x, y) in got.data().iter().zip(want.data()) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    // The listing shows every task with its node and attempts.
    let rows = client.list().await.unwrap();
    assert!(rows.iter().any(|r| r.label == "record" && r.state == "finished" && r.node.as_deref() == Some("node-2")));
    assert!(rows.iter().any(|r| r.state == "cancelled"));
    if let Some(g) = gpu {
        g.shutdown().await;
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_restarted_scheduler_recovers_its_tasks_and_submitters_reattach() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    exec(&nodes[1], None, 1, &[], &log);
    let journal = tempfile::tempdir().unwrap();
    let sched = SchedulerService::start(&nodes[0], SchedulerOptions::new(journal.path())).await.unwrap();
    let client = TaskClient::member(nodes[0].clone(), "node-0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on_one = |name: &str| {
        TaskRequest::function("record", name.as_bytes().to_vec(), &[]).demand(Demand::default().cpu_slots(1))
    };
    let mut ids = vec![
        client
            .submit(TaskRequest::function("sleep", b"800".to_vec(), &[]).demand(Demand::default().cpu_slots(1)))
            .await
            .unwrap(),
    ];
    for i in 0..5 {
        ids.push(client.submit(on_one(&format!("t{i}"))).await.unwrap());
    }
    // The scheduler dies with one task running and five queued.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sched.stop().await;
    drop(sched);
    let _sched = SchedulerService::start(&nodes[0], SchedulerOptions::new(journal.path())).await.unwrap();
    // Submitters reattach by id: every task ends once, in order.
    for id in &ids {
        finished(client.wait(*id, WAIT).await.unwrap());
    }
    assert_eq!(*log.lock().unwrap(), ["t0", "t1", "t2", "t3", "t4"]);
    let rows = client.list().await.unwrap();
    assert_eq!(rows.iter().filter(|r| r.state == "finished").count(), 6, "{rows:?}");
    for n in &nodes {
        n.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_submit_over_the_queue_bound_is_refused_naming_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 1).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    exec(&nodes[0], None, 1, &[], &log);
    let journal = tempfile::tempdir().unwrap();
    let mut options = SchedulerOptions::new(journal.path());
    options.config.queue_bound = 2;
    let _sched = SchedulerService::start(&nodes[0], options).await.unwrap();
    let client = TaskClient::member(nodes[0].clone(), "node-0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let one = || TaskRequest::function("sleep", b"400".to_vec(), &[]).demand(Demand::default().cpu_slots(1));
    let running = client.submit(one()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = [client.submit(one()).await.unwrap(), client.submit(one()).await.unwrap()];
    let e = client.submit(one()).await.unwrap_err().to_string();
    assert!(e.ends_with("submit refused: the queue holds 2 tasks, its bound is 2"), "{e}");
    // Room again once the queue drains.
    for id in [running, queued[0], queued[1]] {
        finished(client.wait(id, WAIT).await.unwrap());
    }
    finished(client.run(one(), WAIT).await.unwrap());
    nodes[0].shutdown().await;
}
