//! The node side: [`GpuService`], which serves a node's GPU actor to the cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_gpu::{GpuError, GpuHandle, Op, TensorId};
use strata_net::{
    Caller, MembershipEvent, NetError, NodeHandle, Service, ServiceFuture, ServiceRequest, ServiceResponse,
};
use strata_tensor::{DType, HostTensor, Shape};

use super::protocol::{
    Envelope, Fault, Onward, Owner, OwnerRole, Reply, Request, SERVICE, WireGpuError, decode, encode, operands,
};
use super::sessions::{Limits, SessionKey, Sessions};

/// How the service treats its callers.
#[derive(Clone, Debug)]
pub struct GpuServiceOptions {
    /// A session not renewed for this long is ended and its tensors freed (clients renew
    /// at a third of it).
    pub lease: Duration,
    /// How often expired sessions are looked for; `None`: a quarter of the lease, at
    /// most a second.
    pub sweep_every: Option<Duration>,
    /// The longest a call may make the node work for it (GPU waits, onward calls), even
    /// if the caller offers to wait longer.
    pub call_limit_max: Duration,
    /// Open sessions, all callers together.
    pub max_sessions: usize,
    /// Tensors one session may hold.
    pub max_tensors_per_session: usize,
}

impl Default for GpuServiceOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            sweep_every: None,
            call_limit_max: Duration::from_secs(120),
            max_sessions: 4096,
            max_tensors_per_session: 1 << 16,
        }
    }
}

/// What the service has done, for tests and monitoring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuServiceStats {
    /// Sessions open now.
    pub sessions: usize,
    /// Tensors held by open sessions.
    pub tensors: usize,
    /// Sessions ended by their lease or their owner's departure.
    pub expired_sessions: u64,
    /// Tensors freed with them.
    pub expired_tensors: u64,
    /// Tensor bytes callers uploaded.
    pub bytes_from_callers: u64,
    /// Tensor bytes callers downloaded.
    pub bytes_to_callers: u64,
    /// Tensor bytes other nodes' services copied here for a caller.
    pub bytes_from_peers: u64,
    /// Tensor bytes this service copied to other nodes for a caller.
    pub bytes_to_peers: u64,
}

#[derive(Default)]
struct Counters {
    from_callers: AtomicU64,
    to_callers: AtomicU64,
    from_peers: AtomicU64,
    to_peers: AtomicU64,
}

/// Serves a node's GPU actor to members and operators as service [`SERVICE`].
///
/// Each caller works in sessions of its own (its verified name and role, plus a number
/// its client chose), so it can only name its own tensors. A session lives while its
/// client renews the lease (every call renews it); when the lease runs out, or the owning
/// member leaves or fails, its tensors are freed.
///
/// Trust: a tensor copied between nodes is stored by the destination under the original
/// caller's name on the word of the sending node (`Adopt`). Members are trusted to act
/// for the callers whose work they carry (they run that work anyway); operators are not,
/// so `Adopt` from an operator is refused.
pub struct GpuService {
    inner: Arc<Inner>,
}

struct Inner {
    gpu: GpuHandle,
    node: NodeHandle,
    options: GpuServiceOptions,
    started: Instant,
    sessions: Mutex<Sessions>,
    counters: Counters,
}

impl GpuService {
    /// Serves `gpu` on `node` as service [`SERVICE`] and starts the lease sweep (on the
    /// node's runtime). The service unregisters itself and frees what its callers held
    /// when the node stops.
    pub async fn register(
        node: &NodeHandle,
        gpu: GpuHandle,
        options: GpuServiceOptions,
    ) -> Result<Arc<GpuService>, NetError> {
        let events = node.subscribe().await?;
        let limits = Limits {
            lease_ms: options.lease.as_millis() as u64,
            max_sessions: options.max_sessions,
            max_tensors_per_session: options.max_tensors_per_session,
            remembered: 4096,
        };
        let inner = Arc::new(Inner {
            gpu,
            node: node.clone(),
            started: Instant::now(),
            sessions: Mutex::new(Sessions::new(limits)),
            counters: Counters::default(),
            options,
        });
        let service = Arc::new(GpuService { inner: inner.clone() });
        node.register_service(SERVICE, service.clone());
        actix::spawn(sweep(Arc::downgrade(&inner), events));
        Ok(service)
    }

