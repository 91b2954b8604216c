//! Clusters of nodes in one process, collectives over QUIC.

use std::time::Duration;

use strata_collective::{Algorithm, Compression, GroupOptions, ReduceOp};
use strata_net::MembershipEvent;
use strata_tensor::shard::even_ranges;
use strata_tensor::{HostTensor, SplitMix64};

use super::helpers::{cluster, cluster_with, groups};
use crate::common::futures_join;

fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64(seed);
    (0..world).map(|_| (0..len).map(|_| rng.next_f32() - 0.5).collect()).collect()
}

#[actix_rt::test]
async fn clusters_of_two_three_and_four_nodes_run_every_collective() {
    for n in [2usize, 3, 4] {
        let dir = tempfile::tempdir().unwrap();
        let nodes = cluster(dir.path(), n).await;
        for node in &nodes {
            assert_eq!(node.alive().await.unwrap().len(), n);
        }
        for algorithm in [Algorithm::Ring, Algorithm::Tree] {
            let gs = groups(
                &nodes,
                GroupOptions { algorithm, seg_len: 1000, timeout: Duration::from_secs(5), ..Default::default() },
            )
            .await;
            for len in [0usize, 1, 7, 2_501, 100_003] {
                let xs = inputs(n, len, len as u64);
                let futs = gs.iter().zip(&xs).map(|(g, x)| g.all_reduce(x.clone(), ReduceOp::Sum));
                let outs: Vec<Vec<f32>> = futures_join(futs)
                    .await
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|e| panic!("{algorithm:?} n={n} len={len}: {e}")))
                    .collect();
                for (r, o) in outs.iter().enumerate() {
                    assert_eq!(o.len(), len);
                    assert!(
                        o.iter().zip(&outs[0]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{algorithm:?} n={n} len={len}: rank {r} differs"
                    );
                    for i in 0..len {
                        let exact: f64 = xs.iter().map(|x| f64::from(x[i])).sum();
                        assert!((f64::from(o[i]) - exact).abs() < 1e-5, "{algorithm:?} n={n} len={len} [{i}]");
                    }
                }
            }
        }
        let gs = groups(&nodes, GroupOptions { seg_len: 333, ..Default::default() }).await;
        // Mean, reduce-scatter, all-gather, broadcast, send/recv.
        let xs = inputs(n, 1001, 9);
        let outs = futures_join(gs.iter().zip(&xs).map(|(g, x)| g.all_reduce(x.clone(), ReduceOp::Mean))).await;
        for o in outs {
            let o = o.unwrap();
            let exact: f64 = xs.iter().map(|x| f64::from(x[5])).sum::<f64>() / n as f64;
            assert!((f64::from(o[5]) - exact).abs() < 1e-6);
        }
        let outs = futures_join(gs.iter().zip(&xs).map(|(g, x)| g.reduce_scatter(x.clone(), ReduceOp::Sum))).await;
        let chunks = even_ranges(1001, n);
        for (r, o) in outs.into_iter().enumerate() {
            let o = o.unwrap();
            assert_eq!(o.len(), chunks[r].len());
            let i = chunks[r].start;
            let exact: f64 = xs.iter().map(|x| f64::from(x[i])).sum();
            assert!((f64::from(o[0]) - exact).abs() < 1e-5);
        }
        let outs = futures_join(gs.iter().zip(&xs).map(|(g, x)| g.all_gather(&x[..10]))).await;
        let want: Vec<f32> = xs.iter().flat_map(|x| x[..10].to_vec()).collect();
        for o in outs {
            assert_eq!(o.unwrap(), want);
        }
        let root = n - 1;
        let outs = futures_join(
            gs.iter()
                .enumerate()
                .map(|(r, g)| g.broadcast(root, if r == root { xs[root].clone() } else { vec![0.0; 1001] })),
        )
        .await;
        for o in outs {
            assert_eq!(o.unwrap(), xs[root]);
        }
        let (a, b) = (&gs[0], &gs[n - 1]);
        let (sent, got) = tokio::join!(a.send(n - 1, xs[0].clone()), b.recv(0, 1001));
        assert_eq!(sent.unwrap(), xs[0], "send hands the buffer back");
        assert_eq!(got.unwrap(), xs[0]);
        for node in &nodes {
            node.shutdown().await;
        }
    }
}

