//! Peer links and peer actors: one per QUIC connection.
//!
//! Every frame travels on a stream of its own: one-way messages (heartbeats, collective
//! chunks) on unidirectional streams, requests and their answers on bidirectional ones.
//! A refused frame resets only its stream; the connection and its other streams go on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use strata_tensor::{DType, HostTensor};
use strata_wire::{Body, ChunkTag, Event, FrameDecoder, Header, Limits, TensorMeta, WireError, frame_header_bytes};

use crate::NetError;
use crate::budget::{Charge, FRAME_OVERHEAD_BYTES, OverBudget, PeerBudget};
use crate::buffers::Payload;
use crate::node::{Heard, NodeActor, PeerClosed, PeerLeft, StatusQuery};
use crate::router::{ChunkMessage, Delivery, Router, TensorMessage};

/// Stream reset code: the frame was refused.
pub(crate) const CODE_REFUSED: u32 = 1;
/// Connection close code: this node leaves.
pub(crate) const CODE_LEAVING: u32 = 2;
/// Connection close code: a second connection to the same peer.
pub(crate) const CODE_DUPLICATE: u32 = 3;
/// Connection close code: the peer was refused (cluster, name, role or protocol).
pub(crate) const CODE_REFUSED_PEER: u32 = 4;
/// Connection close code: the peer exceeded its memory budget.
pub(crate) const CODE_OVER_BUDGET: u32 = 5;
/// Connection close code: the node was aborted (sharing its thread with the endpoint, it
/// cannot fall silent).
pub(crate) const CODE_ABORTED: u32 = 6;

/// Payload bytes reserved when a header arrives; larger payloads grow as their data
/// arrives, so a header declaring a gigabyte reserves nothing it has not sent.
const PREALLOC_BYTES_MAX: u64 = 4 << 20;

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum ReadFrameError {
    /// The frame was refused.
    Wire(WireError),
    /// The stream or connection failed.
    Stream(String),
    /// The peer went over its memory budget.
    OverBudget(String),
    /// No data arrived on the stream within the limit.
    Idle(u64),
}

impl std::fmt::Display for ReadFrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFrameError::Wire(e) => write!(f, "{e}"),
            ReadFrameError::Stream(e) => write!(f, "{e}"),
            ReadFrameError::OverBudget(e) => write!(f, "{e}"),
            ReadFrameError::Idle(ms) => write!(f, "no data for {ms} ms inside a frame"),
        }
    }
}

/// One frame read from a stream: the header, the payload, and the memory it holds
/// against its peer's budget. Collective chunks keep their payload as it arrived
/// (`pieces`); every other frame's payload is copied into f32 elements (`payload`).
pub(crate) struct Frame {
    pub(crate) header: Header,
    pub(crate) payload: Vec<f32>,
    pub(crate) pieces: Payload,
    pub(crate) charge: Charge,
}

/// Chunk payload pieces at least this long are kept as the transport delivered them;
/// shorter ones are copied, so that a peer cannot pin a whole datagram buffer with a
/// few bytes.
const PIECE_KEPT_BYTES_MIN: usize = 16 << 10;
/// What a kept piece is charged at least: the datagram buffer it keeps alive (quinn
/// allocates one per received datagram, at most 64 KiB).
const PIECE_CHARGE_BYTES_MIN: u64 = 64 << 10;

