//! Remote GPU actors: the GPU actor of any node, by name, used like the local one.
//!
//! A node serves its GPU actor with [`GpuService::register`]. An application on any
//! member ([`RemoteGpu::on_node`]) or a tool holding an operator certificate
//! ([`RemoteGpu::via_operator`]) gets a [`RemoteGpu`] and uploads, runs programs of
//! [`Op`]s, downloads and frees, as with a [`strata_gpu::GpuHandle`]:
//!
//! ```no_run
//! # async fn demo(node: strata_net::NodeHandle) -> Result<(), strata_cluster::remote_gpu::RemoteGpuError> {
//! use strata_cluster::remote_gpu::RemoteGpu;
//! use strata_gpu::Op;
//! use strata_tensor::HostTensor;
//!
//! let gpu = RemoteGpu::on_node(&node, "node-1").await?;
//! let a = gpu.upload(HostTensor::random([64, 32], 1)).await?;
//! let b = gpu.upload(HostTensor::random([32, 16], 2)).await?;
//! let c = gpu.new_tensor();
//! gpu.run(vec![Op::MatMul { a: a.id(), b: b.id(), trans_a: false, trans_b: false, out: c.id() }]).await?;
//! let product = gpu.download::<f32>(&c).await?;
//! # Ok(()) }
//! ```
//!
//! Tensors stay on the serving node behind [`RemoteTensor`] handles owned by the caller.
//! Dropping the last clone of a handle frees its tensor; a client renews its lease in the
//! background while it exists, and when it is dropped (or its process dies) the node
//! frees everything it held: at once when told, or when the lease runs out, or when the
//! owning member leaves the cluster. Every call is one request on a stream of its own
//! (so replies cannot be confused), carries a deadline the node also bounds its work by,
//! and fails with a [`RemoteGpuError`]: a mistake on the serving node comes back as the
//! very [`GpuError`] a local call would return, with the node's name.
//! [`RemoteGpu::copy_to`] sends a tensor from its node straight to another node's GPU.

pub mod protocol;
mod service;
mod sessions;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use strata_gpu::{GpuError, Op, TensorId};
use strata_net::{MemberState, NetError, NodeHandle, OperatorClient, ServiceResponse};
use strata_tensor::{DType, Element, HostTensor};
use tokio::sync::Notify;

pub use service::{GpuService, GpuServiceOptions, GpuServiceStats};

use protocol::{Envelope, Fault, Onward, Reply, Request, SERVICE, decode, encode};

/// Everything a remote GPU call can fail at. Messages name the node.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteGpuError {
    /// The serving GPU actor refused or failed, exactly as a local call would have
    /// (tensor ids are the caller's).
    #[error("gpu on {node}: {error}")]
    Gpu {
        /// The node.
        node: String,
        /// The GPU actor's error.
        error: GpuError,
    },
    /// No member has that name.
    #[error("no member named {node} (members: {members:?})")]
    UnknownNode {
        /// The name asked for.
        node: String,
        /// The members this node knows.
        members: Vec<String>,
    },
    /// The node left the cluster, failed, or (for an operator) closed the connection.
    #[error("{node} has left the cluster or is unreachable")]
    NodeLeft {
        /// The node.
        node: String,
    },
    /// The node serves no GPU.
    #[error("{node} serves no remote gpu: {message}")]
    NoService {
        /// The node.
        node: String,
        /// Its answer.
        message: String,
    },
    /// The handle was freed with [`RemoteGpu::free`].
    #[error("{op}: tensor {id} on {node} was freed")]
    Freed {
        /// The operation.
        op: &'static str,
        /// The node.
        node: String,
        /// The handle.
        id: TensorId,
    },
    /// The handle belongs to another client (another node, or another session).
    #[error("{op}: tensor {id} belongs to another remote gpu client (of {owner_node}), not this one of {node}")]
    ForeignTensor {
        /// The operation.
        op: &'static str,
        /// This client's node.
        node: String,
        /// The handle.
        id: TensorId,
        /// The node of the client the handle belongs to.
        owner_node: String,
    },
    /// A copy's destination client acts for another caller than the source's (a copy
    /// stays with the caller that owns it).
    #[error("{op}: the destination client on {dest} acts for another caller than this one")]
    ForeignClient {
        /// The operation.
        op: &'static str,
        /// The destination node.
        dest: String,
    },
    /// The session ended on the node (its lease ran out, this member was declared
    /// failed, or the node restarted): its tensors are gone; make a new client.
    #[error("{op}: the session on {node} has ended (lease expired or node restarted) and its tensors were freed")]
    SessionEnded {
        /// The operation.
        op: &'static str,
        /// The node.
        node: String,
    },
    /// The element type cannot travel (only 4-byte elements do).
    #[error("{op}: tensors of dtype {dtype} cannot be sent to a remote gpu")]
    DType {
        /// The operation.
        op: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// The node refused the call (malformed, forbidden, or over a limit).
    #[error("{node} refused {op}: {message}")]
    Refused {
        /// The node.
        node: String,
        /// The operation.
        op: &'static str,
        /// Why.
        message: String,
    },
    /// No answer within the deadline.
    #[error("{op} on {node} timed out after {millis} ms")]
    Timeout {
        /// The node.
        node: String,
        /// The operation.
        op: &'static str,
        /// The deadline.
        millis: u64,
    },
    /// The answer did not follow the protocol.
    #[error("{op} on {node}: unexpected answer: {message}")]
    Protocol {
        /// The node.
        node: String,
        /// The operation.
        op: &'static str,
        /// What was wrong.
        message: String,
    },
    /// Another network failure.
    #[error("{op} on {node}: {error}")]
    Net {
        /// The node.
        node: String,
        /// The operation.
        op: &'static str,
        /// The failure.
        error: NetError,
    },
}

