//! What travels between a remote GPU client and a node's `gpu` service.
//!
//! A call's arguments are an [`Envelope`] (MessagePack, named fields) and its tensor data
//! travels in the call's payload as 4-byte words (f32 as is, u32 bit for bit). The reply's
//! data is a `Result<Reply, Fault>`, so a refusal reaches the caller as a typed value
//! rather than as a string. [`GpuError`] holds `&'static str` names and is not
//! serializable, so it travels as its mirror [`WireGpuError`] and is rebuilt on arrival.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use strata_gpu::{GpuError, Op, TensorId};
use strata_tensor::{DType, Shape, TensorError};

/// The name the service is registered under.
pub const SERVICE: &str = "gpu";

/// Whether a tensor's owner is a member or an operator (the two namespaces of
/// certificate names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OwnerRole {
    /// A member node.
    Node,
    /// An operator (a tool holding an operator certificate).
    Operator,
}

/// Who owns a session: a verified certificate name and its role.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// The certificate's name.
    pub name: String,
    /// Its role.
    pub role: OwnerRole,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.role {
            OwnerRole::Node => write!(f, "node {}", self.name),
            OwnerRole::Operator => write!(f, "operator {}", self.name),
        }
    }
}

/// One call's arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The caller's session on the node (a client picks it at random; tensor ids are
    /// scoped by the caller's verified name and this number).
    pub session: u64,
    /// How long the caller waits, ms: the node bounds its own work (GPU calls, onward
    /// calls) by it.
    pub deadline_ms: u64,
    /// What to do.
    pub request: Request,
}

/// What a caller asks of the service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Opens (or renews) the session: answered with [`Reply::Opened`].
    Open,
    /// Renews the session's lease.
    Renew,
    /// Ends the session, freeing its tensors.
    Close,
    /// Uploads the payload as tensor `id` of the session (replacing one of that id).
    Upload {
        /// The caller's id.
        id: TensorId,
        /// The shape.
        shape: Shape,
        /// The element type of the payload's words.
        dtype: DType,
    },
    /// Runs a program over the session's ids atomically; its outputs join the session.
    Run {
        /// The program, in the caller's ids.
        ops: Vec<Op>,
    },
    /// Downloads tensor `id`: answered with [`Reply::Tensor`] and the data.
    Download {
        /// The caller's id.
        id: TensorId,
        /// The element type the caller expects.
        dtype: DType,
    },
    /// Frees tensors; unknown ids are ignored, as the local actor does.
    Free {
        /// The caller's ids.
        ids: Vec<TensorId>,
    },
    /// Sends tensor `id` straight to node `dest`'s service, as `dest_id` of the caller's
    /// session `dest_session` there.
    CopyTo {
        /// The caller's id here.
        id: TensorId,
        /// The destination node.
        dest: String,
        /// The caller's session on the destination.
        dest_session: u64,
        /// The caller's id for the copy.
        dest_id: TensorId,
    },
    /// The second half of [`Request::CopyTo`]: a member stores the payload as `id` of
    /// session (`owner`, envelope session). Accepted from members only.
    Adopt {
        /// The session's owner, for whom the calling member acts.
        owner: Owner,
        /// The owner's id.
        id: TensorId,
        /// The shape.
        shape: Shape,
        /// The element type of the payload's words.
        dtype: DType,
    },
}

impl Request {
    /// The method name the call carries.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Open => "open",
            Request::Renew => "renew",
            Request::Close => "close",
            Request::Upload { .. } => "upload",
            Request::Run { .. } => "run",
            Request::Download { .. } => "download",
            Request::Free { .. } => "free",
            Request::CopyTo { .. } => "copy_to",
            Request::Adopt { .. } => "adopt",
        }
    }
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The session is open.
    Opened {
        /// The node's name.
        node: String,
        /// Its GPU adapter.
        device: String,
        /// The lease: a session not renewed for this long is freed, ms.
        lease_ms: u64,
        /// The node closes an operator connection idle for this long, ms.
        idle_ms: u64,
    },
    /// Done.
    Done,
    /// A downloaded tensor; the data is the payload.
    Tensor {
        /// The shape.
        shape: Shape,
        /// The element type of the payload's words.
        dtype: DType,
    },
}

/// Why the service refused or failed a call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Fault {
    /// The GPU actor's error, as a local call would have returned it (tensor ids in the
    /// caller's numbering).
    #[error("{}", .0.clone().into_gpu_error())]
    Gpu(WireGpuError),
    /// No session of that number is open for this caller.
    #[error("no open session of this caller")]
    UnknownSession,
    /// The session's lease ran out (or its owner left) and its tensors were freed.
    #[error("the session's lease expired and its tensors were freed")]
    LeaseExpired,
    /// The caller may not make this call.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The call is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A limit of the service was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// A call this node made on the caller's behalf (a copy's destination) failed.
    #[error("{node}: {error}")]
    Onward {
        /// The node called.
        node: String,
        /// What went wrong there.
        error: Onward,
    },
}