/// Reads one frame from `recv`; `None` if the stream ended before any byte. Payload
/// memory is charged to `budget` as the data arrives; every read waits at most `idle`.
/// Streams carry one frame each: the caller drops the stream afterwards, which stops the
/// peer from sending more on it.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
    budget: &Arc<PeerBudget>,
    idle: Duration,
) -> Result<Option<Frame>, ReadFrameError> {
    let over = |e: OverBudget| ReadFrameError::OverBudget(e.message);
    let mut dec = FrameDecoder::new(*limits);
    let mut header: Option<Header> = None;
    let mut declared = 0u64;
    let mut payload: Vec<f32> = Vec::new();
    let mut filled = 0usize;
    // Chunk frames: the kept pieces, and short pieces gathered into `small`.
    let mut chunk_frame = false;
    let mut pieces = Payload::new();
    let mut small: Vec<u8> = Vec::new();
    let mut charge = Charge::new(budget);
    loop {
        let chunk = tokio::time::timeout(idle, recv.read_chunk(1 << 20, true))
            .await
            .map_err(|_| ReadFrameError::Idle(idle.as_millis() as u64))?
            .map_err(|e| ReadFrameError::Stream(e.to_string()))?;
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
                    chunk_frame = matches!(h.body, Body::Chunk { .. });
                    if !chunk_frame && h.payload_bytes % 4 != 0 {
                        return Err(ReadFrameError::Wire(WireError::Malformed(format!(
                            "payload of {} bytes is not whole 4-byte elements",
                            h.payload_bytes
                        ))));
                    }
                    declared = h.payload_bytes;
                    charge.grow(FRAME_OVERHEAD_BYTES).map_err(over)?;
                    if !chunk_frame {
                        // Capacity only: zero-filling a buffer that is about to be
                        // overwritten costs as much as the copy itself.
                        payload = crate::buffers::take_f32((declared.min(PREALLOC_BYTES_MAX) / 4) as usize);
                        charge.grow(payload.capacity() as u64 * 4).map_err(over)?;
                    }
                    header = Some(h);
                }
                Some(Event::Payload(p)) if chunk_frame => {
                    if p.len() >= PIECE_KEPT_BYTES_MIN {
                        charge.grow((p.len() as u64).max(PIECE_CHARGE_BYTES_MIN)).map_err(over)?;
                        if !small.is_empty() {
                            pieces.push(bytes::Bytes::from(std::mem::take(&mut small)));
                        }
                        pieces.push(chunk.bytes.slice_ref(p));
                    } else {
                        let need = small.len() + p.len();
                        if need > small.capacity() {
                            let cap = (need as u64).max(small.capacity() as u64 * 2).min(declared) as usize;
                            charge.grow((cap - small.capacity()) as u64).map_err(over)?;
                            small.reserve_exact(cap - small.len());
                        }
                        small.extend_from_slice(p);
                    }
                }
                Some(Event::Payload(p)) => {
                    let need = filled + p.len();
                    if need > payload.capacity() * 4 {
                        // Grow as data arrives (doubling, up to what the header declared).
                        let cap_bytes = (need as u64).max(payload.capacity() as u64 * 8).min(declared);
                        let mut bigger = crate::buffers::take_f32((cap_bytes / 4) as usize);
                        charge.grow((bigger.capacity() - payload.capacity()) as u64 * 4).map_err(over)?;
                        // SAFETY: `filled` bytes of `payload` were written below; `bigger`
                        // has room for them (its capacity covers `need > filled`).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                payload.as_ptr().cast::<u8>(),
                                bigger.as_mut_ptr().cast::<u8>(),
                                filled,
                            )
                        };
                        std::mem::swap(&mut payload, &mut bigger);
                        crate::buffers::recycle(bigger);
                    }
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
                    // into the capacity above (none for chunk frames).
                    unsafe { payload.set_len(filled / 4) };
                    if !small.is_empty() {
                        pieces.push(bytes::Bytes::from(std::mem::take(&mut small)));
                    }
                    if !rest.is_empty() {
                        return Err(ReadFrameError::Wire(WireError::Malformed("bytes after the frame".into())));
                    }
                    return Ok(Some(Frame { header: h, payload, pieces, charge }));
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
    /// What this peer may make the node hold.
    pub(crate) budget: Arc<PeerBudget>,
    /// Streams written but not yet acknowledged by the peer; closing the connection
    /// before they drain would drop their data.
    unacked: Arc<AtomicUsize>,
    /// Sends in progress (opening a stream or waiting for flow-control credit).
    sending: Arc<AtomicUsize>,
}