impl RemoteGpuError {
    fn from_fault(node: &str, op: &'static str, fault: Fault) -> Self {
        let node = node.to_string();
        match fault {
            Fault::Gpu(e) => Self::Gpu { node, error: e.into_gpu_error() },
            Fault::UnknownSession | Fault::LeaseExpired => Self::SessionEnded { op, node },
            f @ (Fault::Forbidden(_) | Fault::BadRequest(_) | Fault::Limit(_)) => {
                Self::Refused { node, op, message: f.to_string() }
            }
            Fault::Onward { node: dest, error } => match error {
                Onward::Fault(f) => Self::from_fault(&dest, op, *f),
                Onward::Gone(_) => Self::NodeLeft { node: dest },
                Onward::Timeout { millis } => Self::Timeout { node: dest, op, millis },
                Onward::Failed(message) => Self::Refused { node: dest, op, message },
            },
        }
    }
}

/// How a client calls.
#[derive(Clone, Debug)]
pub struct RemoteGpuOptions {
    /// The longest any call waits for its answer; the node bounds its work by it too.
    pub deadline: Duration,
}

impl Default for RemoteGpuOptions {
    fn default() -> Self {
        Self { deadline: Duration::from_secs(60) }
    }
}

/// How a client reaches the node.
#[derive(Clone)]
enum Link {
    /// Through this member's node.
    Node(Box<NodeHandle>),
    /// Through an operator's connection to the node.
    Operator(Arc<OperatorClient>),
}

/// One call: the reply and its tensor data, or the typed error.
async fn call(
    link: &Link,
    node: &str,
    session: u64,
    deadline: Duration,
    op: &'static str,
    request: Request,
    payload: &[f32],
) -> Result<(Reply, Vec<f32>), RemoteGpuError> {
    let method = request.method();
    let args = encode(&Envelope { session, deadline_ms: deadline.as_millis() as u64, request });
    let answer = match link {
        Link::Node(h) => h.call(node, SERVICE, method, args, payload, deadline).await,
        Link::Operator(c) => c.call(SERVICE, method, args, payload, deadline).await,
    };
    match answer {
        Ok(ServiceResponse { data, payload }) => match decode::<Result<Reply, Fault>>(&data) {
            Ok(Ok(reply)) => Ok((reply, payload)),
            Ok(Err(fault)) => Err(RemoteGpuError::from_fault(node, op, fault)),
            Err(message) => Err(RemoteGpuError::Protocol { node: node.to_string(), op, message }),
        },
        Err(error) => Err(net_error(link, node, op, error).await),
    }
}

