//! Pipeline schedules, sans IO: the order in which one stage runs its micro-batches'
//! forward and backward work, how many micro-batches it may hold, and a discrete-event
//! simulator of a whole pipeline that tests the schedules without GPUs or sockets.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Schedule {
    /// GPipe (Huang et al. 2019): every forward, then every backward.
    GPipe,
    /// 1F1B (PipeDream-Flush, Narayanan et al. 2021): after a warm-up of `S - i - 1`
    /// forwards, stage `i` alternates one forward and one backward, so it holds at most
    /// `S - i` micro-batches of activations.
    OneFOneB,
    /// Zero bubble in the manner of ZB-H1 (Qi et al. 2023): 1F1B's order with each
    /// backward split into its input-gradient part, run (and sent) at once, and its
    /// weight-gradient part, deferred to fill time the stage would spend waiting. Every
    /// stage may hold as many micro-batches as 1F1B's first stage (`S`), so the pipeline's
    /// peak activation memory stays 1F1B's while later stages use the room to defer.
    ZeroBubble,
}

impl Schedule {
    /// Every schedule, in the order benchmarks report them.
    pub const ALL: [Schedule; 3] = [Schedule::GPipe, Schedule::OneFOneB, Schedule::ZeroBubble];

    /// The command-line name: `gpipe`, `1f1b` or `zb`.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
            Schedule::ZeroBubble => "zb",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" => Ok(Schedule::OneFOneB),
            "zb" | "zb-h1" | "zero-bubble" => Ok(Schedule::ZeroBubble),
            other => Err(format!("unknown schedule {other:?} (gpipe, 1f1b or zb)")),
        }
    }

    /// Whether the backward pass is split into input- and weight-gradient work.
    pub fn splits_backward(self) -> bool {
        self == Schedule::ZeroBubble
    }

    /// Micro-batches stage `stage` of `stages` holds at most at once (forward done,
    /// weight gradient not yet), with `micro` micro-batches per step.
    pub fn activation_bound(self, stages: usize, stage: usize, micro: usize) -> usize {
        match self {
            Schedule::GPipe => micro,
            Schedule::OneFOneB => (stages - stage).min(micro),
            Schedule::ZeroBubble => stages.min(micro),
        }
    }

    /// The schedule's idle fraction for `stages` balanced stages and `micro` micro-batches
    /// when transfers cost nothing: `(S-1)/(m+S-1)` for GPipe and 1F1B (forward and
    /// backward of equal cost per stage), `(S-1)/(3m)` for ZB-H1 (forward, input gradient
    /// and weight gradient of equal cost), as in Qi et al. 2023.
    pub fn bubble_formula(self, stages: usize, micro: usize) -> f64 {
        let (s, m) = (stages as f64, micro as f64);
        match self {
            Schedule::GPipe | Schedule::OneFOneB => (s - 1.0) / (m + s - 1.0),
            Schedule::ZeroBubble => (s - 1.0) / (3.0 * m),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Work on one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Work {
    /// The forward pass.
    Forward,
    /// The whole backward pass (input and weight gradients).
    Backward,
    /// The input-gradient half of the backward pass (what the previous stage waits for).
    BackwardInput,
    /// The weight-gradient half of the backward pass.
    BackwardWeight,
}

impl Work {
    /// A one-letter name: F, B (whole backward or input gradient) or W.
    pub fn letter(self) -> &'static str {
        match self {
            Work::Forward => "F",
            Work::Backward | Work::BackwardInput => "B",
            Work::BackwardWeight => "W",
        }
    }
}

/// One piece of a stage's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Action {
    /// What.
    pub work: Work,
    /// On which micro-batch of the step.
    pub micro: usize,
}

/// What a stage should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run this action now.
    Run(Action),
    /// Wait for an input to arrive, then ask again.
    Wait,
    /// The step's work is done on this stage.
    Done,
}

/// One stage's plan for one step: the schedule's order of forwards and backwards, the
/// deferred weight-gradient work, and the count of micro-batches held.
#[derive(Clone, Debug)]
pub struct StagePlan {
    order: Vec<Action>,
    next: usize,
    bound: usize,
    held: usize,
    peak: usize,
    pending_weight: VecDeque<usize>,
    stage: usize,
    stages: usize,
}

