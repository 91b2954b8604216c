//! The GPU compute core of Strata: a wgpu device on any adapter (hardware, or a
//! software Vulkan adapter such as lavapipe), a buffer pool, the WGSL kernels under
//! `shaders/`, device-resident tensors, atomic programs of operations, and the GPU actor.
//!
//! Three ways in, from low to high level:
//! - [`Gpu`]: call operations on [`GpuTensor`]s directly; work is recorded and submitted
//!   lazily, data stays on the device until [`Gpu::download`].
//! - [`Executor`]: a table of tensors behind [`TensorId`] handles that runs [`Op`]
//!   programs atomically.
//! - [`GpuHandle`]: the same executor inside an actix actor with its own thread.

mod actor;
mod device;
mod error;
mod gpu;
pub mod kernels;
mod ops;
mod pool;
mod program;
mod tensor;

pub use actor::{Download, Free, GpuActor, GpuHandle, Info, ReadRange, Run, Shutdown, Stats, Upload, With, WriteRange};
pub use device::{AdapterRequest, DeviceInfo, list_adapters};
pub use error::{GpuError, Result};
pub use gpu::{DEVICE_TIMEOUT_DEFAULT, GemmKernel, Gpu, GpuOptions, GpuStats, KernelTime};
pub use ops::{BackwardParts, Conv2dGrads, ConvAlgo, ConvChoice, ConvForward};
pub use pool::PoolStats;
pub use program::{Executor, Op, Program, TensorId};
pub use tensor::GpuTensor;