    /// What the service holds and has moved.
    pub fn stats(&self) -> GpuServiceStats {
        let s = self.inner.lock();
        let c = &self.inner.counters;
        GpuServiceStats {
            sessions: s.live_sessions(),
            tensors: s.live_tensors(),
            expired_sessions: s.expired_sessions,
            expired_tensors: s.expired_tensors,
            bytes_from_callers: c.from_callers.load(Ordering::Relaxed),
            bytes_to_callers: c.to_callers.load(Ordering::Relaxed),
            bytes_from_peers: c.from_peers.load(Ordering::Relaxed),
            bytes_to_peers: c.to_peers.load(Ordering::Relaxed),
        }
    }
}

impl Service for GpuService {
    fn call(&self, request: ServiceRequest) -> ServiceFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let ServiceRequest { caller, method, args, payload } = request;
            let (result, payload) = match decode::<Envelope>(&args) {
                Ok(env) if env.request.method() == method => inner.handle(&caller, env, payload).await,
                Ok(env) => (
                    Err(Fault::BadRequest(format!("method {method:?} carries a {} request", env.request.method()))),
                    vec![],
                ),
                Err(e) => (Err(Fault::BadRequest(format!("undecodable {method} arguments: {e}"))), vec![]),
            };
            if let Err(fault) = &result {
                tracing::debug!("gpu service: {method} from {} refused: {fault}", caller.name);
            }
            Ok(ServiceResponse { data: encode(&result), payload })
        })
    }
}

/// Ends expired sessions every so often, and the sessions of members that left; stops
/// (freeing everything) when the node stops.
async fn sweep(inner: std::sync::Weak<Inner>, mut events: tokio::sync::mpsc::Receiver<MembershipEvent>) {
    let every = match inner.upgrade() {
        Some(i) => i.options.sweep_every.unwrap_or((i.options.lease / 4).min(Duration::from_secs(1))),
        None => return,
    }
    .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = tick.tick() => None,
            e = events.recv() => Some(e),
        };
        let Some(inner) = inner.upgrade() else { return };
        let freed = match event {
            None => {
                let now = inner.now_ms();
                inner.lock().sweep(now)
            }
            Some(Some(MembershipEvent::Left(name) | MembershipEvent::Failed { name, .. })) => {
                inner.lock().release_owner(&Owner { name, role: OwnerRole::Node })
            }
            Some(Some(MembershipEvent::Joined(_))) => Vec::new(),
            Some(None) => {
                // The node stopped (or dropped this subscriber for falling behind).
                match inner.node.subscribe().await {
                    Ok(e) => {
                        events = e;
                        continue;
                    }
                    Err(_) => {
                        inner.node.unregister_service(SERVICE);
                        let all = inner.lock().drain();
                        if !all.is_empty() {
                            let _ = inner.gpu.free(all).await;
                        }
                        return;
                    }
                }
            }
        };
        if !freed.is_empty() {
            tracing::info!("gpu service on {}: freeing {} tensors of ended sessions", inner.node.name(), freed.len());
            let _ = inner.gpu.free(freed).await;
        }
    }
}

type Answer = (Result<Reply, Fault>, Vec<f32>);

