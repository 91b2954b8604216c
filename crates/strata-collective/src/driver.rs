//! Running the machines over a node's QUIC links.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use strata_net::buffers::Payload;
use strata_net::{Charge, ChunkMessage, NetError, NodeHandle, NodeInfo, PeerLink};
use strata_wire::{Body, ChunkTag};
use tokio::task::JoinSet;

use crate::machines::{
    Algorithm, AllGather, AllReduce, Broadcast, Compression, Machine, Received, Recv, ReduceOp, ReduceScatter, Send,
    SendData,
};
use crate::{CollectiveError, Rank};

/// How long a rank keeps receiving from a peer reported down before failing the
/// operation: its last data can trail the news of its departure.
const DOWN_GRACE: Duration = Duration::from_millis(500);

/// Tuning of a group's operations.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// Elements per segment: the unit of pipelining (default 256 Ki elements, 1 MiB).
    pub seg_len: usize,
    /// Segments a rank may have in flight at once.
    pub sends_in_flight_max: usize,
    /// Longest wait for data before the operation fails (a dead peer is normally reported
    /// sooner, by the membership's failure detector).
    pub timeout: Duration,
    /// All-reduce algorithm.
    pub algorithm: Algorithm,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            seg_len: 256 << 10,
            sends_in_flight_max: 8,
            timeout: Duration::from_secs(30),
            algorithm: Algorithm::Auto,
        }
    }
}

/// An ordered set of nodes that run collectives together. Every member must create its
/// groups and issue their collectives in the same order (as with MPI or NCCL).
pub struct Group {
    node: NodeHandle,
    members: Vec<String>,
    rank: Rank,
    id: u64,
    seq: AtomicU64,
    p2p: Mutex<HashMap<(Rank, Rank), u64>>,
    links: Mutex<HashMap<Rank, PeerLink>>,
    options: GroupOptions,
}

