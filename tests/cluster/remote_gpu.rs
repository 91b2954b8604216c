//! Remote GPU actors: a node's GPU used from another node and from an operator, typed
//! errors that name the node, leases that free what vanished callers held, and copies
//! that go from node to node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_cluster::remote_gpu::protocol::{self, Envelope, Fault, Owner, OwnerRole, Reply, Request, WireGpuError};
use strata_cluster::remote_gpu::{GpuService, GpuServiceOptions, RemoteGpu, RemoteGpuError};
use strata_gpu::{GpuError, GpuHandle, GpuOptions, Op, TensorId};
use strata_net::{NodeHandle, OperatorClient};
use strata_tensor::{DType, HostTensor, Shape, TensorError, cpu};

use crate::common;
use crate::net::helpers::cluster;

const LIMIT: Duration = Duration::from_secs(10);

/// A GPU actor and its service on every node.
async fn serve(nodes: &[NodeHandle], options: GpuServiceOptions) -> (Vec<GpuHandle>, Vec<Arc<GpuService>>) {
    let (mut gpus, mut services) = (Vec::new(), Vec::new());
    for node in nodes {
        let gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
        services.push(GpuService::register(node, gpu.clone(), options.clone()).await.unwrap());
        gpus.push(gpu);
    }
    (gpus, services)
}