impl StagePlan {
    /// The plan of stage `stage` (0-based) of `stages` with `micro` micro-batches.
    ///
    /// # Panics
    /// When `stage >= stages` or `micro == 0` (callers check configurations first).
    pub fn new(schedule: Schedule, stages: usize, stage: usize, micro: usize) -> Self {
        assert!(stage < stages && micro > 0, "stage {stage} of {stages} with {micro} micro-batches");
        let backward = if schedule.splits_backward() { Work::BackwardInput } else { Work::Backward };
        let f = |micro| Action { work: Work::Forward, micro };
        let b = |micro| Action { work: backward, micro };
        let order = match schedule {
            Schedule::GPipe => (0..micro).map(f).chain((0..micro).map(b)).collect(),
            Schedule::OneFOneB | Schedule::ZeroBubble => {
                let warmup = (stages - stage - 1).min(micro);
                let mut order: Vec<Action> = (0..warmup).map(f).collect();
                for j in 0..micro {
                    if warmup + j < micro {
                        order.push(f(warmup + j));
                    }
                    order.push(b(j));
                }
                order
            }
        };
        Self {
            order,
            next: 0,
            bound: schedule.activation_bound(stages, stage, micro),
            held: 0,
            peak: 0,
            pending_weight: VecDeque::new(),
            stage,
            stages,
        }
    }

    /// The next action, given which inputs have arrived: `ready(a)` says whether the
    /// input of forward or backward action `a` is here (always true for the first stage's
    /// forwards and the last stage's backwards). A returned action counts as started.
    pub fn next(&mut self, mut ready: impl FnMut(Action) -> bool) -> Next {
        let Some(&a) = self.order.get(self.next) else {
            return match self.pending_weight.pop_front() {
                Some(micro) => self.start(Action { work: Work::BackwardWeight, micro }),
                None => Next::Done,
            };
        };
        let blocked = a.work == Work::Forward && self.held >= self.bound;
        if !blocked && (self.needs_no_input(a) || ready(a)) {
            self.next += 1;
            return self.start(a);
        }
        // Deferred weight gradients fill the wait (and make room under the bound).
        match self.pending_weight.pop_front() {
            Some(micro) => self.start(Action { work: Work::BackwardWeight, micro }),
            None => {
                debug_assert!(!blocked, "a forward blocked by the bound with no weight work left");
                Next::Wait
            }
        }
    }

    fn needs_no_input(&self, a: Action) -> bool {
        match a.work {
            Work::Forward => self.stage == 0,
            _ => self.stage + 1 == self.stages,
        }
    }

    fn start(&mut self, a: Action) -> Next {
        match a.work {
            Work::Forward => {
                self.held += 1;
                self.peak = self.peak.max(self.held);
            }
            Work::Backward | Work::BackwardWeight => self.held -= 1,
            Work::BackwardInput => self.pending_weight.push_back(a.micro),
        }
        Next::Run(a)
    }

    /// Micro-batches held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The most micro-batches held at once so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// The bound the plan keeps to.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// The schedule's forwards and backwards in order (weight-gradient work not included).
    pub fn order(&self) -> &[Action] {
        &self.order
    }
}

/// Costs of the simulated pipeline, in any time unit.
#[derive(Clone, Copy, Debug)]
pub struct SimCosts {
    /// Forward pass of one micro-batch on one stage.
    pub forward: f64,
    /// Input-gradient half of the backward pass.
    pub backward_input: f64,
    /// Weight-gradient half of the backward pass.
    pub backward_weight: f64,
    /// Transfer between neighbouring stages.
    pub transfer: f64,
}

/// What [`simulate`] found.
#[derive(Clone, Debug)]
pub struct SimResult {
    /// Idle time of the stages over their total time (stages times the makespan).
    pub bubble: f64,
    /// Time from the first forward to the last piece of work.
    pub makespan: f64,
    /// Peak micro-batches held, per stage.
    pub peaks: Vec<usize>,
    /// Each stage's actions with start times, in order.
    pub trace: Vec<Vec<(Action, f64)>>,
}

