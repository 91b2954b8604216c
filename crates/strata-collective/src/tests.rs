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
    data: Vec<u8>,
}

const STEPS_MAX: usize = 1_000_000;

/// Splits `data` into up to four pieces at random byte positions (inside elements too),
/// as a transport may deliver it.
fn pieces<'a>(data: &'a [u8], rng: &mut SplitMix64) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = (0..3).map(|_| rng.below(data.len() as u64 + 1) as usize).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        out.push(&data[at..c]);
        at = c;
    }
    out
}

/// Runs machines to completion, delivering one random in-flight message at a time, in
/// pieces split at random; data a machine asks to keep is forwarded when it says so.
fn run(machines: &mut [Box<dyn Machine>], seed: u64) -> Result<(), CollectiveError> {
    let mut rng = SplitMix64(seed);
    let mut flight: Vec<Msg> = Vec::new();
    let mut kept: std::collections::HashMap<(Rank, ChunkTag), Vec<u8>> = Default::default();
    for _ in 0..STEPS_MAX {
        for (i, m) in machines.iter_mut().enumerate() {
            while let Some(a) = m.poll_send() {
                let data = match a.data {
                    SendData::Bytes(b) => b.to_vec(),
                    SendData::Forward(tag) => kept.remove(&(i, tag)).expect("forwarded data was kept"),
                };
                flight.push(Msg { from: i, to: a.to, tag: a.tag, data });
            }
        }
        if flight.is_empty() {
            break;
        }
        let msg = flight.swap_remove(rng.below(flight.len() as u64) as usize);
        let split = pieces(&msg.data, &mut rng);
        if machines[msg.to].on_receive(msg.from, msg.tag, &split)? == Received::Keep {
            kept.insert((msg.to, msg.tag), msg.data);
        }
    }
    for (i, m) in machines.iter().enumerate() {
        assert!(m.is_done(), "rank {i} of {} did not finish; waiting on {:?}", m.name(), m.waiting_on());
    }
    assert!(kept.is_empty(), "kept data was never forwarded");
    Ok(())
}

fn bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
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
    let tag = ChunkTag { step: 0, segment: 0 };
    // Rank 0 receives only from rank 2 in a ring of 3.
    let e = m.on_receive(1, tag, &[&bytes(&[0.0; 2])]).unwrap_err();
    assert_eq!(e.to_string(), "collective all_reduce: unexpected data from rank 1: rank 0 only receives from rank 2");
    let e = m.on_receive(2, tag, &[&bytes(&[0.0; 5])]).unwrap_err();
    assert!(e.to_string().contains("segment has 5 elements, expected 2"), "{e}");
    let e = m.on_receive(2, tag, &[&[0u8; 7][..]]).unwrap_err();
    assert!(e.to_string().contains("segment of 7 bytes is not whole f32 elements"), "{e}");
    assert_eq!(m.on_receive(2, tag, &[&bytes(&[0.0; 2])]).unwrap(), Received::Done);
    let e = m.on_receive(2, tag, &[&bytes(&[0.0; 2])]).unwrap_err();
    assert!(e.to_string().contains("repeated segment"), "{e}");
    assert_eq!(m.waiting_on(), vec![2]);
    assert!(AllReduce::new(3, 3, vec![], ReduceOp::Sum, Algorithm::Ring, 2).is_err());
    let mut c =
        AllReduce::compressed(0, 2, vec![0.0; 4], ReduceOp::Sum, Algorithm::Auto, 2, Compression::Bf16).unwrap();
    assert_eq!(c.wire_dtype(), strata_tensor::DType::BF16);
    let e = c.on_receive(1, tag, &[&[0u8; 3][..]]).unwrap_err();
    assert!(e.to_string().contains("segment of 3 bytes is not whole bf16 elements"), "{e}");
}

/// The all-reduce with `wire` rounding, computed directly: chunk `c` (of `even_ranges`)
/// is folded in ring order starting after its owner, each rank adding its rounded input
/// to the partial sum it received (`own + received`) and rounding before it sends; the
/// owner rounds the total.
fn compressed_model(xs: &[Vec<f32>], wire: Compression) -> Vec<f32> {
    let (world, len) = (xs.len(), xs[0].len());
    let mut out = vec![0.0; len];
    for (c, chunk) in even_ranges(len, world).into_iter().enumerate() {
        for i in chunk {
            let mut v = wire.round_one(xs[(c + 1) % world][i]);
            for j in 2..=world {
                v = wire.round_one(wire.round_one(xs[(c + j) % world][i]) + v);
            }
            out[i] = if world == 1 { wire.round_one(xs[c][i]) } else { v };
        }
    }
    out
}