/// Waits (at most 10 s) until `done` holds, then returns; panics naming `what` otherwise.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < LIMIT, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(nodes: &[NodeHandle], gpus: &[GpuHandle]) {
    for n in nodes {
        n.shutdown().await;
    }
    for g in gpus {
        g.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_remote_gpu_is_used_like_the_local_one_and_fails_like_it() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let (gpus, services) = serve(&nodes, GpuServiceOptions::default()).await;
    let node1 = "node-1".to_string();

    // A matmul on node-1's GPU, driven from node-0, equals the CPU reference.
    let remote = RemoteGpu::on_node(&nodes[0], "node-1").await.unwrap();
    assert_eq!(remote.node(), "node-1");
    let (ha, hb) = (HostTensor::random([5, 7], 1), HostTensor::random([7, 3], 2));
    let a = remote.upload(ha.clone()).await.unwrap();
    let b = remote.upload(hb.clone()).await.unwrap();
    let c = remote.new_tensor();
    remote.run(vec![Op::MatMul { a: a.id(), b: b.id(), trans_a: false, trans_b: false, out: c.id() }]).await.unwrap();
    let got = remote.download::<f32>(&c).await.unwrap();
    common::assert_close("remote matmul", &got, &cpu::matmul(&ha, &hb, false, false).unwrap(), 1e-5, 1e-5);
    assert_eq!(services[1].stats().tensors, 3);

    // A shape error on node-1 reaches node-0 as the error the local actor gives, naming the node.
    let e = remote
        .run(vec![Op::MatMul { a: a.id(), b: a.id(), trans_a: false, trans_b: false, out: remote.new_id() }])
        .await
        .unwrap_err();
    let la = gpus[1].upload(ha.clone()).await.unwrap();
    let local =
        gpus[1].run(vec![Op::MatMul { a: la, b: la, trans_a: false, trans_b: false, out: gpus[1].new_id() }]).await;
    let local = local.unwrap_err();
    gpus[1].free(vec![la]).await.unwrap();
    assert!(matches!(local, GpuError::Tensor(TensorError::Shape { op: "matmul", .. })), "{local:?}");
    assert_eq!(e, RemoteGpuError::Gpu { node: node1.clone(), error: local.clone() });
    assert_eq!(e.to_string(), format!("gpu on node-1: {local}"));
    assert_eq!(services[1].stats().tensors, 3, "a failed program leaves no tensor behind");

    // An unknown node.
    let e = RemoteGpu::on_node(&nodes[0], "node-9").await.unwrap_err();
    assert_eq!(e.to_string(), r#"no member named node-9 (members: ["node-0", "node-1"])"#);

    // A handle used after it was freed: typed on this side, and the id names nothing there.
    let b2 = b.clone();
    remote.free(&b).await.unwrap();
    assert_eq!(services[1].stats().tensors, 2);
    let e = remote.download::<f32>(&b2).await.unwrap_err();
    assert_eq!(e, RemoteGpuError::Freed { op: "download", node: node1.clone(), id: b.id() });
    assert_eq!(e.to_string(), format!("download: tensor {} on node-1 was freed", b.id()));
    let e = remote
        .run(vec![Op::MatMul { a: a.id(), b: b.id(), trans_a: false, trans_b: false, out: remote.new_id() }])
        .await
        .unwrap_err();
    assert_eq!(
        e,
        RemoteGpuError::Gpu { node: node1.clone(), error: GpuError::UnknownTensor { op: "matmul", id: b.id() } }
    );

    // Another client (another session, here of the same member) cannot use this one's tensors.
    let other = RemoteGpu::on_node(&nodes[0], "node-1").await.unwrap();
    let e = other.download::<f32>(&a).await.unwrap_err();
    assert!(matches!(e, RemoteGpuError::ForeignTensor { op: "download", .. }), "{e:?}");
    let e = other.run(vec![Op::Relu { x: a.id(), out: other.new_id() }]).await.unwrap_err();
    assert_eq!(
        e,
        RemoteGpuError::Gpu { node: node1.clone(), error: GpuError::UnknownTensor { op: "relu", id: a.id() } }
    );

    // Dropping handles frees their tensors; dropping a client ends its session.
    drop((b, b2, c));
    wait_until("node-1 holds only a", || services[1].stats().tensors == 1).await;
    drop((a, remote, other));
    wait_until("node-1 holds no session", || (services[1].stats().sessions, services[1].stats().tensors) == (0, 0))
        .await;
    assert_eq!(services[1].stats().expired_sessions, 0, "sessions were closed, not left to expire");

    // A handle whose node left.
    let remote = RemoteGpu::on_node(&nodes[0], "node-1").await.unwrap();
    let t = remote.upload(HostTensor::random([4], 3)).await.unwrap();
    nodes[1].shutdown().await;
    let e = remote.download::<f32>(&t).await.unwrap_err();
    assert_eq!(e, RemoteGpuError::NodeLeft { node: node1.clone() });
    assert_eq!(e.to_string(), "node-1 has left the cluster or is unreachable");
    assert_eq!(RemoteGpu::on_node(&nodes[0], "node-1").await.unwrap_err(), e);
    // The stopped node's service freed what its callers held.
    wait_until("node-1's service freed its tensors", || services[1].stats().tensors == 0).await;
    stop(&nodes, &gpus).await;
}

/// One raw call to node-1's service as `session`.
fn envelope(session: u64, request: Request) -> Vec<u8> {
    protocol::encode(&Envelope { session, deadline_ms: LIMIT.as_millis() as u64, request })
}

fn answer(r: strata_net::ServiceResponse) -> Result<Reply, Fault> {
    protocol::decode(&r.data).unwrap()
}

#[actix_rt::test]
async fn leases_free_what_vanished_callers_held() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let lease = Duration::from_secs(2);
    let (gpus, services) = serve(&nodes, GpuServiceOptions { lease, ..Default::default() }).await;
    let stats = || services[1].stats();
    let in_use = gpus[1].stats().await.unwrap().pool.in_use_bytes;
    let addr = nodes[1].local_addr().to_string();

    // An operator speaks the protocol directly, uploads a tensor, and then vanishes
    // without closing its session.
    let raw = OperatorClient::connect(&addr, Some(dir.path()), "admin", "strata", LIMIT).await.unwrap();
    let call = |request: Request, payload: Vec<f32>| {
        let method = request.method();
        let args = envelope(7, request);
        let raw = &raw;
        async move { answer(raw.call(protocol::SERVICE, method, args, &payload, LIMIT).await.unwrap()) }
    };
    assert!(matches!(call(Request::Open, vec![]).await, Ok(Reply::Opened { lease_ms: 2000, .. })));
    let upload = Request::Upload { id: TensorId(1), shape: Shape::new([1024]), dtype: DType::F32 };
    assert_eq!(call(upload, vec![0.5; 1024]).await, Ok(Reply::Done));
    assert_eq!((stats().sessions, stats().tensors), (1, 1));
    assert!(gpus[1].stats().await.unwrap().pool.in_use_bytes > in_use);

    // Another caller naming the same session and id reaches nothing: sessions belong to
    // the verified caller.
    let member = |request: Request| {
        let method = request.method();
        let args = envelope(7, request);
        let node = nodes[0].clone();
        async move { answer(node.call("node-1", protocol::SERVICE, method, args, &[], LIMIT).await.unwrap()) }
    };
    assert_eq!(member(Request::Download { id: TensorId(1), dtype: DType::F32 }).await, Err(Fault::UnknownSession));
    assert!(matches!(member(Request::Open).await, Ok(Reply::Opened { .. })));
    let e = member(Request::Download { id: TensorId(1), dtype: DType::F32 }).await.unwrap_err();
    assert_eq!(e, Fault::Gpu(WireGpuError::from(&GpuError::UnknownTensor { op: "download", id: TensorId(1) })));
    assert_eq!(member(Request::Close).await, Ok(Reply::Done));
    // Operators may not store tensors in someone else's name.
    let adopt = Request::Adopt {
        owner: Owner { name: "node-0".into(), role: OwnerRole::Node },
        id: TensorId(2),
        shape: Shape::new([1]),
        dtype: DType::F32,
    };
    let e = call(adopt, vec![1.0]).await.unwrap_err();
    assert_eq!(e.to_string(), "forbidden: operator admin may not store tensors for others (adopt is for members)");

    // A client that lives keeps its tensors past several leases (its task renews them);
    // the raw operator's session ends with its lease.
    let live = RemoteGpu::via_operator(Arc::new(
        OperatorClient::connect(&addr, Some(dir.path()), "admin", "strata", LIMIT).await.unwrap(),
    ))
    .await
    .unwrap();
    let kept = live.upload(HostTensor::<u32>::new([3], vec![7, 8, 9]).unwrap()).await.unwrap();
    wait_until("the raw session expired", || stats().expired_sessions == 1).await;
    assert_eq!((stats().expired_tensors, stats().sessions, stats().tensors), (1, 1, 1));
    assert_eq!(call(Request::Renew, vec![]).await, Err(Fault::LeaseExpired));
    tokio::time::sleep(lease * 2).await;
    assert_eq!(live.download::<u32>(&kept).await.unwrap().data(), &[7, 8, 9]);

    // A member that crashes leaks nothing either.
    let from0 = RemoteGpu::on_node(&nodes[0], "node-1").await.unwrap();
    let _held = from0.upload(HostTensor::random([256], 4)).await.unwrap();
    assert_eq!(stats().tensors, 2);
    nodes[0].abort().await;
    wait_until("the crashed member's session ended", || stats().expired_sessions == 2).await;
    assert_eq!(stats().tensors, 1);

    drop((kept, live));
    wait_until("the live client's session closed", || stats().sessions == 0).await;
    assert_eq!(gpus[1].stats().await.unwrap().pool.in_use_bytes, in_use, "every tensor was freed");
    raw.close().await;
    stop(&nodes[1..], &gpus).await;
}