/// FNV-1a, stable across builds and machines (operation ids must agree everywhere).
pub(crate) fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Group {
    /// A group of the named nodes in this order; this node must be one of them.
    pub fn new(node: NodeHandle, members: Vec<String>, options: GroupOptions) -> Result<Self, CollectiveError> {
        let rank = members.iter().position(|m| m == node.name()).ok_or_else(|| CollectiveError::Argument {
            op: "group",
            message: format!("node {} is not among the members {members:?}", node.name()),
        })?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = members.iter().find(|m| !seen.insert(*m)) {
            return Err(CollectiveError::Argument { op: "group", message: format!("member {dup} appears twice") });
        }
        let names: Vec<&[u8]> = members.iter().map(|m| m.as_bytes()).collect();
        let key = fnv(&names);
        // Groups of the same members, created in the same order everywhere, get distinct ids.
        let epoch = node.next_epoch(key);
        Ok(Self {
            id: fnv(&[&key.to_le_bytes(), &epoch.to_le_bytes()]),
            node,
            members,
            rank,
            seq: AtomicU64::new(0),
            p2p: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            options,
        })
    }

    /// Waits until `world` members are alive and connected, then forms the group of all of
    /// them, ordered by launcher rank when every member has one, else by name.
    pub async fn form(
        node: NodeHandle,
        world: usize,
        wait: Duration,
        options: GroupOptions,
    ) -> Result<Self, CollectiveError> {
        let mut infos: Vec<NodeInfo> = node.wait_for_members(world, wait).await?;
        if infos.len() > world {
            return Err(CollectiveError::Argument {
                op: "group",
                message: format!("{} members are alive, expected {world}", infos.len()),
            });
        }
        if infos.iter().all(|i| i.rank.is_some()) {
            infos.sort_by_key(|i| i.rank);
        }
        let members = infos.into_iter().map(|i| i.name).collect();
        Self::new(node, members, options)
    }

    /// This node's rank.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// Number of members.
    pub fn world(&self) -> usize {
        self.members.len()
    }

    /// Member names in rank order.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The node this group runs on.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    pub(crate) fn next_op(&self) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        fnv(&[&self.id.to_le_bytes(), b"collective", &seq.to_le_bytes()])
    }

    pub(crate) fn p2p_op(&self, from: Rank, to: Rank) -> u64 {
        let mut m = self.p2p.lock().unwrap_or_else(|p| p.into_inner());
        let seq = m.entry((from, to)).or_insert(0);
        *seq += 1;
        fnv(&[
            &self.id.to_le_bytes(),
            b"p2p",
            &(from as u64).to_le_bytes(),
            &(to as u64).to_le_bytes(),
            &seq.to_le_bytes(),
        ])
    }

    pub(crate) fn options(&self) -> &GroupOptions {
        &self.options
    }

    /// Sum or mean of `buf` over all ranks; every rank gets bitwise the same result.
    pub async fn all_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, CollectiveError> {
        let m = AllReduce::new(self.rank, self.world(), buf, op, self.options.algorithm, self.options.seg_len)?;
        self.run(self.next_op(), m).await
    }

    /// As [`Group::all_reduce`], with values travelling in the `wire` format: half the
    /// bytes with a 16-bit format, rounded as [`Compression`] describes (every rank still
    /// gets bitwise the same result).
    pub async fn all_reduce_compressed(
        &self,
        buf: Vec<f32>,
        op: ReduceOp,
        wire: Compression,
    ) -> Result<Vec<f32>, CollectiveError> {
        let m = AllReduce::compressed(
            self.rank,
            self.world(),
            buf,
            op,
            self.options.algorithm,
            self.options.seg_len,
            wire,
        )?;
        self.run(self.next_op(), m).await
    }

    /// Chunk `rank` (of `even_ranges(len, world)`) of the sum or mean of `buf`.
    pub async fn reduce_scatter(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, CollectiveError> {
        let m = ReduceScatter::new(self.rank, self.world(), buf, op, self.options.seg_len)?;
        self.run(self.next_op(), m).await
    }

    /// The concatenation, in rank order, of every rank's equal-length `mine`.
    pub async fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let m = AllGather::new(self.rank, self.world(), mine, self.options.seg_len)?;
        self.run(self.next_op(), m).await
    }

    /// `root`'s `buf` on every rank (`buf` must have the same length everywhere).
    pub async fn broadcast(&self, root: Rank, buf: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        let m = Broadcast::new(self.rank, self.world(), root, buf, self.options.seg_len)?;
        self.run(self.next_op(), m).await
    }

    /// Sends `buf` to rank `to`, which must call [`Group::recv`] with the same length;
    /// returns the buffer for reuse.
    pub async fn send(&self, to: Rank, buf: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        self.check_peer("send", to)?;
        let op = self.p2p_op(self.rank, to);
        self.run(op, Send::new(to, buf, self.options.seg_len)).await
    }

    /// Receives `len` elements from rank `from`.
    pub async fn recv(&self, from: Rank, len: usize) -> Result<Vec<f32>, CollectiveError> {
        self.recv_into(from, vec![0.0; len]).await
    }

    /// Receives `buf.len()` elements from rank `from` into `buf`.
    pub async fn recv_into(&self, from: Rank, buf: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
        self.check_peer("recv", from)?;
        let op = self.p2p_op(from, self.rank);
        self.run(op, Recv::into_buffer(from, buf, self.options.seg_len)).await
    }

    pub(crate) fn check_peer(&self, op: &'static str, r: Rank) -> Result<(), CollectiveError> {
        if r >= self.world() || r == self.rank {
            return Err(CollectiveError::Argument {
                op,
                message: format!("rank {r} is not another rank of a group of {}", self.world()),
            });
        }
        Ok(())
    }

    async fn link(&self, r: Rank) -> Result<PeerLink, CollectiveError> {
        if let Some(l) = self.links.lock().unwrap_or_else(|p| p.into_inner()).get(&r)
            && l.is_open()
        {
            return Ok(l.clone());
        }
        let l = self.node.peer(&self.members[r]).await?;
        self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(r, l.clone());
        Ok(l)
    }

    fn forget_link(&self, r: Rank) {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(&r);
    }

    pub(crate) async fn run(&self, op: u64, machine: impl Machine + 'static) -> Result<Vec<f32>, CollectiveError> {
        let name = machine.name();
        let mut inbox = self.node.open_op(op);
        let result = self.drive(op, machine, &mut inbox).await;
        self.node.close_op(op);
        if let Err(e) = &result {
            // Tell the others, so they fail now rather than at their timeout.
            if !matches!(e, CollectiveError::Aborted { .. }) {
                self.abort_peers(op, e.to_string()).await;
            }
            tracing::warn!("{name} failed on {}: {e}", self.node.name());
        }
        result
    }

    /// Tells every other rank that operation `op` failed here (without waiting for them).
    pub(crate) async fn abort_peers(&self, op: u64, message: String) {
        for r in (0..self.world()).filter(|&r| r != self.rank) {
            if let Ok(l) = self.link(r).await {
                let body = Body::Abort { op, message: message.clone() };
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), l.send(body, &[])).await;
                });
            }
        }
    }

    async fn drive(
        &self,
        op: u64,
        mut m: impl Machine + 'static,
        inbox: &mut tokio::sync::mpsc::Receiver<ChunkMessage>,
    ) -> Result<Vec<f32>, CollectiveError> {
        let name = m.name();
        for (r, member) in self.members.iter().enumerate() {
            if r != self.rank && self.node.is_down(member).await? {
                return Err(CollectiveError::PeerFailed {
                    op: name,
                    peer: member.clone(),
                    reason: "not alive at the start".into(),
                });
            }
        }
        let rank_of: HashMap<&str, Rank> = self.members.iter().enumerate().map(|(r, n)| (n.as_str(), r)).collect();
        let mut sends: JoinSet<Result<(), (Rank, NetError)>> = JoinSet::new();
        let dtype = m.wire_dtype();
        // Received data the machine forwards later, with its charge to the sender's budget.
        let mut kept: HashMap<ChunkTag, (Payload, Charge)> = HashMap::new();
        // A peer reported down that this rank still needs: data it sent before going may
        // still be on its way (streams are not ordered among themselves), so wait briefly.
        let mut doomed: Option<(Rank, String, tokio::time::Instant)> = None;
        loop {
            if let Some((r, reason, deadline)) = &doomed {
                if !m.waiting_on().contains(r) {
                    doomed = None;
                } else if tokio::time::Instant::now() >= *deadline {
                    return Err(CollectiveError::PeerFailed {
                        op: name,
                        peer: self.members[*r].clone(),
                        reason: reason.clone(),
                    });
                }
            }
            while sends.len() < self.options.sends_in_flight_max {
                let Some(a) = m.poll_send() else { break };
                let data = match a.data {
                    SendData::Bytes(b) => Payload::from(b),
                    SendData::Forward(tag) => match kept.remove(&tag) {
                        Some((payload, _charge)) => payload,
                        None => {
                            return Err(CollectiveError::Argument {
                                op: name,
                                message: format!(
                                    "nothing kept to forward for segment {} of step {}",
                                    tag.segment, tag.step
                                ),
                            });
                        }
                    },
                };
                let link = self.link(a.to).await?;
                let to = a.to;
                sends.spawn(async move { link.send_chunk_payload(op, a.tag, dtype, data).await.map_err(|e| (to, e)) });
            }
            if m.is_done() && sends.is_empty() {
                return Ok(m.take_result());
            }
            tokio::select! {
                Some(done) = sends.join_next(), if !sends.is_empty() => {
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err((to, e))) => {
                            self.forget_link(to);
                            return Err(CollectiveError::PeerFailed { op: name, peer: self.members[to].clone(), reason: e.to_string() });
                        }
                        Err(e) => return Err(CollectiveError::Argument { op: name, message: format!("send task failed: {e}") }),
                    }
                }
                msg = inbox.recv() => match msg {
                    Some(ChunkMessage::Data { from, tag, dtype: got, data, charge }) => {
                        let Some(&r) = rank_of.get(from.as_str()) else {
                            tracing::warn!("{name}: ignoring data from {from}, not a member of the group");
                            continue;
                        };
                        if got != dtype {
                            return Err(CollectiveError::Protocol { op: name, from: r, message: format!("{got} data, expected {dtype}") });
                        }
                        let pieces: Vec<&[u8]> = data.pieces().iter().map(|p| &p[..]).collect();
                        if m.on_receive(r, tag, &pieces)? == Received::Keep {
                            kept.insert(tag, (data, charge));
                        }
                    }
                    Some(ChunkMessage::Abort { from, message }) => {
                        if rank_of.contains_key(from.as_str()) {
                            return Err(CollectiveError::Aborted { op: name, peer: from, message });
                        }
                    }
                    Some(ChunkMessage::PeerDown { name: peer, message }) => {
                        // Only a peer this rank still needs matters: one that finished its
                        // part and left is no failure.
                        if let Some(&r) = rank_of.get(peer.as_str())
                            && m.waiting_on().contains(&r)
                            && doomed.is_none()
                        {
                            doomed = Some((r, message, tokio::time::Instant::now() + DOWN_GRACE));
                        }
                    }
                    None => return Err(CollectiveError::Net(NetError::NodeGone)),
                },
                _ = tokio::time::sleep(doomed.as_ref().map_or(self.options.timeout, |d| d.2.saturating_duration_since(tokio::time::Instant::now()))) => {
                    if doomed.is_some() {
                        continue;
                    }
                    let waiting_on = m.waiting_on().into_iter().map(|r| self.members[r].clone()).collect();
                    return Err(CollectiveError::Timeout { op: name, waiting_on, millis: self.options.timeout.as_millis() as u64 });
                }
            }
        }
    }
}