/// A compressed all-reduce computed directly: chunk `c` is folded in ring order from the
/// rank after its owner, each rank adding its rounded input to the partial sum it
/// received and rounding again; the owner's rounded total goes to everyone.
fn compressed_model(xs: &[Vec<f32>], wire: Compression) -> Vec<f32> {
    let (world, len) = (xs.len(), xs[0].len());
    let mut out = vec![0.0; len];
    for (c, chunk) in even_ranges(len, world).into_iter().enumerate() {
        for i in chunk {
            let mut v = wire.round_one(xs[(c + 1) % world][i]);
            for j in 2..=world {
                v = wire.round_one(wire.round_one(xs[(c + j) % world][i]) + v);
            }
            out[i] = v;
        }
    }
    out
}

#[actix_rt::test]
async fn compressed_all_reduce_matches_its_cpu_model_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let gs =
        groups(&nodes, GroupOptions { seg_len: 1000, timeout: Duration::from_secs(5), ..Default::default() }).await;
    for wire in [Compression::Bf16, Compression::Fp16] {
        for len in [1usize, 2_501, 100_003] {
            let xs = inputs(3, len, 40 + len as u64);
            let want: Vec<u32> = compressed_model(&xs, wire).iter().map(|v| (v * (1.0 / 3.0f32)).to_bits()).collect();
            let futs = gs.iter().zip(&xs).map(|(g, x)| g.all_reduce_compressed(x.clone(), ReduceOp::Mean, wire));
            for (r, o) in futures_join(futs).await.into_iter().enumerate() {
                let got: Vec<u32> = o.unwrap().iter().map(|v| v.to_bits()).collect();
                assert!(got == want, "{wire:?} len {len}: rank {r} differs from the model");
            }
        }
    }
    for node in &nodes {
        node.shutdown().await;
    }
}

#[actix_rt::test]
async fn world_of_one_and_tensors_to_named_mailboxes() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    let solo = strata_collective::Group::new(nodes[0].clone(), vec!["node-0".into()], GroupOptions::default()).unwrap();
    assert_eq!(solo.all_reduce(vec![1.0, 2.0], ReduceOp::Sum).await.unwrap(), vec![1.0, 2.0]);

    let mut inbox = nodes[1].mailbox("weights");
    let t = HostTensor::random([3, 4], 1);
    nodes[0].send_tensor("node-1", "weights", 7, &t).await.unwrap();
    let got = inbox.recv().await.unwrap();
    assert_eq!((got.from.as_str(), got.tag, &got.tensor), ("node-0", 7, &t));
    let e = nodes[0].send_tensor("node-1", "nobody", 1, &t).await.unwrap_err();
    assert_eq!(e.to_string(), "node-1 refused: no mailbox named \"nobody\"");
    let e = nodes[0].send_tensor("node-9", "weights", 1, &t).await.unwrap_err();
    assert_eq!(e.to_string(), "peer node-9 is not connected");
}

#[actix_rt::test]
async fn a_vanished_node_is_detected_and_fails_collectives_naming_it() {
    // With the endpoint on a thread of its own, and sharing the node's thread.
    for io_thread in [true, false] {
        a_vanished_node_is_detected(io_thread).await;
    }
}

