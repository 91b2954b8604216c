//! What every stage did when: the start and end of each micro-batch's forward, input- and
//! weight-gradient work, each send and receive, and each optimiser step. Exported as Chrome
//! trace JSON (Perfetto, chrome://tracing), measured as a bubble fraction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What an event was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// Forward pass of a micro-batch.
    Forward,
    /// Whole backward pass (input and weight gradients).
    Backward,
    /// Input-gradient half of the backward pass.
    BackwardInput,
    /// Weight-gradient half of the backward pass.
    BackwardWeight,
    /// Sending an activation or a gradient to a neighbour.
    Send,
    /// Receiving one (from posting the receive to its arrival).
    Recv,
    /// Gradient all-reduce between replicas and the optimiser step.
    Optimizer,
}

impl EventKind {
    const ALL: [EventKind; 7] = [
        EventKind::Forward,
        EventKind::Backward,
        EventKind::BackwardInput,
        EventKind::BackwardWeight,
        EventKind::Send,
        EventKind::Recv,
        EventKind::Optimizer,
    ];

    /// Whether the event is the stage's own work (as opposed to communication).
    pub fn is_compute(self) -> bool {
        !matches!(self, EventKind::Send | EventKind::Recv)
    }

    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Forward => "F",
            EventKind::Backward => "B",
            EventKind::BackwardInput => "B",
            EventKind::BackwardWeight => "W",
            EventKind::Send => "send",
            EventKind::Recv => "recv",
            EventKind::Optimizer => "step",
        }
    }
}

/// One timed event. Times are microseconds of the system clock, so that the stages of
/// one machine share a time base (across machines they are as good as the clocks' sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Data-parallel replica.
    pub replica: u32,
    /// Pipeline stage.
    pub stage: u32,
    /// Optimiser step (0-based, counted from the start of this run).
    pub step: u64,
    /// Micro-batch within the step.
    pub micro: u32,
    /// What.
    pub kind: EventKind,
    /// Start, µs since the Unix epoch.
    pub start_us: u64,
    /// End, µs since the Unix epoch.
    pub end_us: u64,
}

/// Microseconds since the Unix epoch now.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The events of a whole pipeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Stages.
    pub stages: usize,
    /// Replicas.
    pub replicas: usize,
    /// Every event, in any order.
    pub events: Vec<Event>,
}

const WORDS: usize = 9;

/// Encodes events as `f32` words for the collectives (bit patterns, never arithmetic).
pub fn encode(events: &[Event]) -> Vec<f32> {
    let mut out = Vec::with_capacity(events.len() * WORDS);
    for e in events {
        let kind = EventKind::ALL.iter().position(|k| *k == e.kind).expect("listed") as u32;
        let words = [
            e.replica,
            e.stage,
            e.step as u32,
            (e.step >> 32) as u32,
            e.micro,
            kind,
            (e.start_us >> 32) as u32,
            e.start_us as u32,
            (e.end_us - e.start_us) as u32,
        ];
        out.extend(words.map(f32::from_bits));
    }
    out
}

/// Decodes [`encode`]'s words; `None` when they are not whole events.
pub fn decode(words: &[f32]) -> Option<Vec<Event>> {
    if !words.len().is_multiple_of(WORDS) {
        return None;
    }
    words
        .chunks(WORDS)
        .map(|c| {
            let w: Vec<u32> = c.iter().map(|f| f.to_bits()).collect();
            let start_us = (u64::from(w[6]) << 32) | u64::from(w[7]);
            Some(Event {
                replica: w[0],
                stage: w[1],
                step: u64::from(w[2]) | (u64::from(w[3]) << 32),
                micro: w[4],
                kind: *EventKind::ALL.get(w[5] as usize)?,
                start_us,
                end_us: start_us + u64::from(w[8]),
            })
        })
        .collect()
}

/// Idle fraction over a set of steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bubble {
    /// Idle time of the stages over their total time.
    pub fraction: f64,
    /// Steps measured (per replica).
    pub steps: usize,
    /// Mean step time, seconds (first compute event to last, over the stages).
    pub step_seconds: f64,
}

impl Timeline {
    /// The bubble of steps `from_step..`: per replica and step, the window from the first
    /// stage's first piece of work to the last stage's last; each stage is idle in it for
    /// the window less its own work (forward, backward, optimiser). `None` without steps.
    pub fn bubble(&self, from_step: u64) -> Option<Bubble> {
        let steps = self.step_windows(|s| s >= from_step);
        if steps.is_empty() {
            return None;
        }
        let (mut idle, mut total, mut span) = (0f64, 0f64, 0f64);
        for (start, end, busy) in steps.values() {
            let window = (end - start) as f64;
            span += window;
            total += window * self.stages as f64;
            idle += busy.iter().map(|&b| (window - b as f64).max(0.0)).sum::<f64>();
        }
        let replicas = self.replicas.max(1);
        Some(Bubble {
            fraction: if total > 0.0 { idle / total } else { 0.0 },
            steps: steps.len() / replicas,
            step_seconds: span / steps.len() as f64 / 1e6,
        })
    }

