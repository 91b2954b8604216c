//! Strata: a cross-vendor distributed GPU compute runtime.
//!
//! This crate re-exports the public API of the layers below and holds the code behind
//! the `strata` binary's commands.

pub mod bench;
pub mod check;
pub mod cluster;
pub mod demo;
pub mod plot;
pub mod train;

pub use strata_collective as collective;
pub use strata_gpu as gpu;
pub use strata_net as net;
pub use strata_tensor as tensor;
pub use strata_wire as wire;
