//! GPU kernels against the CPU references, gradient checks, the buffer pool and the actor.

mod actor;
mod gradcheck;
mod kernels;
mod limits;