/// Simulates one step of `stages` stages with the given costs, running the same
/// [`StagePlan`]s the runtime runs. Fails (naming the stages and their state) when the
/// plans deadlock, which a correct schedule never does.
pub fn simulate(schedule: Schedule, stages: usize, micro: usize, costs: SimCosts) -> Result<SimResult, String> {
    let mut plans: Vec<StagePlan> = (0..stages).map(|s| StagePlan::new(schedule, stages, s, micro)).collect();
    // act_at[s][j]: when micro-batch j's activation reaches stage s; grad_at likewise.
    let mut act_at = vec![vec![None::<f64>; micro]; stages];
    let mut grad_at = vec![vec![None::<f64>; micro]; stages];
    let mut free_at = vec![0.0f64; stages];
    let mut busy = vec![0.0f64; stages];
    let mut done = vec![false; stages];
    let mut trace = vec![Vec::new(); stages];
    let cost = |w: Work| match w {
        Work::Forward => costs.forward,
        Work::Backward => costs.backward_input + costs.backward_weight,
        Work::BackwardInput => costs.backward_input,
        Work::BackwardWeight => costs.backward_weight,
    };
    while done.iter().any(|d| !d) {
        // The stage that can act earliest acts next.
        let mut best: Option<(f64, usize)> = None;
        for s in (0..stages).filter(|&s| !done[s]) {
            let mut probe = plans[s].clone();
            let now = free_at[s];
            let when = match probe.next(|a| arrival(&act_at, &grad_at, s, a).is_some_and(|t| t <= now)) {
                Next::Run(_) | Next::Done => Some(now),
                Next::Wait => {
                    let a = probe.order[probe.next];
                    arrival(&act_at, &grad_at, s, a)
                }
            };
            if let Some(t) = when
                && best.is_none_or(|(bt, _)| t < bt)
            {
                best = Some((t, s));
            }
        }
        let Some((t, s)) = best else {
            return Err(format!(
                "deadlock: {}",
                (0..stages)
                    .filter(|&s| !done[s])
                    .map(|s| format!("stage {s} waits at {:?}", plans[s].order.get(plans[s].next)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let now = t.max(free_at[s]);
        match plans[s].next(|a| arrival(&act_at, &grad_at, s, a).is_some_and(|t| t <= now)) {
            Next::Done => done[s] = true,
            Next::Wait => free_at[s] = now,
            Next::Run(a) => {
                let end = now + cost(a.work);
                trace[s].push((a, now));
                busy[s] += cost(a.work);
                free_at[s] = end;
                match a.work {
                    Work::Forward if s + 1 < stages => act_at[s + 1][a.micro] = Some(end + costs.transfer),
                    Work::Backward | Work::BackwardInput if s > 0 => {
                        grad_at[s - 1][a.micro] = Some(end + costs.transfer)
                    }
                    _ => {}
                }
            }
        }
    }
    let makespan = free_at.iter().cloned().fold(0.0, f64::max);
    let idle: f64 = busy.iter().map(|b| makespan - b).sum();
    Ok(SimResult {
        bubble: idle / (makespan * stages as f64),
        makespan,
        peaks: plans.iter().map(|p| p.peak).collect(),
        trace,
    })
}

fn arrival(act_at: &[Vec<Option<f64>>], grad_at: &[Vec<Option<f64>>], s: usize, a: Action) -> Option<f64> {
    match a.work {
        Work::Forward if s == 0 => Some(0.0),
        Work::Forward => act_at[s][a.micro],
        _ if s + 1 == act_at.len() => Some(0.0),
        _ => grad_at[s][a.micro],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EQUAL: SimCosts = SimCosts { forward: 1.0, backward_input: 1.0, backward_weight: 1.0, transfer: 0.0 };

    #[test]
    fn one_f_one_b_order_alternates_after_warmup() {
        let p = StagePlan::new(Schedule::OneFOneB, 4, 1, 6);
        let s: String = p.order().iter().map(|a| format!("{}{}", a.work.letter(), a.micro)).collect();
        assert_eq!(s, "F0F1F2B0F3B1F4B2F5B3B4B5");
        let g = StagePlan::new(Schedule::GPipe, 2, 0, 3);
        let s: String = g.order().iter().map(|a| format!("{}{}", a.work.letter(), a.micro)).collect();
        assert_eq!(s, "F0F1F2B0B1B2");
    }

    #[test]
    fn gpipe_and_1f1b_meet_their_formula_when_balanced() {
        // Backward (input + weight) twice the forward, as the formula's derivation
        // allows any fixed ratio; transfers free.
        for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
            for (stages, micro) in [(2, 4), (3, 4), (4, 8), (3, 2), (2, 1)] {
                let r = simulate(schedule, stages, micro, EQUAL).unwrap();
                let f = schedule.bubble_formula(stages, micro);
                assert!((r.bubble - f).abs() < 1e-9, "{schedule} S={stages} m={micro}: {} vs {f}", r.bubble);
            }
        }
    }

    #[test]
    fn zero_bubble_beats_1f1b_at_the_same_activation_bound() {
        for (stages, micro) in [(2, 4), (2, 8), (3, 4), (3, 8), (4, 8)] {
            let zb = simulate(Schedule::ZeroBubble, stages, micro, EQUAL).unwrap();
            let ob = simulate(Schedule::OneFOneB, stages, micro, EQUAL).unwrap();
            assert!(zb.bubble < ob.bubble, "S={stages} m={micro}: zb {} vs 1f1b {}", zb.bubble, ob.bubble);
            // ZB-H1's bubble, (S-1)(F+B-W) per stage over 3m units of work.
            let h1 = (stages - 1) as f64 / (3.0 * micro as f64 + (stages - 1) as f64);
            assert!(zb.bubble <= h1 + 1e-9, "S={stages} m={micro}: zb {} above ZB-H1's {h1}", zb.bubble);
            for s in 0..stages {
                let bound = Schedule::ZeroBubble.activation_bound(stages, s, micro);
                assert!(zb.peaks[s] <= bound, "stage {s} held {} > {bound}", zb.peaks[s]);
            }
            let max = |p: &[usize]| p.iter().copied().max().unwrap();
            assert_eq!(max(&zb.peaks), max(&ob.peaks), "the pipeline's peak is 1F1B's");
        }
    }

    #[test]
    fn activation_peaks_are_the_bounds() {
        for (stages, micro) in [(2, 4), (3, 4), (3, 2), (4, 8)] {
            for schedule in Schedule::ALL {
                let r = simulate(schedule, stages, micro, EQUAL).unwrap();
                for s in 0..stages {
                    assert_eq!(r.peaks[s], schedule.activation_bound(stages, s, micro), "{schedule} stage {s}");
                }
            }
        }
    }

    #[test]
    fn fewer_micro_batches_than_stages_finish() {
        for schedule in Schedule::ALL {
            for micro in 1..4 {
                let r = simulate(schedule, 4, micro, EQUAL).unwrap();
                for (s, t) in r.trace.iter().enumerate() {
                    let forwards = t.iter().filter(|(a, _)| a.work == Work::Forward).count();
                    let weights =
                        t.iter().filter(|(a, _)| matches!(a.work, Work::Backward | Work::BackwardWeight)).count();
                    assert_eq!((forwards, weights), (micro, micro), "{schedule} stage {s} m={micro}");
                }
            }
        }
    }

    #[test]
    fn weight_work_runs_in_micro_batch_order() {
        // Gradients accumulate in micro-batch order on every schedule, which is what
        // makes every schedule's result bitwise the same.
        for schedule in Schedule::ALL {
            let r = simulate(schedule, 3, 5, EQUAL).unwrap();
            for t in &r.trace {
                let w: Vec<usize> = t
                    .iter()
                    .filter(|(a, _)| matches!(a.work, Work::Backward | Work::BackwardWeight))
                    .map(|(a, _)| a.micro)
                    .collect();
                assert_eq!(w, (0..5).collect::<Vec<_>>(), "{schedule}");
            }
        }
    }

    #[test]
    fn names_parse_back() {
        for s in Schedule::ALL {
            assert_eq!(Schedule::parse(s.name()), Ok(s));
        }
        assert_eq!(Schedule::parse("pipedream").unwrap_err(), "unknown schedule \"pipedream\" (gpipe, 1f1b or zb)");
    }
}
