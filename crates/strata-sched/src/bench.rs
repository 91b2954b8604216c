//! The placement benchmark, for `strata bench sched`.
//!
//! A steady state: `queued` tasks wait on `nodes` simulated nodes of five sizes (8 to
//! 80 GiB of GPU memory, 1 to 8 GPU slots, 8 to 128 CPU slots; a third carry
//! `backend=metal`, the rest `backend=vulkan`). Tasks ask for 256 MiB to 8 GiB, one GPU
//! slot and 1 to 4 CPU slots, with priorities 0 to 3; one in eight needs `backend=metal`
//! and half have an input resident on a random node. The loop places until nothing fits,
//! then finishes an eighth of the running attempts at random and submits as many new
//! tasks, so the queue stays full. The time counted covers the whole loop (placements,
//! completions, submits and draining the journal), not the initial fill.

use std::time::Instant;

use crate::{Demand, NodeResources, Scheduler, SchedulerConfig, TaskId, TaskSpec};

/// What [`bench_placements`] measured.
#[derive(Clone, Debug)]
pub struct PlacementBench {
    /// Placements made.
    pub placements: u64,
    /// Attempts finished along the way.
    pub finished: u64,
    /// Wall-clock seconds of the loop.
    pub seconds: f64,
    /// Tasks kept waiting.
    pub queued: usize,
    /// Simulated nodes.
    pub nodes: usize,
}

impl PlacementBench {
    /// Placements per second.
    pub fn per_second(&self) -> f64 {
        self.placements as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Runs `placements` placements with `queued` tasks waiting over `nodes` simulated nodes.
pub fn bench_placements(queued: usize, nodes: usize, placements: u64) -> PlacementBench {
    let config = SchedulerConfig { queue_bound: queued + 1, ..SchedulerConfig::default() };
    let mut s = Scheduler::new(config);
    let mut rng = Rng::new(0x5eed);
    let names: Vec<String> = (0..nodes.max(1)).map(|i| format!("node{i:03}")).collect();
    for (i, name) in names.iter().enumerate() {
        s.node_up(0, name, node_size(i));
    }
    let labels = names.len() >= 3;
    for _ in 0..queued {
        // Every task fits the smallest node, and a metal node exists when labels are used.
        let _ = s.submit(0, random_task(&mut rng, &names, labels));
    }
    drain(&mut s);
    let mut running: Vec<(TaskId, u32)> = Vec::new();
    let (mut placed, mut finished, mut now) = (0u64, 0u64, 1u64);
    let start = Instant::now();
    while placed < placements {
        while placed < placements
            && let Some(p) = s.poll_placement(now)
        {
            running.push((p.task, p.attempt));
            placed += 1;
        }
        if placed >= placements || running.is_empty() {
            break;
        }
        for _ in 0..(running.len() / 8).max(1) {
            let (task, attempt) = running.swap_remove(rng.below(running.len()));
            s.task_finished(now, task, attempt);
            finished += 1;
            let _ = s.submit(now, random_task(&mut rng, &names, labels));
        }
        drain(&mut s);
        now += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    PlacementBench { placements: placed, finished, seconds, queued, nodes }
}

fn drain(s: &mut Scheduler) {
    while s.poll_journal().is_some() {}
    while s.poll_event().is_some() {}
}

fn node_size(i: usize) -> NodeResources {
    const SIZES: [(u64, u32, u32); 5] = [(8, 1, 8), (16, 2, 16), (24, 4, 32), (48, 4, 64), (80, 8, 128)];
    let (gib, gpus, cpus) = SIZES[i % SIZES.len()];
    let backend = if i % 3 == 2 { "metal" } else { "vulkan" };
    NodeResources::new(gib << 30, gpus, cpus).label("backend", backend)
}

fn random_task(rng: &mut Rng, names: &[String], labels: bool) -> TaskSpec {
    let mem = (1 + rng.below(32) as u64) * (256 << 20);
    let mut demand = Demand::gpu_mem(mem).gpu_slots(1).cpu_slots(1 + rng.below(4) as u32);
    if labels && rng.below(8) == 0 {
        demand = demand.label("backend", "metal");
    }
    let mut spec = TaskSpec::new("bench").priority(rng.below(4) as i32).demand(demand);
    if rng.below(2) == 0 {
        spec = spec.input(names[rng.below(names.len())].clone(), (1 + rng.below(64) as u64) << 20);
    }
    spec
}

/// SplitMix64: a tiny deterministic generator for simulations.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