    /// Per (replica, step) of the steps `keep` accepts: the window from the first piece of
    /// work (forward, backward, optimiser) on any stage to the last, in µs, and each
    /// stage's busy time in it.
    pub fn step_windows(&self, keep: impl Fn(u64) -> bool) -> BTreeMap<(u32, u64), (u64, u64, Vec<u64>)> {
        let mut steps: BTreeMap<(u32, u64), (u64, u64, Vec<u64>)> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.kind.is_compute() && keep(e.step)) {
            let w = steps.entry((e.replica, e.step)).or_insert((u64::MAX, 0, vec![0; self.stages]));
            w.0 = w.0.min(e.start_us);
            w.1 = w.1.max(e.end_us);
            if let Some(b) = w.2.get_mut(e.stage as usize) {
                *b += e.end_us - e.start_us;
            }
        }
        steps
    }

    /// The most micro-batches each (replica, stage) held at once, from its events: a
    /// forward starts holding one, a whole backward or a weight gradient ends it.
    pub fn activation_peaks(&self) -> Vec<Vec<usize>> {
        let mut peaks = vec![vec![0; self.stages]; self.replicas.max(1)];
        let mut evs: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Forward | EventKind::Backward | EventKind::BackwardWeight))
            .collect();
        evs.sort_by_key(|e| (e.replica, e.stage, e.start_us, e.kind != EventKind::Forward));
        let mut held = 0usize;
        let mut at = (u32::MAX, u32::MAX);
        for e in evs {
            if (e.replica, e.stage) != at {
                at = (e.replica, e.stage);
                held = 0;
            }
            if e.kind == EventKind::Forward {
                held += 1;
                if let Some(p) = peaks.get_mut(e.replica as usize).and_then(|r| r.get_mut(e.stage as usize)) {
                    *p = (*p).max(held);
                }
            } else {
                held = held.saturating_sub(1);
            }
        }
        peaks
    }

    /// The timeline as Chrome trace JSON: one process per replica, one track per stage for
    /// its work and one for its transfers; times relative to the first event.
    pub fn chrome_trace(&self) -> String {
        let t0 = self.events.iter().map(|e| e.start_us).min().unwrap_or(0);
        let mut out = Vec::new();
        for r in 0..self.replicas.max(1) {
            out.push(serde_json::json!({
                "name": "process_name", "ph": "M", "pid": r, "tid": 0,
                "args": { "name": format!("replica {r}") }
            }));
            for s in 0..self.stages {
                for (tid, what) in [(2 * s, "work"), (2 * s + 1, "transfers")] {
                    out.push(serde_json::json!({
                        "name": "thread_name", "ph": "M", "pid": r, "tid": tid,
                        "args": { "name": format!("stage {s} {what}") }
                    }));
                    out.push(serde_json::json!({
                        "name": "thread_sort_index", "ph": "M", "pid": r, "tid": tid,
                        "args": { "sort_index": tid }
                    }));
                }
            }
        }
        for e in &self.events {
            let tid = 2 * e.stage as usize + usize::from(!e.kind.is_compute());
            out.push(serde_json::json!({
                "name": format!("{}{}", e.kind.label(), e.micro),
                "cat": format!("{:?}", e.kind),
                "ph": "X",
                "pid": e.replica,
                "tid": tid,
                "ts": e.start_us - t0,
                "dur": (e.end_us - e.start_us).max(1),
                "args": { "step": e.step, "micro": e.micro },
            }));
        }
        serde_json::json!({ "traceEvents": out, "displayTimeUnit": "ms" }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(stage: u32, step: u64, micro: u32, kind: EventKind, start: u64, end: u64) -> Event {
        Event { replica: 0, stage, step, micro, kind, start_us: start, end_us: end }
    }

    #[test]
    fn events_survive_encoding() {
        let e = vec![
            ev(1, 7, 3, EventKind::BackwardWeight, 1_700_000_000_123_456, 1_700_000_000_223_456),
            Event { replica: 2, ..ev(0, u64::from(u32::MAX) + 5, 0, EventKind::Recv, 5, 9) },
        ];
        assert_eq!(decode(&encode(&e)).unwrap(), e);
        assert!(decode(&[0.0; 5]).is_none());
    }

    #[test]
    fn bubble_counts_idle_time_per_stage() {
        // Two stages, one step of 10 µs: stage 0 works 8, stage 1 works 6.
        let t = Timeline {
            stages: 2,
            replicas: 1,
            events: vec![
                ev(0, 1, 0, EventKind::Forward, 100, 104),
                ev(0, 1, 0, EventKind::Backward, 106, 110),
                ev(1, 1, 0, EventKind::Forward, 104, 106),
                ev(1, 1, 0, EventKind::Backward, 102, 104),
                ev(1, 1, 0, EventKind::Optimizer, 106, 108),
                ev(1, 1, 0, EventKind::Send, 100, 110),
                ev(0, 0, 0, EventKind::Forward, 0, 50),
            ],
        };
        let b = t.bubble(1).unwrap();
        assert!((b.fraction - 6.0 / 20.0).abs() < 1e-12, "{b:?}");
        assert_eq!(b.steps, 1);
        let trace: serde_json::Value = serde_json::from_str(&t.chrome_trace()).unwrap();
        let evs = trace["traceEvents"].as_array().unwrap();
        assert!(evs.iter().any(|e| e["name"] == "B0" && e["tid"] == 0 && e["ts"] == 106 && e["dur"] == 4));
        assert!(evs.iter().any(|e| e["name"] == "send0" && e["tid"] == 3));
    }

    #[test]
    fn peaks_follow_forwards_and_weight_work() {
        let t = Timeline {
            stages: 1,
            replicas: 1,
            events: vec![
                ev(0, 0, 0, EventKind::Forward, 0, 1),
                ev(0, 0, 1, EventKind::Forward, 1, 2),
                ev(0, 0, 0, EventKind::BackwardInput, 2, 3),
                ev(0, 0, 0, EventKind::BackwardWeight, 3, 4),
                ev(0, 0, 2, EventKind::Forward, 4, 5),
                ev(0, 0, 1, EventKind::Backward, 5, 6),
            ],
        };
        assert_eq!(t.activation_peaks(), vec![vec![2]]);
    }
}
