//! Dividing each step's global batch between ranks of different speed, sans IO.
//!
//! Every rank measures its own throughput (samples over the time of its own work in a
//! step, waits for other ranks left out); every few steps the ranks all-gather those
//! figures and each computes the same new split from the same numbers, so they never
//! disagree. A step also has costs that do not grow with the samples (the optimiser);
//! splitting by throughput again and again still converges, since its fixed point is the
//! split at which every rank's step takes equally long.

use std::time::Duration;

use crate::TrainError;

/// How the global batch of a step is divided between ranks.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Balance {
    /// Every rank takes `batch` samples of its own shard per step, as PyTorch's
    /// `DistributedSampler` deals them out, and gradients are averaged. The default: the
    /// run's arithmetic depends on the seed alone, never on timings.
    #[default]
    Equal,
    /// The global batch (`batch` times the world size, the same indices one node would
    /// take) is cut into contiguous slices in proportion to each rank's measured
    /// throughput, re-measured every `TrainConfig::rebalance_every` steps; gradients are
    /// weighted by each rank's share, so the update is that of one node on the global batch.
    Measured,
    /// As `Measured`, in proportion to these weights (one per rank, e.g. known relative
    /// speeds), never re-measured.
    Fixed(Vec<f64>),
}

impl Balance {
    /// Whether the global batch is split by shares (`Measured`, `Fixed`) rather than
    /// dealt out by the sampler (`Equal`).
    pub fn by_shares(&self) -> bool {
        !matches!(self, Balance::Equal)
    }
}

impl std::str::FromStr for Balance {
    type Err = TrainError;

    /// `equal`, `measured`, or weights separated by colons (`3:1`).
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "equal" => Ok(Balance::Equal),
            "measured" => Ok(Balance::Measured),
            _ => {
                let weights = s
                    .split(':')
                    .map(|w| w.trim().parse::<f64>().ok().filter(|w| w.is_finite() && *w > 0.0))
                    .collect::<Option<Vec<f64>>>()
                    .ok_or_else(|| {
                        TrainError::Config(format!(
                            "balance {s:?} is not equal, measured or positive weights such as 3:1"
                        ))
                    })?;
                Ok(Balance::Fixed(weights))
            }
        }
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Balance::Equal => write!(f, "equal"),
            Balance::Measured => write!(f, "measured"),
            Balance::Fixed(w) => {
                let parts: Vec<String> = w.iter().map(|x| x.to_string()).collect();
                write!(f, "{}", parts.join(":"))
            }
        }
    }
}

/// Splits `global` samples between ranks in proportion to `weights` by largest
/// remainder, each rank getting at least one sample. Ties go to the lower rank, so the
/// result depends on the numbers alone.
pub fn split(global: usize, weights: &[f64]) -> Result<Vec<usize>, TrainError> {
    let world = weights.len();
    if world == 0 {
        return Err(TrainError::Config("splitting a batch needs at least one rank's weight".into()));
    }
    if let Some((r, w)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
        return Err(TrainError::Config(format!("rank {r} has weight {w}; weights must be finite and positive")));
    }
    if global < world {
        return Err(TrainError::Config(format!(
            "a global batch of {global} samples cannot give each of {world} ranks at least one"
        )));
    }
    let total: f64 = weights.iter().sum();
    let quota: Vec<f64> = weights.iter().map(|w| global as f64 * w / total).collect();
    let mut n: Vec<usize> = quota.iter().map(|q| (q.floor() as usize).max(1)).collect();
    // Each correction moves one sample; floors sum to at least `global - world` and the
    // clamp to 1 adds at most `world`, so both loops end within `world` rounds.
    let remainder = |n: &[usize], r: usize| quota[r] - n[r] as f64;
    while n.iter().sum::<usize>() < global {
        let r = (0..world).fold(0, |b, r| if remainder(&n, r) > remainder(&n, b) { r } else { b });
        n[r] += 1;
    }
    while n.iter().sum::<usize>() > global {
        let r = (0..world)
            .filter(|&r| n[r] > 1)
            .fold(None, |b: Option<usize>, r| match b {
                Some(b) if remainder(&n, b) <= remainder(&n, r) => Some(b),
                _ => Some(r),
            })
            .expect("the sum exceeds world, so some rank has more than one");
        n[r] -= 1;
    }
    Ok(n)
}

/// Seconds one step of `split` takes when rank `r` processes `rates[r]` samples per second
/// (the slowest rank sets the pace).
pub fn step_seconds(split: &[usize], rates: &[f64]) -> f64 {
    split.iter().zip(rates).map(|(&n, &v)| n as f64 / v).fold(0.0, f64::max)
}

/// One rank's measurement since the previous rebalancing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    /// Samples processed.
    pub samples: usize,
    /// Time the rank spent on them (its own work, no waits for other ranks).
    pub busy: Duration,
}

