//! The scheduler driven in memory: rules one by one, then randomized clusters.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use crate::bench::Rng;
use crate::*;

const GIB: u64 = 1 << 30;

fn sched() -> Scheduler {
    Scheduler::new(SchedulerConfig::default())
}

fn cpus(n: u32) -> Demand {
    Demand::default().cpu_slots(n)
}

fn cpu_node(n: u32) -> NodeResources {
    NodeResources::new(0, 0, n)
}

fn gpu_node(gib: u64) -> NodeResources {
    NodeResources::new(gib * GIB, 1, 8)
}

fn task(name: &str, demand: Demand) -> TaskSpec {
    TaskSpec::new(name).demand(demand)
}

/// Every placement available now (bounded).
fn placements(s: &mut Scheduler, now: u64) -> Vec<Placement> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match s.poll_placement(now) {
            Some(p) => out.push(p),
            None => return out,
        }
    }
    panic!("more than 10000 placements in one go");
}

fn events(s: &mut Scheduler) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn journal(s: &mut Scheduler) -> Vec<JournalRecord> {
    std::iter::from_fn(|| s.poll_journal()).collect()
}

fn used(s: &Scheduler, node: &str) -> Usage {
    s.node(node).expect("node known").used
}

#[test]
fn priority_first_then_fifo_within_a_priority() {
    let mut s = sched();
    s.node_up(0, "n", cpu_node(1));
    let order = [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 2)];
    let ids: HashMap<TaskId, &str> =
        order.iter().map(|&(name, p)| (s.submit(0, task(name, cpus(1)).priority(p)).unwrap(), name)).collect();
    let mut ran = Vec::new();
    for now in 1..=5 {
        let p = placements(&mut s, now);
        assert_eq!(p.len(), 1, "one slot, one task at a time");
        ran.push(ids[&p[0].task]);
        assert_eq!(s.task_finished(now, p[0].task, p[0].attempt), Delivery::Deliver);
    }
    assert_eq!(ran, ["e", "b", "d", "a", "c"]);
    assert!(s.poll_placement(6).is_none());
}

#[test]
fn best_fit_takes_the_tightest_node() {
    let mut s = sched();
    s.node_up(0, "n10", gpu_node(10));
    s.node_up(0, "n4", gpu_node(4));
    s.node_up(0, "n6", gpu_node(6));
    let node_of = |s: &mut Scheduler, gib: u64| {
        s.submit(0, task("t", Demand::gpu_mem(gib * GIB))).unwrap();
        placements(s, 0).pop().expect("placed").node
    };
    assert_eq!(node_of(&mut s, 3), "n4");
    assert_eq!(node_of(&mut s, 3), "n6");
    assert_eq!(node_of(&mut s, 3), "n6");
    assert_eq!(node_of(&mut s, 1), "n4");
    assert_eq!(node_of(&mut s, 5), "n10");
    // A CPU-only task goes where the least GPU memory is free, keeping GPUs for GPU work.
    let mut s = sched();
    s.node_up(0, "big-gpu", NodeResources::new(80 * GIB, 8, 64));
    s.node_up(0, "cpu-box", NodeResources::new(0, 0, 64));
    s.submit(0, task("cpu", cpus(4))).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "cpu-box");
}

#[test]
fn input_locality_comes_before_best_fit() {
    let mut s = sched();
    s.node_up(0, "a", gpu_node(4));
    s.node_up(0, "b", gpu_node(16));
    s.node_up(0, "c", gpu_node(16));
    s.submit(0, task("local", Demand::gpu_mem(2 * GIB)).input("c", 1 << 20).input("b", 100 << 20)).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "b", "most input bytes win");
    s.submit(0, task("remote", Demand::gpu_mem(2 * GIB))).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "a", "without inputs, best fit");
    // When the node holding the inputs is full, best fit elsewhere.
    s.submit(0, task("fill-b", Demand::gpu_mem(14 * GIB)).input("b", 1)).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "b");
    s.submit(0, task("local-but-full", Demand::gpu_mem(GIB)).input("b", 100 << 20)).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "a");
}

#[test]
fn labels_restrict_placement() {
    let mut s = sched();
    s.node_up(0, "v", gpu_node(16).label("backend", "vulkan"));
    s.node_up(0, "m", gpu_node(8).label("backend", "metal"));
    s.submit(0, task("t", Demand::gpu_mem(GIB).label("backend", "vulkan"))).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "v");
}

#[test]
fn a_large_task_at_the_head_does_not_block_smaller_ones() {
    let mut s = sched();
    s.node_up(0, "a", cpu_node(4));
    s.node_up(0, "b", cpu_node(2));
    let first = s.submit(0, task("first", cpus(2))).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "b");
    let _ = first;
    s.submit(0, task("holder", cpus(1))).unwrap();
    assert_eq!(placements(&mut s, 0)[0].node, "a");
    let big = s.submit(1, task("big", cpus(4))).unwrap();
    let small = s.submit(1, task("small", cpus(2))).unwrap();
    let p = placements(&mut s, 1);
    assert_eq!(p.iter().map(|p| p.task).collect::<Vec<_>>(), [small]);
    assert_eq!(p[0].node, "a");
    let info = s.task(big).unwrap();
    assert!(matches!(info.state, TaskState::Queued { bypasses: 1, bypassed_since_ms: Some(1), .. }), "{info:?}");
}

/// When the big task of [`big_behind_small_stream`] was first bypassed, got a node
/// reserved, and was placed, ms.
#[derive(Debug, Default)]
struct BigTask {
    bypassed: Option<u64>,
    reserved: Option<u64>,
    placed: Option<u64>,
}

