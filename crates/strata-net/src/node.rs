//! The node actor and the public node API.
//!
//! The node actor owns the member list ([`Membership`]) and the table of connected peers.
//! It dials members it is not connected to, sends heartbeats, declares silent members
//! failed and tells subscribers. Connections are established by plain async tasks (TLS
//! handshake, then a `Hello` exchange on the first stream) that report to the actor.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use quinn::rustls::pki_types::CertificateDer;
use strata_tensor::HostTensor;
use strata_wire::{AdapterSummary, Body, Header, MemberRecord, MemberState, NodeInfo};
use tokio::sync::mpsc;

use crate::budget::PeerBudget;
use crate::config::NodeConfig;
use crate::membership::{Membership, MembershipEvent};
use crate::peer::{
    CODE_ABORTED, CODE_DUPLICATE, CODE_LEAVING, CODE_REFUSED_PEER, Close, Frame, PeerActor, PeerLink, ReadFrameError,
    SendHeartbeat, read_frame, write_frame,
};
use crate::router::{ChunkMessage, Router, TensorMessage};
use crate::tls::{self, Identity, Role};
use crate::{NetError, transport};

/// What a node reports about its GPU besides its configuration.
#[derive(Clone, Default)]
pub struct NodeExtras {
    /// The GPU adapter the node opened.
    pub adapter: Option<AdapterSummary>,
    /// Called before every heartbeat: `(free, used)` GPU bytes.
    pub resources: Option<Arc<dyn Fn() -> (u64, u64) + Send + Sync>>,
}

/// Starts nodes.
pub struct Node;

impl Node {
    /// Starts a node inside the running actix system: binds its endpoint, dials its
    /// peers and seed, and returns a handle. Fails on a bad configuration or certificate.
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, NetError> {
        Self::start_with(config, NodeExtras::default()).await
    }

    /// As [`Node::start`], with the node's GPU description.
    pub async fn start_with(config: NodeConfig, extras: NodeExtras) -> Result<NodeHandle, NetError> {
        config.validate()?;
        let identity = if config.insecure_dev {
            tracing::warn!(
                "INSECURE: node {} runs with --insecure-dev: peers are not authenticated and anyone who can reach {} can join",
                config.name,
                config.listen
            );
            eprintln!("WARNING: --insecure-dev: no certificate checks; never use this outside a development machine");
            None
        } else {
            let dir = config.cert_dir.as_ref().expect("validated: a certificate directory is set");
            Some(Arc::new(tls::load_identity(dir, &config.name, Role::Node)?))
        };
        // The endpoint's IO runs on its own thread where there are cores for it: QUIC
        // crypto and packet handling then overlap with the actors and the collective
        // arithmetic. Where node processes share few cores, every datagram's cross-thread
        // wake-up costs more than the overlap gains (BENCHMARKS.md), so it shares the
        // node's thread.
        let io_arbiter = config.io_thread_of_its_own().then(Arbiter::new);
        let io = io_arbiter.as_ref().map_or_else(Arbiter::current, Arbiter::handle);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (cfg, id) = (config.clone(), identity.clone());
        io.spawn(async move {
            let _ = tx.send(transport::bind(&cfg, id.as_deref()));
        });
        let (endpoint, client) = rx.await.map_err(|_| NetError::NodeGone)??;
        let local = endpoint
            .local_addr()
            .map_err(|e| NetError::Endpoint { addr: config.listen.clone(), reason: e.to_string() })?;
        let addr = match &config.advertise {
            Some(a) => a.clone(),
            None if local.ip().is_unspecified() => {
                return Err(NetError::Config(format!(
                    "listening on {local}: set `advertise` to an address peers can dial"
                )));
            }
            None => local.to_string(),
        };
        let info = NodeInfo {
            name: config.name.clone(),
            addr,
            rank: config.rank,
            adapter: extras.adapter.clone(),
            gpu_free_bytes: None,
            gpu_used_bytes: None,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let incarnation = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let router = Arc::new(Router::new(Duration::from_millis(config.early_chunk_ttl_ms)));
        let config = Arc::new(config);
        let actor = NodeActor {
            membership: Membership::new(info.clone(), incarnation, config.failure_timeout()),
            config: config.clone(),
            identity,
            endpoint: endpoint.clone(),
            client,
            io,
            io_arbiter,
            router: router.clone(),
            extras,
            peers: HashMap::new(),
            dialing: HashSet::new(),
            static_addrs: config.peers.iter().chain(config.seed.iter()).cloned().collect(),
            warned: HashSet::new(),
            subscribers: Vec::new(),
            seq: 0,
            incarnation,
            leaving: false,
            aborted: false,
        };
        let addr = actor.start();
        let (ep, node) = (endpoint.clone(), addr.clone());
        actix::spawn(accept_loop(ep, node, router.clone()));
        tracing::info!("node {} listening on {local}", info.name);
        Ok(NodeHandle { addr, router, info, local, config })
    }
}

/// The application's handle to a running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    addr: Addr<NodeActor>,
    router: Arc<Router>,
    info: NodeInfo,
    local: SocketAddr,
    config: Arc<NodeConfig>,
}