impl Throughput {
    /// Samples per second, if there was anything to measure.
    pub fn rate(&self) -> Option<f64> {
        let s = self.busy.as_secs_f64();
        let v = self.samples as f64 / s;
        (self.samples > 0 && s > 0.0 && v.is_finite()).then_some(v)
    }
}

/// The shares of a `Measured` (or `Fixed`) run: throughputs smoothed over rebalancings,
/// and the weights the split is currently made from.
#[derive(Clone, Debug)]
pub struct Balancer {
    weights: Vec<f64>,
    rates: Option<Vec<f64>>,
    /// The split the smoothed rates were measured at.
    measured_at: Vec<usize>,
    adapt: bool,
}

/// Weight of a new measurement in the smoothed throughput (of measurements at the same
/// split; one at another split replaces the old, since a step's fixed costs make the
/// throughput depend on the batch size).
const SMOOTHING: f64 = 0.5;
/// A new split is taken only when it predicts steps at least this much shorter, so equal
/// ranks keep an equal split rather than following timing noise.
const MIN_GAIN: f64 = 0.05;

impl Balancer {
    /// Shares for `world` ranks under `balance`: equal to begin with for `Measured` (and
    /// `Equal`), the given weights for `Fixed`.
    pub fn new(balance: &Balance, world: usize) -> Result<Self, TrainError> {
        let (weights, adapt) = match balance {
            Balance::Fixed(w) if w.len() != world => {
                return Err(TrainError::Config(format!(
                    "balance {balance} gives {} weights for a world of {world}",
                    w.len()
                )));
            }
            Balance::Fixed(w) => (w.clone(), false),
            Balance::Measured => (vec![1.0; world], true),
            Balance::Equal => (vec![1.0; world], false),
        };
        split(world, &weights)?;
        Ok(Self { weights, rates: None, measured_at: Vec::new(), adapt })
    }

    /// The weights the split is made from.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The smoothed throughput of every rank in samples per second, once measured.
    pub fn rates(&self) -> Option<&[f64]> {
        self.rates.as_deref()
    }

    /// Samples per rank of a global batch of `global` samples.
    pub fn split(&self, global: usize) -> Result<Vec<usize>, TrainError> {
        split(global, &self.weights)
    }