/// Decrements a counter when dropped, so cancelled futures count correctly too.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Self(c.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PeerLink {
    pub(crate) fn new(
        name: &str,
        conn: quinn::Connection,
        limits: Limits,
        request_timeout: Duration,
        budget_bytes: u64,
    ) -> Self {
        Self {
            name: name.into(),
            conn,
            limits,
            request_timeout,
            budget: PeerBudget::new(name, budget_bytes),
            unacked: Arc::default(),
            sending: Arc::default(),
        }
    }

    /// Waits (up to `limit`) until every stream written so far was acknowledged.
    pub async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.unacked.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
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

    /// Sends to this peer still in progress: waiting for a stream or for flow-control
    /// credit, or for the peer to acknowledge what was written.
    pub fn sends_in_flight(&self) -> usize {
        self.sending.load(Ordering::Acquire) + self.unacked.load(Ordering::Acquire)
    }

    /// Bytes this peer makes the node hold now, and the most it held at once.
    pub fn buffered_bytes(&self) -> (u64, u64) {
        (self.budget.used(), self.budget.peak())
    }

    fn lost(&self, reason: impl std::fmt::Display) -> NetError {
        NetError::ConnectionLost { peer: self.name.to_string(), reason: reason.to_string() }
    }

    fn timed_out(&self, what: &str) -> NetError {
        NetError::Timeout { what: format!("{what} to {}", self.name), millis: self.request_timeout.as_millis() as u64 }
    }

    /// Sends one message on a stream of its own.
    pub async fn send(&self, body: Body, payload: &[u8]) -> Result<(), NetError> {
        self.send_owned(body, bytes::Bytes::copy_from_slice(payload)).await
    }

    /// Sends one message whose payload the caller already owns: quinn takes the buffer
    /// as it is, without another copy. Waits at most the request timeout for a stream
    /// and for flow-control credit: a peer that grants neither makes this fail, not hang.
    pub async fn send_owned(&self, body: Body, payload: bytes::Bytes) -> Result<(), NetError> {
        self.send_payload(body, Payload::from(payload)).await
    }

    /// Sends one message whose payload is `payload`'s pieces, in order, without a copy.
    pub async fn send_payload(&self, body: Body, payload: Payload) -> Result<(), NetError> {
        let what = body.name();
        let _pending = Pending::new(&self.sending);
        let header = Header::new(body, payload.len() as u64);
        let head = frame_header_bytes(&header).map_err(|e| self.lost(e))?;
        let mut pieces = Vec::with_capacity(payload.pieces().len() + 1);
        pieces.push(bytes::Bytes::from(head));
        pieces.extend(payload.into_pieces());
        let fut = async {
            let mut s = self.conn.open_uni().await.map_err(|e| self.lost(e))?;
            s.write_all_chunks(&mut pieces).await.map_err(|e| self.lost(e))?;
            s.finish().map_err(|e| self.lost(e))?;
            Ok::<_, NetError>(s)
        };
        let s = tokio::time::timeout(self.request_timeout, fut).await.map_err(|_| self.timed_out(what))??;
        // Count the stream until the peer acknowledges it (bounded), so a leaving node can drain.
        let unacked = Pending::new(&self.unacked);
        let limit = self.request_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, s.stopped()).await;
            drop(unacked);
        });
        Ok(())
    }

    /// Sends a message and waits (up to the request timeout) until the peer acknowledged
    /// receiving it (for messages that must arrive before the connection closes, such as
    /// `Leave`).
    pub async fn send_acknowledged(&self, body: Body) -> Result<(), NetError> {
        let what = body.name();
        let head = frame_header_bytes(&Header::new(body, 0)).map_err(|e| self.lost(e))?;
        let fut = async {
            let mut s = self.conn.open_uni().await.map_err(|e| self.lost(e))?;
            s.write_all(&head).await.map_err(|e| self.lost(e))?;
            s.finish().map_err(|e| self.lost(e))?;
            s.stopped().await.map_err(|e| self.lost(e))?;
            Ok(())
        };
        tokio::time::timeout(self.request_timeout, fut).await.map_err(|_| self.timed_out(what))?
    }

    /// Sends a segment of collective operation `op`.
    pub async fn send_chunk(&self, op: u64, tag: ChunkTag, data: &[f32]) -> Result<(), NetError> {
        self.send_chunk_payload(op, tag, DType::F32, crate::buffers::bytes_of_f32(data).into()).await
    }

    /// Sends a segment of collective operation `op` whose elements of `dtype` are the
    /// little-endian bytes of `data`'s pieces.
    pub async fn send_chunk_payload(
        &self,
        op: u64,
        tag: ChunkTag,
        dtype: DType,
        data: Payload,
    ) -> Result<(), NetError> {
        let body = Body::Chunk { op, tag, dtype, len: (data.len() / dtype.size_bytes()) as u32 };
        self.send_payload(body, data).await
    }

    /// Sends a request and waits (up to the request timeout) for the answer.
    pub async fn request(&self, body: Body, payload: &[u8]) -> Result<(Header, Vec<f32>), NetError> {
        self.request_within(body, payload, self.request_timeout).await
    }

    /// Sends a request and waits up to `limit` for the answer (each read of the answer
    /// still waits at most the request timeout once it has begun).
    pub async fn request_within(
        &self,
        body: Body,
        payload: &[u8],
        limit: Duration,
    ) -> Result<(Header, Vec<f32>), NetError> {
        let header = Header::new(body, payload.len() as u64);
        let what = format!("request {} to {}", header.body.name(), self.name);
        let fut = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
            write_frame(&mut send, &header, payload).await.map_err(|e| self.lost(e))?;
            match read_frame(&mut recv, &self.limits, &self.budget, limit).await {
                Ok(Some(answer)) => Ok((answer.header, answer.payload)),
                Ok(None) => Err(self.lost("the answer stream ended empty")),
                Err(ReadFrameError::Wire(error)) => Err(NetError::Wire { peer: self.name.to_string(), error }),
                Err(e) => Err(self.lost(e)),
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| NetError::Timeout { what, millis: limit.as_millis() as u64 })?
    }

    /// Calls `method` of service `service` on the peer with encoded `args` and tensor
    /// data `payload`, waiting up to `limit` for the answer.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        args: Vec<u8>,
        payload: &[f32],
        limit: Duration,
    ) -> Result<crate::ServiceResponse, NetError> {
        let body = Body::ServiceCall { service: service.to_string(), method: method.to_string(), args };
        let (answer, payload) = self.request_within(body, bytemuck::cast_slice(payload), limit).await?;
        match answer.body {
            Body::ServiceReply { data } => Ok(crate::ServiceResponse { data, payload }),
            Body::Error { message } => Err(NetError::Refused { peer: self.name.to_string(), message }),
            other => Err(NetError::Refused {
                peer: self.name.to_string(),
                message: format!("unexpected answer {}", other.name()),
            }),
        }
    }

    /// Sends a tensor to mailbox `mailbox` on the peer and waits for its acknowledgement.
    pub async fn send_tensor(&self, mailbox: &str, tag: u64, tensor: &HostTensor<f32>) -> Result<(), NetError> {
        let meta = TensorMeta { dtype: DType::F32, shape: tensor.shape().clone() };
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
    /// A heartbeat is on its way: the next one is skipped rather than queued behind a
    /// peer that grants no stream credit.
    pub(crate) heartbeat_busy: Arc<AtomicBool>,
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

/// Sends a heartbeat to the peer unless the previous one is still on its way (fire and
/// forget; failures surface as a closed connection or a failed member).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SendHeartbeat(pub(crate) Body);

impl Handler<SendHeartbeat> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: SendHeartbeat, _: &mut Context<Self>) {
        if self.heartbeat_busy.swap(true, Ordering::AcqRel) {
            tracing::debug!("heartbeat to {} skipped: the previous one is still on its way", self.link.name);
            return;
        }
        let (link, busy) = (self.link.clone(), self.heartbeat_busy.clone());
        actix::spawn(async move {
            if let Err(e) = link.send(msg.0, &[]).await {
                tracing::debug!("sending to {}: {e}", link.name);
            }
            busy.store(false, Ordering::Release);
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

/// Disconnects a peer that went over its budget; the node keeps serving the others.
pub(crate) fn disconnect_over_budget(link: &PeerLink, message: &str) {
    tracing::warn!("disconnecting {}: {message}", link.name);
    link.conn.close(CODE_OVER_BUDGET.into(), message.as_bytes());
}

async fn accept_uni(link: PeerLink, node: Addr<NodeActor>, router: Arc<Router>) {
    while let Ok(mut recv) = link.conn.accept_uni().await {
        let (link, node, router) = (link.clone(), node.clone(), router.clone());
        actix::spawn(async move {
            match read_frame(&mut recv, &link.limits, &link.budget, link.request_timeout).await {
                Ok(Some(frame)) => match handle_one_way(&link, &node, &router, frame).await {
                    Ok(()) => {}
                    Err(OneWayError::Refused(e)) => {
                        tracing::warn!("refusing a frame from {}: {e}", link.name);
                        let _ = recv.stop(CODE_REFUSED.into());
                    }
                    Err(OneWayError::OverBudget(e)) => disconnect_over_budget(&link, &e),
                },
                Ok(None) => {}
                Err(ReadFrameError::Wire(e)) => {
                    tracing::warn!("refusing a malformed frame from {}: {e}", link.name);
                    let _ = recv.stop(CODE_REFUSED.into());
                }
                Err(ReadFrameError::OverBudget(e)) => disconnect_over_budget(&link, &e),
                Err(e @ ReadFrameError::Idle(_)) => {
                    tracing::warn!("dropping a stalled frame from {}: {e}", link.name);
                    let _ = recv.stop(CODE_REFUSED.into());
                }
                Err(ReadFrameError::Stream(e)) => tracing::debug!("stream from {} failed: {e}", link.name),
            }
        });
    }
}

enum OneWayError {
    Refused(String),
    OverBudget(String),
}

async fn handle_one_way(
    link: &PeerLink,
    node: &Addr<NodeActor>,
    router: &Router,
    frame: Frame,
) -> Result<(), OneWayError> {
    let Frame { header, pieces, charge, .. } = frame;
    let deliver = |d: Delivery| match d {
        Delivery::Delivered | Delivery::Dropped => Ok(()),
        Delivery::OverBudget(m) => Err(OneWayError::OverBudget(m)),
    };
    match header.body {
        Body::Heartbeat { info, members, .. } => {
            if info.name != *link.name {
                return Err(OneWayError::Refused(format!(
                    "heartbeat names {:?}, but the connection belongs to {:?}",
                    info.name, link.name
                )));
            }
            node.do_send(Heard { info, members });
            Ok(())
        }
        Body::Chunk { op, tag, dtype, .. } => {
            if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
                return Err(OneWayError::Refused(format!("chunks of dtype {dtype} are not supported")));
            }
            let msg = ChunkMessage::Data { from: link.name.to_string(), tag, dtype, data: pieces, charge };
            deliver(router.deliver_chunk(op, &link.name, msg, link.request_timeout).await)
        }
        Body::Abort { op, message } => {
            let msg = ChunkMessage::Abort { from: link.name.to_string(), message };
            deliver(router.deliver_chunk(op, &link.name, msg, link.request_timeout).await)
        }
        Body::Leave => {
            node.do_send(PeerLeft(link.name.to_string()));
            Ok(())
        }
        other => Err(OneWayError::Refused(format!("{} is not a one-way message", other.name()))),
    }
}

async fn accept_bi(link: PeerLink, node: Addr<NodeActor>, router: Arc<Router>) {
    while let Ok((mut send, mut recv)) = link.conn.accept_bi().await {
        let (link, node, router) = (link.clone(), node.clone(), router.clone());
        actix::spawn(async move {
            let (answer, payload) = match read_frame(&mut recv, &link.limits, &link.budget, link.request_timeout).await
            {
                Ok(Some(frame)) => answer_request(&link, &node, &router, frame).await,
                Ok(None) => return,
                Err(ReadFrameError::Wire(e)) => {
                    tracing::warn!("refusing a malformed request from {}: {e}", link.name);
                    let _ = recv.stop(CODE_REFUSED.into());
                    (Body::Error { message: e.to_string() }, Vec::new())
                }
                Err(ReadFrameError::OverBudget(e)) => {
                    disconnect_over_budget(&link, &e);
                    return;
                }
                Err(e) => {
                    tracing::debug!("request stream from {} failed: {e}", link.name);
                    return;
                }
            };
            write_answer(&link, &mut send, answer, &payload).await;
        });
    }
}

/// Writes an answer frame, bounded by the request timeout.
pub(crate) async fn write_answer(link: &PeerLink, send: &mut quinn::SendStream, answer: Body, payload: &[f32]) {
    let bytes: &[u8] = bytemuck::cast_slice(payload);
    let header = Header::new(answer, bytes.len() as u64);
    match tokio::time::timeout(link.request_timeout, write_frame(send, &header, bytes)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("answering {}: {e}", link.name),
        Err(_) => tracing::debug!("answering {}: timed out", link.name),
    }
}

/// Answers a request from a member: the answer's body and tensor data.
pub(crate) async fn answer_request(
    link: &PeerLink,
    node: &Addr<NodeActor>,
    router: &Router,
    frame: Frame,
) -> (Body, Vec<f32>) {
    let Frame { header, payload, charge, .. } = frame;
    let body = match header.body {
        Body::StatusRequest => match node.send(StatusQuery).await {
            Ok(records) => Body::Members(records),
            Err(_) => Body::Error { message: "the node is shutting down".into() },
        },
        Body::Tensor { mailbox, tag, meta } => {
            if meta.dtype != DType::F32 {
                Body::Error { message: format!("tensors of dtype {} are not supported", meta.dtype) }
            } else {
                match HostTensor::new(meta.shape, payload) {
                    Ok(tensor) => {
                        let msg = TensorMessage { from: link.name.to_string(), tag, tensor, charge };
                        match router.deliver_tensor(&mailbox, msg) {
                            Ok(()) => Body::Ack,
                            Err(message) => Body::Error { message },
                        }
                    }
                    Err(e) => Body::Error { message: e.to_string() },
                }
            }
        }
        Body::ServiceCall { service, method, args } => {
            // The call's data stays charged to the caller until the service is done with it.
            let _charge = charge;
            let caller = crate::Caller { name: link.name.to_string(), role: crate::tls::Role::Node };
            let request = crate::ServiceRequest { caller, method, args, payload };
            return service_answer(router.services.call(&service, request).await);
        }
        other => Body::Error { message: format!("{} is not a request", other.name()) },
    };
    (body, Vec::new())
}

/// A service's result as an answer frame: the body, and the tensor data to send with it.
pub(crate) fn service_answer(r: Result<crate::ServiceResponse, String>) -> (Body, Vec<f32>) {
    match r {
        Ok(resp) => (Body::ServiceReply { data: resp.data }, resp.payload),
        Err(message) => (Body::Error { message }, Vec::new()),
    }
}
