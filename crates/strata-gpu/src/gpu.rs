//! The device context: records kernels into a command encoder and submits them lazily.
//!
//! Operations on [`Gpu`] only record work; nothing reaches the device until
//! [`Gpu::flush`] (or a download, which flushes). A sequence of operations therefore
//! runs as one submission with no host round trip between kernels. Small per-kernel
//! parameter blocks are packed into a reusable uniform arena and bound with dynamic
//! offsets, so a steady loop creates no buffers at all.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use strata_tensor::{DType, Element, HostTensor, Shape};

use crate::device::{self, AdapterRequest, DeviceInfo};
use crate::kernels::Kernels;
use crate::ops::{ConvAlgo, ConvChoice, ConvKey};
use crate::pool::{Pool, PoolStats};
use crate::{GpuError, GpuTensor, Result};

/// Bytes reserved for one kernel's parameter block.
const PARAMS_SLOT_BYTES: usize = 256;
/// Bytes of one parameter-arena chunk (one uniform buffer).
const ARENA_CHUNK_BYTES: usize = 64 * 1024;
/// Default cap on one scratch matrix (e.g. a convolution's patch matrix).
const SCRATCH_BYTES_DEFAULT: usize = 64 << 20;
/// Default memory budget: no limit beyond the device's own.
const BUDGET_BYTES_DEFAULT: u64 = u64::MAX;

/// Which matrix-multiply kernel a device uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GemmKernel {
    /// Workgroup-memory tiles, 64x64 per workgroup, 4x4 per invocation: for real GPUs.
    Tiled,
    /// One 8-lane subgroup per workgroup sharing B through `subgroupBroadcast`, 16x64
    /// per workgroup: for CPU adapters such as lavapipe, where every lane's load is a
    /// scalar loop and arithmetic per load decides speed.
    Subgroup8,
}

/// Options for opening a device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Which adapter to open.
    pub adapter: AdapterRequest,
    /// Cap on bytes held in GPU buffers by this device (tensors plus idle pool); `None`
    /// for no cap beyond the device's memory.
    pub memory_budget_bytes: Option<u64>,
    /// Force a GEMM kernel; `None` picks by adapter (also `STRATA_GEMM=tiled|subgroup`).
    pub gemm: Option<GemmKernel>,
    /// Limit on every wait for the device (a readback, a sync) and on every
    /// [`crate::GpuHandle`] call; `None` for [`DEVICE_TIMEOUT_DEFAULT`] (also
    /// `STRATA_GPU_TIMEOUT_MS`). A hung device then fails its work with
    /// [`GpuError::Timeout`] instead of hanging its node.
    pub timeout: Option<std::time::Duration>,
    /// How 3x3 stride-1 convolutions are computed; `None` for [`ConvAlgo::Auto`] (also
    /// `STRATA_CONV_ALGO=auto|im2col|winograd`).
    pub conv_algo: Option<ConvAlgo>,
}

/// How long a device wait or a GPU actor call may take unless configured otherwise.
pub const DEVICE_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(300);

impl GpuOptions {
    /// Options from the environment (`STRATA_BACKEND`, `STRATA_ADAPTER`, `STRATA_GEMM`,
    /// `STRATA_GPU_TIMEOUT_MS`, `STRATA_CONV_ALGO`).
    pub fn from_env() -> Self {
        let gemm = match std::env::var("STRATA_GEMM").as_deref() {
            Ok("tiled") => Some(GemmKernel::Tiled),
            Ok("subgroup") => Some(GemmKernel::Subgroup8),
            _ => None,
        };
        let timeout = std::env::var("STRATA_GPU_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms > 0)
            .map(std::time::Duration::from_millis);
        let conv_algo = std::env::var("STRATA_CONV_ALGO").ok().and_then(|v| {
            let algo = ConvAlgo::from_name(&v);
            if algo.is_none() {
                tracing::warn!("ignoring STRATA_CONV_ALGO={v:?}: expected auto, im2col or winograd");
            }
            algo
        });
        Self { adapter: AdapterRequest::from_env(), memory_budget_bytes: None, gemm, timeout, conv_algo }
    }

    /// The device timeout in force.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout.unwrap_or(DEVICE_TIMEOUT_DEFAULT)
    }
}

