//! Message types: the header of every frame and the bodies it carries.

use serde::{Deserialize, Serialize};
use strata_tensor::{DType, Shape};

use crate::WireError;

/// The protocol version this build speaks. A frame of another version is refused.
pub const PROTOCOL_VERSION: u16 = 2;

/// The header of a frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Bytes of payload after the header.
    pub payload_bytes: u64,
    /// The message.
    pub body: Body,
}

impl Header {
    /// A header of the current version.
    pub fn new(body: Body, payload_bytes: u64) -> Self {
        Self { version: PROTOCOL_VERSION, payload_bytes, body }
    }

    /// Checks that the payload length matches what the body describes.
    pub fn check_payload(&self) -> Result<(), WireError> {
        let expected = match &self.body {
            Body::Tensor { meta, .. } => Some((
                "tensor",
                meta.bytes().ok_or_else(|| WireError::ShapeTooLarge { shape: meta.shape.to_string() })?,
            )),
            Body::Chunk { dtype, len, .. } => Some(("chunk", (*len as u64) * dtype.size_bytes() as u64)),
            _ => None,
        };
        match expected {
            Some((what, expected)) if expected != self.payload_bytes => {
                Err(WireError::PayloadLength { what, expected, got: self.payload_bytes })
            }
            // Service messages carry whatever tensor data their service defines.
            None if matches!(self.body, Body::ServiceCall { .. } | Body::ServiceReply { .. }) => Ok(()),
            None if self.payload_bytes != 0 => {
                Err(WireError::PayloadLength { what: self.body.name(), expected: 0, got: self.payload_bytes })
            }
            _ => Ok(()),
        }
    }
}

/// The GPU adapter of a node, as members see it.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// Backend (`vulkan`, `metal`, ...).
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `cpu` or `other`.
    pub device_type: String,
}

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique node name (also the name in its certificate).
    pub name: String,
    /// Address other nodes dial, e.g. `127.0.0.1:7000`.
    pub addr: String,
    /// Rank given by the launcher (torchrun's `RANK`), if any.
    pub rank: Option<u32>,
    /// The GPU adapter, if the node opened one.
    pub adapter: Option<AdapterSummary>,
    /// GPU memory the node can still allocate under its budget, in bytes.
    pub gpu_free_bytes: Option<u64>,
    /// GPU memory held by live tensors, in bytes.
    pub gpu_used_bytes: Option<u64>,
    /// CPU cores.
    pub cpus: u32,
    /// Software version.
    pub version: String,
}

/// The state of a member in a member list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Heard from within the failure timeout.
    Alive,
    /// Not heard from within the failure timeout.
    Failed,
    /// Left the cluster on purpose.
    Left,
}

/// One entry of a member list, as gossiped between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member.
    pub info: NodeInfo,
    /// Its state as the sender sees it.
    pub state: MemberState,
    /// Bumped by the member itself on every restart, so old news loses to new.
    pub incarnation: u64,
}

/// Shape and dtype of a tensor payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Shape,
}

impl TensorMeta {
    /// Payload bytes of the tensor, or `None` when the shape's size overflows (a peer's
    /// `[2^32, 2^32]` must not wrap to an empty tensor).
    pub fn bytes(&self) -> Option<u64> {
        let n = self.shape.checked_numel()?;
        u64::try_from(n).ok()?.checked_mul(self.dtype.size_bytes() as u64)
    }
}

/// Position of a collective chunk: the step of the algorithm and the segment within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkTag {
    /// Algorithm step.
    pub step: u32,
    /// Segment within the step.
    pub segment: u32,
}

/// Messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// First frame of a connection, both ways: who I am and the cluster I belong to.
    Hello {
        /// The sender.
        info: NodeInfo,
        /// Cluster name; nodes of different clusters refuse each other.
        cluster: String,
        /// The sender's incarnation.
        incarnation: u64,
    },
    /// First frame of a tool's connection (an operator certificate, never a member):
    /// the name it claims, which must be its certificate's. Answered by the node's `Hello`
    /// or an `Error`; requests follow on further streams.
    OperatorHello {
        /// The operator's name.
        name: String,
        /// Cluster name.
        cluster: String,
    },
    /// Periodic liveness signal with the sender's member list (gossip).
    Heartbeat {
        /// Sequence number.
        seq: u64,
        /// Sender's current self-description (free resources change).
        info: NodeInfo,
        /// The sender's member list.
        members: Vec<MemberRecord>,
    },
    /// Asks for the member list (status tools).
    StatusRequest,
    /// The member list.
    Members(Vec<MemberRecord>),
    /// A tensor for a named mailbox on the receiving node; answered by `Ack` or `Error`.
    Tensor {
        /// Mailbox name.
        mailbox: String,
        /// Sender's tag, passed through.
        tag: u64,
        /// Shape and dtype; the payload holds the elements.
        meta: TensorMeta,
    },
    /// Positive answer.
    Ack,
    /// Negative answer.
    Error {
        /// What went wrong.
        message: String,
    },
    /// A segment of a collective operation's data.
    Chunk {
        /// Collective operation id, equal on every rank.
        op: u64,
        /// Position in the algorithm.
        tag: ChunkTag,
        /// Element type.
        dtype: DType,
        /// Element count.
        len: u32,
    },
    /// The sender gives up on a collective operation; the others fail it too.
    Abort {
        /// Collective operation id.
        op: u64,
        /// Why.
        message: String,
    },
    /// The sender leaves the cluster.
    Leave,
    /// A call to service `service` on the receiving node (the application's own protocol,
    /// registered with `NodeHandle::register_service`); answered by `ServiceReply` or
    /// `Error`. The payload, if any, is f32 tensor data the service interprets.
    ServiceCall {
        /// Service name.
        service: String,
        /// Method within the service.
        method: String,
        /// Arguments, encoded by the service (MessagePack by convention).
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
    },
    /// A service's answer; the payload, if any, is f32 tensor data.
    ServiceReply {
        /// The result, encoded by the service.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

impl Body {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "hello",
            Body::OperatorHello { .. } => "operator hello",
            Body::Heartbeat { .. } => "heartbeat",
            Body::StatusRequest => "status request",
            Body::Members(_) => "members",
            Body::Tensor { .. } => "tensor",
            Body::Ack => "ack",
            Body::Error { .. } => "error",
            Body::Chunk { .. } => "chunk",
            Body::Abort { .. } => "abort",
            Body::Leave => "leave",
            Body::ServiceCall { .. } => "service call",
            Body::ServiceReply { .. } => "service reply",
        }
    }
}