const SMALL_RUN_MS: u64 = 10;

/// One 8-slot node; small 1-slot tasks arrive every ms and run 10 ms; a task needing the
/// whole node arrives at 5 ms behind them.
fn big_behind_small_stream(config: SchedulerConfig, horizon_ms: u64) -> BigTask {
    let mut s = Scheduler::new(config);
    s.node_up(0, "n", cpu_node(8));
    let mut running: Vec<(u64, TaskId, u32)> = Vec::new();
    let mut big = None;
    let mut seen = BigTask::default();
    for now in 0..horizon_ms {
        for (_, t, a) in running.extract_if(.., |(end, ..)| *end <= now) {
            assert_eq!(s.task_finished(now, t, a), Delivery::Deliver);
        }
        s.submit(now, task("small", cpus(1))).unwrap();
        if now == 5 {
            big = Some(s.submit(now, task("big", cpus(8))).unwrap());
        }
        for p in placements(&mut s, now) {
            if Some(p.task) == big {
                seen.placed = Some(now);
                return seen;
            }
            running.push((now + SMALL_RUN_MS, p.task, p.attempt));
        }
        if let Some(TaskState::Queued { bypassed_since_ms, reserved_node, .. }) =
            big.and_then(|b| s.task(b)).map(|i| i.state)
        {
            seen.bypassed = seen.bypassed.or(bypassed_since_ms);
            if reserved_node.is_some() {
                seen.reserved = seen.reserved.or(Some(now));
            }
        }
    }
    seen
}

#[test]
fn aging_places_a_large_task_within_the_bound() {
    // By time: starving 100 ms after the first bypass, then the node drains in one run.
    let config = SchedulerConfig { max_bypass_wait_ms: 100, max_bypasses: u32::MAX, ..SchedulerConfig::default() };
    let big = big_behind_small_stream(config, 5_000);
    let (Some(bypassed), Some(reserved), Some(placed)) = (big.bypassed, big.reserved, big.placed) else {
        panic!("{big:?}");
    };
    assert_eq!(reserved, bypassed + 100, "{big:?}");
    assert!(placed <= bypassed + 100 + SMALL_RUN_MS, "{big:?}");

    // By count: reserved after 20 bypasses (one per small task placed behind it).
    let config = SchedulerConfig { max_bypass_wait_ms: u64::MAX, max_bypasses: 20, ..SchedulerConfig::default() };
    let big = big_behind_small_stream(config, 5_000);
    let (Some(_), Some(reserved), Some(placed)) = (big.bypassed, big.reserved, big.placed) else {
        panic!("{big:?}");
    };
    assert!(placed <= reserved + SMALL_RUN_MS, "{big:?}");

    // Without aging the stream starves it.
    let config = SchedulerConfig { max_bypass_wait_ms: u64::MAX, max_bypasses: u32::MAX, ..SchedulerConfig::default() };
    let big = big_behind_small_stream(config, 2_000);
    assert!(big.bypassed.is_some() && big.reserved.is_none() && big.placed.is_none(), "{big:?}");
}

#[test]
fn a_starving_task_shows_its_reserved_node() {
    let config = SchedulerConfig { max_bypasses: 1, ..SchedulerConfig::default() };
    let mut s = Scheduler::new(config);
    s.node_up(0, "n", cpu_node(4));
    s.submit(0, task("holder", cpus(2))).unwrap();
    placements(&mut s, 0);
    let big = s.submit(0, task("big", cpus(4))).unwrap();
    s.submit(0, task("small1", cpus(1))).unwrap();
    s.submit(0, task("small2", cpus(1))).unwrap();
    // small1 bypasses big; at the next scan big starves and reserves n, so small2 waits.
    assert_eq!(placements(&mut s, 0).len(), 1);
    let info = s.task(big).unwrap();
    assert!(matches!(&info.state, TaskState::Queued { reserved_node: Some(n), .. } if n == "n"), "{info:?}");
    assert_eq!(s.node("n").unwrap().reserved_for, Some(big));
}

#[test]
fn a_full_queue_refuses_with_its_bound() {
    let mut s = Scheduler::new(SchedulerConfig { queue_bound: 3, ..SchedulerConfig::default() });
    s.node_up(0, "n", cpu_node(1));
    for _ in 0..3 {
        s.submit(0, task("t", cpus(1))).unwrap();
    }
    journal(&mut s);
    let err = s.submit(0, task("t", cpus(1))).unwrap_err();
    assert_eq!(err, SchedError::QueueFull { queued: 3, bound: 3 });
    assert_eq!(err.to_string(), "submit refused: the queue holds 3 tasks, its bound is 3");
    assert!(journal(&mut s).is_empty(), "a refusal changes nothing");
    assert_eq!(placements(&mut s, 0).len(), 1);
    s.submit(0, task("t", cpus(1))).unwrap();
}