struct ParamArena {
    chunks: Vec<(wgpu::Buffer, Vec<u8>)>,
    chunk: usize,
    used: usize,
    align: usize,
    /// While set, a flush keeps the slots written so far (see [`Gpu::isolated`]).
    hold: bool,
}

impl ParamArena {
    fn push(&mut self, device: &wgpu::Device, bytes: &[u8]) -> (usize, u32) {
        assert!(bytes.len() <= PARAMS_SLOT_BYTES, "parameter block of {} bytes exceeds the slot", bytes.len());
        if self.used + PARAMS_SLOT_BYTES > ARENA_CHUNK_BYTES {
            self.chunk += 1;
            self.used = 0;
        }
        if self.chunk == self.chunks.len() {
            let buf = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("strata params"),
                size: ARENA_CHUNK_BYTES as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.chunks.push((buf, vec![0; ARENA_CHUNK_BYTES]));
        }
        let off = self.used;
        self.chunks[self.chunk].1[off..off + bytes.len()].copy_from_slice(bytes);
        self.used += PARAMS_SLOT_BYTES.next_multiple_of(self.align);
        (self.chunk, off as u32)
    }

    fn flush(&mut self, queue: &wgpu::Queue) {
        for i in 0..=self.chunk.min(self.chunks.len().saturating_sub(1)) {
            let len = if i == self.chunk { self.used } else { ARENA_CHUNK_BYTES };
            if len > 0 && i < self.chunks.len() {
                queue.write_buffer(&self.chunks[i].0, 0, &self.chunks[i].1[..len]);
            }
        }
        if !self.hold {
            self.chunk = 0;
            self.used = 0;
        }
    }
}

/// A storage binding: a byte range of a tensor's buffer.
pub(crate) struct Arg<'a> {
    pub(crate) tensor: &'a GpuTensor,
    pub(crate) offset_bytes: u64,
    pub(crate) size_bytes: u64,
}

impl GpuTensor {
    /// The whole tensor as a binding, rounded up to 16 bytes so `vec4` views see the tail.
    pub(crate) fn arg(&self) -> Arg<'_> {
        let size = self.size_bytes().max(4).next_multiple_of(16).min(self.capacity_bytes());
        Arg { tensor: self, offset_bytes: 0, size_bytes: size }
    }

    /// Elements `[offset, offset + len)` as a binding; `offset` must respect the device's
    /// storage offset alignment (callers chunk at aligned boundaries).
    pub(crate) fn arg_range(&self, offset: usize, len: usize) -> Arg<'_> {
        let es = self.dtype().size_bytes() as u64;
        let off = offset as u64 * es;
        let size = (len as u64 * es).max(4).next_multiple_of(16).min(self.capacity_bytes() - off);
        Arg { tensor: self, offset_bytes: off, size_bytes: size }
    }
}

/// Counters of one device, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuStats {
    /// Buffer pool counters.
    pub pool: PoolStats,
    /// Kernels dispatched since start.
    pub dispatches: u64,
    /// Command buffers submitted since start.
    pub submits: u64,
}

/// Time spent in one kernel while profiling (see [`Gpu::set_profiling`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelTime {
    /// `file:entry`, with sizes where the kernel gives them.
    pub kernel: String,
    /// Dispatches.
    pub calls: u64,
    /// Wall-clock seconds from submission to completion.
    pub wall_s: f64,
    /// CPU seconds of the whole process meanwhile (on a CPU adapter, the kernel's own
    /// work, and less disturbed than wall time by other load on a shared machine); NaN
    /// where the platform does not report it.
    pub cpu_s: f64,
    /// The fewest CPU seconds of one call (leaves out first-use compilation and most of
    /// the disturbance from other load); NaN where the platform does not report it.
    #[serde(default)]
    pub cpu_min_s: f64,
}

/// CPU seconds used by this process so far, all threads.
fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid timespec for clock_gettime to write.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    f64::NAN
}