impl NodeHandle {
    /// This node's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// This node's self-description.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    async fn ask<M>(&self, msg: M) -> Result<M::Result, NetError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        NodeActor: Handler<M>,
    {
        self.addr.send(msg).await.map_err(|_| NetError::NodeGone)
    }

    /// Every member record, this node first.
    pub async fn members(&self) -> Result<Vec<MemberRecord>, NetError> {
        self.ask(StatusQuery).await
    }

    /// Alive members including this node, sorted by name.
    pub async fn alive(&self) -> Result<Vec<NodeInfo>, NetError> {
        let mut v: Vec<NodeInfo> =
            self.members().await?.into_iter().filter(|r| r.state == MemberState::Alive).map(|r| r.info).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Waits until at least `count` members (this node included) are alive and connected.
    pub async fn wait_for_members(&self, count: usize, timeout: Duration) -> Result<Vec<NodeInfo>, NetError> {
        let deadline = Instant::now() + timeout;
        loop {
            let alive = self.alive().await?;
            let connected = self.ask(ConnectedPeers).await?;
            let ready: Vec<NodeInfo> =
                alive.into_iter().filter(|i| i.name == self.info.name || connected.contains(&i.name)).collect();
            if ready.len() >= count {
                return Ok(ready);
            }
            if Instant::now() >= deadline {
                return Err(NetError::Timeout {
                    what: format!(
                        "waiting for {count} members (have {}: {:?})",
                        ready.len(),
                        ready.iter().map(|i| &i.name).collect::<Vec<_>>()
                    ),
                    millis: timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The link to a connected peer.
    pub async fn peer(&self, name: &str) -> Result<PeerLink, NetError> {
        self.ask(GetPeer(name.to_string())).await?.ok_or_else(|| NetError::NotConnected(name.to_string()))
    }

    /// Sends a tensor to mailbox `mailbox` on node `peer` and waits for its acknowledgement.
    pub async fn send_tensor(
        &self,
        peer: &str,
        mailbox: &str,
        tag: u64,
        tensor: &HostTensor<f32>,
    ) -> Result<(), NetError> {
        self.peer(peer).await?.send_tensor(mailbox, tag, tensor).await
    }

    /// Opens a mailbox that receives tensors sent to `name` on this node.
    pub fn mailbox(&self, name: &str) -> mpsc::Receiver<TensorMessage> {
        self.router.mailbox(name)
    }

    /// Membership events from now on. The queue holds [`SUBSCRIBER_DEPTH`] events: a
    /// subscriber that falls that far behind is dropped (its receiver closes) with a warning.
    pub async fn subscribe(&self) -> Result<mpsc::Receiver<MembershipEvent>, NetError> {
        self.ask(Subscribe).await
    }

    /// Opens the inbox of collective operation `op` (bounded: [`crate::OP_INBOX_DEPTH`]).
    pub fn open_op(&self, op: u64) -> mpsc::Receiver<ChunkMessage> {
        self.router.open_op(op)
    }

    /// How many times `key` was asked for before (see `strata_collective::Group`).
    pub fn next_epoch(&self, key: u64) -> u64 {
        self.router.next_epoch(key)
    }

    /// Closes the inbox of collective operation `op`.
    pub fn close_op(&self, op: u64) {
        self.router.close_op(op)
    }

    /// Registers service `name` on this node (replacing one of the same name): members
    /// and operators can then call it.
    pub fn register_service(&self, name: &str, service: Arc<dyn crate::Service>) {
        self.router.services.register(name, service);
    }

    /// Removes service `name`.
    pub fn unregister_service(&self, name: &str) {
        self.router.services.unregister(name);
    }

    /// Calls `method` of service `service` on node `peer` (this node's own services
    /// included), waiting up to `limit` for the answer.
    pub async fn call(
        &self,
        peer: &str,
        service: &str,
        method: &str,
        args: Vec<u8>,
        payload: &[f32],
        limit: Duration,
    ) -> Result<crate::ServiceResponse, NetError> {
        if peer == self.info.name {
            let caller = crate::Caller { name: self.info.name.clone(), role: Role::Node };
            let request = crate::ServiceRequest { caller, method: method.to_string(), args, payload: payload.to_vec() };
            let call = self.router.services.call(service, request);
            return match tokio::time::timeout(limit, call).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(message)) => Err(NetError::Refused { peer: peer.to_string(), message }),
                Err(_) => Err(NetError::Timeout {
                    what: format!("call {service}.{method} on {peer}"),
                    millis: limit.as_millis() as u64,
                }),
            };
        }
        self.peer(peer).await?.call(service, method, args, payload, limit).await
    }

    /// Whether `name` is currently failed or gone (as this node sees it).
    pub async fn is_down(&self, name: &str) -> Result<bool, NetError> {
        let rec = self.members().await?.into_iter().find(|r| r.info.name == name);
        Ok(rec.is_none_or(|r| r.state != MemberState::Alive))
    }

    /// Leaves the cluster: tells the peers, closes connections and stops the node.
    pub async fn shutdown(&self) {
        let _ = self.addr.send(Shutdown).await;
    }

    /// Stops the node at once without telling its peers, as a crash would: its endpoint
    /// falls silent and the others detect the failure by the silence. (When the endpoint
    /// shares the node's thread, see [`NodeConfig::io_thread`], its connections are closed
    /// instead, without a goodbye.)
    pub async fn abort(&self) {
        let _ = self.addr.send(Abort).await;
    }
}

/// Membership events a subscriber may have unread before it is dropped.
pub const SUBSCRIBER_DEPTH: usize = 1024;

struct PeerEntry {
    link: PeerLink,
    actor: Addr<PeerActor>,
    dialed_by_me: bool,
    incarnation: u64,
}

/// The node actor.
pub(crate) struct NodeActor {
    config: Arc<NodeConfig>,
    identity: Option<Arc<Identity>>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    io: ArbiterHandle,
    /// The endpoint's own thread, if it has one.
    io_arbiter: Option<Arbiter>,
    router: Arc<Router>,
    extras: NodeExtras,
    membership: Membership,
    peers: HashMap<String, PeerEntry>,
    dialing: HashSet<String>,
    static_addrs: Vec<String>,
    warned: HashSet<String>,
    subscribers: Vec<mpsc::Sender<MembershipEvent>>,
    seq: u64,
    incarnation: u64,
    leaving: bool,
    aborted: bool,
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.config.heartbeat(), |act, ctx| act.tick(ctx));
        self.dial_missing(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if !self.aborted {
            self.endpoint.close(CODE_LEAVING.into(), b"node stopped");
        }
        if let Some(a) = &self.io_arbiter {
            a.stop();
        }
    }
}

impl NodeActor {
    fn hello(&self) -> Body {
        Body::Hello {
            info: self.membership.me().info.clone(),
            cluster: self.config.cluster.clone(),
            incarnation: self.incarnation,
        }
    }

    fn handshake(&self) -> Handshake {
        Handshake {
            cluster: self.config.cluster.clone(),
            me: self.config.name.clone(),
            secure: self.identity.is_some(),
            hello: self.hello(),
            limits: self.config.limits(),
            timeout: Duration::from_millis(self.config.connect_timeout_ms),
            request_timeout: self.config.request_timeout(),
            budget_bytes: self.config.peer_buffer_bytes_max,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.leaving {
            return;
        }
        if let Some(res) = &self.extras.resources {
            let (free, used) = res();
            let mut me = self.membership.me().info.clone();
            me.gpu_free_bytes = Some(free);
            me.gpu_used_bytes = Some(used);
            self.membership.update_me(me);
        }
        self.membership.handle_timeout(Instant::now());
        self.process_events();
        self.router.expire_early(Instant::now());
        self.seq += 1;
        let hb = Body::Heartbeat {
            seq: self.seq,
            info: self.membership.me().info.clone(),
            members: self.membership.records(),
        };
        for p in self.peers.values() {
            p.actor.do_send(SendHeartbeat(hb.clone()));
        }
        self.dial_missing(ctx);
    }

    fn process_events(&mut self) {
        while let Some(ev) = self.membership.poll_event() {
            match &ev {
                MembershipEvent::Joined(i) => tracing::info!("member {} joined ({})", i.name, i.addr),
                MembershipEvent::Failed { name, silent_ms } => {
                    tracing::warn!("member {name} failed: silent for {silent_ms} ms");
                    self.router.peer_down(name, &format!("silent for {silent_ms} ms"));
                    if let Some(p) = self.peers.remove(name) {
                        p.actor.do_send(Close(CODE_REFUSED_PEER, "declared failed"));
                    }
                }
                MembershipEvent::Left(name) => {
                    tracing::info!("member {name} left");
                    self.router.peer_down(name, "left the cluster");
                }
            }
            self.subscribers.retain(|s| match s.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("dropping a membership subscriber: {SUBSCRIBER_DEPTH} events unread");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }

    fn dial_missing(&mut self, ctx: &mut Context<Self>) {
        let mut targets: Vec<(String, Option<String>)> = Vec::new();
        for info in self.membership.alive() {
            if info.name != self.config.name && !self.peers.contains_key(&info.name) {
                targets.push((info.addr.clone(), Some(info.name.clone())));
            }
        }
        // Gossip only offers addresses; the dial checks that whoever answers is that member.
        for c in self.membership.candidates() {
            if !self.peers.contains_key(&c.name) {
                targets.push((c.addr.clone(), Some(c.name.clone())));
            }
        }
        for a in &self.static_addrs {
            targets.push((a.clone(), None));
        }
        for (addr, name) in targets {
            if !self.dialing.insert(addr.clone()) {
                continue;
            }
            let (ep, client, hs, node) = (self.endpoint.clone(), self.client.clone(), self.handshake(), ctx.address());
            actix::spawn(async move {
                let result = dial(&ep, client, &addr, name.as_deref(), &hs).await;
                node.do_send(Dialed { addr, name, result });
            });
        }
    }

    /// Keeps one connection per peer: the one dialed by the node with the smaller name.
    fn register(&mut self, ctx: &mut Context<Self>, c: Connected) {
        let name = c.info.name.clone();
        let keep_new = match self.peers.get(&name) {
            None => true,
            Some(old) => {
                let preferred = |dialed_by_me: bool| {
                    (dialed_by_me && self.config.name < name) || (!dialed_by_me && name < self.config.name)
                };
                preferred(c.dialed_by_me) && !preferred(old.dialed_by_me)
            }
        };
        // Every connection gets a reader: the peer may have sent on it before it learnt
        // which of two simultaneous connections wins.
        let actor = PeerActor {
            link: c.link.clone(),
            node: ctx.address(),
            router: self.router.clone(),
            io: self.io.clone(),
            heartbeat_busy: Arc::default(),
        }
        .start();
        let entry = PeerEntry { link: c.link, actor, dialed_by_me: c.dialed_by_me, incarnation: c.incarnation };
        let loser = if keep_new { self.peers.insert(name, entry) } else { Some(entry) };
        if let Some(l) = loser {
            // Both ends agree on the winner (the connection dialed by the smaller name) and
            // stop sending on the loser; close it once what was sent on it has arrived.
            actix::spawn(async move {
                l.link.drain(Duration::from_secs(2)).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                l.actor.do_send(Close(CODE_DUPLICATE, "duplicate connection"));
            });
        }
        self.membership.heard(Instant::now(), &c.info, c.incarnation);
        self.process_events();
    }
}

/// Parameters of the hello exchange.
#[derive(Clone)]
struct Handshake {
    cluster: String,
    me: String,
    secure: bool,
    hello: Body,
    limits: strata_wire::Limits,
    timeout: Duration,
    request_timeout: Duration,
    budget_bytes: u64,
}

/// A connection whose hello exchange succeeded.
struct Connected {
    link: PeerLink,
    info: NodeInfo,
    incarnation: u64,
    dialed_by_me: bool,
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?.into_iter().next()
}

/// The role and name in a peer's certificate.
fn peer_identity(conn: &quinn::Connection) -> Result<(Role, String), String> {
    let cert = peer_certificate(conn).ok_or("peer presented no certificate")?;
    tls::certificate_identity(&cert)
}

/// Checks a peer's hello: same cluster, another node, and (with TLS) a node certificate
/// issued to the one name it claims.
fn check_hello(
    hs: &Handshake,
    conn: &quinn::Connection,
    body: Body,
    expect: Option<&str>,
) -> Result<(NodeInfo, u64), String> {
    let Body::Hello { info, cluster, incarnation } = body else {
        return Err(format!("expected hello, got {}", body.name()));
    };
    if cluster != hs.cluster {
        return Err(format!("peer {} belongs to cluster {cluster:?}, this node to {:?}", info.name, hs.cluster));
    }
    if info.name.is_empty() || info.name == hs.me {
        return Err(format!("peer claims the name {:?}", info.name));
    }
    if let Some(e) = expect
        && e != info.name
    {
        return Err(format!("expected node {e:?} at {}, found {:?}", conn.remote_address(), info.name));
    }
    if hs.secure {
        let (role, name) = peer_identity(conn)?;
        if role != Role::Node {
            return Err(format!("{:?} holds an operator certificate: operators never join as members", name));
        }
        if name != info.name {
            return Err(format!("peer claims to be {:?}, but its certificate is issued to {name:?}", info.name));
        }
    }
    Ok((info, incarnation))
}

/// Checks a tool's hello: same cluster and (with TLS) an operator certificate issued to
/// the name it claims. Returns that name.
fn check_operator_hello(hs: &Handshake, conn: &quinn::Connection, body: Body) -> Result<String, String> {
    let Body::OperatorHello { name, cluster } = body else {
        return Err(format!("the first frame must be a hello or an operator hello, not {}", body.name()));
    };
    if cluster != hs.cluster {
        return Err(format!("operator {name:?} belongs to cluster {cluster:?}, this node to {:?}", hs.cluster));
    }
    if hs.secure {
        let (role, cert_name) = peer_identity(conn)?;
        if role != Role::Operator {
            return Err(format!("{cert_name:?} holds a node certificate, which is not an operator's"));
        }
        if cert_name != name {
            return Err(format!("operator claims to be {name:?}, but its certificate is issued to {cert_name:?}"));
        }
    }
    Ok(name)
}

async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    let err = |reason: String| NetError::Connect { peer: addr.to_string(), reason };
    tokio::net::lookup_host(addr).await.map_err(|e| err(e.to_string()))?.next().ok_or_else(|| err("no address".into()))
}

async fn dial(
    ep: &quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: &str,
    expect: Option<&str>,
    hs: &Handshake,
) -> Result<Connected, NetError> {
    let err = |reason: String| NetError::Connect { peer: addr.to_string(), reason };
    let sa = resolve(addr).await?;
    let fut = async {
        let conn = ep
            .connect_with(client, sa, expect.unwrap_or(tls::CLUSTER_SERVER_NAME))
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        write_frame(&mut send, &Header::new(hs.hello.clone(), 0), &[]).await.map_err(err)?;
        let answer = match read_frame(&mut recv, &hs.limits, &hello_budget(addr), hs.timeout).await {
            Ok(Some(f)) => f.header.body,
            Ok(None) => return Err(err("the peer closed the hello stream".into())),
            Err(e) => return Err(err(e.to_string())),
        };
        if let Body::Error { message } = answer {
            return Err(NetError::Refused { peer: addr.to_string(), message });
        }
        match check_hello(hs, &conn, answer, expect) {
            Ok((info, incarnation)) => {
                let link = PeerLink::new(&info.name, conn, hs.limits, hs.request_timeout, hs.budget_bytes);
                Ok(Connected { link, info, incarnation, dialed_by_me: true })
            }
            Err(reason) => {
                conn.close(CODE_REFUSED_PEER.into(), reason.as_bytes());
                Err(err(reason))
            }
        }
    };
    tokio::time::timeout(hs.timeout, fut).await.map_err(|_| NetError::Timeout {
        what: format!("connecting to {addr}"),
        millis: hs.timeout.as_millis() as u64,
    })?
}

/// Answers a refused hello with the reason, then closes the connection.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, hs: &Handshake, reason: String) {
    tracing::warn!("refused {}: {reason}", conn.remote_address());
    let answer = Header::new(Body::Error { message: reason.clone() }, 0);
    let _ = tokio::time::timeout(hs.timeout, write_frame(&mut send, &answer, &[])).await;
    // Let the refusal reach the peer before the close discards unsent data.
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    conn.close(CODE_REFUSED_PEER.into(), reason.as_bytes());
}

/// Hellos carry no payload: a small budget bounds what a stranger can make us hold.
fn hello_budget(remote: impl std::fmt::Display) -> Arc<PeerBudget> {
    PeerBudget::new(&format!("{remote}"), 1 << 20)
}

async fn accept_loop(ep: quinn::Endpoint, node: Addr<NodeActor>, router: Arc<Router>) {
    while let Some(incoming) = ep.accept().await {
        let (node, router) = (node.clone(), router.clone());
        actix::spawn(async move {
            let remote = incoming.remote_address();
            let Ok(hs) = node.send(GetHandshake).await else { return };
            let conn = match tokio::time::timeout(hs.timeout, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!("refused a connection from {remote}: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!("refused a connection from {remote}: handshake timed out");
                    return;
                }
            };
            let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(hs.timeout, conn.accept_bi()).await else {
                tracing::warn!("closing a connection from {remote}: no hello within {} ms", hs.timeout.as_millis());
                conn.close(CODE_REFUSED_PEER.into(), b"no hello");
                return;
            };
            let hello = match read_frame(&mut recv, &hs.limits, &hello_budget(remote), hs.timeout).await {
                Ok(Some(f)) => f.header.body,
                Ok(None) | Err(ReadFrameError::Stream(_) | ReadFrameError::Idle(_)) => {
                    conn.close(CODE_REFUSED_PEER.into(), b"no hello");
                    return;
                }
                Err(e) => {
                    refuse(&conn, send, &hs, format!("malformed hello: {e}")).await;
                    return;
                }
            };
            if !matches!(hello, Body::Hello { .. } | Body::OperatorHello { .. }) {
                let reason = format!("the first frame must be a hello or an operator hello, not {}", hello.name());
                refuse(&conn, send, &hs, reason).await;
                return;
            }
            if matches!(hello, Body::OperatorHello { .. }) {
                match check_operator_hello(&hs, &conn, hello) {
                    Ok(name) => {
                        let answer = Header::new(hs.hello.clone(), 0);
                        if tokio::time::timeout(hs.timeout, write_frame(&mut send, &answer, &[])).await.is_err() {
                            return;
                        }
                        serve_operator(name, conn, node, router, hs).await;
                    }
                    Err(reason) => refuse(&conn, send, &hs, reason).await,
                }
                return;
            }
            match check_hello(&hs, &conn, hello, None) {
                Ok((info, incarnation)) => {
                    let answer = Header::new(hs.hello.clone(), 0);
                    if !matches!(
                        tokio::time::timeout(hs.timeout, write_frame(&mut send, &answer, &[])).await,
                        Ok(Ok(()))
                    ) {
                        return;
                    }
                    let link = PeerLink::new(&info.name, conn, hs.limits, hs.request_timeout, hs.budget_bytes);
                    node.do_send(Accepted(Connected { link, info, incarnation, dialed_by_me: false }));
                }
                Err(reason) => refuse(&conn, send, &hs, reason).await,
            }
        });
    }
}

/// Serves an operator's requests, one per bidirectional stream, until it hangs up or
/// stays idle past the request timeout. Operators are never members.
async fn serve_operator(
    name: String,
    conn: quinn::Connection,
    node: Addr<NodeActor>,
    router: Arc<Router>,
    hs: Handshake,
) {
    let who = format!("operator {name}");
    tracing::info!("{who} connected from {}", conn.remote_address());
    let link = PeerLink::new(&who, conn.clone(), hs.limits, hs.request_timeout, hs.budget_bytes);
    loop {
        let (mut send, mut recv) = match tokio::time::timeout(hs.request_timeout, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return,
            Err(_) => {
                conn.close(0u32.into(), b"idle");
                return;
            }
        };
        let (link, node, router, name) = (link.clone(), node.clone(), router.clone(), name.clone());
        actix::spawn(async move {
            let (answer, payload) = match read_frame(&mut recv, &hs.limits, &link.budget, hs.request_timeout).await {
                Ok(Some(frame)) => answer_operator(&name, &node, &router, frame).await,
                Ok(None) => return,
                Err(ReadFrameError::OverBudget(e)) => {
                    crate::peer::disconnect_over_budget(&link, &e);
                    return;
                }
                Err(e) => (Body::Error { message: e.to_string() }, Vec::new()),
            };
            crate::peer::write_answer(&link, &mut send, answer, &payload).await;
        });
    }
}

/// Answers one operator request: the status, or a call to a service.
async fn answer_operator(name: &str, node: &Addr<NodeActor>, router: &Router, frame: Frame) -> (Body, Vec<f32>) {
    let Frame { header, payload, charge, .. } = frame;
    let body = match header.body {
        Body::StatusRequest => match node.send(StatusQuery).await {
            Ok(records) => Body::Members(records),
            Err(_) => Body::Error { message: "the node is shutting down".into() },
        },
        Body::ServiceCall { service, method, args } => {
            let _charge = charge;
            let caller = crate::Caller { name: name.to_string(), role: Role::Operator };
            let request = crate::ServiceRequest { caller, method, args, payload };
            return crate::peer::service_answer(router.services.call(&service, request).await);
        }
        other => Body::Error { message: format!("{} is not an operator request", other.name()) },
    };
    (body, Vec::new())
}

#[derive(Message)]
#[rtype(result = "Handshake")]
struct GetHandshake;

impl Handler<GetHandshake> for NodeActor {
    type Result = MessageResult<GetHandshake>;
    fn handle(&mut self, _: GetHandshake, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.handshake())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Dialed {
    addr: String,
    name: Option<String>,
    result: Result<Connected, NetError>,
}

impl Handler<Dialed> for NodeActor {
    type Result = ();
    fn handle(&mut self, msg: Dialed, ctx: &mut Context<Self>) {
        self.dialing.remove(&msg.addr);
        match msg.result {
            Ok(c) => {
                self.static_addrs.retain(|a| *a != msg.addr);
                self.warned.remove(&msg.addr);
                if !self.leaving {
                    self.register(ctx, c);
                }
            }
            Err(e) => {
                // Both ends dialing at once is normal: one connection wins, the other closes.
                let raced = msg.name.as_ref().is_some_and(|n| self.peers.contains_key(n));
                if let Some(n) = &msg.name
                    && !raced
                {
                    self.membership.dial_failed(n);
                }
                if !raced && self.warned.insert(msg.addr.clone()) {
                    tracing::warn!("{e} (retrying every {} ms)", self.config.heartbeat_ms);
                } else {
                    tracing::debug!("{e}");
                }
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Accepted(Connected);

impl Handler<Accepted> for NodeActor {
    type Result = ();
    fn handle(&mut self, msg: Accepted, ctx: &mut Context<Self>) {
        if self.leaving {
            msg.0.link.conn.close(CODE_LEAVING.into(), b"leaving");
        } else {
            self.register(ctx, msg.0);
        }
    }
}

/// A heartbeat arrived from a connected peer.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Heard {
    pub(crate) info: NodeInfo,
    pub(crate) members: Vec<MemberRecord>,
}

impl Handler<Heard> for NodeActor {
    type Result = ();
    fn handle(&mut self, msg: Heard, ctx: &mut Context<Self>) {
        let Some(incarnation) = self.peers.get(&msg.info.name).map(|p| p.incarnation) else { return };
        let now = Instant::now();
        self.membership.heard(now, &msg.info, incarnation);
        self.membership.merge(now, &msg.members);
        self.process_events();
        self.dial_missing(ctx);
    }
}

/// A peer's connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PeerClosed {
    pub(crate) name: String,
    pub(crate) conn_id: usize,
    pub(crate) reason: String,
    /// The peer closed the connection because it leaves the cluster.
    pub(crate) leaving: bool,
}

impl Handler<PeerClosed> for NodeActor {
    type Result = ();
    fn handle(&mut self, msg: PeerClosed, _: &mut Context<Self>) {
        if self.peers.get(&msg.name).is_some_and(|p| p.link.conn.stable_id() == msg.conn_id) {
            self.peers.remove(&msg.name);
            tracing::info!("connection to {} closed: {}", msg.name, msg.reason);
            if msg.leaving {
                self.membership.left(&msg.name);
                self.process_events();
            }
        }
    }
}

/// A peer said it leaves.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PeerLeft(pub(crate) String);

impl Handler<PeerLeft> for NodeActor {
    type Result = ();
    fn handle(&mut self, msg: PeerLeft, _: &mut Context<Self>) {
        self.membership.left(&msg.0);
        self.process_events();
    }
}

/// Asks for every member record.
#[derive(Message)]
#[rtype(result = "Vec<MemberRecord>")]
pub(crate) struct StatusQuery;

impl Handler<StatusQuery> for NodeActor {
    type Result = MessageResult<StatusQuery>;
    fn handle(&mut self, _: StatusQuery, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.membership.records())
    }
}

#[derive(Message)]
#[rtype(result = "HashSet<String>")]
struct ConnectedPeers;

impl Handler<ConnectedPeers> for NodeActor {
    type Result = MessageResult<ConnectedPeers>;
    fn handle(&mut self, _: ConnectedPeers, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.peers.keys().cloned().collect())
    }
}

#[derive(Message)]
#[rtype(result = "Option<PeerLink>")]
struct GetPeer(String);

impl Handler<GetPeer> for NodeActor {
    type Result = Option<PeerLink>;
    fn handle(&mut self, msg: GetPeer, _: &mut Context<Self>) -> Self::Result {
        self.peers.get(&msg.0).map(|p| p.link.clone())
    }
}

#[derive(Message)]
#[rtype(result = "mpsc::Receiver<MembershipEvent>")]
struct Subscribe;

impl Handler<Subscribe> for NodeActor {
    type Result = MessageResult<Subscribe>;
    fn handle(&mut self, _: Subscribe, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_DEPTH);
        self.subscribers.push(tx);
        MessageResult(rx)
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Abort;

impl Handler<Abort> for NodeActor {
    type Result = ();
    fn handle(&mut self, _: Abort, ctx: &mut Context<Self>) {
        self.leaving = true;
        self.aborted = true;
        match &self.io_arbiter {
            // The endpoint and connection drivers run on the IO arbiter: stopping it
            // silences them.
            Some(a) => {
                a.stop();
            }
            // They share the node's thread, which goes on: close the endpoint without a
            // goodbye, so peers see the connections end rather than silence.
            None => self.endpoint.close(CODE_ABORTED.into(), b"node aborted"),
        }
        ctx.stop();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown;

impl Handler<Shutdown> for NodeActor {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.leaving = true;
        let links: Vec<PeerLink> = self.peers.values().map(|p| p.link.clone()).collect();
        let endpoint = self.endpoint.clone();
        Box::pin(
            async move {
                // `Leave` must be acknowledged before the close: closing a connection
                // abandons stream data not yet delivered.
                let mut sends = tokio::task::JoinSet::new();
                for l in links.clone() {
                    sends.spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(1), l.send_acknowledged(Body::Leave)).await;
                    });
                }
                sends.join_all().await;
                for l in &links {
                    l.conn.close(CODE_LEAVING.into(), b"leaving");
                }
                // The close frames are sent by the endpoint driver; a process that exits
                // right after shutdown would otherwise leave its peers to time out.
                let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                act.peers.clear();
                ctx.stop();
            }),
        )
    }
}

/// A tool's connection to one node, authenticated with an operator certificate: it
/// never joins as a member, and the node binds it to its certificate's name.
pub struct OperatorClient {
    endpoint: quinn::Endpoint,
    link: PeerLink,
    node: NodeInfo,
}

impl OperatorClient {
    /// Connects to the node at `addr` as operator `name`, with `<name>.pem` from
    /// `cert_dir` (or with no checks when `cert_dir` is `None`: `--insecure-dev` clusters).
    /// Every wait is bounded by `timeout`.
    pub async fn connect(
        addr: &str,
        cert_dir: Option<&Path>,
        name: &str,
        cluster: &str,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let identity = cert_dir.map(|d| tls::load_identity(d, name, Role::Operator)).transpose()?;
        let config = NodeConfig { name: name.to_string(), insecure_dev: identity.is_none(), ..Default::default() };
        let (endpoint, client) = transport::client_endpoint(&config, identity.as_ref())?;
        let sa = resolve(addr).await?;
        let err = |reason: String| NetError::Connect { peer: addr.to_string(), reason };
        let fut = async {
            let conn = endpoint
                .connect_with(client, sa, tls::CLUSTER_SERVER_NAME)
                .map_err(|e| err(e.to_string()))?
                .await
                .map_err(|e| err(e.to_string()))?;
            let link = PeerLink::new(addr, conn, config.limits(), timeout, config.peer_buffer_bytes_max);
            let hello = Body::OperatorHello { name: name.to_string(), cluster: cluster.to_string() };
            let (answer, _) = link.request(hello, &[]).await?;
            match answer.body {
                Body::Hello { info, .. } => Ok((link, info)),
                Body::Error { message } => Err(NetError::Refused { peer: addr.to_string(), message }),
                other => Err(err(format!("unexpected answer {}", other.name()))),
            }
        };
        let (link, node) = tokio::time::timeout(timeout, fut).await.map_err(|_| NetError::Timeout {
            what: format!("connecting to {addr}"),
            millis: timeout.as_millis() as u64,
        })??;
        Ok(Self { endpoint, link, node })
    }

    /// The node this client is connected to.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Sends a request and waits (bounded) for its answer; an `Error` answer becomes
    /// [`NetError::Refused`].
    pub async fn request(&self, body: Body) -> Result<Body, NetError> {
        let (answer, _) = self.link.request(body, &[]).await?;
        match answer.body {
            Body::Error { message } => Err(NetError::Refused { peer: self.node.name.clone(), message }),
            other => Ok(other),
        }
    }

    /// Calls `method` of service `service` on the node, waiting up to `limit`.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        args: Vec<u8>,
        payload: &[f32],
        limit: Duration,
    ) -> Result<crate::ServiceResponse, NetError> {
        self.link.call(service, method, args, payload, limit).await
    }

    /// The node's member list.
    pub async fn members(&self) -> Result<Vec<MemberRecord>, NetError> {
        match self.request(Body::StatusRequest).await? {
            Body::Members(m) => Ok(m),
            other => Err(NetError::Connect {
                peer: self.node.name.clone(),
                reason: format!("unexpected answer {}", other.name()),
            }),
        }
    }

    /// Hangs up and waits (at most a second) for the close to reach the node.
    pub async fn close(self) {
        self.link.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Asks a node at `addr` for its member list, authenticating with the operator
/// certificate `<as_name>.pem` from `cert_dir` (or with no checks when `cert_dir` is
/// `None`: `--insecure-dev` clusters).
pub async fn query_status(
    addr: &str,
    cert_dir: Option<&Path>,
    as_name: &str,
    timeout: Duration,
) -> Result<Vec<MemberRecord>, NetError> {
    query_status_in(addr, cert_dir, as_name, "strata", timeout).await
}

/// As [`query_status`], for a cluster of another name.
pub async fn query_status_in(
    addr: &str,
    cert_dir: Option<&Path>,
    as_name: &str,
    cluster: &str,
    timeout: Duration,
) -> Result<Vec<MemberRecord>, NetError> {
    let client = OperatorClient::connect(addr, cert_dir, as_name, cluster, timeout).await?;
    let r = client.members().await;
    client.close().await;
    r
}
