//! Map-reduce benchmark: the image-tiles job (`examples/image_tiles.rs`) on two nodes,
//! against the same job on one node.
//!
//! The nodes are in-process (one actix system, loopback QUIC with mutual TLS between
//! them), each with a GPU actor on a device of its own; on one adapter the two devices
//! share it, so the figure measures the cluster's overhead and overlap (upload, filter,
//! transfer of neighbouring tiles) more than added GPU capacity. The image is generated
//! (the arithmetic does not depend on its content), so the case needs no files.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use strata_cluster::mapreduce::local::LocalCluster;
use strata_cluster::mapreduce::{self, map_reduce, tiles};
use strata_cluster::tasks::{ExecOptions, TaskRegistry};
use strata_gpu::{GpuHandle, GpuOptions};
use strata_tensor::HostTensor;

use super::Figure;

/// A grey `width` x `height` test image with edges (rings on a gradient).
pub fn test_image(width: usize, height: usize) -> HostTensor<f32> {
    let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
    let data = (0..width * height)
        .map(|i| {
            let (x, y) = ((i % width) as f64, (i / width) as f64);
            let band = (((x - cx).powi(2) + (y - cy).powi(2)).sqrt() / 40.0) as u64;
            let ring = if band.is_multiple_of(2) { 160.0 } else { 60.0 };
            (ring + x / width as f64 * 80.0).floor() as f32
        })
        .collect();
    HostTensor::new(vec![height, width], data).expect("sizes match")
}

/// Median seconds of `iters` runs (after one warm-up) of the tiles job on a fresh
/// in-process cluster of `nodes` nodes, each with its own device; and the edge image
/// of the last run.
async fn time_job(
    image: &HostTensor<f32>,
    nodes: usize,
    options: &GpuOptions,
    iters: usize,
) -> Result<(f64, HostTensor<f32>)> {
    let gpus = (0..nodes)
        .map(|_| GpuHandle::start(options).map(Some))
        .collect::<Result<Vec<_>, _>>()
        .context("opening a GPU")?;
    let dir = tempfile::tempdir()?;
    let registry = |_| {
        let r = TaskRegistry::new();
        tiles::register(&r);
        r
    };
    let exec = ExecOptions { gpu_slots: 2, ..ExecOptions::default() };
    let cluster = LocalCluster::start(dir.path(), gpus, registry, exec).await?;
    // Shut the cluster down (and release the devices) whatever happened.
    let result = runs(&cluster, image, iters).await;
    cluster.shutdown().await;
    let (mut times, last) = result?;
    // The first run warms the pipelines and the pools.
    let mut timed = times.split_off(1);
    timed.sort_by(f64::total_cmp);
    Ok((timed[timed.len() / 2], last))
}

/// Seconds of each of `iters + 1` runs of the tiles job, and the last run's edge image.
async fn runs(cluster: &LocalCluster, image: &HostTensor<f32>, iters: usize) -> Result<(Vec<f64>, HostTensor<f32>)> {
    let (h, w) = (image.shape().dims()[0], image.shape().dims()[1]);
    let grid = tiles::grid(w, h, tiles::TILE)?;
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..iters.max(1) + 1 {
        let t = Instant::now();
        let shards = tiles::shards(image, &grid)?;
        let out = map_reduce(&cluster.client, shards, tiles::FILTER, mapreduce::SUM, &tiles::options()).await?;
        let filtered: Vec<&HostTensor<f32>> = out.maps.iter().map(|m| &m.side[0]).collect();
        last = Some(tiles::assemble(w, h, &grid, &filtered)?);
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((times, last.expect("at least one run")))
}

/// The `mapreduce tiles` case: the tiles job over a `width` x `height` image on 2
/// in-process nodes, each with its own device, against the same job on 1 node, in
/// megapixels per second; checks that both give bitwise the same edge image. Runs
/// inside an actix system.
pub async fn mapreduce_tiles_case(width: usize, height: usize, iters: usize, gpu: &GpuOptions) -> Result<Figure> {
    let image = test_image(width, height);
    let (one_s, one) = time_job(&image, 1, gpu, iters).await?;
    let (two_s, two) = time_job(&image, 2, gpu, iters).await?;
    let same = one.data().iter().zip(two.data()).all(|(a, b)| a.to_bits() == b.to_bits());
    ensure!(same, "the 2-node edge image differs from the 1-node one");
    let mpx = (width * height) as f64 / 1e6;
    let tiles = tiles::grid(width, height, tiles::TILE)?.len();
    Ok(Figure {
        case: format!("mapreduce tiles {width}x{height} ({tiles} tiles) 2 in-process nodes"),
        unit: "Mpx/s",
        value: mpx / two_s,
        seconds: two_s,
        reference: "same job on 1 node".into(),
        reference_value: mpx / one_s,
        ratio: one_s / two_s,
        target: None,
    })
}