/// How a call made on a caller's behalf failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Onward {
    /// The node called refused or failed.
    #[error("{0}")]
    Fault(Box<Fault>),
    /// The node called is not connected (left or failed).
    #[error("the node has left the cluster or is unreachable: {0}")]
    Gone(String),
    /// The node called did not answer in time.
    #[error("no answer within {millis} ms")]
    Timeout {
        /// The limit.
        millis: u64,
    },
    /// Another network failure.
    #[error("{0}")]
    Failed(String),
}

/// [`TensorError`] as it travels.
#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireTensorError {
    Shape { op: String, msg: String },
    Argument { op: String, msg: String },
    DataLength { shape: String, expected: u64, got: u64 },
    TooLarge { shape: String },
    DType { op: String, dtype: String },
}

/// [`GpuError`] as it travels: the same variants with owned strings.
#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireGpuError {
    NoAdapter { request: String, available: String },
    RequestDevice { adapter: String, reason: String },
    Tensor(WireTensorError),
    UnknownTensor { op: String, id: TensorId },
    DType { op: String, what: String, got: String, expected: String },
    OutOfMemory { requested_bytes: u64, in_use_bytes: u64, limit_bytes: u64 },
    BindingTooLarge { op: String, what: String, bytes: u64, limit_bytes: u64 },
    BufferTooLarge { bytes: u64, limit_bytes: u64 },
    DispatchTooLarge { op: String, what: String },
    Wgpu(String),
    Readback(String),
    Timeout { op: String, millis: u64 },
    ActorGone,
    Range { op: String, start: u64, end: u64, len: u64 },
}

impl From<&GpuError> for WireGpuError {
    fn from(e: &GpuError) -> Self {
        // Exhaustive on purpose: a new GpuError variant must be taught to travel.
        match e.clone() {
            GpuError::NoAdapter { request, available } => Self::NoAdapter { request, available },
            GpuError::RequestDevice { adapter, reason } => Self::RequestDevice { adapter, reason },
            GpuError::Tensor(t) => Self::Tensor(match t {
                TensorError::Shape { op, msg } => WireTensorError::Shape { op: op.into(), msg },
                TensorError::Argument { op, msg } => WireTensorError::Argument { op: op.into(), msg },
                TensorError::DataLength { shape, expected, got } => {
                    WireTensorError::DataLength { shape, expected: expected as u64, got: got as u64 }
                }
                TensorError::TooLarge { shape } => WireTensorError::TooLarge { shape },
                TensorError::DType { op, dtype } => WireTensorError::DType { op: op.into(), dtype: dtype.into() },
            }),
            GpuError::UnknownTensor { op, id } => Self::UnknownTensor { op: op.into(), id },
            GpuError::DType { op, what, got, expected } => {
                Self::DType { op: op.into(), what: what.into(), got: got.into(), expected: expected.into() }
            }
            GpuError::OutOfMemory { requested_bytes, in_use_bytes, limit_bytes } => {
                Self::OutOfMemory { requested_bytes, in_use_bytes, limit_bytes }
            }
            GpuError::BindingTooLarge { op, what, bytes, limit_bytes } => {
                Self::BindingTooLarge { op: op.into(), what: what.into(), bytes, limit_bytes }
            }
            GpuError::BufferTooLarge { bytes, limit_bytes } => Self::BufferTooLarge { bytes, limit_bytes },
            GpuError::DispatchTooLarge { op, what } => Self::DispatchTooLarge { op: op.into(), what },
            GpuError::Wgpu(m) => Self::Wgpu(m),
            GpuError::Readback(m) => Self::Readback(m),
            GpuError::Timeout { op, millis } => Self::Timeout { op: op.into(), millis },
            GpuError::ActorGone => Self::ActorGone,
            GpuError::Range { op, start, end, len } => {
                Self::Range { op: op.into(), start: start as u64, end: end as u64, len: len as u64 }
            }
        }
    }
}

