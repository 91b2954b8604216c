//! Mutual TLS refusals and malformed frames from an authenticated peer.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use strata_collective::{Group, GroupOptions, ReduceOp};
use strata_net::tls::{self, Identity};
use strata_net::{Node, NodeConfig};
use strata_wire::{Body, ChunkTag, Header, NodeInfo, PROTOCOL_VERSION, frame_header_bytes};

use super::helpers::{certs, cluster, config};

fn client(identity: Option<&Identity>) -> (quinn::Endpoint, quinn::ClientConfig) {
    let crypto = tls::client_crypto(identity).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    (quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(), cfg)
}

/// Connects and exchanges a hello; returns the error text if anything fails.
async fn try_join(
    addr: std::net::SocketAddr,
    identity: Option<&Identity>,
    name: &str,
) -> Result<quinn::Connection, String> {
    let (ep, cfg) = client(identity);
    let fut = async {
        let conn = ep
            .connect_with(cfg, addr, tls::CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let info = NodeInfo { name: name.into(), addr: "127.0.0.1:1".into(), ..Default::default() };
        let hello = Header::new(Body::Hello { info, cluster: "strata".into(), incarnation: 1 }, 0);
        send.write_all(&frame_header_bytes(&hello).unwrap()).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let answer = recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())?;
        if answer.is_empty() {
            return Err("empty answer".to_string());
        }
        Ok(conn)
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.map_err(|_| "timed out".to_string())?
}

fn self_signed(dir: &std::path::Path, name: &str) {
    let key = rcgen_key();
    let params = rcgen_params(name);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

fn rcgen_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate().unwrap()
}

fn rcgen_params(name: &str) -> rcgen::CertificateParams {
    rcgen::CertificateParams::new(vec![name.to_string(), tls::CLUSTER_SERVER_NAME.to_string()]).unwrap()
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

    let good = tls::load_identity(ours.path(), "node-1").unwrap();
    let conn = try_join(addr, Some(&good), "node-1").await.expect("a certificate from the cluster CA is accepted");
    conn.close(0u32.into(), b"");

    // The refusals: another CA, a self-signed certificate, no certificate.
    let other_ca = tls::load_identity(theirs.path(), "node-1").unwrap();
    let e = try_join(addr, Some(&other_ca), "node-1").await.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "other CA: {e}");
    let own = tls::load_identity(lone.path(), "node-2").unwrap();
    let e = try_join(addr, Some(&own), "node-2").await.unwrap_err();
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "self-signed: {e}");
    let e = try_join(addr, None, "node-3").await.unwrap_err();
    assert!(e.contains("connection lost") || e.contains("certificate"), "no certificate: {e}");

    // A valid certificate for one name cannot claim another.
    assert!(try_join(addr, Some(&good), "node-7").await.is_err(), "a certificate for node-1 must not pass as node-7");

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
    let mallory = tls::load_identity(dir.path(), "mallory").unwrap();
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