    /// Takes every rank's measurement since the previous call (made at the current split
    /// of `global` samples), in rank order, and returns whether the weights changed. A
    /// round where some rank measured nothing is skipped whole. The split moves to the
    /// smoothed throughputs when that predicts a step at least 5% shorter than the
    /// current split.
    pub fn observe(&mut self, global: usize, measured: &[Throughput]) -> bool {
        if !self.adapt || measured.len() != self.weights.len() {
            return false;
        }
        let Some(new) = measured.iter().map(Throughput::rate).collect::<Option<Vec<f64>>>() else { return false };
        let at = split(global, &self.weights).unwrap_or_default();
        let rates = match self.rates.take() {
            Some(old) if at == self.measured_at => {
                old.iter().zip(&new).map(|(o, n)| (1.0 - SMOOTHING) * o + SMOOTHING * n).collect()
            }
            _ => new,
        };
        self.measured_at = at;
        let changed = match (split(global, &self.weights), split(global, &rates)) {
            (Ok(now), Ok(next)) if now != next => {
                step_seconds(&next, &rates) < (1.0 - MIN_GAIN) * step_seconds(&now, &rates)
            }
            _ => false,
        };
        if changed {
            self.weights = rates.clone();
        }
        self.rates = Some(rates);
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_rates(b: &Balancer, want: [f64; 2]) {
        let got = b.rates().unwrap();
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-9), "{got:?} vs {want:?}");
    }

    fn tp(samples: usize, ms: u64) -> Throughput {
        Throughput { samples, busy: Duration::from_millis(ms) }
    }

    #[test]
    fn split_is_proportional_by_largest_remainder() {
        assert_eq!(split(64, &[1.0, 1.0]).unwrap(), vec![32, 32]);
        assert_eq!(split(64, &[3.0, 1.0]).unwrap(), vec![48, 16]);
        // Quotas 21.33 / 21.33 / 21.33: the one spare sample goes to the lowest rank.
        assert_eq!(split(64, &[1.0, 1.0, 1.0]).unwrap(), vec![22, 21, 21]);
        // Quotas 53.33 / 10.67: floors 53 + 10, the larger remainder (rank 1) gets the rest.
        assert_eq!(split(64, &[5.0, 1.0]).unwrap(), vec![53, 11]);
        // Every rank keeps at least one sample, taken from the rank with the least remainder.
        assert_eq!(split(64, &[1000.0, 1.0, 1.0]).unwrap(), vec![62, 1, 1]);
        assert_eq!(split(3, &[1.0, 1e9, 1.0]).unwrap(), vec![1, 1, 1]);
        for (g, w) in [(7usize, vec![0.3, 2.0, 5.5]), (1000, vec![1.0, 7.0, 0.01, 3.0]), (4, vec![1.0; 4])] {
            let s = split(g, &w).unwrap();
            assert_eq!(s.iter().sum::<usize>(), g, "{w:?}");
            assert!(s.iter().all(|&n| n >= 1), "{s:?}");
        }
    }

    #[test]
    fn split_refuses_what_it_cannot_do() {
        let e = split(1, &[1.0, 1.0]).unwrap_err().to_string();
        assert_eq!(e, "training: a global batch of 1 samples cannot give each of 2 ranks at least one");
        let e = split(8, &[1.0, f64::NAN]).unwrap_err().to_string();
        assert_eq!(e, "training: rank 1 has weight NaN; weights must be finite and positive");
        let e = split(8, &[0.0, 1.0]).unwrap_err().to_string();
        assert_eq!(e, "training: rank 0 has weight 0; weights must be finite and positive");
        assert!(split(8, &[]).is_err());
        let e = Balancer::new(&Balance::Fixed(vec![3.0, 1.0]), 3).unwrap_err().to_string();
        assert_eq!(e, "training: balance 3:1 gives 2 weights for a world of 3");
    }

    #[test]
    fn balance_parses_and_prints() {
        assert_eq!("equal".parse::<Balance>().unwrap(), Balance::Equal);
        assert_eq!("measured".parse::<Balance>().unwrap(), Balance::Measured);
        assert_eq!("3:1".parse::<Balance>().unwrap(), Balance::Fixed(vec![3.0, 1.0]));
        assert_eq!(Balance::Fixed(vec![3.0, 1.5]).to_string(), "3:1.5");
        for bad in ["", "3:0", "fast", "1:-2", "2:inf"] {
            let e = bad.parse::<Balance>().unwrap_err().to_string();
            assert!(e.contains("is not equal, measured or positive weights such as 3:1"), "{bad}: {e}");
        }
    }

    #[test]
    fn measured_shares_follow_the_throughput_of_each_rank() {
        let mut b = Balancer::new(&Balance::Measured, 2).unwrap();
        assert_eq!(b.split(128).unwrap(), vec![64, 64]);
        // Rank 1 takes 5x as long per sample (a GL adapter next to a Vulkan one).
        assert!(b.observe(128, &[tp(64, 320), tp(64, 1600)]));
        assert_rates(&b, [200.0, 40.0]);
        assert_eq!(b.split(128).unwrap(), vec![107, 21]);
        // Measured again at the new split with the same speeds: nothing moves.
        assert!(!b.observe(128, &[tp(107, 535), tp(21, 525)]));
        assert_eq!(b.split(128).unwrap(), vec![107, 21]);
        // Rank 0 slows to rank 1's speed: at the same split, the measurement is smoothed
        // into rates (120, 40), which move the split at once; the next measurement, at the
        // new split, replaces the rates and evens the split.
        assert!(b.observe(128, &[tp(107, 2675), tp(21, 525)]));
        assert_rates(&b, [120.0, 40.0]);
        assert_eq!(b.split(128).unwrap(), vec![96, 32]);
        assert!(b.observe(128, &[tp(96, 2400), tp(32, 800)]));
        assert_rates(&b, [40.0, 40.0]);
        assert_eq!(b.split(128).unwrap(), vec![64, 64]);
        // A rank with a fixed cost per step (1 s, then 10 ms a sample) next to one without
        // (10 ms a sample): splitting by throughput again and again approaches the split
        // at which both take equally long (114 and 14 samples, 1.14 s each) and stops
        // within 5% of it.
        let mut splits = Vec::new();
        for _ in 0..8 {
            let s = b.split(128).unwrap();
            b.observe(128, &[tp(s[0], 10 * s[0] as u64), tp(s[1], 1000 + 10 * s[1] as u64)]);
            splits.push(b.split(128).unwrap()[0]);
        }
        assert_eq!(splits, [92, 101, 106, 108, 110, 111, 111, 111]);
    }

    #[test]
    fn equal_ranks_keep_an_equal_split_through_timing_noise() {
        let mut b = Balancer::new(&Balance::Measured, 2).unwrap();
        // Within 5% of each other: the predicted gain is below MIN_GAIN.
        for (a, c) in [(330, 320), (318, 335), (340, 325), (321, 329)] {
            assert!(!b.observe(64, &[tp(32, a), tp(32, c)]));
        }
        assert_eq!(b.split(64).unwrap(), vec![32, 32]);
    }

    #[test]
    fn rounds_without_a_measurement_and_fixed_shares_change_nothing() {
        let mut b = Balancer::new(&Balance::Measured, 2).unwrap();
        assert!(!b.observe(64, &[tp(32, 100), tp(0, 0)]));
        assert!(!b.observe(64, &[tp(32, 100), tp(32, 0)]));
        assert!(!b.observe(64, &[tp(32, 100)]));
        assert_eq!(b.rates(), None);
        let mut f = Balancer::new(&Balance::Fixed(vec![3.0, 1.0]), 2).unwrap();
        assert!(!f.observe(64, &[tp(48, 100), tp(16, 1000)]));
        assert_eq!(f.split(64).unwrap(), vec![48, 16]);
    }
}
