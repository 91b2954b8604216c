//! Routing of incoming tensors to mailboxes and of collective chunks to the operation
//! that waits for them. Stream tasks call it directly, without an actor hop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use strata_tensor::{DType, HostTensor};
use strata_wire::ChunkTag;
use tokio::sync::mpsc;

use crate::budget::Charge;
use crate::buffers::Payload;

/// A tensor that arrived for a mailbox.
#[derive(Debug)]
pub struct TensorMessage {
    /// Sending node.
    pub from: String,
    /// The sender's tag.
    pub tag: u64,
    /// The tensor.
    pub tensor: HostTensor<f32>,
    /// Its bytes, charged to the sender's budget until this message is dropped.
    #[allow(dead_code, reason = "held for its Drop, which gives the bytes back")]
    pub(crate) charge: Charge,
}

/// A segment of a collective operation's data, or the operation's abort.
#[derive(Debug)]
pub enum ChunkMessage {
    /// Data.
    Data {
        /// Sending node.
        from: String,
        /// Position in the algorithm.
        tag: ChunkTag,
        /// Element type on the wire.
        dtype: DType,
        /// The elements' little-endian bytes, as they arrived.
        data: Payload,
        /// The elements' bytes, charged to the sender's budget until dropped.
        charge: Charge,
    },
    /// The sender gave up on the operation.
    Abort {
        /// Sending node.
        from: String,
        /// Why.
        message: String,
    },
    /// This node's membership saw a peer fail or leave.
    PeerDown {
        /// The peer.
        name: String,
        /// What happened.
        message: String,
    },
}

/// Mailbox queue depth: a sender finds a full mailbox refused rather than the node's
/// memory filled.
const MAILBOX_DEPTH: usize = 64;
/// Messages an open operation's inbox holds before the stream tasks delivering to it
/// wait (and, through QUIC flow control, the senders).
pub const OP_INBOX_DEPTH: usize = 1024;
/// Operations, over all peers, that may buffer data before their local rank opens them.
const EARLY_OPS_MAX: usize = 1024;
/// Operations one peer may send data for before they are opened here.
const EARLY_OPS_PER_PEER_MAX: usize = 64;
/// Messages buffered for one operation before it is opened.
const EARLY_MESSAGES_PER_OP_MAX: usize = OP_INBOX_DEPTH;
/// Closed operation ids remembered, so stragglers are dropped rather than buffered.
const CLOSED_OPS_MAX: usize = 4096;

/// What became of a delivered chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for the operation, now or for when it opens.
    Delivered,
    /// Dropped: the operation is closed or its consumer stopped reading.
    Dropped,
    /// The sending peer exceeded what it may buffer here.
    OverBudget(String),
}

struct Early {
    /// The peer whose data opened the slot (counted against its early-operation cap).
    owner: String,
    since: Instant,
    messages: Vec<ChunkMessage>,
}

enum OpSlot {
    Early(Early),
    Open(mpsc::Sender<ChunkMessage>),
}

#[derive(Default)]
struct Ops {
    slots: HashMap<u64, OpSlot>,
    early_per_peer: HashMap<String, usize>,
    early_total: usize,
    closed: HashSet<u64>,
    closed_order: VecDeque<u64>,
}

impl Ops {
    fn forget_early(&mut self, owner: &str) {
        self.early_total -= 1;
        if let Some(n) = self.early_per_peer.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                self.early_per_peer.remove(owner);
            }
        }
    }
}

/// Mailboxes and operation inboxes of one node.
pub(crate) struct Router {
    mailboxes: Mutex<HashMap<String, mpsc::Sender<TensorMessage>>>,
    ops: Mutex<Ops>,
    epochs: Mutex<HashMap<u64, u64>>,
    /// How long data for an operation nobody opened is kept.
    early_ttl: Duration,
    /// Application services, called by request streams.
    pub(crate) services: crate::service::Services,
}

impl Default for Router {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Router {
    /// A router that keeps early chunks for `early_ttl`.
    pub(crate) fn new(early_ttl: Duration) -> Self {
        Self {
            mailboxes: Mutex::default(),
            ops: Mutex::default(),
            epochs: Mutex::default(),
            early_ttl,
            services: Default::default(),
        }
    }

