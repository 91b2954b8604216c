//! The GPU actor: one actix actor per device, owning the device, its queue and the
//! tensors behind handles, on a thread of its own (GPU calls block).
//!
//! Handlers are thin: each one calls a method of [`Executor`] and replies with its typed
//! `Result`. A failed message leaves the actor serving, with its table unchanged.
//! Applications use [`GpuHandle`], which hands out fresh [`TensorId`]s and wraps the
//! messages in async methods.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use strata_tensor::{Element, HostTensor};

use crate::{DeviceInfo, Executor, Gpu, GpuError, GpuOptions, GpuStats, Op, Result, TensorId};

/// The actor owning one device.
pub struct GpuActor {
    /// `None` after [`Shutdown`].
    exec: Option<Executor>,
}

impl GpuActor {
    fn exec(&mut self) -> Result<&mut Executor> {
        self.exec.as_mut().ok_or(GpuError::ActorGone)
    }
}

impl Actor for GpuActor {
    type Context = SyncContext<Self>;
}

/// Uploads a host tensor under `id`.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Upload<T: Element> {
    /// Handle for the new tensor.
    pub id: TensorId,
    /// The data.
    pub tensor: HostTensor<T>,
}

/// Downloads the tensor under `id`.
#[derive(Message)]
#[rtype(result = "Result<HostTensor<T>>")]
pub struct Download<T: Element> {
    /// The handle.
    pub id: TensorId,
    /// The element type expected.
    pub _t: PhantomData<fn() -> T>,
}

/// Copies elements `range` of the tensor under `id` into `buf` (resized to the range's
/// length) and hands `buf` back, so callers reuse their host memory.
#[derive(Message)]
#[rtype(result = "Result<Vec<T>>")]
pub struct ReadRange<T: Element> {
    /// The handle.
    pub id: TensorId,
    /// Elements to read.
    pub range: std::ops::Range<usize>,
    /// Where to put them.
    pub buf: Vec<T>,
}

/// Overwrites elements `offset..offset + data.len()` of the tensor under `id`, and hands
/// `data` back for reuse.
#[derive(Message)]
#[rtype(result = "Result<Vec<T>>")]
pub struct WriteRange<T: Element> {
    /// The handle.
    pub id: TensorId,
    /// First element written.
    pub offset: usize,
    /// The values.
    pub data: Vec<T>,
}

/// Runs a program atomically.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Run(pub Vec<Op>);

/// Drops handles; unknown ones are ignored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Free(pub Vec<TensorId>);

/// Releases the device, answering once it is gone (so a process can exit without racing
/// the driver's teardown); later messages fail with [`GpuError::ActorGone`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Asks what the device is.
#[derive(Message)]
#[rtype(result = "DeviceInfo")]
pub struct Info;

/// Asks for the device's counters.
#[derive(Message)]
#[rtype(result = "GpuStats")]
pub struct Stats;

/// Runs a closure on the actor's executor: the escape hatch for work the message set
/// does not cover (it runs on the GPU thread and must not block for long).
pub struct With<F, R>(pub F, pub PhantomData<fn() -> R>);

impl<F, R> Message for With<F, R>
where
    F: FnOnce(&mut Executor) -> R,
    R: 'static,
{
    type Result = Result<R>;
}

impl<T: Element> Handler<Upload<T>> for GpuActor {
    type Result = Result<()>;
    fn handle(&mut self, msg: Upload<T>, _: &mut SyncContext<Self>) -> Self::Result {
        self.exec()?.upload(msg.id, &msg.tensor)
    }
}

impl<T: Element> Handler<Download<T>> for GpuActor {
    type Result = Result<HostTensor<T>>;
    fn handle(&mut self, msg: Download<T>, _: &mut SyncContext<Self>) -> Self::Result {
        self.exec()?.download(msg.id)
    }
}

impl<T: Element> Handler<ReadRange<T>> for GpuActor {
    type Result = Result<Vec<T>>;
    fn handle(&mut self, msg: ReadRange<T>, _: &mut SyncContext<Self>) -> Self::Result {
        let ReadRange { id, range, mut buf } = msg;
        let exec = self.exec()?;
        let len = exec.get(id)?.numel();
        // Checked before the buffer grows: a wrong range must not exhaust memory.
        if range.start > range.end || range.end > len {
            return Err(GpuError::Range { op: "read_range", start: range.start, end: range.end, len });
        }
        buf.resize(range.len(), T::default());
        exec.read_range(id, range, &mut buf)?;
        Ok(buf)
    }
}

impl<T: Element> Handler<WriteRange<T>> for GpuActor {
    type Result = Result<Vec<T>>;
    fn handle(&mut self, msg: WriteRange<T>, _: &mut SyncContext<Self>) -> Self::Result {
        self.exec()?.write_range(msg.id, msg.offset, &msg.data)?;
        Ok(msg.data)
    }
}

impl Handler<Run> for GpuActor {
    type Result = Result<()>;
    fn handle(&mut self, msg: Run, _: &mut SyncContext<Self>) -> Self::Result {
        self.exec()?.run(&msg.0)
    }
}

impl Handler<Free> for GpuActor {
    type Result = ();
    fn handle(&mut self, msg: Free, _: &mut SyncContext<Self>) {
        if let Some(ex) = self.exec.as_mut() {
            for id in msg.0 {
                ex.remove(id);
            }
        }
    }
}

impl Handler<Shutdown> for GpuActor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, _: &mut SyncContext<Self>) {
        // The actor stays (a stopped sync actor would be rebuilt by its arbiter); its
        // thread ends when the last address is dropped.
        drop(self.exec.take());
    }
}