async fn a_vanished_node_is_detected(io_thread: bool) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster_with(dir.path(), 3, |c| strata_net::NodeConfig { io_thread: Some(io_thread), ..c }).await;
    let mut events = nodes[0].subscribe().await.unwrap();
    let gs = groups(&nodes, GroupOptions::default()).await;
    // node-2 stops answering without saying goodbye: its endpoint goes away.
    let victim = nodes[2].clone();
    let started = std::time::Instant::now();
    victim.abort().await;
    let xs = inputs(3, 1 << 20, 1);
    let (r0, r1) =
        tokio::join!(gs[0].all_reduce(xs[0].clone(), ReduceOp::Sum), gs[1].all_reduce(xs[1].clone(), ReduceOp::Sum));
    for r in [r0, r1] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("node-2"), "io thread {io_thread}: error does not name the dead peer: {e}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "io thread {io_thread}: took {:?}", started.elapsed());
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(MembershipEvent::Failed { name, .. }) = events.recv().await {
                return name;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(failed, "node-2");
    for node in &nodes[..2] {
        node.shutdown().await;
    }
}

/// Echoes the caller and doubles the tensor data; "fail" answers an error.
struct Echo;

impl strata_net::Service for Echo {
    fn call(&self, req: strata_net::ServiceRequest) -> strata_net::ServiceFuture {
        Box::pin(async move {
            if req.method == "fail" {
                return Err(format!("echo refuses {:?}", String::from_utf8_lossy(&req.args)));
            }
            let data = format!("{}:{:?}:{}", req.caller.name, req.caller.role, String::from_utf8_lossy(&req.args));
            Ok(strata_net::ServiceResponse {
                data: data.into_bytes(),
                payload: req.payload.iter().map(|x| x * 2.0).collect(),
            })
        })
    }
}

#[actix_rt::test]
async fn services_answer_members_and_operators_with_their_verified_names() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 2).await;
    nodes[1].register_service("echo", std::sync::Arc::new(Echo));
    let limit = Duration::from_secs(5);
    let r = nodes[0].call("node-1", "echo", "say", b"hi".to_vec(), &[1.0, 2.5], limit).await.unwrap();
    assert_eq!((String::from_utf8(r.data).unwrap(), r.payload), ("node-0:Node:hi".to_string(), vec![2.0, 5.0]));
    let e = nodes[0].call("node-1", "echo", "fail", b"x".to_vec(), &[], limit).await.unwrap_err();
    assert_eq!(e.to_string(), "node-1 refused: echo refuses \"x\"");
    let e = nodes[1].call("node-0", "echo", "say", vec![], &[], limit).await.unwrap_err();
    assert_eq!(e.to_string(), "node-0 refused: no service named \"echo\" on this node");
    // A node calls its own services without the network.
    let r = nodes[1].call("node-1", "echo", "say", b"me".to_vec(), &[], limit).await.unwrap();
    assert_eq!(String::from_utf8(r.data).unwrap(), "node-1:Node:me");
    // Operators call services too, under their certificate's name.
    let addr = nodes[1].local_addr().to_string();
    let op = strata_net::OperatorClient::connect(&addr, Some(dir.path()), "admin", "strata", limit).await.unwrap();
    let r = op.call("echo", "say", b"op".to_vec(), &[4.0], limit).await.unwrap();
    assert_eq!((String::from_utf8(r.data).unwrap(), r.payload), ("admin:Operator:op".to_string(), vec![8.0]));
    op.close().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Device tensors into the collectives and back: every rank's all-reduce result is