    /// Opens mailbox `name`, replacing an older one of the same name.
    pub(crate) fn mailbox(&self, name: &str) -> mpsc::Receiver<TensorMessage> {
        let (tx, rx) = mpsc::channel(MAILBOX_DEPTH);
        self.mailboxes.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), tx);
        rx
    }

    /// Delivers a tensor; the error is sent back to the peer.
    pub(crate) fn deliver_tensor(&self, mailbox: &str, msg: TensorMessage) -> Result<(), String> {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = boxes.get(mailbox) else {
            return Err(format!("no mailbox named {mailbox:?}"));
        };
        match tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(format!("mailbox {mailbox:?} is full ({MAILBOX_DEPTH} tensors)"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                boxes.remove(mailbox);
                Err(format!("mailbox {mailbox:?} was closed"))
            }
        }
    }

    /// The number of earlier calls with the same `key`: groups with the same members get
    /// distinct operation ids when every member creates them in the same order.
    pub(crate) fn next_epoch(&self, key: u64) -> u64 {
        let mut e = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
        let v = e.entry(key).or_insert(0);
        *v += 1;
        *v - 1
    }

    /// Opens operation `op`'s inbox, handing over anything that arrived early.
    pub(crate) fn open_op(&self, op: u64) -> mpsc::Receiver<ChunkMessage> {
        let (tx, rx) = mpsc::channel(OP_INBOX_DEPTH);
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(OpSlot::Early(early)) = ops.slots.remove(&op) {
            ops.forget_early(&early.owner);
            // Early messages are capped below the inbox depth, so none is lost here.
            for m in early.messages {
                let _ = tx.try_send(m);
            }
        }
        ops.slots.insert(op, OpSlot::Open(tx));
        rx
    }

    /// Closes operation `op`; later chunks for it are dropped.
    pub(crate) fn close_op(&self, op: u64) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(OpSlot::Early(early)) = ops.slots.remove(&op) {
            ops.forget_early(&early.owner);
        }
        if ops.closed.insert(op) {
            ops.closed_order.push_back(op);
            if ops.closed_order.len() > CLOSED_OPS_MAX
                && let Some(old) = ops.closed_order.pop_front()
            {
                ops.closed.remove(&old);
            }
        }
    }

    /// Routes a chunk (or abort) from peer `from` to its operation. An open operation's
    /// inbox is bounded: delivery waits up to `wait` for room (the stream's reader waits
    /// with it, and QUIC flow control slows the sender), then drops the message.
    pub(crate) async fn deliver_chunk(&self, op: u64, from: &str, msg: ChunkMessage, wait: Duration) -> Delivery {
        let tx = {
            let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
            if ops.closed.contains(&op) {
                return Delivery::Dropped;
            }
            let early_total = ops.early_total;
            let early_mine = ops.early_per_peer.get(from).copied().unwrap_or(0);
            match ops.slots.get_mut(&op) {
                Some(OpSlot::Open(tx)) => tx.clone(),
                Some(OpSlot::Early(e)) => {
                    if e.messages.len() >= EARLY_MESSAGES_PER_OP_MAX {
                        return Delivery::OverBudget(format!(
                            "operation {op} has {EARLY_MESSAGES_PER_OP_MAX} messages waiting to be opened"
                        ));
                    }
                    e.messages.push(msg);
                    return Delivery::Delivered;
                }
                None if early_mine >= EARLY_OPS_PER_PEER_MAX => {
                    return Delivery::OverBudget(format!(
                        "peer {from} sent data for {EARLY_OPS_PER_PEER_MAX} operations not opened here"
                    ));
                }
                None if early_total >= EARLY_OPS_MAX => {
                    tracing::warn!(
                        "dropping a chunk of operation {op} from {from}: {EARLY_OPS_MAX} operations already wait to be opened"
                    );
                    return Delivery::Dropped;
                }
                None => {
                    let slot = Early { owner: from.to_string(), since: Instant::now(), messages: vec![msg] };
                    ops.slots.insert(op, OpSlot::Early(slot));
                    ops.early_total += 1;
                    *ops.early_per_peer.entry(from.to_string()).or_insert(0) += 1;
                    return Delivery::Delivered;
                }
            }
        };
        match tx.send_timeout(msg, wait).await {
            Ok(()) => Delivery::Delivered,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Delivery::Dropped,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!("dropping a chunk of operation {op} from {from}: its inbox stayed full for {wait:?}");
                Delivery::Dropped
            }
        }
    }

    /// Drops data buffered for operations nobody opened within the expiry (their bytes
    /// go back to the senders' budgets). Returns how many operations expired.
    pub(crate) fn expire_early(&self, now: Instant) -> usize {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.early_ttl;
        let expired: Vec<(u64, String)> = ops
            .slots
            .iter()
            .filter_map(|(op, s)| match s {
                OpSlot::Early(e) if now.saturating_duration_since(e.since) >= ttl => Some((*op, e.owner.clone())),
                _ => None,
            })
            .collect();
        for (op, owner) in &expired {
            ops.slots.remove(op);
            ops.forget_early(owner);
            tracing::warn!("dropped data of operation {op} from {owner}: not opened here within {ttl:?}");
        }
        expired.len()
    }

    /// Tells every open operation that a peer failed or left.
    pub(crate) fn peer_down(&self, name: &str, message: &str) {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        for slot in ops.slots.values() {
            if let OpSlot::Open(tx) = slot {
                let msg = ChunkMessage::PeerDown { name: name.to_string(), message: message.to_string() };
                if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
                    // A full inbox is being read: hand the news over when there is room.
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send_timeout(msg, Duration::from_secs(60)).await;
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::PeerBudget;

    fn data(from: &str, budget: &std::sync::Arc<PeerBudget>, len: usize) -> ChunkMessage {
        let mut charge = Charge::new(budget);
        charge.grow(len as u64 * 4).unwrap();
        let tag = ChunkTag { step: 0, segment: 0 };
        ChunkMessage::Data {
            from: from.into(),
            tag,
            dtype: DType::F32,
            data: Payload::from_f32(&vec![0.0; len]),
            charge,
        }
    }

    #[tokio::test]
    async fn early_chunks_are_capped_per_peer_and_expire() {
        let router = Router::new(Duration::from_secs(5));
        let b = PeerBudget::new("mallory", 1 << 30);
        let wait = Duration::from_millis(10);
        for op in 0..EARLY_OPS_PER_PEER_MAX as u64 {
            assert_eq!(router.deliver_chunk(op, "mallory", data("mallory", &b, 10), wait).await, Delivery::Delivered);
        }
        let d = router.deliver_chunk(10_000, "mallory", data("mallory", &b, 10), wait).await;
        assert_eq!(
            d,
            Delivery::OverBudget(format!(
                "peer mallory sent data for {EARLY_OPS_PER_PEER_MAX} operations not opened here"
            ))
        );
        // Another peer is not affected by mallory's flood.
        let good = PeerBudget::new("node-1", 1 << 30);
        assert_eq!(router.deliver_chunk(20_000, "node-1", data("node-1", &good, 10), wait).await, Delivery::Delivered);
        assert_eq!(b.used(), EARLY_OPS_PER_PEER_MAX as u64 * 40);
        // Expiry gives the bytes back; the operation opened in time keeps its data.
        let mut inbox = router.open_op(20_000);
        assert_eq!(router.expire_early(Instant::now()), 0);
        assert_eq!(router.expire_early(Instant::now() + Duration::from_secs(6)), EARLY_OPS_PER_PEER_MAX);
        assert_eq!(b.used(), 0);
        assert!(matches!(inbox.try_recv(), Ok(ChunkMessage::Data { .. })));
        assert_eq!(router.deliver_chunk(1, "mallory", data("mallory", &b, 10), wait).await, Delivery::Delivered);
    }

    #[tokio::test]
    async fn a_full_inbox_applies_back_pressure_then_drops() {
        let router = Router::default();
        let b = PeerBudget::new("p", 1 << 30);
        let mut inbox = router.open_op(7);
        for _ in 0..OP_INBOX_DEPTH {
            assert_eq!(router.deliver_chunk(7, "p", data("p", &b, 1), Duration::ZERO).await, Delivery::Delivered);
        }
        let d = router.deliver_chunk(7, "p", data("p", &b, 1), Duration::from_millis(20)).await;
        assert_eq!(d, Delivery::Dropped);
        assert_eq!(b.used(), OP_INBOX_DEPTH as u64 * 4);
        inbox.recv().await.unwrap();
        assert_eq!(router.deliver_chunk(7, "p", data("p", &b, 1), Duration::ZERO).await, Delivery::Delivered);
        router.close_op(7);
        assert_eq!(router.deliver_chunk(7, "p", data("p", &b, 1), Duration::ZERO).await, Delivery::Dropped);
    }
}
