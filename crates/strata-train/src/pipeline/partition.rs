//! Balanced cuts, sans IO: contiguous units of layers assigned to stages so that the
//! slowest stage is as fast as possible, by each unit's time measured on each stage's own
//! adapter, within each stage's memory.

/// One unit's measured cost on every stage, and its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitCost {
    /// Forward + backward seconds of one micro-batch, per stage (its own adapter).
    pub seconds: Vec<f64>,
    /// Bytes of parameters, gradients and optimiser state.
    pub param_bytes: u64,
    /// Bytes of one micro-batch's activations and activation gradients.
    pub act_bytes: u64,
}

/// A balanced cut.
#[derive(Clone, Debug, PartialEq)]
pub struct Balanced {
    /// Index of each stage's first unit.
    pub starts: Vec<usize>,
    /// Each stage's measured seconds per micro-batch.
    pub stage_seconds: Vec<f64>,
    /// Each stage's memory need in bytes.
    pub stage_bytes: Vec<u64>,
}

/// Cuts `units` into `stages` contiguous non-empty ranges minimising the largest stage
/// time; stage `s` holds `held[s]` micro-batches and must fit `budget[s]` bytes (`None`:
/// no limit). Fails, saying what is short, when no cut fits.
pub fn balance(units: &[UnitCost], stages: usize, held: &[usize], budget: &[Option<u64>]) -> Result<Balanced, String> {
    let n = units.len();
    if stages == 0 || stages > n {
        return Err(format!("{stages} stages for {n} units"));
    }
    let cost = |s: usize, r: std::ops::Range<usize>| -> f64 { units[r].iter().map(|u| u.seconds[s]).sum() };
    let bytes = |s: usize, r: std::ops::Range<usize>| -> u64 {
        units[r].iter().map(|u| u.param_bytes + u.act_bytes * held[s] as u64).sum()
    };
    let fits = |s: usize, r: std::ops::Range<usize>| budget[s].is_none_or(|b| bytes(s, r) <= b);
    // best[s][u]: the smallest largest time placing units 0..u on stages 0..s.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut from = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for u in s..=n - (stages - s) {
            for v in (s - 1)..u {
                if best[s - 1][v].is_infinite() || !fits(s - 1, v..u) {
                    continue;
                }
                let t = best[s - 1][v].max(cost(s - 1, v..u));
                if t < best[s][u] {
                    best[s][u] = t;
                    from[s][u] = v;
                }
            }
        }
    }
    if best[stages][n].is_infinite() {
        let total: u64 = units.iter().map(|u| u.param_bytes).sum();
        return Err(format!(
            "no cut into {stages} stages fits the stages' memory (budgets {budget:?} bytes; the parameters alone need {total} bytes)"
        ));
    }
    let mut starts = vec![0; stages];
    let mut u = n;
    for s in (1..=stages).rev() {
        starts[s - 1] = from[s][u];
        u = from[s][u];
    }
    let ends: Vec<usize> = starts[1..].iter().copied().chain([n]).collect();
    Ok(Balanced {
        stage_seconds: (0..stages).map(|s| cost(s, starts[s]..ends[s])).collect(),
        stage_bytes: (0..stages).map(|s| bytes(s, starts[s]..ends[s])).collect(),
        starts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(times: &[f64], stages: usize) -> Vec<UnitCost> {
        times.iter().map(|&t| UnitCost { seconds: vec![t; stages], param_bytes: 10, act_bytes: 1 }).collect()
    }

    #[test]
    fn balances_by_time_not_by_count() {
        // One heavy unit and five light ones: the heavy one gets a stage of its own.
        let b = balance(&units(&[1.0, 8.0, 1.0, 1.0, 1.0, 1.0], 2), 2, &[2, 1], &[None, None]).unwrap();
        assert_eq!(b.starts, vec![0, 2]);
        assert_eq!(b.stage_seconds, vec![9.0, 4.0]);
        let b = balance(&units(&[2.0; 6], 3), 3, &[3, 2, 1], &[None; 3]).unwrap();
        assert_eq!(b.starts, vec![0, 2, 4]);
    }

    #[test]
    fn a_slower_stage_gets_less_work() {
        // Stage 1's adapter is 3x slower: it takes fewer units.
        let u: Vec<UnitCost> =
            (0..8).map(|_| UnitCost { seconds: vec![1.0, 3.0], param_bytes: 0, act_bytes: 0 }).collect();
        let b = balance(&u, 2, &[1, 1], &[None, None]).unwrap();
        assert_eq!(b.starts, vec![0, 6]);
        assert_eq!(b.stage_seconds, vec![6.0, 6.0]);
    }

    #[test]
    fn memory_budgets_bind() {
        let mut u = units(&[1.0; 4], 2);
        u[0].param_bytes = 100;
        // Stage 0 cannot hold unit 0 with anything else.
        let b = balance(&u, 2, &[1, 1], &[Some(101), None]).unwrap();
        assert_eq!(b.starts, vec![0, 1]);
        let e = balance(&u, 2, &[1, 1], &[Some(50), Some(50)]).unwrap_err();
        assert!(e.starts_with("no cut into 2 stages fits the stages' memory"), "{e}");
    }

    #[test]
    fn too_many_stages_is_an_error() {
        assert_eq!(balance(&units(&[1.0; 2], 3), 3, &[1; 3], &[None; 3]).unwrap_err(), "3 stages for 2 units");
    }
}
