//! Peer links and peer actors: one per QUIC connection.
//!
//! Every frame travels on a stream of its own: one-way messages (heartbeats, collective
//! chunks) on unidirectional streams, requests and their answers on bidirectional ones.
//! A refused frame resets only its stream; the connection and its other streams go on.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use strata_tensor::HostTensor;
use strata_wire::{Body, ChunkTag, Event, FrameDecoder, Header, Limits, TensorMeta, WireError, frame_header_bytes};

use crate::NetError;
use crate::node::{Heard, NodeActor, PeerClosed, PeerLeft, StatusQuery};
use crate::router::{ChunkMessage, Router, TensorMessage};

/// Stream reset code: the frame was refused.
pub(crate) const CODE_REFUSED: u32 = 1;
/// Connection close code: this node leaves.
pub(crate) const CODE_LEAVING: u32 = 2;
/// Connection close code: a second connection to the same peer.
pub(crate) const CODE_DUPLICATE: u32 = 3;
/// Connection close code: the peer was refused (cluster, name or protocol).
pub(crate) const CODE_REFUSED_PEER: u32 = 4;

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum ReadFrameError {
    /// The frame was refused.
    Wire(WireError),
    /// The stream or connection failed.
    Stream(String),
}

impl std::fmt::Display for ReadFrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFrameError::Wire(e) => write!(f, "{e}"),
            ReadFrameError::Stream(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one frame from `recv`; `None` if the stream ended before any byte. The payload
/// is read straight into its final buffer. Streams carry one frame each: the caller
/// drops the stream afterwards, which stops the peer from sending more on it.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
) -> Result<Option<(Header, Vec<f32>)>, ReadFrameError> {
    let mut dec = FrameDecoder::new(*limits);
    let mut header: Option<Header> = None;
    let mut payload: Vec<f32> = Vec::new();
    let mut filled = 0usize;
    loop {
        let chunk = recv.read_chunk(1 << 20, true).await.map_err(|e| ReadFrameError::Stream(e.to_string()))?;
        let Some(chunk) = chunk else {
            dec.finish().map_err(ReadFrameError::Wire)?;
            return match header {
                None => Ok(None),
                Some(_) => Err(ReadFrameError::Wire(WireError::Truncated { missing: 0 })),
            };
        };
        let mut rest: &[u8] = &chunk.bytes;
        loop {
            let (used, ev) = dec.feed(rest).map_err(ReadFrameError::Wire)?;
            rest = &rest[used..];
            match ev {
                Some(Event::Header(h)) => {
                    if h.payload_bytes % 4 != 0 {
                        return Err(ReadFrameError::Wire(WireError::Malformed(format!(
                            "payload of {} bytes is not whole 4-byte elements",
                            h.payload_bytes
                        ))));
                    }
                    // Capacity only: zero-filling a buffer that is about to be overwritten
                    // costs as much as the copy itself.
                    payload = crate::buffers::take_f32((h.payload_bytes / 4) as usize);
                    header = Some(h);
                }
                Some(Event::Payload(p)) => {
                    let room = payload.capacity() * 4 - filled;
                    assert!(p.len() <= room, "the decoder never yields more payload than the header declared");
                    // SAFETY: the destination range lies within the vector's capacity (checked
                    // above), source and destination do not overlap, and every f32 bit
                    // pattern is valid.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            p.as_ptr(),
                            payload.as_mut_ptr().cast::<u8>().add(filled),
                            p.len(),
                        )
                    };
                    filled += p.len();
                }
                Some(Event::End) => {
                    let h = header.take().expect("a frame ends after its header");
                    // SAFETY: the decoder delivered exactly `payload_bytes` bytes, all copied
                    // into the capacity above.
                    unsafe { payload.set_len(filled / 4) };
                    if !rest.is_empty() {
                        return Err(ReadFrameError::Wire(WireError::Malformed("bytes after the frame".into())));
                    }
                    return Ok(Some((h, payload)));
                }
                None if used == 0 => break,
                None => {}
            }
        }
    }
}