#[test]
fn an_infeasible_demand_is_refused_naming_it_and_the_largest_node() {
    let mut s = sched();
    let err = s.submit(0, task("t", Demand::gpu_mem(GIB))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "submit refused: no node of the cluster could ever meet the demand of 1.0 GiB of gpu memory, 0 gpu slots, \
         0 cpu slots; the cluster has no live node"
    );
    s.node_up(0, "small", NodeResources::new(8 * GIB, 1, 8).label("backend", "vulkan"));
    s.node_up(0, "large", NodeResources::new(48 * GIB, 4, 64).label("backend", "vulkan"));
    let err = s.submit(0, task("t", Demand::gpu_mem(64 * GIB).gpu_slots(1).cpu_slots(1))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "submit refused: no node of the cluster could ever meet the demand of 64.0 GiB of gpu memory, 1 gpu slot, \
         1 cpu slot; the largest live node, large, has 48.0 GiB of gpu memory, 4 gpu slots, 64 cpu slots, \
         labels backend=vulkan"
    );
    let err = s.submit(0, task("t", Demand::gpu_mem(GIB).label("backend", "cuda"))).unwrap_err();
    assert!(
        err.to_string().contains("demand of 1.0 GiB of gpu memory, 0 gpu slots, 0 cpu slots, labels backend=cuda;"),
        "{err}"
    );
    assert!(matches!(err, SchedError::Infeasible { largest: Some((ref n, _)), .. } if n == "large"));
    // Busy is not infeasible: a demand that fits an idle node waits.
    s.submit(0, task("t", Demand::gpu_mem(48 * GIB))).unwrap();
    s.submit(0, task("t", Demand::gpu_mem(48 * GIB))).unwrap();
    assert_eq!(placements(&mut s, 0).len(), 1);
    assert_eq!(s.queued_len(), 1);
}

#[test]
fn bad_submits_and_calls_are_refused_with_their_values() {
    let mut s = sched();
    s.node_up(0, "n", cpu_node(1));
    let err = s.submit(100, task("t", cpus(1)).deadline_ms(100)).unwrap_err();
    assert_eq!(err.to_string(), "submit refused: the deadline 100 ms is not after now (100 ms)");
    let id = s.submit(0, task("t", cpus(1)).id(TaskId(7))).unwrap();
    assert_eq!(id, TaskId(7));
    let err = s.submit(0, task("t", cpus(1)).id(TaskId(7))).unwrap_err();
    assert_eq!(err.to_string(), "submit refused: task id 7 is already in use");
    assert_eq!(s.submit(0, task("t", cpus(1))).unwrap(), TaskId(8), "assigned ids skip given ones");
    let err = s.cancel(0, TaskId(99)).unwrap_err();
    assert_eq!(err.to_string(), "cancel: no task 99 is queued or running");
    let err = s.node_resources(0, "ghost", cpu_node(1)).unwrap_err();
    assert_eq!(err.to_string(), "node resources: node ghost is not live");
}

