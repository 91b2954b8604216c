//! Integration tests of Strata, compiled into one binary with a module per area.
//!
//! GPU tests open the adapter chosen by the environment (lavapipe in CI). Without an
//! adapter they print `SKIPPED` and pass, unless `STRATA_REQUIRE_GPU=1` (set by
//! `.ci/run`) turns the skip into a failure.

mod cluster;
mod common;
mod gpu;
mod net;
mod train;