/// Writes one frame to `send` and finishes the stream.
pub(crate) async fn write_frame(send: &mut quinn::SendStream, header: &Header, payload: &[u8]) -> Result<(), String> {
    let head = frame_header_bytes(header).map_err(|e| e.to_string())?;
    send.write_all(&head).await.map_err(|e| e.to_string())?;
    if !payload.is_empty() {
        send.write_all(payload).await.map_err(|e| e.to_string())?;
    }
    send.finish().map_err(|e| e.to_string())
}

/// A handle for sending to one connected peer. Cheap to clone.
#[derive(Clone)]
pub struct PeerLink {
    name: Arc<str>,
    pub(crate) conn: quinn::Connection,
    limits: Limits,
    request_timeout: Duration,
    /// Streams written but not yet acknowledged by the peer; closing the connection
    /// before they drain would drop their data.
    unacked: Arc<std::sync::atomic::AtomicUsize>,
}

impl PeerLink {
    pub(crate) fn new(name: &str, conn: quinn::Connection, limits: Limits, request_timeout: Duration) -> Self {
        Self { name: name.into(), conn, limits, request_timeout, unacked: Arc::default() }
    }

    /// Waits (up to `limit`) until every stream written so far was acknowledged.
    pub async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.unacked.load(std::sync::atomic::Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }

    /// Transport statistics of the connection (path MTU, congestion window, losses).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    fn lost(&self, reason: impl std::fmt::Display) -> NetError {
        NetError::ConnectionLost { peer: self.name.to_string(), reason: reason.to_string() }
    }

    /// Sends one message on a stream of its own.
    pub async fn send(&self, body: Body, payload: &[u8]) -> Result<(), NetError> {
        self.send_owned(body, bytes::Bytes::copy_from_slice(payload)).await
    }

    /// Sends one message whose payload the caller already owns: quinn takes the buffer
    /// as it is, without another copy.
    pub async fn send_owned(&self, body: Body, payload: bytes::Bytes) -> Result<(), NetError> {
        let header = Header::new(body, payload.len() as u64);
        let head = frame_header_bytes(&header).map_err(|e| self.lost(e))?;
        let mut s = self.conn.open_uni().await.map_err(|e| self.lost(e))?;
        s.write_all(&head).await.map_err(|e| self.lost(e))?;
        if !payload.is_empty() {
            s.write_chunk(payload).await.map_err(|e| self.lost(e))?;
        }
        s.finish().map_err(|e| self.lost(e))?;
        // Count the stream until the peer acknowledges it, so a leaving node can drain.
        let unacked = self.unacked.clone();
        unacked.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            let _ = s.stopped().await;
            unacked.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
        Ok(())
    }

    /// Sends a message and waits until the peer acknowledged receiving it (for messages
    /// that must arrive before the connection closes, such as `Leave`).
    pub async fn send_acknowledged(&self, body: Body) -> Result<(), NetError> {
        let head = frame_header_bytes(&Header::new(body, 0)).map_err(|e| self.lost(e))?;
        let mut s = self.conn.open_uni().await.map_err(|e| self.lost(e))?;
        s.write_all(&head).await.map_err(|e| self.lost(e))?;
        s.finish().map_err(|e| self.lost(e))?;
        s.stopped().await.map_err(|e| self.lost(e))?;
        Ok(())
    }

    /// Sends a segment of collective operation `op`.
    pub async fn send_chunk(&self, op: u64, tag: ChunkTag, data: &[f32]) -> Result<(), NetError> {
        self.send_chunk_owned(op, tag, crate::buffers::bytes_of_f32(data)).await
    }

    /// Sends a segment of collective operation `op` from little-endian f32 bytes.
    pub async fn send_chunk_owned(&self, op: u64, tag: ChunkTag, data: bytes::Bytes) -> Result<(), NetError> {
        let body = Body::Chunk { op, tag, dtype: strata_tensor::DType::F32, len: (data.len() / 4) as u32 };
        self.send_owned(body, data).await
    }

    /// Sends a request and waits (up to the request timeout) for the answer.
    pub async fn request(&self, body: Body, payload: &[u8]) -> Result<(Header, Vec<f32>), NetError> {
        let header = Header::new(body, payload.len() as u64);
        let what = format!("request {} to {}", header.body.name(), self.name);
        let fut = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
            write_frame(&mut send, &header, payload).await.map_err(|e| self.lost(e))?;
            match read_frame(&mut recv, &self.limits).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => Err(self.lost("the answer stream ended empty")),
                Err(ReadFrameError::Wire(error)) => Err(NetError::Wire { peer: self.name.to_string(), error }),
                Err(ReadFrameError::Stream(e)) => Err(self.lost(e)),
            }
        };
        tokio::time::timeout(self.request_timeout, fut)
            .await
            .map_err(|_| NetError::Timeout { what, millis: self.request_timeout.as_millis() as u64 })?
    }

    /// Sends a tensor to mailbox `mailbox` on the peer and waits for its acknowledgement.
    pub async fn send_tensor(&self, mailbox: &str, tag: u64, tensor: &HostTensor<f32>) -> Result<(), NetError> {
        let meta = TensorMeta { dtype: strata_tensor::DType::F32, shape: tensor.shape().clone() };
        let body = Body::Tensor { mailbox: mailbox.to_string(), tag, meta };
        let (answer, _) = self.request(body, bytemuck::cast_slice(tensor.data())).await?;
        match answer.body {
            Body::Ack => Ok(()),
            Body::Error { message } => Err(NetError::Refused { peer: self.name.to_string(), message }),
            other => Err(NetError::Refused {
                peer: self.name.to_string(),
                message: format!("unexpected answer {}", other.name()),
            }),
        }
    }
}