impl Handler<Info> for GpuActor {
    type Result = MessageResult<Info>;
    fn handle(&mut self, _: Info, _: &mut SyncContext<Self>) -> Self::Result {
        MessageResult(self.exec.as_mut().map(|e| e.gpu().info().clone()).unwrap_or_default())
    }
}

impl Handler<Stats> for GpuActor {
    type Result = MessageResult<Stats>;
    fn handle(&mut self, _: Stats, _: &mut SyncContext<Self>) -> Self::Result {
        MessageResult(self.exec.as_mut().map(|e| e.gpu().stats()).unwrap_or_default())
    }
}

impl<F, R> Handler<With<F, R>> for GpuActor
where
    F: FnOnce(&mut Executor) -> R + Send + 'static,
    R: Send + 'static,
{
    type Result = MessageResult<With<F, R>>;
    fn handle(&mut self, msg: With<F, R>, _: &mut SyncContext<Self>) -> Self::Result {
        MessageResult(self.exec().map(|ex| (msg.0)(ex)))
    }
}

/// The application's handle to a GPU actor. Cheap to clone.
#[derive(Clone)]
pub struct GpuHandle {
    addr: Addr<GpuActor>,
    next_id: Arc<AtomicU64>,
    info: DeviceInfo,
    /// Limit on every call; a call past it fails with [`GpuError::Timeout`] (the actor
    /// may still finish the work, but the caller is not held hostage by a hung device).
    timeout: std::time::Duration,
}

impl GpuHandle {
    /// Opens a device and starts its actor on a thread of its own. Must be called inside
    /// a running actix system.
    pub fn start(options: &GpuOptions) -> Result<Self> {
        let gpu = Gpu::new(options)?;
        Ok(Self::from_gpu(gpu))
    }

    /// Starts an actor around an already opened device.
    pub fn from_gpu(gpu: Gpu) -> Self {
        let info = gpu.info().clone();
        // Calls wait for the device's own (bounded) waits, plus time to queue behind others.
        let timeout = gpu.timeout().saturating_mul(2);
        let slot = Mutex::new(Some(gpu));
        let addr = SyncArbiter::start(1, move || {
            let gpu = slot.lock().unwrap_or_else(|p| p.into_inner()).take().expect("the GPU actor is constructed once");
            GpuActor { exec: Some(Executor::new(gpu)) }
        });
        Self { addr, next_id: Arc::new(AtomicU64::new(1)), info, timeout }
    }

    /// The same actor with another limit on each call.
    pub fn with_timeout(&self, timeout: std::time::Duration) -> Self {
        Self { timeout, ..self.clone() }
    }

    /// The actor's address, for sending messages directly.
    pub fn addr(&self) -> &Addr<GpuActor> {
        &self.addr
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// A handle no other tensor of this actor uses.
    pub fn new_id(&self) -> TensorId {
        TensorId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    async fn ask<M>(&self, op: &'static str, msg: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        GpuActor: Handler<M>,
    {
        match actix::clock::timeout(self.timeout, self.addr.send(msg)).await {
            Ok(r) => r.map_err(|_| GpuError::ActorGone),
            Err(_) => Err(GpuError::Timeout { op, millis: self.timeout.as_millis() as u64 }),
        }
    }

    /// Uploads a host tensor and returns its new handle.
    pub async fn upload<T: Element>(&self, tensor: HostTensor<T>) -> Result<TensorId> {
        let id = self.new_id();
        self.ask("upload", Upload { id, tensor }).await??;
        Ok(id)
    }

    /// Uploads a host tensor under a given handle.
    pub async fn upload_as<T: Element>(&self, id: TensorId, tensor: HostTensor<T>) -> Result<()> {
        self.ask("upload", Upload { id, tensor }).await?
    }

    /// Downloads a tensor.
    pub async fn download<T: Element>(&self, id: TensorId) -> Result<HostTensor<T>> {
        self.ask("download", Download::<T> { id, _t: PhantomData }).await?
    }

    /// Reads elements `range` of a tensor into `buf` (resized to fit; its allocation is
    /// reused) and returns it: one host copy, out of the staging buffer.
    pub async fn read_range<T: Element>(
        &self,
        id: TensorId,
        range: std::ops::Range<usize>,
        buf: Vec<T>,
    ) -> Result<Vec<T>> {
        self.ask("read_range", ReadRange { id, range, buf }).await?
    }

    /// Overwrites elements `offset..offset + data.len()` of a tensor, keeping the rest, and
    /// returns `data` for reuse.
    pub async fn write_range<T: Element>(&self, id: TensorId, offset: usize, data: Vec<T>) -> Result<Vec<T>> {
        self.ask("write_range", WriteRange { id, offset, data }).await?
    }

    /// Runs a program atomically.
    pub async fn run(&self, ops: Vec<Op>) -> Result<()> {
        self.ask("run", Run(ops)).await?
    }

    /// Drops handles.
    pub async fn free(&self, ids: Vec<TensorId>) -> Result<()> {
        self.ask("free", Free(ids)).await
    }

    /// The device's counters.
    pub async fn stats(&self) -> Result<GpuStats> {
        self.ask("stats", Stats).await
    }

    /// Releases the device; later calls fail with [`GpuError::ActorGone`].
    pub async fn shutdown(&self) {
        let _ = self.addr.send(Shutdown).await;
    }

    /// Runs `f` on the actor's executor.
    pub async fn with<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Executor) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.ask("with", With(f, PhantomData)).await?
    }
}
