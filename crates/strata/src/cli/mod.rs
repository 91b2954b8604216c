//! The code behind the `strata` binary's commands: node, train, demo, bench, submit and
//! the rest. It is public only so that the binary, the benchmarks and the process tests
//! can reach it; applications use the crate's re-exports instead.

pub mod bench;
pub mod check;
pub mod demo;
pub mod node;
pub mod pipeline;
pub mod plot;
pub mod tasks;
pub mod train;

/// Value parsers shared by the command line's options, so that an out-of-range value is
/// a clear usage error from clap, never a panic or a division by zero later.
pub mod args {
    use clap::builder::{RangedU64ValueParser, ValueParser};

    /// A count in `min..=max`.
    pub fn count(min: u64, max: u64) -> RangedU64ValueParser<usize> {
        RangedU64ValueParser::new().range(min..=max)
    }

    /// A count of at least 1.
    pub fn positive() -> RangedU64ValueParser<usize> {
        RangedU64ValueParser::new().range(1..)
    }

    /// A finite number in `[min, max]`, e.g. a momentum.
    pub fn finite_in(min: f32, max: f32) -> ValueParser {
        ValueParser::new(move |s: &str| -> Result<f32, String> {
            let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
            if v.is_finite() && (min..=max).contains(&v) {
                Ok(v)
            } else {
                Err(format!("{v} is not a finite number in [{min}, {max}]"))
            }
        })
    }

    /// A finite number above 0 and at most `max`, e.g. a learning rate.
    pub fn finite_positive(max: f32) -> ValueParser {
        ValueParser::new(move |s: &str| -> Result<f32, String> {
            let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
            if v.is_finite() && v > 0.0 && v <= max {
                Ok(v)
            } else {
                Err(format!("{v} is not a finite number above 0 and at most {max}"))
            }
        })
    }
}