/// The actor owning one connection: it starts the stream loops and reports the
/// connection's end to the node.
pub(crate) struct PeerActor {
    pub(crate) link: PeerLink,
    pub(crate) node: Addr<NodeActor>,
    pub(crate) router: Arc<Router>,
    pub(crate) io: ArbiterHandle,
}

impl Actor for PeerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let me = ctx.address();
        let (link, node, router) = (self.link.clone(), self.node.clone(), self.router.clone());
        self.io.spawn(accept_uni(link.clone(), node.clone(), router.clone()));
        self.io.spawn(accept_bi(link.clone(), node.clone(), router));
        actix::spawn(async move {
            let reason = link.conn.closed().await;
            let leaving =
                matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CODE_LEAVING.into());
            node.do_send(PeerClosed {
                name: link.name.to_string(),
                conn_id: link.conn.stable_id(),
                reason: reason.to_string(),
                leaving,
            });
            me.do_send(Stop);
        });
    }
}

/// Sends a frame to the peer (fire and forget; failures surface as a closed connection).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SendBody(pub(crate) Body);

impl Handler<SendBody> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: SendBody, _: &mut Context<Self>) {
        let link = self.link.clone();
        actix::spawn(async move {
            if let Err(e) = link.send(msg.0, &[]).await {
                tracing::debug!("sending to {}: {e}", link.name);
            }
        });
    }
}

/// Closes the connection.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Close(pub(crate) u32, pub(crate) &'static str);

