//! In-memory harness: several ranks' machines exchange messages through one queue that
//! delivers in a seeded random order, bounded in steps.

use strata_tensor::SplitMix64;
use strata_tensor::shard::even_ranges;
use strata_wire::ChunkTag;

use super::*;

struct Msg {
    from: Rank,
    to: Rank,
    tag: ChunkTag,
    data: Vec<f32>,
}

const STEPS_MAX: usize = 1_000_000;

/// Runs machines to completion, delivering one random in-flight message at a time.
fn run(machines: &mut [Box<dyn Machine>], seed: u64) -> Result<(), CollectiveError> {
    let mut rng = SplitMix64(seed);
    let mut flight: Vec<Msg> = Vec::new();
    for _ in 0..STEPS_MAX {
        for (i, m) in machines.iter_mut().enumerate() {
            while let Some(a) = m.poll_send() {
                flight.push(Msg { from: i, to: a.to, tag: a.tag, data: m.buffer()[a.range].to_vec() });
            }
        }
        if flight.is_empty() {
            break;
        }
        let msg = flight.swap_remove(rng.below(flight.len() as u64) as usize);
        machines[msg.to].on_receive(msg.from, msg.tag, &msg.data)?;
    }
    for (i, m) in machines.iter().enumerate() {
        assert!(m.is_done(), "rank {i} of {} did not finish; waiting on {:?}", m.name(), m.waiting_on());
    }
    Ok(())
}

fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64(seed);
    (0..world).map(|_| (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()).collect()
}

fn exact_sum(inputs: &[Vec<f32>]) -> Vec<f64> {
    let len = inputs[0].len();
    (0..len).map(|i| inputs.iter().map(|v| f64::from(v[i])).sum()).collect()
}

const WORLDS: [usize; 6] = [1, 2, 3, 4, 5, 8];
const LENS: [usize; 7] = [0, 1, 2, 3, 7, 100, 1001];