/// One GPU device: its queue, kernels, buffer pool and the command encoder being recorded.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: DeviceInfo,
    kernels: Kernels,
    pool: Pool,
    staging: Pool,
    encoder: Option<wgpu::CommandEncoder>,
    arena: ParamArena,
    pub(crate) gemm: GemmKernel,
    errors: Arc<Mutex<Vec<String>>>,
    dispatches: u64,
    submits: u64,
    pub(crate) storage_align: usize,
    pub(crate) scratch_bytes_max: usize,
    /// Lanes per workgroup of the grid-stride kernels (the `WG` override).
    pub(crate) wg: u32,
    /// Per-kernel times when profiling, by `file:entry`.
    profile: Option<std::collections::BTreeMap<String, KernelTime>>,
    /// Extra label for the next profiled dispatch (e.g. GEMM sizes).
    pub(crate) profile_tag: Option<String>,
    /// Limit on every wait for the device.
    timeout: std::time::Duration,
    /// How 3x3 stride-1 convolutions are computed.
    pub(crate) conv_algo: ConvAlgo,
    /// Choices [`ConvAlgo::Auto`] made by measurement, per geometry and direction.
    pub(crate) conv_choices: std::collections::HashMap<ConvKey, ConvChoice>,
}

impl Gpu {
    /// Opens a device as described by `options`.
    pub fn new(options: &GpuOptions) -> Result<Self> {
        let open = device::open(&options.adapter)?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        open.device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!("wgpu: {e}");
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
        }));
        let info = open.info;
        let gemm = options.gemm.unwrap_or_else(|| match std::env::var("STRATA_GEMM").as_deref() {
            Ok("tiled") => GemmKernel::Tiled,
            Ok("subgroup") if info.subgroups => GemmKernel::Subgroup8,
            _ if info.is_cpu() && info.subgroups && info.subgroup_sizes.0 >= 8 => GemmKernel::Subgroup8,
            _ => GemmKernel::Tiled,
        });
        if gemm == GemmKernel::Subgroup8 && !(info.subgroups && info.subgroup_sizes.0 >= 8) {
            return Err(GpuError::Wgpu(format!(
                "the subgroup GEMM needs subgroups of at least 8 lanes; {} has {:?}",
                info.name, info.subgroup_sizes
            )));
        }
        let limits = open.device.limits();
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        tracing::info!("opened {} ({}, {}), gemm {:?}", info.name, info.backend, info.device_type, gemm);
        Ok(Self {
            device: open.device,
            queue: open.queue,
            kernels: Kernels::default(),
            pool: Pool::new(options.memory_budget_bytes.unwrap_or(BUDGET_BYTES_DEFAULT), usage),
            staging: Pool::new(u64::MAX, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            encoder: None,
            arena: ParamArena {
                chunks: Vec::new(),
                chunk: 0,
                used: 0,
                align: limits.min_uniform_buffer_offset_alignment as usize,
                hold: false,
            },
            gemm,
            errors,
            dispatches: 0,
            submits: 0,
            storage_align: limits.min_storage_buffer_offset_alignment.max(16) as usize,
            scratch_bytes_max: SCRATCH_BYTES_DEFAULT,
            // On a CPU adapter a workgroup's lanes run in SIMD batches one after another,
            // so one batch per workgroup keeps every batch's accesses contiguous.
            wg: if info.is_cpu() { 8 } else { 64 },
            profile: std::env::var_os("STRATA_PROFILE").map(|_| Default::default()),
            profile_tag: None,
            timeout: options.timeout(),
            conv_algo: options.conv_algo.unwrap_or(ConvAlgo::Auto),
            conv_choices: Default::default(),
            info,
        })
    }

    /// Opens the device chosen by the environment ([`GpuOptions::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::new(&GpuOptions::from_env())
    }

    /// What this device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The GEMM kernel in use.
    pub fn gemm_kernel(&self) -> GemmKernel {
        self.gemm
    }

    /// Pool and dispatch counters.
    pub fn stats(&self) -> GpuStats {
        GpuStats { pool: self.pool.stats(), dispatches: self.dispatches, submits: self.submits }
    }

    /// Sets the memory budget in bytes (tensors plus idle pool buffers).
    pub fn set_memory_budget(&mut self, bytes: u64) {
        self.pool.set_budget(bytes);
    }

    /// Caps the bytes of one scratch matrix (a convolution's patch matrix); larger
    /// problems are processed in several chunks. Lower it to trade speed for memory.
    pub fn set_scratch_limit(&mut self, bytes: usize) {
        self.scratch_bytes_max = bytes.max(1);
    }

    /// Turns per-kernel profiling on or off (also `STRATA_PROFILE=1`). While on, every
    /// dispatch is submitted and waited for on its own, so totals are exact per kernel but
    /// the whole runs slower.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Default::default);
    }

    /// Whether per-kernel profiling is on.
    pub(crate) fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// Calls and times per kernel (`file:entry` and sizes) since profiling was turned on.
    pub fn profile(&self) -> Vec<KernelTime> {
        self.profile.iter().flatten().map(|(_, t)| t.clone()).collect()
    }

    /// Releases idle pool buffers.
    pub fn trim(&mut self) {
        self.pool.trim();
        self.staging.trim();
    }

    /// A new tensor with unspecified contents.
    pub fn empty(&mut self, shape: impl Into<Shape>, dtype: DType) -> Result<GpuTensor> {
        let shape = shape.into();
        let bytes = shape
            .checked_numel()
            .and_then(|n| n.checked_mul(dtype.size_bytes()))
            .ok_or_else(|| strata_tensor::TensorError::TooLarge { shape: shape.to_string() })?
            as u64;
        let (buf, class) = self.pool.acquire(&self.device, bytes, self.info.max_buffer_bytes)?;
        Ok(GpuTensor::new(crate::tensor::Storage::new(buf, class, self.pool.clone()), shape, dtype))
    }

    /// A new tensor of zeros.
    pub fn zeros(&mut self, shape: impl Into<Shape>, dtype: DType) -> Result<GpuTensor> {
        let t = self.empty(shape, dtype)?;
        self.fill_bits(&t, 0)?;
        Ok(t)
    }

    /// Copies a host tensor to a new device tensor.
    pub fn upload<T: Element>(&mut self, host: &HostTensor<T>) -> Result<GpuTensor> {
        let t = self.empty(host.shape().clone(), T::DTYPE)?;
        self.write(&t, host.data())?;
        Ok(t)
    }

    /// Overwrites a device tensor with host data of the same element count and dtype.
    pub fn write<T: Element>(&mut self, t: &GpuTensor, data: &[T]) -> Result<()> {
        if t.dtype() != T::DTYPE {
            return Err(GpuError::DType {
                op: "write",
                what: "destination",
                got: t.dtype().name(),
                expected: T::DTYPE.name(),
            });
        }
        if data.len() != t.numel() {
            return Err(strata_tensor::TensorError::DataLength {
                shape: t.shape().to_string(),
                expected: t.numel(),
                got: data.len(),
            }
            .into());
        }
        // Commands recorded so far must see the old contents: queue writes land before
        // the next submission, so submit what is recorded first.
        self.flush()?;
        if !data.is_empty() {
            self.queue.write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Copies a device tensor back to the host (flushes and waits).
    pub fn download<T: Element>(&mut self, t: &GpuTensor) -> Result<HostTensor<T>> {
        check_dtype::<T>("download", "source", t)?;
        let mut data = Vec::new();
        self.read_bytes(t, 0, t.size_bytes() as usize, |bytes| data = bytemuck::cast_slice(bytes).to_vec())?;
        Ok(HostTensor::new(t.shape().clone(), data)?)
    }

    /// Copies elements `range` of a device tensor into `dst` (flushes and waits): one
    /// copy on the host, from the mapped staging buffer into the caller's memory, which
    /// can be reused from call to call (gradient buckets, collective pieces).
    pub fn read_range<T: Element>(&mut self, t: &GpuTensor, range: Range<usize>, dst: &mut [T]) -> Result<()> {
        check_dtype::<T>("read_range", "source", t)?;
        check_range("read_range", t, &range)?;
        if dst.len() != range.len() {
            return Err(strata_tensor::TensorError::DataLength {
                shape: format!("[{}]", range.len()),
                expected: range.len(),
                got: dst.len(),
            }
            .into());
        }
        let size = size_of::<T>();
        self.read_bytes(t, range.start * size, range.len() * size, |bytes| {
            dst.copy_from_slice(bytemuck::cast_slice(bytes))
        })
    }

    /// Overwrites elements `offset..offset + data.len()` of a device tensor; the rest keeps
    /// its contents. Ordered after everything recorded before it, like [`Gpu::write`].
    pub fn write_range<T: Element>(&mut self, t: &GpuTensor, offset: usize, data: &[T]) -> Result<()> {
        check_dtype::<T>("write_range", "destination", t)?;
        let end = offset.saturating_add(data.len());
        check_range("write_range", t, &(offset..end))?;
        self.flush()?;
        if !data.is_empty() {
            let at = (offset * size_of::<T>()) as u64;
            let bytes: &[u8] = bytemuck::cast_slice(data);
            // Queue writes need sizes and offsets in multiples of 4 bytes; every element
            // type here is 4 bytes wide.
            debug_assert!(at.is_multiple_of(4) && bytes.len().is_multiple_of(4));
            self.queue.write_buffer(t.buffer(), at, bytes);
        }
        Ok(())
    }

    /// Copies `len` bytes of `t` from byte `offset` through a staging buffer and hands the
    /// mapped bytes to `f` (flushes and waits); `f` is not called when `len` is 0.
    fn read_bytes(&mut self, t: &GpuTensor, offset: usize, len: usize, f: impl FnOnce(&[u8])) -> Result<()> {
        if len == 0 {
            // Nothing to copy (and an empty byte slice need not be aligned for `T`).
            return Ok(());
        }
        // Buffer copies move multiples of 4 bytes from 4-byte aligned offsets.
        let start = offset & !3;
        let bytes = (offset + len - start).next_multiple_of(4) as u64;
        let (staging, class) = self.staging.acquire(&self.device, bytes, u64::MAX)?;
        self.encoder().copy_buffer_to_buffer(t.buffer(), start as u64, &staging, 0, bytes);
        self.flush()?;
        let slice = staging.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait("read")?;
        let mapped = rx.recv().map_err(|e| GpuError::Readback(e.to_string()))?;
        mapped.map_err(|e| GpuError::Readback(e.to_string()))?;
        {
            let view = slice.get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
            f(&view[offset - start..offset - start + len]);
        }
        staging.unmap();
        self.staging.release(staging, class);
        self.check_errors()
    }

    /// Downloads a one-element tensor as a scalar.
    pub fn read_scalar(&mut self, t: &GpuTensor) -> Result<f32> {
        Ok(self.download::<f32>(t)?.data()[0])
    }

    /// Submits everything recorded so far.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(enc) = self.encoder.take() {
            self.arena.flush(&self.queue);
            self.queue.submit([enc.finish()]);
            self.submits += 1;
        }
        self.check_errors()
    }

    /// Submits everything recorded so far and waits until the device has finished it.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.wait("sync")?;
        self.check_errors()
    }

    /// The limit on every wait for the device.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Changes the limit on every wait for the device.
    pub fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.timeout = timeout;
    }

    /// Waits (bounded) until the device finished everything submitted.
    fn wait(&self, op: &'static str) -> Result<()> {
        let poll = wgpu::PollType::Wait { submission_index: None, timeout: Some(self.timeout) };
        match self.device.poll(poll) {
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(GpuError::Timeout { op, millis: self.timeout.as_millis() as u64 }),
            Err(e) => Err(GpuError::Wgpu(e.to_string())),
        }
    }

    /// Runs `f` (which records, submits and waits for work of its own, such as a timing
    /// trial) without touching the work recorded so far: that work stays unsubmitted,
    /// its parameter slots are kept, and `f` gets no buffer freed before it started
    /// (pending commands may still read those), so a program stays atomic. Work `f`
    /// leaves unsubmitted is dropped. Profiling pauses meanwhile.
    pub(crate) fn isolated<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let pending = self.encoder.take();
        let (chunk, used, hold) = (self.arena.chunk, self.arena.used, self.arena.hold);
        let profile = self.profile.take();
        self.arena.hold = true;
        self.pool.isolate(true);
        let r = f(self);
        self.encoder = pending;
        self.pool.isolate(false);
        (self.arena.chunk, self.arena.used, self.arena.hold) = (chunk, used, hold);
        self.profile = profile;
        r
    }

    /// Drops everything recorded since the last flush (used to make a failed program
    /// leave no trace).
    pub fn discard(&mut self) {
        self.encoder = None;
        self.arena.chunk = 0;
        self.arena.used = 0;
    }

    fn check_errors(&self) -> Result<()> {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_empty() {
            return Ok(());
        }
        let msg = e.join("; ");
        e.clear();
        Err(GpuError::Wgpu(msg))
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder.get_or_insert_with(|| {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("strata") })
        })
    }

    /// Records a buffer-to-buffer copy of whole 4-byte words.
    pub(crate) fn copy_bytes(&mut self, src: &GpuTensor, src_off: u64, dst: &GpuTensor, dst_off: u64, bytes: u64) {
        if bytes > 0 {
            self.encoder().copy_buffer_to_buffer(src.buffer(), src_off, dst.buffer(), dst_off, bytes);
        }
    }

    /// Records one kernel dispatch.
    ///
    /// `op` names the user-facing operation for error messages. Every binding is checked
    /// against the device's storage binding limit before anything is recorded.
    pub(crate) fn dispatch<P: bytemuck::Pod>(
        &mut self,
        op: &'static str,
        kernel: (&'static str, &'static str),
        constants: &[(&'static str, f64)],
        params: &P,
        args: &[Arg<'_>],
        groups: [u32; 3],
    ) -> Result<()> {
        let limit = self.info.max_storage_binding_bytes;
        for a in args {
            if a.size_bytes > limit {
                return Err(GpuError::BindingTooLarge { op, what: "tensor", bytes: a.size_bytes, limit_bytes: limit });
            }
            debug_assert!(a.offset_bytes + a.size_bytes <= a.tensor.capacity_bytes());
        }
        let max = self.info.max_workgroups_per_dim;
        if groups.iter().any(|&g| g > max) {
            return Err(GpuError::DispatchTooLarge {
                op,
                what: format!("{groups:?} workgroups, limit {max} per dimension"),
            });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let pipeline = self.kernels.pipeline(&self.device, kernel.0, kernel.1, constants, self.wg)?;
        assert_eq!(
            pipeline.storage_count,
            args.len(),
            "{}:{} binds {} storage buffers",
            kernel.0,
            kernel.1,
            pipeline.storage_count
        );
        let (chunk, offset) = self.arena.push(&self.device, bytemuck::bytes_of(params));
        let mut entries = Vec::with_capacity(args.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.arena.chunks[chunk].0,
                offset: 0,
                size: wgpu::BufferSize::new(PARAMS_SLOT_BYTES as u64),
            }),
        });
        for (i, a) in args.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: a.tensor.buffer(),
                    offset: a.offset_bytes,
                    size: wgpu::BufferSize::new(a.size_bytes),
                }),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.layout,
            entries: &entries,
        });
        let enc = self.encoder.get_or_insert_with(|| {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("strata") })
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &bind_group, &[offset]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        drop(pass);
        self.dispatches += 1;
        if self.profile.is_some() {
            let (start, cpu_start) = (std::time::Instant::now(), process_cpu_seconds());
            self.sync()?;
            let secs = start.elapsed().as_secs_f64();
            let cpu = process_cpu_seconds() - cpu_start;
            let label = match self.profile_tag.take() {
                Some(t) => format!("{}:{} {t}", kernel.0, kernel.1),
                None => format!("{}:{}", kernel.0, kernel.1),
            };
            let e = self.profile.as_mut().expect("checked").entry(label.clone()).or_insert_with(|| KernelTime {
                kernel: label,
                cpu_min_s: f64::INFINITY,
                ..KernelTime::default()
            });
            e.calls += 1;
            e.cpu_min_s = if cpu.is_nan() { f64::NAN } else { e.cpu_min_s.min(cpu) };
            e.wall_s += secs;
            e.cpu_s += cpu;
        }
        Ok(())
    }

    /// Largest element count per chunk for a buffer of `elem_bytes`-sized elements, so a
    /// chunk fits one storage binding and chunk offsets respect the alignment.
    pub(crate) fn chunk_elems(&self, elem_bytes: usize) -> usize {
        let limit = self.info.max_storage_binding_bytes as usize;
        let aligned = (limit / self.storage_align) * self.storage_align;
        // Keep room for the 16-byte round-up of a binding's size.
        (aligned - self.storage_align.max(16)) / elem_bytes
    }
}

fn check_dtype<T: Element>(op: &'static str, what: &'static str, t: &GpuTensor) -> Result<()> {
    if t.dtype() != T::DTYPE {
        return Err(GpuError::DType { op, what, got: t.dtype().name(), expected: T::DTYPE.name() });
    }
    Ok(())
}

fn check_range(op: &'static str, t: &GpuTensor, range: &Range<usize>) -> Result<()> {
    if range.start > range.end || range.end > t.numel() {
        return Err(GpuError::Range { op, start: range.start, end: range.end, len: t.numel() });
    }
    Ok(())
}
