//! Mutual TLS refusals and malformed frames from an authenticated peer.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use strata_collective::{Group, GroupOptions, ReduceOp};
use strata_net::tls::{self, Identity, Role};
use strata_net::{Node, NodeConfig};
use strata_wire::{
    Body, ChunkTag, Event, FrameDecoder, Header, Limits, MemberRecord, MemberState, NodeInfo, PROTOCOL_VERSION,
    frame_header_bytes,
};

use super::helpers::{certs, cluster, cluster_with, config};

fn client(
    identity: Option<&Identity>,
    transport: Option<quinn::TransportConfig>,
) -> (quinn::Endpoint, quinn::ClientConfig) {
    let crypto = tls::client_crypto(identity).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    if let Some(t) = transport {
        cfg.transport_config(Arc::new(t));
    }
    (quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(), cfg)
}

/// Connects with `identity` and sends `first` as the first frame; returns the connection
/// and the node's answer, or the error text (a refusal's own message when the node sent
/// one).
async fn first_frame(
    addr: std::net::SocketAddr,
    identity: Option<&Identity>,
    transport: Option<quinn::TransportConfig>,
    first: Body,
) -> Result<(quinn::Connection, Body), String> {
    let (ep, cfg) = client(identity, transport);
    let fut = async {
        let conn = ep
            .connect_with(cfg, addr, tls::CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&frame_header_bytes(&Header::new(first, 0)).unwrap()).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let answer = recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())?;
        let mut dec = FrameDecoder::new(Limits::default());
        let mut rest: &[u8] = &answer;
        loop {
            let (used, ev) = dec.feed(rest).map_err(|e| format!("undecodable answer: {e}"))?;
            rest = &rest[used..];
            match ev {
                Some(Event::Header(h)) => {
                    return match h.body {
                        Body::Error { message } => Err(message),
                        other => Ok((conn, other)),
                    };
                }
                _ if used == 0 => return Err("empty answer".to_string()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.map_err(|_| "timed out".to_string())?
}

fn hello(name: &str) -> Body {
    let info = NodeInfo { name: name.into(), addr: "127.0.0.1:1".into(), ..Default::default() };
    Body::Hello { info, cluster: "strata".into(), incarnation: 1 }
}

/// Connects and exchanges a hello as node `name`.
async fn try_join(
    addr: std::net::SocketAddr,
    identity: Option<&Identity>,
    name: &str,
) -> Result<quinn::Connection, String> {
    first_frame(addr, identity, None, hello(name)).await.map(|(c, _)| c)
}

fn self_signed(dir: &std::path::Path, name: &str) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let id = format!("urn:strata:node:{name}");
    params.subject_alt_names.push(rcgen::SanType::URI(id.try_into().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

fn node_id(dir: &std::path::Path, name: &str) -> Identity {
    tls::load_identity(dir, name, Role::Node).unwrap()
}

#[actix_rt::test]
async fn peers_without_a_certificate_from_the_cluster_ca_are_refused() {
    crate::common::init_logging();
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let lone = tempfile::tempdir().unwrap();
    certs(ours.path(), &["node-0", "node-1"]);
    certs(theirs.path(), &["node-1"]);
    self_signed(lone.path(), "node-2");
    let node = Node::start(config("node-0", ours.path())).await.unwrap();
    let addr = node.local_addr();

    let good = node_id(ours.path(), "node-1");
    let conn = try_join(addr, Some(&good), "node-1").await.expect("a certificate from the cluster CA is accepted");
    conn.close(0u32.into(), b"");

    // The refusals: another CA, a self-signed certificate, no certificate.
    let other_ca = node_id(theirs.path(), "node-1");
    let e = try_join(addr, Some(&other_ca), "node-1").await.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "other CA: {e}");
    let own = node_id(lone.path(), "node-2");
    let e = try_join(addr, Some(&own), "node-2").await.unwrap_err();
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "self-signed: {e}");
    let e = try_join(addr, None, "node-3").await.unwrap_err();
    assert!(e.contains("connection lost") || e.contains("certificate"), "no certificate: {e}");

    // A valid certificate for one name cannot claim another: the node says so.
    let e = try_join(addr, Some(&good), "node-7").await.unwrap_err();
    assert_eq!(e, "peer claims to be \"node-7\", but its certificate is issued to \"node-1\"");

    // Whole nodes with foreign certificates never become members, in either direction.
    let intruder =
        Node::start(NodeConfig { seed: Some(addr.to_string()), ..config("node-1", theirs.path()) }).await.unwrap();
    let probe =
        Node::start(NodeConfig { peers: vec![intruder.local_addr().to_string()], ..config("node-1", ours.path()) })
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let names = |v: Vec<NodeInfo>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
    assert_eq!(names(node.alive().await.unwrap()), ["node-0"]);
    assert_eq!(names(intruder.alive().await.unwrap()), ["node-1"]);
    assert_eq!(names(probe.alive().await.unwrap()), ["node-1"]);
    // An insecure node cannot join a secure one either.
    let loose = Node::start(NodeConfig {
        seed: Some(addr.to_string()),
        insecure_dev: true,
        cert_dir: None,
        ..config("node-5", ours.path())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(names(node.alive().await.unwrap()), ["node-0"]);
    for n in [node, intruder, probe, loose] {
        n.shutdown().await;
    }
}

/// One name per certificate, and one role: node certificates join as their one node,
/// operator certificates only ever act as tools bound to their name.
#[actix_rt::test]
async fn certificates_allow_one_name_and_one_role() {
    crate::common::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let addr = nodes[0].local_addr();
    tls::issue_operator(dir.path(), "ops").unwrap();
    let node1 = node_id(dir.path(), "node-1");
    let admin = tls::load_identity(dir.path(), "admin", Role::Operator).unwrap();

    // The name every certificate used to share is nobody's.
    let e = try_join(addr, Some(&node1), tls::CLUSTER_SERVER_NAME).await.unwrap_err();
    assert_eq!(e, "peer claims to be \"strata-node\", but its certificate is issued to \"node-1\"");
    // An operator certificate never joins as a member, under its name or any other.
    for name in ["admin", "node-9"] {
        let e = try_join(addr, Some(&admin), name).await.unwrap_err();
        assert_eq!(e, "\"admin\" holds an operator certificate: operators never join as members", "as {name}");
    }
    // A node certificate is not an operator's.
    let as_operator = |name: &str| Body::OperatorHello { name: name.into(), cluster: "strata".into() };
    let e = first_frame(addr, Some(&node1), None, as_operator("node-1")).await.unwrap_err();
    assert_eq!(e, "\"node-1\" holds a node certificate, which is not an operator's");
    // An operator is bound to its certificate's name.
    let e = first_frame(addr, Some(&admin), None, as_operator("ops")).await.unwrap_err();
    assert_eq!(e, "operator claims to be \"ops\", but its certificate is issued to \"admin\"");
    // A first frame that is neither hello is refused, not served as a tool.
    let e = first_frame(addr, Some(&admin), None, Body::StatusRequest).await.unwrap_err();
    assert_eq!(e, "the first frame must be a hello or an operator hello, not status request");
    let (_, answer) = first_frame(addr, Some(&admin), None, as_operator("admin")).await.unwrap();
    assert!(matches!(answer, Body::Hello { ref info, .. } if info.name == "node-0"), "{answer:?}");

    // Tools through the public API: the operator may query; a node certificate may not.
    let status =
        strata_net::query_status(&addr.to_string(), Some(dir.path()), "admin", Duration::from_secs(5)).await.unwrap();
    let listed: Vec<&str> = status.iter().map(|r| r.info.name.as_str()).collect();
    assert_eq!(listed, ["node-0", "node-1"]);
    let e = strata_net::query_status(&addr.to_string(), Some(dir.path()), "node-1", Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a node certificate; this needs an operator certificate"), "{e}");
    // And a node refuses to start with an operator's certificate.
    let e = Node::start(config("admin", dir.path())).await.err().expect("an operator cannot start a node").to_string();
    assert!(e.contains("is an operator certificate; this needs a node certificate"), "{e}");
    // Operators never show up as members.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in &nodes {
        let names: Vec<String> = n.members().await.unwrap().into_iter().map(|r| r.info.name).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        n.shutdown().await;
    }
}

/// A frame writer for a raw connection, as a misbehaving member would use it.
async fn send_one_way(conn: &quinn::Connection, body: Body, payload: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&frame_header_bytes(&Header::new(body, payload.len() as u64)).unwrap()).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.finish().unwrap();
}

fn heartbeat(name: &str, seq: u64, members: Vec<MemberRecord>) -> Body {
    let info = NodeInfo { name: name.into(), addr: "127.0.0.1:1".into(), ..Default::default() };
    Body::Heartbeat { seq, info, members }
}

/// A member that lies about others (that they left, failed, or came back) changes
/// nothing about them: only a member speaks for itself.
#[actix_rt::test]
async fn no_member_speaks_for_another() {
    crate::common::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    tls::issue_node(dir.path(), "mallory", &[]).unwrap();
    let mallory = node_id(dir.path(), "mallory");
    let conn = try_join(nodes[0].local_addr(), Some(&mallory), "mallory").await.unwrap();
    let victim = nodes[1].members().await.unwrap()[0].clone();
    assert_eq!(victim.info.name, "node-1");
    let lie = |state: MemberState| MemberRecord { info: victim.info.clone(), state, incarnation: u64::MAX };
    let ghost = MemberRecord {
        info: NodeInfo { name: "ghost".into(), addr: "127.0.0.1:9".into(), ..Default::default() },
        state: MemberState::Alive,
        incarnation: 1,
    };
    for seq in 0..10 {
        let members = vec![lie(MemberState::Left), lie(MemberState::Failed), ghost.clone()];
        send_one_way(&conn, heartbeat("mallory", seq, members), &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A forged Leave on a stream of mallory's own connection makes only mallory leave.
    send_one_way(&conn, Body::Leave, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = nodes[0].members().await.unwrap();
    let state = |n: &str| records.iter().find(|r| r.info.name == n).map(|r| (r.state, r.incarnation));
    assert_eq!(state("node-1"), Some((MemberState::Alive, victim.incarnation)));
    assert_eq!(state("ghost"), None, "gossip must not add members");
    assert_eq!(state("mallory").map(|s| s.0), Some(MemberState::Left));
    // node-1 still takes part in collectives with node-0.
    let opts = GroupOptions { timeout: Duration::from_secs(5), ..Default::default() };
    let members = vec!["node-0".to_string(), "node-1".to_string()];
    let gs: Vec<_> = nodes.iter().map(|n| Group::new(n.clone(), members.clone(), opts.clone()).unwrap()).collect();
    let (a, b) =
        tokio::join!(gs[0].all_reduce(vec![1.0; 100], ReduceOp::Sum), gs[1].all_reduce(vec![2.0; 100], ReduceOp::Sum));
    assert_eq!((a.unwrap(), b.unwrap()), (vec![3.0; 100], vec![3.0; 100]));
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A peer that declares huge frames, or floods data for operations nobody opened, is
/// disconnected once over its budget; the node keeps serving everyone else.
#[actix_rt::test]
async fn a_flooding_peer_is_cut_off_at_its_budget() {
    crate::common::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let budget = 48u64 << 20;
    let nodes =
        cluster_with(dir.path(), 2, |c| NodeConfig { frame_bytes_max: 32 << 20, peer_buffer_bytes_max: budget, ..c })
            .await;
    tls::issue_node(dir.path(), "mallory", &[]).unwrap();
    let mallory = node_id(dir.path(), "mallory");

    // Many streams each declaring a large payload reserve nothing up front beyond a
    // bounded prefix; the data that does arrive is charged, and too much of it ends the
    // connection.
    let conn = try_join(nodes[0].local_addr(), Some(&mallory), "mallory").await.unwrap();
    let declared = 32u64 << 20;
    let chunk = |op: u64| Body::Chunk {
        op,
        tag: ChunkTag { step: 0, segment: 0 },
        dtype: strata_tensor::DType::F32,
        len: (declared / 4) as u32,
    };
    let data = vec![0u8; 6 << 20];
    let mut streams = Vec::new();
    for op in 0..12u64 {
        let Ok(mut s) = conn.open_uni().await else { break };
        let head = frame_header_bytes(&Header::new(chunk(op), declared)).unwrap();
        if s.write_all(&head).await.is_err() || s.write_all(&data).await.is_err() {
            break;
        }
        streams.push(s);
    }
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("mallory is cut off");
    assert!(reason.to_string().contains("exceeded its memory budget"), "{reason}");
    drop(streams);

    // Small chunks for operations that nobody opens: capped per peer.
    let conn = try_join(nodes[0].local_addr(), Some(&mallory), "mallory").await.unwrap();
    let small = |op: u64| Body::Chunk {
        op: 1_000_000 + op,
        tag: ChunkTag { step: 0, segment: 0 },
        dtype: strata_tensor::DType::F32,
        len: 1,
    };
    for op in 0..200u64 {
        let Ok(mut s) = conn.open_uni().await else { break };
        let head = frame_header_bytes(&Header::new(small(op), 4)).unwrap();
        if s.write_all(&head).await.is_err() || s.write_all(&[0; 4]).await.is_err() {
            break;
        }
        let _ = s.finish();
    }
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("mallory is cut off");
    assert!(reason.to_string().contains("operations not opened here"), "{reason}");

    // Everyone else is served: node-1's link holds nothing, and collectives run.
    let link = nodes[0].peer("node-1").await.unwrap();
    let opts = GroupOptions { timeout: Duration::from_secs(5), ..Default::default() };
    let members = vec!["node-0".to_string(), "node-1".to_string()];
    let gs: Vec<_> = nodes.iter().map(|n| Group::new(n.clone(), members.clone(), opts.clone()).unwrap()).collect();
    let big = 3 << 20;
    let (a, b) =
        tokio::join!(gs[0].all_reduce(vec![1.0; big], ReduceOp::Sum), gs[1].all_reduce(vec![2.0; big], ReduceOp::Sum));
    assert_eq!((a.unwrap(), b.unwrap()), (vec![3.0; big], vec![3.0; big]));
    let (now, peak) = link.buffered_bytes();
    assert!(peak > 0 && peak <= budget, "node-1's peak {peak} within the budget {budget}");
    // Only a heartbeat being read at this instant may still be held.
    assert!(now < 64 << 10, "node-1's data was consumed, {now} bytes still held");
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A peer that grants no stream credit makes sends fail within the request timeout, and
/// heartbeats do not pile up behind it.
#[actix_rt::test]
async fn sends_to_a_peer_that_grants_no_credit_are_bounded() {
    crate::common::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes =
        cluster_with(dir.path(), 1, |c| NodeConfig { request_timeout_ms: 400, failure_timeout_ms: 5000, ..c }).await;
    tls::issue_node(dir.path(), "mallory", &[]).unwrap();
    let mallory = node_id(dir.path(), "mallory");
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into());
    let (conn, _) = first_frame(nodes[0].local_addr(), Some(&mallory), Some(t), hello("mallory")).await.unwrap();
    let keep_alive = {
        let conn = conn.clone();
        tokio::spawn(async move {
            for seq in 0..40 {
                send_one_way(&conn, heartbeat("mallory", seq, vec![]), &[]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let link = nodes[0].peer("mallory").await.unwrap();
    // 15 heartbeat ticks have passed; at most one heartbeat waits for credit.
    assert!(link.sends_in_flight() <= 1, "{} sends in flight", link.sends_in_flight());
    let e = link.send(Body::Leave, &[]).await.unwrap_err();
    assert!(matches!(e, strata_net::NetError::Timeout { millis: 400, .. }), "{e}");
    keep_alive.abort();
    nodes[0].shutdown().await;
}

/// Opens a one-way stream, writes `bytes` and waits (without finishing) for the node to
/// reset it; returns the reset code.
async fn refused(conn: &quinn::Connection, bytes: &[u8]) -> Option<u32> {
    let mut s = conn.open_uni().await.unwrap();
    let _ = s.write_all(bytes).await;
    let stopped = tokio::time::timeout(Duration::from_secs(3), s.stopped()).await;
    match stopped {
        Ok(Ok(Some(code))) => Some(code.into_inner() as u32),
        _ => None,
    }
}

#[actix_rt::test]
async fn malformed_frames_reset_their_stream_and_the_node_keeps_serving() {
    crate::common::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    tls::issue_node(dir.path(), "mallory", &[]).unwrap();
    let mallory = node_id(dir.path(), "mallory");
    let conn = try_join(nodes[0].local_addr(), Some(&mallory), "mallory").await.unwrap();

    let mut garbage = vec![0xff; 64];
    garbage[..4].copy_from_slice(&12u32.to_le_bytes());
    let mut huge_header = (u32::MAX).to_le_bytes().to_vec();
    huge_header.extend_from_slice(&[0; 64]);
    let mut old = Header::new(Body::Leave, 0);
    old.version = PROTOCOL_VERSION + 1;
    let oversized = Header::new(
        Body::Chunk {
            op: 1,
            tag: ChunkTag { step: 0, segment: 0 },
            dtype: strata_tensor::DType::F32,
            len: u32::MAX / 4,
        },
        u64::from(u32::MAX / 4) * 4,
    );
    let not_one_way = Header::new(Body::StatusRequest, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", garbage),
        ("header over the limit", huge_header),
        ("wrong version", frame_header_bytes(&old).unwrap()),
        ("payload over the limit", frame_header_bytes(&oversized).unwrap()),
        ("request on a one-way stream", frame_header_bytes(&not_one_way).unwrap()),
    ];
    for (what, bytes) in cases {
        let code = refused(&conn, &bytes).await;
        assert_eq!(code, Some(1), "{what}: the stream should be reset with code 1");
    }
    // A truncated frame: the stream ends inside the payload.
    let mut s = conn.open_uni().await.unwrap();
    let chunk = Header::new(
        Body::Chunk { op: 9, tag: ChunkTag { step: 0, segment: 0 }, dtype: strata_tensor::DType::F32, len: 100 },
        400,
    );
    s.write_all(&frame_header_bytes(&chunk).unwrap()).await.unwrap();
    s.write_all(&[0; 10]).await.unwrap();
    s.finish().unwrap();

    // The connection survives, and the node keeps serving its peers and tools.
    assert!(conn.close_reason().is_none(), "the connection should stay open: {:?}", conn.close_reason());
    let opts = GroupOptions { timeout: Duration::from_secs(5), ..Default::default() };
    let members = vec!["node-0".to_string(), "node-1".to_string()];
    let gs: Vec<_> = nodes.iter().map(|n| Group::new(n.clone(), members.clone(), opts.clone()).unwrap()).collect();
    let (a, b) = tokio::join!(
        gs[0].all_reduce(vec![1.0; 1000], ReduceOp::Sum),
        gs[1].all_reduce(vec![2.0; 1000], ReduceOp::Sum)
    );
    assert_eq!(a.unwrap(), vec![3.0; 1000]);
    assert_eq!(b.unwrap(), vec![3.0; 1000]);
    let status =
        strata_net::query_status(&nodes[0].local_addr().to_string(), Some(dir.path()), "admin", Duration::from_secs(5))
            .await
            .unwrap();
    assert!(status.iter().any(|r| r.info.name == "node-1"));
    conn.close(0u32.into(), b"");
}