fn gpu_fault(e: &GpuError) -> Fault {
    Fault::Gpu(WireGpuError::from(e))
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn handle(&self, caller: &Caller, env: Envelope, payload: Vec<f32>) -> Answer {
        let limit = Duration::from_millis(env.deadline_ms.max(1)).min(self.options.call_limit_max);
        let deadline = Instant::now() + limit;
        let gpu = self.gpu.with_timeout(limit);
        let role = match caller.role {
            strata_net::tls::Role::Node => OwnerRole::Node,
            strata_net::tls::Role::Operator => OwnerRole::Operator,
        };
        let key = SessionKey { owner: Owner { name: caller.name.clone(), role }, session: env.session };
        let now = self.now_ms();
        let touched = match &env.request {
            Request::Open => self.lock().open(&key, now),
            Request::Close | Request::Adopt { .. } => Ok(()),
            _ => self.lock().touch(&key, now),
        };
        if let Err(f) = touched {
            return (Err(f), vec![]);
        }
        match env.request {
            Request::Open => {
                let reply = Reply::Opened {
                    node: self.node.name().to_string(),
                    device: self.gpu.info().name.clone(),
                    lease_ms: self.options.lease.as_millis() as u64,
                    idle_ms: self.node.config().request_timeout_ms,
                };
                (Ok(reply), vec![])
            }
            Request::Renew => (Ok(Reply::Done), vec![]),
            Request::Close => {
                let freed = self.lock().close(&key);
                if !freed.is_empty() {
                    let _ = gpu.free(freed).await;
                }
                (Ok(Reply::Done), vec![])
            }
            Request::Upload { id, shape, dtype } => {
                let bytes = payload.len() as u64 * 4;
                let r = self.store(&gpu, &key, id, shape, dtype, payload).await;
                if r.is_ok() {
                    self.counters.from_callers.fetch_add(bytes, Ordering::Relaxed);
                }
                (r.map(|()| Reply::Done), vec![])
            }
            Request::Adopt { owner, id, shape, dtype } => {
                if role != OwnerRole::Node {
                    let msg =
                        format!("operator {} may not store tensors for others (adopt is for members)", caller.name);
                    return (Err(Fault::Forbidden(msg)), vec![]);
                }
                let key = SessionKey { owner, session: env.session };
                if let Err(f) = self.lock().touch(&key, now) {
                    return (Err(f), vec![]);
                }
                let bytes = payload.len() as u64 * 4;
                let r = self.store(&gpu, &key, id, shape, dtype, payload).await;
                if r.is_ok() {
                    self.counters.from_peers.fetch_add(bytes, Ordering::Relaxed);
                }
                (r.map(|()| Reply::Done), vec![])
            }
            Request::Run { ops } => (self.run(&gpu, &key, ops).await.map(|()| Reply::Done), vec![]),
            Request::Download { id, dtype } => match self.fetch(&gpu, &key, id, Some(dtype), "download").await {
                Ok((shape, dtype, words)) => {
                    self.counters.to_callers.fetch_add(words.len() as u64 * 4, Ordering::Relaxed);
                    (Ok(Reply::Tensor { shape, dtype }), words)
                }
                Err(f) => (Err(f), vec![]),
            },
            Request::Free { ids } => {
                let freed: Vec<TensorId> = {
                    let mut s = self.lock();
                    ids.into_iter().filter_map(|id| s.unbind(&key, id)).collect()
                };
                if !freed.is_empty() {
                    let _ = gpu.free(freed).await;
                }
                (Ok(Reply::Done), vec![])
            }
            Request::CopyTo { id, dest, dest_session, dest_id } => {
                let r = self.copy_to(&gpu, &key, id, dest, dest_session, dest_id, deadline).await;
                (r.map(|()| Reply::Done), vec![])
            }
        }
    }

    /// Uploads words as the session's tensor `id`.
    async fn store(
        &self,
        gpu: &GpuHandle,
        key: &SessionKey,
        id: TensorId,
        shape: Shape,
        dtype: DType,
        words: Vec<f32>,
    ) -> Result<(), Fault> {
        if shape.checked_numel().is_none() {
            return Err(Fault::BadRequest(format!("shape {shape} has too many elements")));
        }
        {
            let sessions = self.lock();
            sessions.room_for(key, usize::from(sessions.resolve(key, id).is_none()))?;
        }
        let local = gpu.new_id();
        let uploaded = match dtype {
            DType::F32 => match HostTensor::new(shape, words) {
                Ok(t) => gpu.upload_as(local, t).await,
                Err(e) => Err(e.into()),
            },
            DType::U32 => match HostTensor::new(shape, words.into_iter().map(f32::to_bits).collect()) {
                Ok(t) => gpu.upload_as::<u32>(local, t).await,
                Err(e) => Err(e.into()),
            },
            other => return Err(Fault::BadRequest(format!("tensors of dtype {other} do not travel as words"))),
        };
        if let Err(e) = uploaded {
            return Err(gpu_fault(&e));
        }
        let bound = self.lock().bind(key, id, local);
        match bound {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    let _ = gpu.free(vec![old]).await;
                }
                Ok(())
            }
            Err(f) => {
                let _ = gpu.free(vec![local]).await;
                Err(f)
            }
        }
    }

    /// Runs a program given in the session's ids: renumbers it to the actor's ids (ids
    /// the session does not hold get fresh ones: outputs, or unknown inputs that the
    /// actor reports), runs it, then records which of its ids now hold tensors.
    async fn run(&self, gpu: &GpuHandle, key: &SessionKey, mut ops: Vec<Op>) -> Result<(), Fault> {
        let mut to_local: HashMap<TensorId, TensorId> = HashMap::new();
        let mut fresh = 0usize;
        {
            let sessions = self.lock();
            for op in &mut ops {
                let (ids, shapes) = operands(op);
                if let Some(s) = shapes.iter().find(|s| s.checked_numel().is_none()) {
                    return Err(Fault::BadRequest(format!("shape {s} has too many elements")));
                }
                for id in ids {
                    let local = *to_local.entry(*id).or_insert_with(|| match sessions.resolve(key, *id) {
                        Some(l) => l,
                        None => {
                            fresh += 1;
                            gpu.new_id()
                        }
                    });
                    *id = local;
                }
            }
            sessions.room_for(key, fresh)?;
        }
        let pairs: Vec<(TensorId, TensorId)> = to_local.into_iter().collect();
        let locals: Vec<TensorId> = pairs.iter().map(|p| p.1).collect();
        let outcome = gpu
            .with(move |ex| {
                let r = ex.run(&ops);
                let live: Vec<bool> = locals.iter().map(|l| ex.get(*l).is_ok()).collect();
                (r, live)
            })
            .await;
        let (result, live) = match outcome {
            Ok(x) => x,
            Err(e) => return Err(gpu_fault(&e)),
        };
        if let Err(e) = result {
            // Name the caller's id, not the actor's.
            let e = match e {
                GpuError::UnknownTensor { op, id } => {
                    let id = pairs.iter().find(|p| p.1 == id).map_or(id, |p| p.0);
                    GpuError::UnknownTensor { op, id }
                }
                other => other,
            };
            return Err(gpu_fault(&e));
        }
        let mut orphans = Vec::new();
        {
            let mut sessions = self.lock();
            for ((id, local), live) in pairs.into_iter().zip(live) {
                let bound = sessions.resolve(key, id);
                if live && bound != Some(local) {
                    match sessions.bind(key, id, local) {
                        Ok(replaced) => orphans.extend(replaced),
                        Err(_) => orphans.push(local),
                    }
                } else if !live && bound == Some(local) {
                    sessions.unbind(key, id);
                }
            }
        }
        if !orphans.is_empty() {
            let _ = gpu.free(orphans).await;
        }
        Ok(())
    }

    /// Reads the session's tensor `id` as words (checking its dtype if `want` is given).
    async fn fetch(
        &self,
        gpu: &GpuHandle,
        key: &SessionKey,
        id: TensorId,
        want: Option<DType>,
        op: &'static str,
    ) -> Result<(Shape, DType, Vec<f32>), Fault> {
        let Some(local) = self.lock().resolve(key, id) else {
            return Err(gpu_fault(&GpuError::UnknownTensor { op, id }));
        };
        let r = gpu
            .with(move |ex| -> Result<(Shape, DType, Vec<f32>), GpuError> {
                let dtype = want.unwrap_or(ex.get(local)?.dtype());
                match dtype {
                    DType::F32 => ex.download::<f32>(local).map(|h| (h.shape().clone(), dtype, h.into_data())),
                    DType::U32 => ex.download::<u32>(local).map(|h| {
                        let shape = h.shape().clone();
                        (shape, dtype, h.into_data().into_iter().map(f32::from_bits).collect())
                    }),
                    other => Err(GpuError::DType { op, what: "tensor", got: other.name(), expected: "f32 or u32" }),
                }
            })
            .await;
        match r {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(GpuError::UnknownTensor { op, .. })) => Err(gpu_fault(&GpuError::UnknownTensor { op, id })),
            Ok(Err(e)) | Err(e) => Err(gpu_fault(&e)),
        }
    }

    /// Sends the session's tensor `id` to `dest`'s service for the same owner.
    async fn copy_to(
        &self,
        gpu: &GpuHandle,
        key: &SessionKey,
        id: TensorId,
        dest: String,
        dest_session: u64,
        dest_id: TensorId,
        deadline: Instant,
    ) -> Result<(), Fault> {
        let (shape, dtype, words) = self.fetch(gpu, key, id, None, "copy_to").await?;
        let limit = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let env = Envelope {
            session: dest_session,
            deadline_ms: limit.as_millis() as u64,
            request: Request::Adopt { owner: key.owner.clone(), id: dest_id, shape, dtype },
        };
        let onward = |error| Fault::Onward { node: dest.clone(), error };
        let answer = self.node.call(&dest, SERVICE, "adopt", encode(&env), &words, limit).await;
        let r = match answer {
            Ok(resp) => match decode::<Result<Reply, Fault>>(&resp.data) {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(f)) => Err(onward(Onward::Fault(Box::new(f)))),
                Err(e) => Err(onward(Onward::Failed(format!("undecodable answer: {e}")))),
            },
            Err(e @ (NetError::NotConnected(_) | NetError::ConnectionLost { .. })) => {
                Err(onward(Onward::Gone(e.to_string())))
            }
            Err(NetError::Timeout { millis, .. }) => Err(onward(Onward::Timeout { millis })),
            Err(e) => Err(onward(Onward::Failed(e.to_string()))),
        };
        if r.is_ok() {
            self.counters.to_peers.fetch_add(words.len() as u64 * 4, Ordering::Relaxed);
        }
        r
    }
}
