//! Map-reduce over in-process nodes: the tree's shape and order, placement near the
//! data, failures, image tiles equal to the whole image bitwise on the GPU, and
//! Fashion-MNIST statistics equal to a single-node computation.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_cluster::mapreduce::class_stats::{self, ClassStats, Labelled};
use strata_cluster::mapreduce::local::LocalCluster;
use strata_cluster::mapreduce::tiles::{self, Tile};
use strata_cluster::mapreduce::{self, MapReduceError, MapReduceOptions, Partial, Shard, Stage, map_reduce, reducer};
use strata_cluster::tasks::{ExecOptions, TaskContext, TaskFuture, TaskInput, TaskOutput, TaskRegistry};
use strata_gpu::GpuHandle;
use strata_tensor::HostTensor;

/// Test task functions: `mr.shard` returns its argument as data and `[i + 1, 10 * i]`;
/// `mr.join` parenthesises its inputs' data joined by `+` and sums their tensors, so
/// the result spells out the tree; `mr.fussy` fails on the argument `bad`.
fn registry() -> TaskRegistry {
    let r = TaskRegistry::new();
    mapreduce::register_builtins(&r);
    r.register("mr.shard", |ctx: TaskContext, input: TaskInput| -> TaskFuture {
        Box::pin(async move {
            let i: f32 = String::from_utf8_lossy(&input.args).parse().map_err(|e| format!("mr.shard: {e}"))?;
            let t = HostTensor::new(vec![2], vec![i + 1.0, 10.0 * i]).unwrap();
            let side = HostTensor::new(vec![1], vec![ctx.attempt as f32]).unwrap();
            Ok(TaskOutput { data: input.args, tensors: vec![side, t] })
        })
    });
    r.register(
        "mr.join",
        reducer(|parts: Vec<Partial>| {
            let names: Vec<String> = parts.iter().map(|p| String::from_utf8_lossy(&p.data).to_string()).collect();
            let mut sum = mapreduce::sum_partials(parts.into_iter().map(|p| Partial { data: vec![], ..p }).collect())?;
            sum.data = format!("({})", names.join("+")).into_bytes();
            Ok(sum)
        }),
    );
    r.register("mr.fussy", |_: TaskContext, input: TaskInput| -> TaskFuture {
        Box::pin(async move {
            if input.args == b"bad" {
                return Err("this shard is bad".to_string());
            }
            Ok(TaskOutput::default())
        })
    });
    r
}

/// An in-process cluster of `gpus.len()` nodes, node i with `gpus[i]` and `registry()`.
async fn start(dir: &Path, gpus: Vec<Option<GpuHandle>>, registry: impl Fn() -> TaskRegistry) -> LocalCluster {
    let exec = ExecOptions { gpu_slots: 2, cpu_slots: 4, ..ExecOptions::default() };
    LocalCluster::start(dir, gpus, |_| registry(), exec).await.unwrap()
}

fn opts(fan_in: usize) -> MapReduceOptions {
    MapReduceOptions {
        fan_in,
        side_tensors: 1,
        retries: Some(0),
        timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

#[actix_rt::test]
async fn the_tree_reduce_equals_a_sequential_fold_and_maps_run_near_their_shards() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path(), vec![None; 3], registry).await;
    let client = &cluster.client;
    let shards = |n: usize| -> Vec<Shard> {
        (0..n)
            .map(|i| Shard::new(i.to_string().into_bytes(), vec![]).near(&format!("node-{}", i % 3), 1 << 20))
            .collect()
    };
    for (n, fan_in, tree) in [(1, 2, "0"), (2, 2, "(0+1)"), (5, 2, "(((0+1)+2)+(3+4))"), (5, 3, "((0+1)+(2+3)+4)")] {
        let out = map_reduce(client, shards(n), "mr.shard", "mr.join", &opts(fan_in)).await.unwrap();
        // A sequential fold over the shards, in order.
        let want: Vec<f32> =
            (0..n).fold(vec![0.0, 0.0], |acc, i| vec![acc[0] + i as f32 + 1.0, acc[1] + 10.0 * i as f32]);
        assert_eq!(out.result.tensors, vec![HostTensor::new(vec![2], want).unwrap()], "{n} shards");
        assert_eq!(String::from_utf8(out.result.data).unwrap(), tree, "{n} shards, fan-in {fan_in}");
        // The side output stays with the map; nothing idle, so every map ran at home.
        for (i, m) in out.maps.iter().enumerate() {
            assert_eq!((m.node.as_str(), m.side[0].data()), (format!("node-{}", i % 3).as_str(), &[1.0][..]));
        }
        let reduces = if n == 1 {
            0
        } else if fan_in == 2 {
            n - 1
        } else {
            3
        };
        assert_eq!(out.reduces.len(), reduces, "{n} shards, fan-in {fan_in}");
        if let Some(root) = out.reduces.last() {
            assert_eq!(root.shards, 0..n);
        }
    }
    // The built-in sum over three shards' tensors.
    let sum =
        map_reduce(client, shards(3), "mr.shard", mapreduce::SUM, &MapReduceOptions { side_tensors: 0, ..opts(2) })
            .await;
    let e = sum.unwrap_err().to_string();
    assert!(e.starts_with("reduce task of shards 0..2 (mapreduce.sum) failed: ") && e.contains("data unlike"), "{e}");
    cluster.shutdown().await;
}