impl Handler<Close> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: Close, ctx: &mut Context<Self>) {
        self.link.conn.close(msg.0.into(), msg.1.as_bytes());
        ctx.stop();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Stop;

impl Handler<Stop> for PeerActor {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

async fn accept_uni(link: PeerLink, node: Addr<NodeActor>, router: Arc<Router>) {
    while let Ok(mut recv) = link.conn.accept_uni().await {
        let (link, node, router) = (link.clone(), node.clone(), router.clone());
        actix::spawn(async move {
            match read_frame(&mut recv, &link.limits).await {
                Ok(Some((header, payload))) => {
                    if let Err(e) = handle_one_way(&link, &node, &router, header, payload) {
                        tracing::warn!("refusing a frame from {}: {e}", link.name);
                        let _ = recv.stop(CODE_REFUSED.into());
                    }
                }
                Ok(None) => {}
                Err(ReadFrameError::Wire(e)) => {
                    tracing::warn!("refusing a malformed frame from {}: {e}", link.name);
                    let _ = recv.stop(CODE_REFUSED.into());
                }
                Err(ReadFrameError::Stream(e)) => tracing::debug!("stream from {} failed: {e}", link.name),
            }
        });
    }
}

fn handle_one_way(
    link: &PeerLink,
    node: &Addr<NodeActor>,
    router: &Router,
    header: Header,
    payload: Vec<f32>,
) -> Result<(), String> {
    match header.body {
        Body::Heartbeat { info, members, .. } => {
            if info.name != *link.name {
                return Err(format!("heartbeat names {:?}, but the connection belongs to {:?}", info.name, link.name));
            }
            node.do_send(Heard { info, members });
            Ok(())
        }
        Body::Chunk { op, tag, dtype, .. } => {
            if dtype != strata_tensor::DType::F32 {
                return Err(format!("chunks of dtype {dtype} are not supported"));
            }
            router.deliver_chunk(op, ChunkMessage::Data { from: link.name.to_string(), tag, data: payload });
            Ok(())
        }
        Body::Abort { op, message } => {
            router.deliver_chunk(op, ChunkMessage::Abort { from: link.name.to_string(), message });
            Ok(())
        }
        Body::Leave => {
            node.do_send(PeerLeft(link.name.to_string()));
            Ok(())
        }
        other => Err(format!("{} is not a one-way message", other.name())),
    }
}

async fn accept_bi(link: PeerLink, node: Addr<NodeActor>, router: Arc<Router>) {
    while let Ok((mut send, mut recv)) = link.conn.accept_bi().await {
        let (link, node, router) = (link.clone(), node.clone(), router.clone());
        actix::spawn(async move {
            let answer = match read_frame(&mut recv, &link.limits).await {
                Ok(Some((header, payload))) => answer_request(&link, &node, &router, header, payload).await,
                Ok(None) => return,
                Err(ReadFrameError::Wire(e)) => {
                    tracing::warn!("refusing a malformed request from {}: {e}", link.name);
                    let _ = recv.stop(CODE_REFUSED.into());
                    Body::Error { message: e.to_string() }
                }
                Err(ReadFrameError::Stream(e)) => {
                    tracing::debug!("request stream from {} failed: {e}", link.name);
                    return;
                }
            };
            if let Err(e) = write_frame(&mut send, &Header::new(answer, 0), &[]).await {
                tracing::debug!("answering {}: {e}", link.name);
            }
        });
    }
}

pub(crate) async fn answer_request(
    link: &PeerLink,
    node: &Addr<NodeActor>,
    router: &Router,
    header: Header,
    payload: Vec<f32>,
) -> Body {
    match header.body {
        Body::StatusRequest => match node.send(StatusQuery).await {
            Ok(records) => Body::Members(records),
            Err(_) => Body::Error { message: "the node is shutting down".into() },
        },
        Body::Tensor { mailbox, tag, meta } => {
            if meta.dtype != strata_tensor::DType::F32 {
                return Body::Error { message: format!("tensors of dtype {} are not supported", meta.dtype) };
            }
            match HostTensor::new(meta.shape, payload) {
                Ok(tensor) => {
                    match router.deliver_tensor(&mailbox, TensorMessage { from: link.name.to_string(), tag, tensor }) {
                        Ok(()) => Body::Ack,
                        Err(message) => Body::Error { message },
                    }
                }
                Err(e) => Body::Error { message: e.to_string() },
            }
        }
        other => Body::Error { message: format!("{} is not a request", other.name()) },
    }
}
