//! Strata's wire protocol, sans IO.
//!
//! A frame is a little-endian `u32` header length, a MessagePack header ([`Header`]:
//! protocol version, payload length, message [`Body`]), and a raw little-endian payload.
//! [`FrameDecoder`] turns any split of a byte stream into header and payload events
//! without copying the payload, refusing a frame over the configured [`Limits`] before
//! reading it. Nothing here touches a socket; the network layer drives it.

mod error;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod message;

pub use error::WireError;
pub use frame::{Event, FrameDecoder, Limits, encode_frame_header, frame_header_bytes};
pub use message::{
    AdapterSummary, Body, ChunkTag, Header, MemberRecord, MemberState, NodeInfo, PROTOCOL_VERSION, TensorMeta,
};

#[cfg(target_endian = "big")]
compile_error!("strata's wire format sends raw little-endian payloads; big-endian targets need byte swapping first");
