//! Starting in-process clusters on loopback.

use std::path::Path;
use std::time::Duration;

use strata_collective::{Group, GroupOptions};
use strata_net::{Node, NodeConfig, NodeHandle, tls};

/// A certificate directory with a CA, node certificates for `names` and the operator
/// certificate "admin".
pub fn certs(dir: &Path, names: &[&str]) {
    tls::create_ca(dir, "test").unwrap();
    for n in names {
        tls::issue_node(dir, n, &["127.0.0.1".into()]).unwrap();
    }
    tls::issue_operator(dir, "admin").unwrap();
}

/// Fast failure detection for tests.
pub fn config(name: &str, dir: &Path) -> NodeConfig {
    NodeConfig {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        cert_dir: Some(dir.to_path_buf()),
        heartbeat_ms: 100,
        failure_timeout_ms: 1000,
        connect_timeout_ms: 2000,
        request_timeout_ms: 5000,
        ..Default::default()
    }
}

/// Starts `n` nodes named `node-0..`, all joining through node-0, and waits until every
/// node sees all of them.
pub async fn cluster(dir: &Path, n: usize) -> Vec<NodeHandle> {
    cluster_with(dir, n, |c| c).await
}

/// As [`cluster`], with every node's configuration passed through `adjust`.
pub async fn cluster_with(dir: &Path, n: usize, adjust: impl Fn(NodeConfig) -> NodeConfig) -> Vec<NodeHandle> {
    crate::common::init_logging();
    let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
    certs(dir, &names.iter().map(String::as_str).collect::<Vec<_>>());
    let first = Node::start(adjust(config(&names[0], dir))).await.unwrap();
    let seed = first.local_addr().to_string();
    let mut nodes = vec![first];
    for name in &names[1..] {
        let c = adjust(NodeConfig { seed: Some(seed.clone()), ..config(name, dir) });
        nodes.push(Node::start(c).await.unwrap());
    }
    for node in &nodes {
        node.wait_for_members(n, Duration::from_secs(10)).await.unwrap();
    }
    nodes
}

/// The group of all nodes, formed on each node.
pub async fn groups(nodes: &[NodeHandle], options: GroupOptions) -> Vec<Group> {
    let mut gs = Vec::new();
    for node in nodes {
        gs.push(Group::form(node.clone(), nodes.len(), Duration::from_secs(10), options.clone()).await.unwrap());
    }
    gs
}