impl WireGpuError {
    /// The [`GpuError`] this mirrors: equal to the one raised on the remote node.
    pub fn into_gpu_error(self) -> GpuError {
        match self {
            Self::NoAdapter { request, available } => GpuError::NoAdapter { request, available },
            Self::RequestDevice { adapter, reason } => GpuError::RequestDevice { adapter, reason },
            Self::Tensor(t) => GpuError::Tensor(match t {
                WireTensorError::Shape { op, msg } => TensorError::Shape { op: intern(op), msg },
                WireTensorError::Argument { op, msg } => TensorError::Argument { op: intern(op), msg },
                WireTensorError::DataLength { shape, expected, got } => {
                    TensorError::DataLength { shape, expected: expected as usize, got: got as usize }
                }
                WireTensorError::TooLarge { shape } => TensorError::TooLarge { shape },
                WireTensorError::DType { op, dtype } => TensorError::DType { op: intern(op), dtype: intern(dtype) },
            }),
            Self::UnknownTensor { op, id } => GpuError::UnknownTensor { op: intern(op), id },
            Self::DType { op, what, got, expected } => {
                GpuError::DType { op: intern(op), what: intern(what), got: intern(got), expected: intern(expected) }
            }
            Self::OutOfMemory { requested_bytes, in_use_bytes, limit_bytes } => {
                GpuError::OutOfMemory { requested_bytes, in_use_bytes, limit_bytes }
            }
            Self::BindingTooLarge { op, what, bytes, limit_bytes } => {
                GpuError::BindingTooLarge { op: intern(op), what: intern(what), bytes, limit_bytes }
            }
            Self::BufferTooLarge { bytes, limit_bytes } => GpuError::BufferTooLarge { bytes, limit_bytes },
            Self::DispatchTooLarge { op, what } => GpuError::DispatchTooLarge { op: intern(op), what },
            Self::Wgpu(m) => GpuError::Wgpu(m),
            Self::Readback(m) => GpuError::Readback(m),
            Self::Timeout { op, millis } => GpuError::Timeout { op: intern(op), millis },
            Self::ActorGone => GpuError::ActorGone,
            Self::Range { op, start, end, len } => {
                GpuError::Range { op: intern(op), start: start as usize, end: end as usize, len: len as usize }
            }
        }
    }
}

/// Distinct names kept for the life of the process, and their longest length: the
/// names in errors are operation and operand names, a small set, but a peer could send
/// any, so the table is bounded and names past it read as [`UNNAMED`].
const INTERN_MAX: usize = 1024;
const INTERN_LEN_MAX: usize = 96;
/// What a name reads as once the intern table is full.
pub const UNNAMED: &str = "(unnamed)";

/// A `&'static str` equal to `s`: each distinct name is leaked once (bounded).
fn intern(s: String) -> &'static str {
    static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut table = TABLE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&known) = table.get(s.as_str()) {
        return known;
    }
    if table.len() >= INTERN_MAX || s.len() > INTERN_LEN_MAX {
        return UNNAMED;
    }
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    table.insert(leaked);
    leaked
}

/// Encodes a value as MessagePack with named fields (so `#[serde(default)]` fields of
/// [`Op`] stay optional).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("protocol values always encode")
}

/// Decodes a MessagePack value.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// The tensor ids an operation names, to renumber them ([`Op::tensor_ids_mut`]), and the
/// shapes it carries, to check them before anything is allocated.
pub(crate) fn operands(op: &mut Op) -> (Vec<&mut TensorId>, Vec<Shape>) {
    let shapes = match &*op {
        Op::MaxPool2dBackward { input_shape, .. } => vec![input_shape.clone()],
        Op::Reshape { shape, .. } | Op::Zeros { shape, .. } => vec![shape.clone()],
        Op::Split { outs, .. } => outs.iter().map(|(_, s)| s.clone()).collect(),
        _ => Vec::new(),
    };
    (op.tensor_ids_mut(), shapes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_errors_travel_and_come_back_equal() {
        let errors = vec![
            GpuError::Tensor(TensorError::shape("matmul", "a [2,3] and b [2,3] do not chain")),
            GpuError::Tensor(TensorError::DataLength { shape: "[2]".into(), expected: 2, got: 3 }),
            GpuError::Tensor(TensorError::TooLarge { shape: "[huge]".into() }),
            GpuError::UnknownTensor { op: "add", id: TensorId(7) },
            GpuError::DType { op: "relu", what: "x", got: "u32", expected: "f32" },
            GpuError::OutOfMemory { requested_bytes: 1, in_use_bytes: 2, limit_bytes: 3 },
            GpuError::Timeout { op: "run", millis: 5 },
            GpuError::ActorGone,
            GpuError::Range { op: "read_range", start: 3, end: 9, len: 4 },
        ];
        for e in errors {
            let wire: WireGpuError = decode(&encode(&WireGpuError::from(&e))).unwrap();
            assert_eq!(wire.into_gpu_error(), e);
        }
    }

    #[test]
    fn interning_is_bounded() {
        assert_eq!(intern("x".repeat(INTERN_LEN_MAX + 1)), UNNAMED);
        let a = intern("conv2d".to_string());
        assert!(std::ptr::eq(a, intern("conv2d".to_string())), "a name is leaked once");
    }

    #[test]
    fn operands_name_every_id_of_an_op() {
        let mut op =
            Op::Split { src: TensorId(1), outs: vec![(TensorId(2), Shape::new([1])), (TensorId(3), [2].into())] };
        let (ids, shapes) = operands(&mut op);
        assert_eq!(ids.into_iter().map(|i| i.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(shapes.len(), 2);
        let mut op =
            Op::Linear { x: TensorId(1), w: TensorId(2), bias: Some(TensorId(3)), out: TensorId(4), relu: true };
        for id in operands(&mut op).0 {
            id.0 += 10;
        }
        assert_eq!(
            op,
            Op::Linear { x: TensorId(11), w: TensorId(12), bias: Some(TensorId(13)), out: TensorId(14), relu: true }
        );
    }
}