/// bitwise the host all-reduce of each piece (f32 and compressed, with a prepare step, in
/// place or into another tensor), broadcast and send/recv deliver the exact data, and a
/// rank's mistake fails it at once and aborts the others promptly.
#[actix_rt::test]
async fn device_tensors_go_through_collectives_piece_by_piece_and_mistakes_abort_every_rank() {
    use strata_collective::{CollectiveError, TensorReduce};
    use strata_gpu::{GpuHandle, GpuOptions};
    if crate::common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let gs =
        groups(&nodes, GroupOptions { seg_len: 1000, timeout: Duration::from_secs(20), ..Default::default() }).await;
    let gpus: Vec<GpuHandle> = (0..3).map(|_| GpuHandle::start(&GpuOptions::from_env()).unwrap()).collect();
    let cases = [
        (1usize, TensorReduce::new(ReduceOp::Sum), false),
        (2_501, TensorReduce::new(ReduceOp::Mean).piece_len(700), true),
        (100_003, TensorReduce::new(ReduceOp::Mean).piece_len(30_000), false),
        (20_011, TensorReduce::new(ReduceOp::Sum).wire(Compression::Bf16).piece_len(4_000), true),
        (20_011, TensorReduce::new(ReduceOp::Mean).wire(Compression::Fp16).piece_len(100_000), false),
    ];
    for (case, (len, spec, in_place)) in cases.into_iter().enumerate() {
        let xs = inputs(3, len, 90 + case as u64);
        // What each rank's prepare step makes of its input: doubled.
        let prepared: Vec<Vec<f32>> = xs.iter().map(|x| x.iter().map(|v| v * 2.0).collect()).collect();
        let mut want = Vec::with_capacity(len);
        for piece in spec.pieces(len) {
            let futs = gs
                .iter()
                .zip(&prepared)
                .map(|(g, x)| g.all_reduce_compressed(x[piece.clone()].to_vec(), spec.op, spec.wire));
            want.extend(futures_join(futs).await.remove(0).unwrap());
        }
        let mut ids = Vec::new();
        for (gpu, x) in gpus.iter().zip(&xs) {
            let src = gpu.upload(HostTensor::new([len], x.clone()).unwrap()).await.unwrap();
            let dst = if in_place {
                src
            } else {
                gpu.upload(HostTensor::new([len], vec![f32::NAN; len]).unwrap()).await.unwrap()
            };
            ids.push((src, dst));
        }
        let futs = gs.iter().zip(&gpus).zip(&ids).map(|((g, gpu), &(src, dst))| {
            g.all_reduce_tensor_with(gpu, src, dst, len, &spec, |range, x| {
                assert_eq!(range.len(), x.len());
                x.iter_mut().for_each(|v| *v *= 2.0);
            })
        });
        for r in futures_join(futs).await {
            r.unwrap();
        }
        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        for (r, (gpu, &(_, dst))) in gpus.iter().zip(&ids).enumerate() {
            let got: Vec<u32> = gpu.download::<f32>(dst).await.unwrap().data().iter().map(|v| v.to_bits()).collect();
            assert!(got == want, "case {case} ({len} elements, {spec:?}): rank {r} differs from the host all-reduce");
        }
    }

    // Broadcast from rank 1, then rank 2 sends to rank 0, over more than one piece.
    let len = 600_001;
    let xs = inputs(3, len, 77);
    let mut ids = Vec::new();
    for (gpu, x) in gpus.iter().zip(&xs) {
        ids.push(gpu.upload(HostTensor::new([len], x.clone()).unwrap()).await.unwrap());
    }
    let futs = gs.iter().zip(&gpus).zip(&ids).map(|((g, gpu), &id)| g.broadcast_tensor(gpu, 1, id, len));
    for r in futures_join(futs).await {
        r.unwrap();
    }
    for (r, (gpu, &id)) in gpus.iter().zip(&ids).enumerate() {
        assert!(gpu.download::<f32>(id).await.unwrap().data() == &xs[1][..], "broadcast: rank {r} differs");
    }
    let fresh = gpus[2].upload(HostTensor::new([len], xs[2].clone()).unwrap()).await.unwrap();
    let (sent, received) =
        tokio::join!(gs[2].send_tensor(&gpus[2], 0, fresh, len), gs[0].recv_tensor(&gpus[0], 2, ids[0], len));
    sent.unwrap();
    received.unwrap();
    assert!(gpus[0].download::<f32>(ids[0]).await.unwrap().data() == &xs[2][..], "send/recv differs");
    // A receive into a tensor of another length is refused, and the sender is aborted.
    let short = gpus[0].upload(HostTensor::new([len - 1], vec![0.0f32; len - 1]).unwrap()).await.unwrap();
    let (sent, received) =
        tokio::join!(gs[2].send_tensor(&gpus[2], 0, fresh, len), gs[0].recv_tensor(&gpus[0], 2, short, len));
    assert!(
        matches!(&received, Err(CollectiveError::Argument { message, .. }) if message.contains("destination tensor has 600000 elements")),
        "{received:?}"
    );
    assert!(matches!(sent, Err(CollectiveError::Aborted { .. })), "{sent:?}");

    // Rank 0 names a length its tensor does not have, then a tensor it does not hold:
    // it fails at once with what is wrong, and the others are aborted long before their
    // 20 s timeout.
    let len = 5_000;
    let mut ids = Vec::new();
    for gpu in &gpus {
        ids.push(gpu.upload(HostTensor::new([len], vec![1.0f32; len]).unwrap()).await.unwrap());
    }
    // 1,000-element pieces: rank 0's wrong length makes 6 pieces where the others make 5.
    let spec = TensorReduce::new(ReduceOp::Sum).piece_len(1_000);
    for mistake in 0..2 {
        let started = std::time::Instant::now();
        let futs = gs.iter().zip(&gpus).zip(&ids).enumerate().map(|(r, ((g, gpu), &id))| {
            let src = if r == 0 && mistake == 1 { gpu.new_id() } else { id };
            let n = if r == 0 && mistake == 0 { len + 1 } else { len };
            g.all_reduce_tensor(gpu, src, id, n, &spec)
        });
        let results = futures_join(futs).await;
        match (&results[0], mistake) {
            (Err(CollectiveError::Argument { message, .. }), 0) => {
                assert!(message.contains("5000 elements, the call says 5001"), "{message}")
            }
            (Err(CollectiveError::Device { message, .. }), 1) => {
                assert!(message.contains("unknown tensor"), "{message}")
            }
            (other, _) => panic!("mistake {mistake}: rank 0 got {other:?}"),
        }
        for (r, res) in results.iter().enumerate().skip(1) {
            assert!(matches!(res, Err(CollectiveError::Aborted { .. })), "mistake {mistake}: rank {r} got {res:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the others waited {:?}", started.elapsed());
    }
    // The mistakes spoiled only their own calls: the group's operations still agree.
    let futs = gs.iter().map(|g| g.all_reduce(vec![1.0; 10], ReduceOp::Sum));
    for r in futures_join(futs).await {
        assert_eq!(r.unwrap(), vec![3.0; 10]);
    }
    // A length no tensor can have is refused before anything is allocated.
    let e = gs[0].all_reduce_tensor(&gpus[0], ids[0], ids[0], usize::MAX / 2, &spec).await.unwrap_err();
    assert!(matches!(e, CollectiveError::Argument { .. }), "{e:?}");

    // 80 ring-sized pieces with one rank starting late: the others run ahead by at most a
    // window of pieces, within the 64 operations a node holds data for before opening
    // them (a peer over that is disconnected, which would fail this).
    let len = 5_600_000;
    let xs = inputs(3, len, 5);
    let mut ids = Vec::new();
    for (gpu, x) in gpus.iter().zip(&xs) {
        ids.push(gpu.upload(HostTensor::new([len], x.clone()).unwrap()).await.unwrap());
    }
    let spec = TensorReduce::new(ReduceOp::Sum).piece_len(70_000);
    let mut want = Vec::new();
    for piece in spec.pieces(len) {
        let futs = gs.iter().zip(&xs).map(|(g, x)| g.all_reduce(x[piece.clone()].to_vec(), ReduceOp::Sum));
        want.extend(futures_join(futs).await.remove(0).unwrap());
    }
    let futs = gs.iter().zip(&gpus).zip(&ids).enumerate().map(|(r, ((g, gpu), &id))| {
        let spec = &spec;
        async move {
            if r == 2 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            g.all_reduce_tensor(gpu, id, id, len, spec).await
        }
    });
    for r in futures_join(futs).await {
        r.unwrap();
    }
    for (r, (gpu, &id)) in gpus.iter().zip(&ids).enumerate() {
        assert!(gpu.download::<f32>(id).await.unwrap().data() == &want[..], "80 pieces: rank {r} differs");
    }
    for gpu in &gpus {
        gpu.shutdown().await;
    }
    for node in &nodes {
        node.shutdown().await;
    }
}