#[test]
fn resources_are_released_on_finish_failure_and_loss() {
    let mut s = Scheduler::new(SchedulerConfig { default_retries: 0, ..SchedulerConfig::default() });
    s.node_up(0, "n", NodeResources::new(4 * GIB, 4, 4));
    for _ in 0..5 {
        s.submit(0, task("t", Demand::gpu_mem(GIB).gpu_slots(1).cpu_slots(1))).unwrap();
    }
    let p = placements(&mut s, 0);
    assert_eq!(p.len(), 4);
    assert_eq!(used(&s, "n"), Usage { gpu_mem_bytes: 4 * GIB, gpu_slots: 4, cpu_slots: 4 });
    assert_eq!(s.task_finished(1, p[0].task, p[0].attempt), Delivery::Deliver);
    assert_eq!(used(&s, "n").gpu_slots, 3);
    let p5 = placements(&mut s, 1);
    assert_eq!(p5.len(), 1);
    assert_eq!(s.task_failed(2, p[1].task, p[1].attempt, "shader error", false), Delivery::Deliver);
    assert_eq!(used(&s, "n").gpu_slots, 3);
    assert_eq!(
        events(&mut s),
        [Event::Failed {
            task: p[1].task,
            causes: CauseChain(vec![Cause { attempt: Some(1), node: Some("n".into()), reason: "shader error".into() }])
        }]
    );
    s.node_lost(3, "n");
    assert_eq!(used(&s, "n"), Usage::default());
    assert!(!s.node("n").unwrap().live);
    assert_eq!(s.placed_len(), 0);
    // No retries left: the three placed tasks fail with the node's loss as their cause.
    let failed: Vec<_> = events(&mut s)
        .into_iter()
        .map(|e| match e {
            Event::Failed { causes, .. } => causes.to_string(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(|c| c == "attempt 1 on node n: node n was lost"), "{failed:?}");
}

#[test]
fn node_loss_requeues_counting_attempts_until_the_budget_is_spent() {
    let mut s = sched();
    s.node_up(0, "a", cpu_node(1));
    let t = s.submit(0, task("t", cpus(1)).retries(2)).unwrap();
    let blocker = s.submit(0, task("blocker", cpus(1))).unwrap();
    assert_eq!(placements(&mut s, 0), [Placement { task: t, attempt: 1, node: "a".into() }]);
    s.node_up(1, "b", cpu_node(1));
    assert_eq!(placements(&mut s, 1)[0].task, blocker);
    s.node_lost(2, "a");
    assert!(events(&mut s).is_empty());
    let info = s.task(t).unwrap();
    assert_eq!(info.attempts, 1);
    assert_eq!(info.causes.to_string(), "attempt 1 on node a: node a was lost");
    assert!(matches!(info.state, TaskState::Queued { .. }));
    // It keeps its place ahead of later tasks.
    let later = s.submit(2, task("later", cpus(1))).unwrap();
    assert_eq!(s.task_finished(3, blocker, 1), Delivery::Deliver);
    assert_eq!(placements(&mut s, 3), [Placement { task: t, attempt: 2, node: "b".into() }]);
    s.node_up(4, "a", cpu_node(1));
    assert_eq!(placements(&mut s, 4)[0].task, later);
    assert_eq!(s.task_finished(5, later, 1), Delivery::Deliver);
    s.node_lost(6, "b");
    assert_eq!(placements(&mut s, 6), [Placement { task: t, attempt: 3, node: "a".into() }]);
    s.node_lost(7, "a");
    assert_eq!(
        events(&mut s),
        [Event::Failed {
            task: t,
            causes: CauseChain(vec![
                Cause { attempt: Some(1), node: Some("a".into()), reason: "node a was lost".into() },
                Cause { attempt: Some(2), node: Some("b".into()), reason: "node b was lost".into() },
                Cause { attempt: Some(3), node: Some("a".into()), reason: "node a was lost".into() },
            ])
        }]
    );
    assert!(s.task(t).is_none(), "an ended task is forgotten");
}

#[test]
fn the_cause_chain_reads_in_order() {
    let chain = CauseChain(vec![
        Cause { attempt: Some(1), node: Some("a".into()), reason: "node a was lost".into() },
        Cause { attempt: Some(2), node: Some("b".into()), reason: "out of memory".into() },
    ]);
    assert_eq!(chain.to_string(), "attempt 1 on node a: node a was lost; then attempt 2 on node b: out of memory");
}

#[test]
fn retryable_failures_use_the_budget() {
    let mut s = sched();
    s.node_up(0, "n", cpu_node(1));
    let t = s.submit(0, task("t", cpus(1)).retries(1)).unwrap();
    let p = placements(&mut s, 0);
    assert_eq!(s.task_failed(1, t, p[0].attempt, "device lost", true), Delivery::Deliver);
    let p = placements(&mut s, 1);
    assert_eq!(p, [Placement { task: t, attempt: 2, node: "n".into() }]);
    assert_eq!(s.task_failed(2, t, 2, "device lost again", true), Delivery::Deliver);
    let [Event::Failed { causes, .. }] = &events(&mut s)[..] else { panic!("expected one failure") };
    assert_eq!(causes.to_string(), "attempt 1 on node n: device lost; then attempt 2 on node n: device lost again");
}

#[test]
fn a_late_result_from_a_lost_node_is_dropped_and_results_are_delivered_once() {
    let mut s = sched();
    s.node_up(0, "a", cpu_node(1));
    s.node_up(0, "b", cpu_node(1));
    let t = s.submit(0, task("t", cpus(1))).unwrap();
    let first = placements(&mut s, 0).pop().unwrap();
    s.node_lost(1, &first.node);
    let second = placements(&mut s, 1).pop().unwrap();
    assert_eq!((second.task, second.attempt), (t, 2));
    assert_ne!(second.node, first.node);
    // The lost node was only partitioned: its result arrives after all.
    assert_eq!(s.task_started(2, t, 1), Delivery::Late);
    assert_eq!(s.task_finished(2, t, 1), Delivery::Late);
    assert_eq!(s.task_failed(2, t, 1, "x", true), Delivery::Late);
    assert_eq!(s.task_started(2, t, 2), Delivery::Deliver);
    assert_eq!(s.task_finished(3, t, 2), Delivery::Deliver);
    assert_eq!(s.task_finished(3, t, 2), Delivery::Duplicate);
    assert_eq!(s.task_failed(3, t, 2, "x", true), Delivery::Duplicate);
    assert_eq!(s.task_finished(3, t, 1), Delivery::Late);
    assert_eq!(s.task_finished(3, TaskId(12345), 1), Delivery::Late);
    assert_eq!(used(&s, &second.node), Usage::default());
    assert!(events(&mut s).is_empty());
    s.check_consistency();
}

#[test]
fn cancel_ends_a_task_once_and_aborts_a_placed_attempt() {
    let mut s = sched();
    s.node_up(0, "n", cpu_node(2));
    let placed = s.submit(0, task("placed", cpus(2))).unwrap();
    let waiting = s.submit(0, task("waiting", cpus(2))).unwrap();
    placements(&mut s, 0);
    s.cancel(1, waiting).unwrap();
    assert_eq!(events(&mut s), [Event::Cancelled { task: waiting }]);
    assert_eq!(s.queued_len(), 0);
    s.cancel(1, placed).unwrap();
    assert_eq!(
        events(&mut s),
        [Event::Cancelled { task: placed }, Event::Abort { task: placed, attempt: 1, node: "n".into() }]
    );
    assert_eq!(s.cancel(1, placed).unwrap_err(), SchedError::UnknownTask { op: "cancel", task: placed });
    // The attempt holds its slots until the node reports it stopped.
    assert_eq!(used(&s, "n").cpu_slots, 2);
    let next = s.submit(2, task("next", cpus(1))).unwrap();
    assert!(placements(&mut s, 2).is_empty());
    assert_eq!(s.task_failed(3, placed, 1, "aborted", false), Delivery::Late);
    assert_eq!(used(&s, "n").cpu_slots, 0);
    assert_eq!(placements(&mut s, 3)[0].task, next);
    assert!(events(&mut s).is_empty());
    s.check_consistency();
}

#[test]
fn deadlines_expire_waiting_and_placed_tasks() {
    let mut s = sched();
    s.node_up(0, "n", cpu_node(1));
    let placed = s.submit(0, task("placed", cpus(1)).deadline_ms(200)).unwrap();
    let waiting = s.submit(0, task("waiting", cpus(1)).deadline_ms(100)).unwrap();
    placements(&mut s, 0);
    assert_eq!(s.next_timeout(), Some(100));
    s.tick(99);
    assert!(events(&mut s).is_empty());
    s.tick(100);
    assert_eq!(events(&mut s), [Event::DeadlineExpired { task: waiting, deadline_ms: 100 }]);
    assert_eq!(s.next_timeout(), Some(200));
    s.tick(250);
    assert_eq!(
        events(&mut s),
        [
            Event::DeadlineExpired { task: placed, deadline_ms: 200 },
            Event::Abort { task: placed, attempt: 1, node: "n".into() }
        ]
    );
    assert_eq!(s.next_timeout(), None);
    assert_eq!(s.task_finished(260, placed, 1), Delivery::Late, "a result after the deadline is dropped");
    assert_eq!(used(&s, "n"), Usage::default());
}

#[test]
fn tasks_no_live_node_can_hold_wait_for_a_node_then_fail() {
    let mut s = Scheduler::new(SchedulerConfig { unplaceable_grace_ms: 1_000, ..SchedulerConfig::default() });
    s.node_up(0, "small", gpu_node(4));
    s.node_up(0, "large", gpu_node(32));
    let t = s.submit(0, task("t", Demand::gpu_mem(16 * GIB))).unwrap();
    let other = s.submit(0, task("other", Demand::gpu_mem(16 * GIB))).unwrap();
    assert!(placements(&mut s, 0).iter().all(|p| p.node == "large"));
    s.node_lost(10, "large");
    assert!(placements(&mut s, 10).is_empty());
    assert_eq!(s.next_timeout(), Some(1_010));
    let info = s.task(other).unwrap();
    assert!(matches!(info.state, TaskState::Queued { unplaceable_since_ms: Some(10), .. }), "{info:?}");
    s.tick(500);
    assert!(events(&mut s).is_empty());
    // A node that can hold them comes up within the grace: they run.
    s.node_up(600, "large2", gpu_node(32));
    assert_eq!(placements(&mut s, 600).len(), 2);
    s.node_lost(700, "large2");
    s.tick(1_699);
    assert!(events(&mut s).is_empty());
    s.tick(1_700);
    let failed = events(&mut s);
    assert_eq!(failed.len(), 2);
    for e in failed {
        let Event::Failed { task: id, causes } = e else { panic!("{e:?}") };
        assert!([t, other].contains(&id));
        assert!(
            causes.to_string().ends_with(
                "no live node could hold 16.0 GiB of gpu memory, 0 gpu slots, 0 cpu slots for 1000 ms; \
                 the largest live node, small, has 4.0 GiB of gpu memory, 1 gpu slot, 8 cpu slots"
            ),
            "{causes}"
        );
    }
    s.check_consistency();
}

#[test]
fn journal_records_round_trip_through_messagepack() {
    let mut s = sched();
    s.node_up(0, "n", gpu_node(8).label("backend", "vulkan"));
    let t = s
        .submit(
            0,
            task("t", Demand::gpu_mem(GIB).label("backend", "vulkan"))
                .payload(vec![1, 2, 3])
                .priority(-3)
                .input("n", 5)
                .deadline_ms(9_000),
        )
        .unwrap();
    placements(&mut s, 0);
    s.node_lost(1, "n");
    s.node_up(2, "n", gpu_node(8).label("backend", "vulkan"));
    placements(&mut s, 2);
    s.cancel(3, t).unwrap();
    let records = journal(&mut s);
    assert_eq!(records.len(), 6, "{records:?}");
    for r in records.iter().chain(s.snapshot().iter()) {
        let bytes = rmp_serde::to_vec(r).unwrap();
        let back: JournalRecord = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(&back, r);
    }
}

#[test]
fn recovery_keeps_placed_attempts_for_nodes_that_report_and_requeues_the_rest() {
    let mut s = sched();
    s.node_up(0, "a", cpu_node(1));
    s.node_up(0, "b", cpu_node(1));
    let ta = s.submit(0, task("ta", cpus(1)).input("a", 1)).unwrap();
    let tb = s.submit(0, task("tb", cpus(1)).input("b", 1)).unwrap();
    let waiting = s.submit(0, task("waiting", cpus(1))).unwrap();
    let p = placements(&mut s, 0);
    assert_eq!(p.iter().map(|p| (p.task, p.node.as_str())).collect::<Vec<_>>(), [(ta, "a"), (tb, "b")]);
    let log = journal(&mut s);
    let mut r = Scheduler::recover(SchedulerConfig::default(), log, 1_000).unwrap();
    assert_eq!(r.snapshot(), s.snapshot());
    assert_eq!((r.queued_len(), r.placed_len()), (1, 2));
    assert!(r.poll_placement(1_000).is_none(), "no node has reported yet");
    r.node_up(1_001, "a", cpu_node(1));
    assert_eq!(used(&r, "a").cpu_slots, 1, "the recovered attempt holds its slot");
    assert!(r.poll_placement(1_001).is_none());
    assert_eq!(r.next_timeout(), Some(31_000));
    r.tick(31_000);
    // b never reported: its attempt counts as lost and the task waits again, ahead of `waiting`.
    let info = r.task(tb).unwrap();
    assert_eq!(
        info.causes.to_string(),
        "attempt 1 on node b: node b did not report within 30000 ms of the scheduler's recovery"
    );
    assert_eq!(r.task_finished(31_001, ta, 1), Delivery::Deliver);
    assert_eq!(placements(&mut r, 31_001), [Placement { task: tb, attempt: 2, node: "a".into() }]);
    assert_eq!(r.task(waiting).map(|i| i.attempts), Some(0));
    r.check_consistency();
}

#[test]
fn recovery_refuses_a_contradictory_journal() {
    let records = vec![JournalRecord::Placed { task: TaskId(3), attempt: 1, node: "a".into() }];
    let err = Scheduler::recover(SchedulerConfig::default(), records, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "recover: journal record 0 cannot be applied: attempt 1 of task 3 is placed, but the task does not exist"
    );
}

// ---- randomized cluster ----

const SIM_NODES: usize = 64;
const SIM_TASKS: usize = 6_000;
const MAX_RUN_MS: u64 = 400;
const MAX_DT_MS: u64 = 3;

struct Run {
    task: TaskId,
    attempt: u32,
    end: u64,
    fails: bool,
    /// Its node was declared lost after it started, or its task was aborted: no delivery.
    stale: bool,
}

struct SimNode {
    name: String,
    res: NodeResources,
    alive: bool,
    down_until: u64,
    runs: Vec<Run>,
}

struct SimTask {
    key: (Reverse<i32>, u64),
    demand: Demand,
    ended: u32,
    placed: bool,
}

struct Sim {
    rng: Rng,
    s: Scheduler,
    config: SchedulerConfig,
    now: u64,
    nodes: Vec<SimNode>,
    tasks: HashMap<TaskId, SimTask>,
    /// What the scheduler should hold per node, by our own count: (task, attempt) -> demand.
    holds: Vec<HashMap<(TaskId, u32), Demand>>,
    log: Vec<JournalRecord>,
    submitted: usize,
    seq: u64,
    restarts: usize,
    recover_checks: usize,
    refused: usize,
    head_watch: Option<(TaskId, String, u64)>,
    longest_head_wait: u64,
}

fn sim_node_resources(i: usize) -> NodeResources {
    let (gib, gpus, cpus) = [(8, 1, 8), (16, 2, 16), (24, 4, 32), (48, 4, 64)][i % 4];
    let backend = if i % 3 == 2 { "metal" } else { "vulkan" };
    NodeResources::new(gib * GIB, gpus, cpus).label("backend", backend)
}

impl Sim {
    fn new(seed: u64, config: SchedulerConfig) -> Self {
        let mut s = Scheduler::new(config.clone());
        let nodes: Vec<SimNode> = (0..SIM_NODES)
            .map(|i| SimNode {
                name: format!("n{i:02}"),
                res: sim_node_resources(i),
                alive: true,
                down_until: 0,
                runs: Vec::new(),
            })
            .collect();
        for n in &nodes {
            s.node_up(0, &n.name, n.res.clone());
        }
        Sim {
            rng: Rng::new(seed),
            s,
            config,
            now: 0,
            nodes,
            tasks: HashMap::new(),
            holds: (0..SIM_NODES).map(|_| HashMap::new()).collect(),
            log: Vec::new(),
            submitted: 0,
            seq: 0,
            restarts: 0,
            recover_checks: 0,
            refused: 0,
            head_watch: None,
            longest_head_wait: 0,
        }
    }

    fn random_spec(&mut self) -> TaskSpec {
        let r = &mut self.rng;
        let mut demand = match r.below(20) {
            // Needs a whole 48 GiB node: bypassed until aging reserves one.
            0 => Demand::gpu_mem(40 * GIB).gpu_slots(4).cpu_slots(48),
            // No node has this: refused at submit.
            1 if r.below(4) == 0 => Demand::gpu_mem(100 * GIB),
            _ => Demand::gpu_mem((1 + r.below(16) as u64) * (GIB / 2))
                .gpu_slots(r.below(2) as u32)
                .cpu_slots(1 + r.below(6) as u32),
        };
        if r.below(10) == 0 {
            demand = demand.label("backend", "metal");
        }
        let mut spec = TaskSpec::new("sim").priority(r.below(3) as i32).demand(demand).retries(r.below(3) as u32);
        if r.below(3) == 0 {
            spec = spec.input(format!("n{:02}", r.below(SIM_NODES)), 1 + r.below(1 << 20) as u64);
        }
        if r.below(8) == 0 {
            spec = spec.deadline_ms(self.now + 50 + r.below(2_000) as u64);
        }
        spec
    }

    fn node_index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).expect("a sim node")
    }

    fn submit_some(&mut self) {
        for _ in 0..self.rng.below(8) {
            if self.submitted == SIM_TASKS {
                return;
            }
            let spec = self.random_spec();
            let (prio, demand) = (spec.priority, spec.demand.clone());
            match self.s.submit(self.now, spec) {
                Ok(id) => {
                    let key = (Reverse(prio), self.seq);
                    self.tasks.insert(id, SimTask { key, demand, ended: 0, placed: false });
                    self.seq += 1;
                    self.submitted += 1;
                }
                Err(SchedError::QueueFull { bound, .. }) => {
                    assert_eq!(bound, self.config.queue_bound);
                    self.refused += 1;
                }
                Err(SchedError::Infeasible { demand, .. }) => {
                    assert_eq!(demand.gpu_mem_bytes, 100 * GIB, "only the impossible demand is refused");
                    self.submitted += 1;
                }
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
    }

    fn report_runs(&mut self) {
        for i in 0..self.nodes.len() {
            let now = self.now;
            let done: Vec<Run> = self.nodes[i].runs.extract_if(.., |r| r.end <= now).collect();
            for run in done {
                let delivery = if run.fails {
                    let retryable = self.rng.below(4) != 0;
                    self.s.task_failed(now, run.task, run.attempt, "simulated failure", retryable)
                } else {
                    self.s.task_finished(now, run.task, run.attempt)
                };
                assert_ne!(delivery, Delivery::Duplicate, "each run reports once");
                if run.stale {
                    assert_eq!(delivery, Delivery::Late, "task {} attempt {} is stale", run.task, run.attempt);
                }
                if self.nodes[i].alive {
                    // The scheduler releases what a live node reports.
                    self.holds[i].remove(&(run.task, run.attempt));
                }
                if delivery == Delivery::Deliver && !run.fails {
                    self.end(run.task);
                }
            }
        }
    }

    fn end(&mut self, task: TaskId) {
        let t = self.tasks.get_mut(&task).expect("a submitted task");
        t.ended += 1;
        assert_eq!(t.ended, 1, "task {task} ended twice");
    }

    fn churn_nodes(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if !n.alive && n.down_until <= now {
                // It restarts fresh: whatever it still ran is gone.
                n.runs.clear();
                n.alive = true;
                self.s.node_up(now, &n.name, n.res.clone());
            }
        }
        if self.rng.below(60) == 0 {
            let i = self.rng.below(self.nodes.len());
            let down = 20 + self.rng.below(300) as u64;
            let n = &mut self.nodes[i];
            if n.alive {
                n.alive = false;
                n.down_until = now + down;
                // Partitioned, not dead: its runs go on and report late.
                n.runs.iter_mut().for_each(|r| r.stale = true);
                self.holds[i].clear();
                self.s.node_lost(now, &n.name);
            }
        }
    }

    fn cancel_some(&mut self) {
        if self.rng.below(40) != 0 {
            return;
        }
        let live: Vec<TaskId> = self.tasks.iter().filter(|(_, t)| t.ended == 0).map(|(&id, _)| id).collect();
        if live.is_empty() {
            return;
        }
        let id = live[self.rng.below(live.len())];
        // A task ended inside the scheduler whose event we have not read yet does not exist.
        if self.s.task(id).is_some() {
            self.s.cancel(self.now, id).unwrap();
        }
    }

    fn handle_events(&mut self) {
        while let Some(e) = self.s.poll_event() {
            match e {
                Event::Failed { task, causes } => {
                    assert!(!causes.0.is_empty());
                    self.end(task);
                }
                Event::DeadlineExpired { task, .. } | Event::Cancelled { task } => self.end(task),
                Event::Abort { task, attempt, node } => {
                    let i = self.node_index(&node);
                    let now = self.now;
                    // It stops, or finishes before the abort reaches it; either report is late.
                    let fails = self.rng.below(2) == 0;
                    if let Some(run) = self.nodes[i].runs.iter_mut().find(|r| r.task == task && r.attempt == attempt) {
                        run.end = run.end.min(now + 1);
                        run.fails = fails;
                        run.stale = true;
                    }
                }
            }
        }
        self.log.extend(std::iter::from_fn(|| self.s.poll_journal()));
    }

    fn place(&mut self) {
        for _ in 0..10_000 {
            let Some(p) = self.s.poll_placement(self.now) else { return };
            let i = self.node_index(&p.node);
            assert!(self.nodes[i].alive, "placed on lost node {}", p.node);
            let t = &self.tasks[&p.task];
            assert_eq!(t.ended, 0);
            // A node reserved by another task takes only tasks ahead of it in queue order.
            if let Some(r) = self.s.node(&p.node).unwrap().reserved_for
                && r != p.task
            {
                assert!(t.key < self.tasks[&r].key, "{} placed on {} reserved by {r} ahead of it", p.task, p.node);
            }
            let state = self.s.task(p.task).map(|i| i.state);
            assert!(matches!(state, Some(TaskState::Placed { .. })), "placed task in state {state:?}");
            let demand = t.demand.clone();
            // A task ahead of the watched head may take its reserved node: watch afresh.
            if self.head_watch.as_ref().is_some_and(|(h, n, _)| *n == p.node && *h != p.task) {
                self.head_watch = None;
            }
            self.tasks.get_mut(&p.task).unwrap().placed = true;
            self.holds[i].insert((p.task, p.attempt), demand);
            let end = self.now + 1 + self.rng.below(MAX_RUN_MS as usize) as u64;
            let fails = self.rng.below(10) == 0;
            if self.rng.below(2) == 0 {
                assert_eq!(self.s.task_started(self.now, p.task, p.attempt), Delivery::Deliver);
            }
            self.nodes[i].runs.push(Run { task: p.task, attempt: p.attempt, end, fails, stale: false });
        }
        panic!("placement loop did not end");
    }

    fn check(&mut self) {
        self.s.check_consistency();
        for (i, n) in self.nodes.iter().enumerate() {
            let held = self.holds[i].values().fold(Usage::default(), |u, d| Usage {
                gpu_mem_bytes: u.gpu_mem_bytes + d.gpu_mem_bytes,
                gpu_slots: u.gpu_slots + d.gpu_slots,
                cpu_slots: u.cpu_slots + d.cpu_slots,
            });
            assert!(
                held.gpu_mem_bytes <= n.res.gpu_mem_bytes
                    && held.gpu_slots <= n.res.gpu_slots
                    && held.cpu_slots <= n.res.cpu_slots,
                "node {} over capacity: {held:?}",
                n.name
            );
            if n.alive {
                assert_eq!(self.s.node(&n.name).unwrap().used, held, "node {}", n.name);
            }
        }
        self.check_head_wait();
    }

    /// The head of the queue, once it holds a reservation, starts within the longest run:
    /// nothing else may start on its node, so the node drains.
    fn check_head_wait(&mut self) {
        let waiting = self
            .tasks
            .iter()
            .filter(|(id, t)| {
                t.ended == 0 && matches!(self.s.task(**id).map(|i| i.state), Some(TaskState::Queued { .. }))
            })
            .min_by_key(|(_, t)| t.key)
            .map(|(&id, _)| id);
        let reserved = waiting.and_then(|id| match self.s.task(id)?.state {
            TaskState::Queued { reserved_node: Some(n), unplaceable_since_ms: None, .. } => Some((id, n)),
            _ => None,
        });
        match (reserved, &self.head_watch) {
            (Some((id, node)), Some((wid, wnode, since))) if id == *wid && node == *wnode => {
                let waited = self.now - since;
                self.longest_head_wait = self.longest_head_wait.max(waited);
                assert!(
                    waited <= MAX_RUN_MS + 2 * MAX_DT_MS,
                    "head task {id} waited {waited} ms on reserved node {node}"
                );
            }
            (Some((id, node)), _) => self.head_watch = Some((id, node, self.now)),
            (None, _) => self.head_watch = None,
        }
    }

    fn restart(&mut self) {
        let snapshot = self.s.snapshot();
        let recovered = Scheduler::recover(self.config.clone(), self.log.clone(), self.now).unwrap();
        assert_eq!(recovered.snapshot(), snapshot, "recovered from the log at {} ms", self.now);
        let compact = Scheduler::recover(self.config.clone(), snapshot.clone(), self.now).unwrap();
        assert_eq!(compact.snapshot(), snapshot, "recovered from a snapshot at {} ms", self.now);
        self.recover_checks += 1;
        if self.rng.below(2) == 0 {
            // Carry on with the recovered scheduler; live nodes report again at once.
            self.s = if self.rng.below(2) == 0 { recovered } else { compact };
            self.log = snapshot;
            for n in self.nodes.iter().filter(|n| n.alive) {
                self.s.node_up(self.now, &n.name, n.res.clone());
            }
            self.head_watch = None;
            self.restarts += 1;
        }
    }

    fn step(&mut self) {
        self.now += 1 + self.rng.below(MAX_DT_MS as usize) as u64;
        self.submit_some();
        self.report_runs();
        self.churn_nodes();
        self.cancel_some();
        self.s.tick(self.now);
        self.handle_events();
        self.place();
        self.handle_events();
        self.check();
        if self.rng.below(150) == 0 {
            self.restart();
        }
    }

    fn finished(&self) -> bool {
        self.submitted == SIM_TASKS
            && self.tasks.values().all(|t| t.ended == 1)
            && self.holds.iter().all(|h| h.is_empty())
    }
}

fn run_sim(seed: u64) -> Sim {
    let config = SchedulerConfig {
        queue_bound: 400,
        lookahead: 64,
        max_bypass_wait_ms: 200,
        max_bypasses: 50,
        default_retries: 2,
        remember_done: 1_000,
        ..SchedulerConfig::default()
    };
    let mut sim = Sim::new(seed, config);
    for _ in 0..200_000 {
        sim.step();
        if sim.finished() {
            break;
        }
    }
    assert!(sim.finished(), "not done after 200000 steps: {} of {} tasks submitted", sim.submitted, SIM_TASKS);
    assert_eq!((sim.s.queued_len(), sim.s.placed_len()), (0, 0));
    for n in &sim.nodes {
        // A node down across a restart is unknown to the recovered scheduler until it reports.
        let used = sim.s.node(&n.name).map(|st| st.used).unwrap_or_default();
        assert_eq!(used, Usage::default(), "node {}", n.name);
    }
    sim
}

#[test]
fn randomized_clusters_keep_every_invariant() {
    for seed in 1..=3 {
        let sim = run_sim(seed);
        let placed = sim.tasks.values().filter(|t| t.placed).count();
        eprintln!(
            "seed {seed}: {} tasks, {} placed at least once, {} refused for the bound, {} recoveries checked, \
             {} restarts, head waited at most {} ms on its reserved node, {} ms simulated",
            sim.tasks.len(),
            placed,
            sim.refused,
            sim.recover_checks,
            sim.restarts,
            sim.longest_head_wait,
            sim.now
        );
        assert!(sim.refused > 0, "the bound was never reached");
        assert!(sim.recover_checks > 0 && sim.restarts > 0);
    }
}

#[test]
fn bench_placements_runs() {
    let b = bench::bench_placements(1_000, 20, 5_000);
    assert_eq!(b.placements, 5_000);
    assert!(b.finished > 0);
}

/// `cargo test --release -p strata-sched -- --ignored --nocapture` prints the figure.
#[test]
#[ignore]
fn bench_placements_figure() {
    let b = bench::bench_placements(10_000, 100, 1_000_000);
    println!(
        "{} placements with {} queued over {} nodes: {:.0} placements/s",
        b.placements,
        b.queued,
        b.nodes,
        b.per_second()
    );
}

#[test]
fn given_ids_collide_with_nothing() {
    let mut s = sched();
    s.node_up(0, "n", cpu_node(1));
    let ids: BTreeSet<TaskId> = (0..10).map(|_| s.submit(0, task("t", cpus(1))).unwrap()).collect();
    assert_eq!(ids.len(), 10);
}