#[actix_rt::test]
async fn a_failing_map_fails_the_job_naming_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path(), vec![None; 2], registry).await;
    let client = &cluster.client;
    let shards: Vec<Shard> =
        ["ok", "ok", "bad", "ok"].iter().map(|a| Shard::new(a.as_bytes().to_vec(), vec![])).collect();
    let plain = MapReduceOptions { side_tensors: 0, ..opts(2) };
    let e = map_reduce(client, shards, "mr.fussy", mapreduce::SUM, &plain).await.unwrap_err();
    match &e {
        MapReduceError::Failed { stage, function, cause } => {
            assert_eq!((stage, function.as_str()), (&Stage::Map { shard: 2 }, "mr.fussy"));
            assert!(cause.contains("this shard is bad"), "{cause}");
        }
        other => panic!("expected the map of shard 2 to fail, got {other:?}"),
    }
    assert!(e.to_string().starts_with("map task of shard 2 (mr.fussy) failed: "), "{e}");
    let e = map_reduce(client, vec![], "mr.fussy", mapreduce::SUM, &opts(2)).await.unwrap_err();
    assert_eq!(e.to_string(), "map_reduce of \"mr.fussy\" needs at least one shard");
    let one = vec![Shard::new(b"ok".to_vec(), vec![])];
    let e = map_reduce(client, one.clone(), "mr.fussy", mapreduce::SUM, &opts(1)).await.unwrap_err();
    assert_eq!(e, MapReduceError::FanIn { fan_in: 1 });
    let e = map_reduce(client, one, "mr.nope", mapreduce::SUM, &opts(2)).await.unwrap_err();
    assert!(e.to_string().contains("no task function named \"mr.nope\""), "{e}");
    cluster.shutdown().await;
}

/// A grey test image with edges, gradients and noise; integer values like a decoded one.
fn test_image(width: usize, height: usize) -> HostTensor<f32> {
    let noise = HostTensor::random([height, width], 7);
    let data = (0..width * height)
        .map(|i| {
            let (x, y) = ((i % width) as f32, (i / width) as f32);
            let disc = if (x - 300.0).powi(2) + (y - 180.0).powi(2) < 120.0f32.powi(2) { 90.0 } else { 0.0 };
            let v = 0.2 * x + 0.1 * y + disc + 20.0 * noise.data()[i];
            v.round().clamp(0.0, 255.0)
        })
        .collect();
    HostTensor::new(vec![height, width], data).unwrap()
}

/// Blur and Sobel magnitude in f64 on the CPU, the border repeated beyond the image (a
/// tolerance check that the GPU filter is the filter at all).
fn cpu_edges(image: &HostTensor<f32>) -> Vec<f64> {
    let (h, w) = (image.shape().dims()[0] as isize, image.shape().dims()[1] as isize);
    let px = |y: isize, x: isize| image.data()[(y.clamp(0, h - 1) * w + x.clamp(0, w - 1)) as usize] as f64;
    let g = [1.0, 4.0, 6.0, 4.0, 1.0];
    let blur = |y: isize, x: isize| {
        let mut s = 0.0;
        for (i, a) in g.iter().enumerate() {
            for (j, b) in g.iter().enumerate() {
                s += a * b * px(y + i as isize - 2, x + j as isize - 2);
            }
        }
        s / 256.0
    };
    let mut out = Vec::with_capacity((h * w) as usize);
    for y in 0..h {
        for x in 0..w {
            let b = |dy: isize, dx: isize| blur(y + dy, x + dx);
            let gx = (b(-1, 1) - b(-1, -1)) + 2.0 * (b(0, 1) - b(0, -1)) + (b(1, 1) - b(1, -1));
            let gy = (b(1, -1) - b(-1, -1)) + 2.0 * (b(1, 0) - b(-1, 0)) + (b(1, 1) - b(-1, 1));
            out.push((gx * gx + gy * gy).sqrt());
        }
    }
    out
}

#[actix_rt::test]
async fn image_tiles_filtered_on_two_gpus_equal_the_whole_image_bitwise() {
    // Both GEMM kernels: the subgroup one runs on CPU adapters, the tiled one on GPUs.
    // (Without an adapter, `gemm_kernels` has said SKIPPED, or failed if one is required.)
    for kernel in crate::common::gemm_kernels() {
        tiles_equal_the_whole_image(kernel).await;
    }
}

