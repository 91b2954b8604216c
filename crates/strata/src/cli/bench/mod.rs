//! Benchmarks behind `strata bench`: every figure comes with a reference measured in the
//! same run on the same machine, and the ratio between the two.

pub mod allreduce;
pub mod cpu;
pub mod kernels;
pub mod mapreduce;
pub mod sched;
pub mod tcp_ring;

use std::time::Instant;

use serde::Serialize;

/// One benchmark result.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// What was measured, e.g. `conv2d_fwd_bwd 64->128@14x14 b64`.
    pub case: String,
    /// Unit of `value`, e.g. `GFLOP/s`.
    pub unit: &'static str,
    /// The measured figure (median over the timed iterations).
    pub value: f64,
    /// Median seconds per iteration.
    pub seconds: f64,
    /// What the reference is, e.g. `cpu im2col+sgemm (matrixmultiply, 2 threads)`.
    pub reference: String,
    /// The reference's figure in the same unit.
    pub reference_value: f64,
    /// `value / reference_value`.
    pub ratio: f64,
    /// The target this figure is held to, if any, in `unit`.
    pub target: Option<f64>,
}

impl Figure {
    /// Whether the value meets target `t`: at most `t` for times (`ms`), at least `t` for
    /// rates.
    pub fn meets(&self, t: f64) -> bool {
        if self.unit == "ms" { self.value <= t } else { self.value >= t }
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let target = self
            .target
            .map_or(String::new(), |t| format!("  target {t:.2} {}", if self.meets(t) { "(met)" } else { "(missed)" }));
        format!(
            "{:<44} {:>8.2} {:<8} ({:>8.2} ms)  ref {:>8.2} {}  ratio {:.2}{target}",
            self.case,
            self.value,
            self.unit,
            self.seconds * 1e3,
            self.reference_value,
            self.reference,
            self.ratio
        )
    }
}

/// Median wall-clock seconds of `iters` runs of `f`, after `warmup` untimed runs.
pub fn median_seconds<E>(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}
