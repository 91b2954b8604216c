//! Routing of incoming tensors to mailboxes and of collective chunks to the operation
//! that waits for them. Stream tasks call it directly, without an actor hop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use strata_tensor::HostTensor;
use strata_wire::ChunkTag;
use tokio::sync::mpsc;

/// A tensor that arrived for a mailbox.
#[derive(Debug)]
pub struct TensorMessage {
    /// Sending node.
    pub from: String,
    /// The sender's tag.
    pub tag: u64,
    /// The tensor.
    pub tensor: HostTensor<f32>,
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
        /// Elements.
        data: Vec<f32>,
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
/// Operations that may buffer data before their local rank opens them.
const EARLY_OPS_MAX: usize = 256;
/// Closed operation ids remembered, so stragglers are dropped rather than buffered.
const CLOSED_OPS_MAX: usize = 4096;

enum OpSlot {
    Early(Vec<ChunkMessage>),
    Open(mpsc::UnboundedSender<ChunkMessage>),
}

#[derive(Default)]
struct Ops {
    slots: HashMap<u64, OpSlot>,
    closed: HashSet<u64>,
    closed_order: VecDeque<u64>,
}

/// Mailboxes and operation inboxes of one node.
#[derive(Default)]
pub(crate) struct Router {
    mailboxes: Mutex<HashMap<String, mpsc::Sender<TensorMessage>>>,
    ops: Mutex<Ops>,
    epochs: Mutex<HashMap<u64, u64>>,
}

impl Router {
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
    pub(crate) fn open_op(&self, op: u64) -> mpsc::UnboundedReceiver<ChunkMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(OpSlot::Early(msgs)) = ops.slots.remove(&op) {
            for m in msgs {
                let _ = tx.send(m);
            }
        }
        ops.slots.insert(op, OpSlot::Open(tx));
        rx
    }

    /// Closes operation `op`; later chunks for it are dropped.
    pub(crate) fn close_op(&self, op: u64) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.slots.remove(&op);
        if ops.closed.insert(op) {
            ops.closed_order.push_back(op);
            if ops.closed_order.len() > CLOSED_OPS_MAX
                && let Some(old) = ops.closed_order.pop_front()
            {
                ops.closed.remove(&old);
            }
        }
    }

    /// Routes a chunk (or abort) to its operation. Returns `false` when it was dropped.
    pub(crate) fn deliver_chunk(&self, op: u64, msg: ChunkMessage) -> bool {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if ops.closed.contains(&op) {
            return false;
        }
        let early = ops.slots.values().filter(|s| matches!(s, OpSlot::Early(_))).count();
        match ops.slots.get_mut(&op) {
            Some(OpSlot::Open(tx)) => tx.send(msg).is_ok(),
            Some(OpSlot::Early(v)) => {
                v.push(msg);
                true
            }
            None if early < EARLY_OPS_MAX => {
                ops.slots.insert(op, OpSlot::Early(vec![msg]));
                true
            }
            None => {
                tracing::warn!(
                    "dropping a chunk of operation {op}: {EARLY_OPS_MAX} operations already wait to be opened"
                );
                false
            }
        }
    }

    /// Tells every open operation that a peer failed or left.
    pub(crate) fn peer_down(&self, name: &str, message: &str) {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        for slot in ops.slots.values() {
            if let OpSlot::Open(tx) = slot {
                let _ = tx.send(ChunkMessage::PeerDown { name: name.to_string(), message: message.to_string() });
            }
        }
    }
}