#[test]
fn compressed_all_reduce_equals_its_cpu_model_bitwise_on_every_rank() {
    for wire in [Compression::Bf16, Compression::Fp16] {
        for world in WORLDS {
            for len in LENS {
                for seg_len in [1, 3, 64] {
                    let xs = inputs(world, len, (world * 7 + len) as u64);
                    let want = compressed_model(&xs, wire);
                    let mut ms: Vec<Box<dyn Machine>> = (0..world)
                        .map(|r| {
                            Box::new(
                                AllReduce::compressed(
                                    r,
                                    world,
                                    xs[r].clone(),
                                    ReduceOp::Sum,
                                    Algorithm::Auto,
                                    seg_len,
                                    wire,
                                )
                                .unwrap(),
                            ) as Box<dyn Machine>
                        })
                        .collect();
                    run(&mut ms, len as u64).unwrap();
                    for (r, m) in ms.iter_mut().enumerate() {
                        let got = m.take_result();
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{wire:?} world {world} len {len} seg {seg_len}: rank {r}");
                    }
                    // Close to the exact sum: each of `world` roundings loses at most half
                    // a unit in the last place of a value below `world` in magnitude.
                    let ulp = if wire == Compression::Bf16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
                    for (i, e) in exact_sum(&xs).iter().enumerate() {
                        let tol = ulp * (world * world) as f64;
                        assert!((f64::from(want[i]) - e).abs() <= tol, "{wire:?} element {i}: {} vs {e}", want[i]);
                    }
                }
            }
        }
    }
}

#[test]
fn uncompressed_ring_equals_the_model_without_rounding() {
    for world in [2, 3, 5] {
        let xs = inputs(world, 1001, 11);
        let want = compressed_model(&xs, Compression::None);
        let mut ms: Vec<Box<dyn Machine>> = (0..world)
            .map(|r| {
                Box::new(AllReduce::new(r, world, xs[r].clone(), ReduceOp::Sum, Algorithm::Ring, 10).unwrap())
                    as Box<dyn Machine>
            })
            .collect();
        run(&mut ms, 5).unwrap();
        for m in &mut ms {
            assert_eq!(
                m.take_result().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

/// The nearest of `candidates` (sorted, finite, non-negative) to `x >= 0`, ties to the
/// even bit pattern (the largest beyond the end: callers handle overflow).
fn nearest(x: f64, candidates: &[(f64, u16)]) -> u16 {
    let i = candidates.partition_point(|(v, _)| *v < x);
    if i == 0 {
        return candidates[0].1;
    }
    if i == candidates.len() {
        return candidates[i - 1].1;
    }
    let ((lo, lb), (hi, hb)) = (candidates[i - 1], candidates[i]);
    if x - lo < hi - x {
        lb
    } else if hi - x < x - lo {
        hb
    } else if lb % 2 == 0 {
        lb
    } else {
        hb
    }
}

#[test]
fn wire_formats_round_to_nearest_even() {
    use crate::machines::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
    // Decoding f16: every bit pattern against its definition.
    for h in 0..=u16::MAX {
        let (sign, exp, man) = (h >> 15, (h >> 10) & 31, f64::from(h & 1023));
        let mag = match exp {
            0 => man * 2f64.powi(-24),
            31 => {
                if man == 0.0 {
                    f64::INFINITY
                } else {
                    f64::NAN
                }
            }
            e => (1.0 + man / 1024.0) * 2f64.powi(i32::from(e) - 15),
        };
        let want = if sign == 1 { -mag } else { mag };
        let got = f64::from(f16_to_f32(h));
        assert!(got == want || (got.is_nan() && want.is_nan()), "f16 {h:#06x}: {got} vs {want}");
    }
    let finite_f16: Vec<(f64, u16)> = (0..0x7c00u16).map(|h| (f64::from(f16_to_f32(h)), h)).collect();
    let finite_bf16: Vec<(f64, u16)> = (0..0x7f80u16).map(|h| (f64::from(bf16_to_f32(h)), h)).collect();
    let mut rng = SplitMix64(42);
    let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e-8, 6e-8, 3e-8, 2.98e-8, 1e30, 3.4e38];
    // Halfway cases of both formats, and random bit patterns.
    xs.extend((0..2000u16).map(|i| (f16_to_f32(i * 31) + f16_to_f32(i * 31 + 1)) / 2.0));
    xs.extend((0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    xs.extend((0..2000u32).map(|i| f32::from_bits(((i * 7919) << 16) | 0x8000)));
    xs.extend((0..2000u32).map(|i| f32::from_bits(0x3800_0000 + (i << 13) + 0x1000)));
    for x in xs {
        if x.is_nan() {
            assert!(bf16_to_f32(f32_to_bf16(x)).is_nan() && f16_to_f32(f32_to_f16(x)).is_nan());
            continue;
        }
        let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
        let a = f64::from(x).abs();
        // f16: beyond 65520 (halfway to the next power) is infinity.
        let want16 = if a >= 65520.0 { 0x7c00 } else { nearest(a, &finite_f16) } | sign;
        assert_eq!(f32_to_f16(x), want16, "f16 of {x:e} ({:#010x})", x.to_bits());
        let bf_max = f64::from(f32::MAX);
        let want_bf = if a.is_infinite() || a > bf_max {
            0x7f80
        } else {
            let halfway = f64::from(bf16_to_f32(0x7f7f)) + 2f64.powi(127 - 8);
            if a >= halfway { 0x7f80 } else { nearest(a, &finite_bf16) }
        } | sign;
        assert_eq!(f32_to_bf16(x), want_bf, "bf16 of {x:e} ({:#010x})", x.to_bits());
    }
}

#[test]
fn compression_names_parse() {
    for c in [Compression::None, Compression::Bf16, Compression::Fp16] {
        assert_eq!(c.name().parse::<Compression>().unwrap(), c);
    }
    assert_eq!("int8".parse::<Compression>().unwrap_err(), "unknown compression \"int8\": expected none, bf16 or fp16");
}