#[test]
fn all_reduce_is_bitwise_identical_everywhere_and_close_to_the_exact_sum() {
    for algorithm in [Algorithm::Ring, Algorithm::Tree, Algorithm::Auto] {
        for world in WORLDS {
            for len in LENS {
                for seg_len in [1, 3, 64] {
                    let xs = inputs(world, len, (world * 1000 + len) as u64);
                    let exact = exact_sum(&xs);
                    let mut results: Vec<Vec<f32>> = Vec::new();
                    for seed in 0..3 {
                        let mut ms: Vec<Box<dyn Machine>> = (0..world)
                            .map(|r| {
                                Box::new(
                                    AllReduce::new(r, world, xs[r].clone(), ReduceOp::Sum, algorithm, seg_len).unwrap(),
                                ) as Box<dyn Machine>
                            })
                            .collect();
                        run(&mut ms, seed).unwrap();
                        let outs: Vec<Vec<f32>> = ms.iter_mut().map(|m| m.take_result()).collect();
                        for (r, o) in outs.iter().enumerate() {
                            assert_eq!(
                                o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                outs[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                "{algorithm:?} world {world} len {len}: rank {r} differs from rank 0"
                            );
                            for (i, v) in o.iter().enumerate() {
                                assert!(
                                    (f64::from(*v) - exact[i]).abs() < 1e-5 * world as f64,
                                    "{algorithm:?} element {i}: {v} vs {}",
                                    exact[i]
                                );
                            }
                        }
                        results.push(outs.into_iter().next().unwrap());
                    }
                    // The summation order does not depend on delivery order.
                    assert!(
                        results.windows(2).all(|w| w[0].iter().zip(&w[1]).all(|(a, b)| a.to_bits() == b.to_bits()))
                    );
                }
            }
        }
    }
}

#[test]
fn all_reduce_mean_scales_the_sum() {
    let xs = inputs(3, 10, 7);
    let exact = exact_sum(&xs);
    let mut ms: Vec<Box<dyn Machine>> = (0..3)
        .map(|r| {
            Box::new(AllReduce::new(r, 3, xs[r].clone(), ReduceOp::Mean, Algorithm::Ring, 4).unwrap())
                as Box<dyn Machine>
        })
        .collect();
    run(&mut ms, 1).unwrap();
    for m in &mut ms {
        for (v, e) in m.take_result().iter().zip(&exact) {
            assert!((f64::from(*v) - e / 3.0).abs() < 1e-6);
        }
    }
}

#[test]
fn auto_picks_tree_for_small_and_ring_for_large_buffers() {
    assert!(AllReduce::new(0, 4, vec![0.0; 1000], ReduceOp::Sum, Algorithm::Auto, 64).unwrap().is_tree());
    assert!(!AllReduce::new(0, 4, vec![0.0; 1 << 20], ReduceOp::Sum, Algorithm::Auto, 64).unwrap().is_tree());
}

#[test]
fn reduce_scatter_leaves_each_rank_its_chunk() {
    for world in WORLDS {
        for len in LENS {
            let xs = inputs(world, len, 3);
            let exact = exact_sum(&xs);
            let mut ms: Vec<Box<dyn Machine>> = (0..world)
                .map(|r| {
                    Box::new(ReduceScatter::new(r, world, xs[r].clone(), ReduceOp::Sum, 5).unwrap()) as Box<dyn Machine>
                })
                .collect();
            run(&mut ms, 2).unwrap();
            let chunks = even_ranges(len, world);
            for (r, m) in ms.iter_mut().enumerate() {
                let got = m.take_result();
                assert_eq!(got.len(), chunks[r].len());
                for (v, e) in got.iter().zip(&exact[chunks[r].clone()]) {
                    assert!((f64::from(*v) - e).abs() < 1e-5 * world as f64);
                }
            }
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in WORLDS {
        for len in [0, 1, 5, 33] {
            let xs = inputs(world, len, 4);
            let want: Vec<f32> = xs.concat();
            let mut ms: Vec<Box<dyn Machine>> = (0..world)
                .map(|r| Box::new(AllGather::new(r, world, &xs[r], 4).unwrap()) as Box<dyn Machine>)
                .collect();
            run(&mut ms, 3).unwrap();
            for m in &mut ms {
                assert_eq!(m.take_result(), want);
            }
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for world in WORLDS {
        for root in 0..world {
            let data = inputs(1, 37, root as u64).remove(0);
            let mut ms: Vec<Box<dyn Machine>> = (0..world)
                .map(|r| {
                    let buf = if r == root { data.clone() } else { vec![0.0; data.len()] };
                    Box::new(Broadcast::new(r, world, root, buf, 5).unwrap()) as Box<dyn Machine>
                })
                .collect();
            run(&mut ms, 5).unwrap();
            for m in &mut ms {
                assert_eq!(m.take_result(), data);
            }
        }
    }
}

#[test]
fn send_and_recv() {
    let data = inputs(1, 100, 9).remove(0);
    let mut ms: Vec<Box<dyn Machine>> =
        vec![Box::new(Send::new(1, data.clone(), 7)), Box::new(Recv::new(0, data.len(), 7))];
    run(&mut ms, 4).unwrap();
    assert_eq!(ms[1].take_result(), data);
}

#[test]
fn unexpected_data_is_a_protocol_error() {
    let mut m = AllReduce::new(0, 3, vec![0.0; 10], ReduceOp::Sum, Algorithm::Ring, 2).unwrap();
    // Rank 0 receives only from rank 2 in a ring of 3.
    let e = m.on_receive(1, ChunkTag { step: 0, segment: 0 }, &[0.0; 2]).unwrap_err();
    assert_eq!(e.to_string(), "collective all_reduce: unexpected data from rank 1: rank 0 only receives from rank 2");
    let e = m.on_receive(2, ChunkTag { step: 0, segment: 0 }, &[0.0; 5]).unwrap_err();
    assert!(e.to_string().contains("segment has 5 elements, expected 2"), "{e}");
    m.on_receive(2, ChunkTag { step: 0, segment: 0 }, &[0.0; 2]).unwrap();
    let e = m.on_receive(2, ChunkTag { step: 0, segment: 0 }, &[0.0; 2]).unwrap_err();
    assert!(e.to_string().contains("repeated segment"), "{e}");
    assert_eq!(m.waiting_on(), vec![2]);
    assert!(AllReduce::new(3, 3, vec![], ReduceOp::Sum, Algorithm::Ring, 2).is_err());
}