async fn net_error(link: &Link, node: &str, op: &'static str, error: NetError) -> RemoteGpuError {
    let node = node.to_string();
    match error {
        NetError::Timeout { millis, .. } => RemoteGpuError::Timeout { node, op, millis },
        NetError::Refused { message, .. } if message.starts_with("no service named") => {
            RemoteGpuError::NoService { node, message }
        }
        NetError::Refused { message, .. } => RemoteGpuError::Refused { node, op, message },
        NetError::NotConnected(_) | NetError::ConnectionLost { .. } => match link {
            // A member asks its member list whether the node is gone.
            Link::Node(h) if !h.is_down(&node).await.unwrap_or(true) => RemoteGpuError::Net { node, op, error },
            _ => RemoteGpuError::NodeLeft { node },
        },
        error => RemoteGpuError::Net { node, op, error },
    }
}

/// Tensor ids are unique in the process, so a handle of one client names nothing in
/// another client's session.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Client {
    node: String,
    device: String,
    link: Link,
    session: u64,
    deadline: Duration,
    /// Ids of dropped handles, freed by the background task.
    pending: Mutex<Vec<TensorId>>,
    wake: Arc<Notify>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // The background task ends the session.
        self.wake.notify_one();
    }
}

impl Client {
    async fn call(
        &self,
        op: &'static str,
        request: Request,
        payload: &[f32],
    ) -> Result<(Reply, Vec<f32>), RemoteGpuError> {
        call(&self.link, &self.node, self.session, self.deadline, op, request, payload).await
    }
}

/// A client of one node's GPU actor. Cheap to clone; the session on the node lives
/// while any clone or any [`RemoteTensor`] of it does.
///
/// Must be created inside an actix system (as nodes are): a background task on the
/// current thread renews the lease and frees dropped handles.
#[derive(Clone)]
pub struct RemoteGpu {
    client: Arc<Client>,
}

impl std::fmt::Debug for RemoteGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteGpu").field("node", &self.client.node).field("session", &self.client.session).finish()
    }
}

/// A tensor resident on a remote node, owned by the client that made it. Cheap to
/// clone; dropping the last clone frees the tensor (in the background).
#[derive(Clone)]
pub struct RemoteTensor {
    inner: Arc<TensorInner>,
}

struct TensorInner {
    id: TensorId,
    client: Arc<Client>,
    freed: AtomicBool,
}

impl Drop for TensorInner {
    fn drop(&mut self) {
        if !self.freed.load(Ordering::Acquire) {
            self.client.pending.lock().unwrap_or_else(|p| p.into_inner()).push(self.id);
            self.client.wake.notify_one();
        }
    }
}

impl std::fmt::Debug for RemoteTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteTensor({} on {})", self.inner.id, self.inner.client.node)
    }
}

impl RemoteTensor {
    /// The handle, to name the tensor in [`Op`]s run by its client.
    pub fn id(&self) -> TensorId {
        self.inner.id
    }

    /// The node the tensor lives on.
    pub fn node(&self) -> &str {
        &self.inner.client.node
    }
}

impl RemoteGpu {
    /// The GPU actor of member `name`, called through `node` (which may be `name`
    /// itself). Fails if no member has that name, it is down, or it serves no GPU.
    pub async fn on_node(node: &NodeHandle, name: &str) -> Result<Self, RemoteGpuError> {
        Self::on_node_with(node, name, RemoteGpuOptions::default()).await
    }

    /// As [`RemoteGpu::on_node`], with options.
    pub async fn on_node_with(
        node: &NodeHandle,
        name: &str,
        options: RemoteGpuOptions,
    ) -> Result<Self, RemoteGpuError> {
        let members =
            node.members().await.map_err(|error| RemoteGpuError::Net { node: name.to_string(), op: "open", error })?;
        match members.iter().find(|r| r.info.name == name) {
            None => {
                let members = members.into_iter().map(|r| r.info.name).collect();
                return Err(RemoteGpuError::UnknownNode { node: name.to_string(), members });
            }
            Some(r) if r.state != MemberState::Alive => {
                return Err(RemoteGpuError::NodeLeft { node: name.to_string() });
            }
            Some(_) => {}
        }
        Self::open(Link::Node(Box::new(node.clone())), name.to_string(), options).await
    }

    /// The GPU actor of the node `client` is connected to, as the client's operator.
    /// (To reach another node, an operator connects to it.)
    pub async fn via_operator(client: Arc<OperatorClient>) -> Result<Self, RemoteGpuError> {
        Self::via_operator_with(client, RemoteGpuOptions::default()).await
    }