async fn tiles_equal_the_whole_image(kernel: strata_gpu::GemmKernel) {
    // Open the devices before the nodes: opening blocks the thread heartbeats run on.
    let open = || GpuHandle::from_gpu(crate::common::gpu_with(Some(kernel)).expect("the adapter opened before"));
    let gpus = vec![Some(open()), Some(open())];
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path(), gpus, || {
        let r = TaskRegistry::new();
        tiles::register(&r);
        r
    })
    .await;
    let client = &cluster.client;
    // 601 x 403 in tiles of 200: a column of 1-pixel tiles and a row of 3-pixel ones.
    let (w, h) = (601, 403);
    let image = test_image(w, h);
    let grid = tiles::grid(w, h, 200).unwrap();
    assert_eq!(grid.len(), 12);
    let options = tiles::options();
    let out = map_reduce(client, tiles::shards(&image, &grid).unwrap(), tiles::FILTER, mapreduce::SUM, &options)
        .await
        .unwrap();
    let filtered: Vec<&HostTensor<f32>> = out.maps.iter().map(|m| &m.side[0]).collect();
    let edges = tiles::assemble(w, h, &grid, &filtered).unwrap();
    assert!(out.maps.iter().any(|m| m.node == "node-0") && out.maps.iter().any(|m| m.node == "node-1"));

    // The reference: the same task on the whole image as one tile.
    let whole = Tile::whole(w, h);
    let reference =
        map_reduce(client, tiles::shards(&image, &[whole]).unwrap(), tiles::FILTER, mapreduce::SUM, &options)
            .await
            .unwrap();
    let want = &reference.maps[0].side[0];
    assert_eq!(edges.shape(), want.shape());
    let differ = edges.data().iter().zip(want.data()).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{kernel:?}: pixels differing from the whole-image filter");
    assert_eq!(out.result.tensors, reference.result.tensors, "{kernel:?}: histograms");
    assert_eq!(out.result.tensors[0].data().iter().sum::<f32>(), (w * h) as f32);

    // And the filter is a blur + Sobel: within rounding of an f64 computation.
    let cpu = cpu_edges(&image);
    for (i, (g, c)) in edges.data().iter().zip(&cpu).enumerate() {
        assert!((*g as f64 - c).abs() <= 1e-3 * (1.0 + c), "{kernel:?}: pixel {i}: gpu {g}, cpu {c}");
    }
    assert!(cpu.iter().any(|&v| v > 50.0), "the test image has edges");
    cluster.shutdown().await;
}

/// The first `n` Fashion-MNIST training samples, as 8-bit values.
fn fashion(dir: &Path, n: usize) -> Result<Labelled, String> {
    let (images, [count, rows, cols]) =
        strata_nn::data::read_idx_images(&dir.join("train-images-idx3-ubyte.gz")).map_err(|e| e.to_string())?;
    let labels =
        strata_nn::data::read_idx_labels(&dir.join("train-labels-idx1-ubyte.gz")).map_err(|e| e.to_string())?;
    let n = n.min(count);
    let sample = rows * cols;
    let pixels = images[..n * sample].iter().map(|&v| (v * 255.0).round() as u8).collect();
    Ok(Labelled { pixels, labels: labels[..n].to_vec(), sample })
}

#[actix_rt::test]
async fn fashion_mnist_statistics_over_shards_equal_one_node() {
    let dir = Path::new(strata_nn::data::FASHION_MNIST_DIR);
    if !dir.join("train-images-idx3-ubyte.gz").exists() {
        eprintln!("SKIPPED: no Fashion-MNIST in {} (scripts/bootstrap.sh installs it)", dir.display());
        return;
    }
    const N: usize = 3000;
    // The single-node reference first: reading blocks the thread the nodes run on.
    let subset = fashion(dir, N).unwrap();
    let want = ClassStats::of(&subset, 10).unwrap();
    let gpu = crate::common::gpu().map(GpuHandle::from_gpu);
    let tmp = tempfile::tempdir().unwrap();
    // Node-1 has the GPU; the others sum on their CPUs. Each node reads its own shard.
    let cluster = start(tmp.path(), vec![None, gpu.clone(), None], || {
        let r = TaskRegistry::new();
        let source: class_stats::Source = Arc::new(move |range: std::ops::Range<usize>| {
            let all = fashion(dir, range.end)?;
            let s = all.sample;
            Ok(Labelled {
                pixels: all.pixels[range.start * s..].to_vec(),
                labels: all.labels[range.clone()].to_vec(),
                sample: s,
            })
        });
        class_stats::register(&r, source);
        r
    })
    .await;
    let client = &cluster.client;
    let ranges = strata_tensor::shard::even_ranges(N, 3);
    let shards = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| class_stats::shard(r.clone(), 10, &format!("node-{i}"), (r.len() * 785) as u64))
        .collect();
    let out =
        map_reduce(client, shards, class_stats::MAP, class_stats::REDUCE, &MapReduceOptions::default()).await.unwrap();
    for (i, m) in out.maps.iter().enumerate() {
        assert_eq!(m.node, format!("node-{i}"), "shard {i} ran where its data is");
    }
    let got = ClassStats::decode(&out.result.data).unwrap();
    assert_eq!(got, want);
    assert_eq!(got.means(), want.means());
    assert_eq!(got.counts.iter().sum::<u64>(), N as u64);
    assert_eq!(got.histogram.iter().sum::<u64>(), (N * 784) as u64);
    // On the GPU alone, too (when there is one).
    if let Some(g) = &gpu {
        assert_eq!(ClassStats::of_gpu(g, Arc::new(subset.clone()), 10).await.unwrap(), want);
    }
    cluster.shutdown().await;
}