#[actix_rt::test]
async fn copies_go_from_node_to_node_and_operators_use_remote_gpus() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let (gpus, services) = serve(&nodes, GpuServiceOptions::default()).await;

    // node-0 copies a tensor from node-1 to node-2: the data goes from node to node.
    let g1 = RemoteGpu::on_node(&nodes[0], "node-1").await.unwrap();
    let g2 = RemoteGpu::on_node(&nodes[0], "node-2").await.unwrap();
    let host = HostTensor::random([6, 5], 3);
    let t1 = g1.upload(host.clone()).await.unwrap();
    let t2 = g1.copy_to(&t1, &g2).await.unwrap();
    assert_eq!(t2.node(), "node-2");
    let (s1, s2) = (services[1].stats(), services[2].stats());
    assert_eq!((s1.bytes_from_callers, s1.bytes_to_peers, s1.bytes_to_callers), (120, 120, 0));
    assert_eq!((s2.bytes_from_peers, s2.bytes_from_callers), (120, 0));
    // The copy is node-0's on node-2.
    assert_eq!(g2.download::<f32>(&t2).await.unwrap(), host);
    let doubled = g2.new_tensor();
    g2.run(vec![Op::Scale { x: t2.id(), alpha: 2.0, out: doubled.id() }]).await.unwrap();
    let want: Vec<f32> = host.data().iter().map(|v| v * 2.0).collect();
    assert_eq!(g2.download::<f32>(&doubled).await.unwrap().data(), &want[..]);
    // A handle of another client is refused; so is a destination acting for another caller.
    let e = g2.copy_to(&t1, &g1).await.unwrap_err();
    assert!(matches!(e, RemoteGpuError::ForeignTensor { op: "copy_to", .. }), "{e:?}");
    let from2 = RemoteGpu::on_node(&nodes[2], "node-2").await.unwrap();
    let e = g1.copy_to(&t1, &from2).await.unwrap_err();
    assert_eq!(e.to_string(), "copy_to: the destination client on node-2 acts for another caller than this one");

    // An operator uses node-1's and node-2's GPUs through its connections to them.
    let connect = |i: usize| {
        let addr = nodes[i].local_addr().to_string();
        let dir = dir.path().to_path_buf();
        async move {
            let c = OperatorClient::connect(&addr, Some(&dir), "admin", "strata", LIMIT).await.unwrap();
            RemoteGpu::via_operator(Arc::new(c)).await.unwrap()
        }
    };
    let (o1, o2) = (connect(1).await, connect(2).await);
    let x = o1.upload(HostTensor::random([4, 4], 5)).await.unwrap();
    let y = o1.new_tensor();
    o1.run(vec![Op::Relu { x: x.id(), out: y.id() }]).await.unwrap();
    let want = cpu::relu(&o1.download::<f32>(&x).await.unwrap());
    assert_eq!(o1.download::<f32>(&y).await.unwrap(), want);
    let labels = o1.upload(HostTensor::<u32>::new([3], vec![1, 0, 2]).unwrap()).await.unwrap();
    let copied = o1.copy_to(&labels, &o2).await.unwrap();
    assert_eq!(o2.download::<u32>(&copied).await.unwrap().data(), &[1, 0, 2]);
    // The copy belongs to the operator on node-2, not to node-0's client there.
    let e = g2.run(vec![Op::Copy { src: copied.id(), out: g2.new_id() }]).await.unwrap_err();
    assert_eq!(
        e,
        RemoteGpuError::Gpu { node: "node-2".into(), error: GpuError::UnknownTensor { op: "copy", id: copied.id() } }
    );
    // A wrong shape from an operator is the same typed error.
    let short = o1.upload(HostTensor::random([2], 6)).await.unwrap();
    let e = o1.run(vec![Op::Add { a: x.id(), b: short.id(), out: o1.new_id() }]).await.unwrap_err();
    assert!(
        matches!(&e, RemoteGpuError::Gpu { node, error: GpuError::Tensor(TensorError::Shape { op: "add", .. }) } if node == "node-1"),
        "{e:?}"
    );

    drop((t1, t2, doubled, x, y, labels, copied, short));
    drop((g1, g2, from2, o1, o2));
    for s in &services {
        wait_until("every session closed", || s.stats().sessions == 0).await;
    }
    stop(&nodes, &gpus).await;
}