    /// As [`RemoteGpu::via_operator`], with options.
    pub async fn via_operator_with(
        client: Arc<OperatorClient>,
        options: RemoteGpuOptions,
    ) -> Result<Self, RemoteGpuError> {
        let node = client.node().name.clone();
        Self::open(Link::Operator(client), node, options).await
    }

    async fn open(link: Link, node: String, options: RemoteGpuOptions) -> Result<Self, RemoteGpuError> {
        // A random session number: clients of one name (several processes with the same
        // certificate) then never share a session.
        let session = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let deadline = options.deadline;
        let (reply, _) = call(&link, &node, session, deadline, "open", Request::Open, &[]).await?;
        let Reply::Opened { device, lease_ms, idle_ms, .. } = reply else {
            return Err(RemoteGpuError::Protocol { node, op: "open", message: format!("{reply:?}") });
        };
        // Renew well within the lease, and often enough that an operator's connection
        // never idles out.
        let period = Duration::from_millis((lease_ms / 3).min(idle_ms / 2).max(10));
        let wake = Arc::new(Notify::new());
        let client = Arc::new(Client {
            node: node.clone(),
            device,
            link: link.clone(),
            session,
            deadline,
            pending: Mutex::new(Vec::new()),
            wake: wake.clone(),
        });
        actix::spawn(maintain(Arc::downgrade(&client), link, node, session, wake, period, deadline));
        Ok(Self { client })
    }

    /// The serving node.
    pub fn node(&self) -> &str {
        &self.client.node
    }

    /// The serving node's GPU adapter.
    pub fn device(&self) -> &str {
        &self.client.device
    }

    /// An id no tensor of any client uses, for a program's temporaries: its tensor lives
    /// until a program frees it or this client ends. Prefer [`RemoteGpu::new_tensor`].
    pub fn new_id(&self) -> TensorId {
        TensorId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// A handle for a program's output: the first program that writes its id makes the
    /// tensor, and dropping the handle frees it. Keep it alive while the tensor is used.
    pub fn new_tensor(&self) -> RemoteTensor {
        self.handle(self.new_id())
    }

    fn handle(&self, id: TensorId) -> RemoteTensor {
        RemoteTensor { inner: Arc::new(TensorInner { id, client: self.client.clone(), freed: AtomicBool::new(false) }) }
    }

    /// Checks that `t` is this client's and not freed.
    fn own(&self, op: &'static str, t: &RemoteTensor) -> Result<TensorId, RemoteGpuError> {
        let id = t.inner.id;
        if !Arc::ptr_eq(&t.inner.client, &self.client) {
            return Err(RemoteGpuError::ForeignTensor {
                op,
                node: self.client.node.clone(),
                id,
                owner_node: t.inner.client.node.clone(),
            });
        }
        if t.inner.freed.load(Ordering::Acquire) {
            return Err(RemoteGpuError::Freed { op, node: self.client.node.clone(), id });
        }
        Ok(id)
    }

    /// Uploads a host tensor (f32 or u32) and returns its handle.
    pub async fn upload<T: Element>(&self, tensor: HostTensor<T>) -> Result<RemoteTensor, RemoteGpuError> {
        let t = self.new_tensor();
        self.upload_as(&t, tensor).await?;
        Ok(t)
    }

    /// Uploads a host tensor under an existing handle (replacing its tensor).
    pub async fn upload_as<T: Element>(&self, t: &RemoteTensor, tensor: HostTensor<T>) -> Result<(), RemoteGpuError> {
        let id = self.own("upload", t)?;
        let words: &[f32] = bytemuck::try_cast_slice(tensor.data())
            .map_err(|_| RemoteGpuError::DType { op: "upload", dtype: T::DTYPE })?;
        let request = Request::Upload { id, shape: tensor.shape().clone(), dtype: T::DTYPE };
        self.client.call("upload", request, words).await.map(drop)
    }

    /// Runs a program atomically on the node, naming tensors by this client's ids
    /// ([`RemoteTensor::id`], [`RemoteGpu::new_id`]).
    pub async fn run(&self, ops: Vec<Op>) -> Result<(), RemoteGpuError> {
        self.client.call("run", Request::Run { ops }, &[]).await.map(drop)
    }

    /// Downloads a tensor.
    pub async fn download<T: Element>(&self, t: &RemoteTensor) -> Result<HostTensor<T>, RemoteGpuError> {
        let id = self.own("download", t)?;
        let (reply, words) = self.client.call("download", Request::Download { id, dtype: T::DTYPE }, &[]).await?;
        let node = || self.client.node.clone();
        let Reply::Tensor { shape, dtype } = reply else {
            return Err(RemoteGpuError::Protocol { node: node(), op: "download", message: format!("{reply:?}") });
        };
        if dtype != T::DTYPE {
            let message = format!("a {dtype} tensor for a {} download", T::DTYPE);
            return Err(RemoteGpuError::Protocol { node: node(), op: "download", message });
        }
        let data: &[T] =
            bytemuck::try_cast_slice(&words).map_err(|_| RemoteGpuError::DType { op: "download", dtype: T::DTYPE })?;
        HostTensor::new(shape, data.to_vec()).map_err(|e| RemoteGpuError::Protocol {
            node: node(),
            op: "download",
            message: e.to_string(),
        })
    }

    /// Frees a tensor now (every clone of the handle then fails with
    /// [`RemoteGpuError::Freed`]).
    pub async fn free(&self, t: &RemoteTensor) -> Result<(), RemoteGpuError> {
        let id = self.own("free", t)?;
        if t.inner.freed.swap(true, Ordering::AcqRel) {
            return Err(RemoteGpuError::Freed { op: "free", node: self.client.node.clone(), id });
        }
        self.client.call("free", Request::Free { ids: vec![id] }, &[]).await.map(drop)
    }

    /// Copies a tensor of this client's node straight to `dest`'s node (the data goes
    /// from node to node, not through this process) and returns the copy's handle.
    pub async fn copy_to(&self, t: &RemoteTensor, dest: &RemoteGpu) -> Result<RemoteTensor, RemoteGpuError> {
        let id = self.own("copy_to", t)?;
        let same_caller = match (&self.client.link, &dest.client.link) {
            (Link::Node(a), Link::Node(b)) => a.name() == b.name(),
            // Operator clients do not know their certificate's name; the destination
            // refuses a copy into another owner's session.
            (Link::Operator(_), Link::Operator(_)) => true,
            _ => false,
        };
        if !same_caller {
            return Err(RemoteGpuError::ForeignClient { op: "copy_to", dest: dest.client.node.clone() });
        }
        // The handle exists before the copy, so a copy that fails half-way is freed too.
        let copy = dest.new_tensor();
        let request = Request::CopyTo {
            id,
            dest: dest.client.node.clone(),
            dest_session: dest.client.session,
            dest_id: copy.id(),
        };
        self.client.call("copy_to", request, &[]).await?;
        Ok(copy)
    }

    /// Renews the lease now (the background task does it too).
    pub async fn renew(&self) -> Result<(), RemoteGpuError> {
        self.client.call("renew", Request::Renew, &[]).await.map(drop)
    }
}

/// Renews the lease, frees dropped handles, and ends the session once the client is
/// gone. Holds the client only weakly, and never across a wait.
async fn maintain(
    client: Weak<Client>,
    link: Link,
    node: String,
    session: u64,
    wake: Arc<Notify>,
    period: Duration,
    deadline: Duration,
) {
    let mut last = Instant::now();
    loop {
        let _ = tokio::time::timeout(period.saturating_sub(last.elapsed()), wake.notified()).await;
        let pending = match client.upgrade() {
            Some(c) => {
                let mut pending = c.pending.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::take(&mut *pending)
            }
            None => {
                if let Err(e) = call(&link, &node, session, deadline, "close", Request::Close, &[]).await {
                    tracing::debug!("closing the remote gpu session on {node}: {e}");
                }
                return;
            }
        };
        let (op, request) = if !pending.is_empty() {
            ("free", Request::Free { ids: pending })
        } else if last.elapsed() >= period {
            ("renew", Request::Renew)
        } else {
            continue;
        };
        last = Instant::now();
        match call(&link, &node, session, deadline, op, request, &[]).await {
            Ok(_) => {}
            Err(e @ RemoteGpuError::SessionEnded { .. }) => {
                tracing::warn!("remote gpu client: {e}");
                return;
            }
            Err(e) => tracing::debug!("remote gpu client: {e}"),
        }
    }
}
