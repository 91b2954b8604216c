//! Image tiles on a cluster: a photograph cut into 256x256 tiles with halos, each tile
//! blurred and edge-filtered (Gaussian + Sobel) on some node's GPU actor, the tiles
//! reassembled into an edge image and reduced to an intensity histogram by a tree of
//! reduce tasks; then the same filter over the whole image as one tile on one node, and
//! the two compared bit for bit.
//!
//! `cargo run --release -p strata-examples --example image_tiles [-- PATH] [--nodes N]
//! [--max-side PIXELS] [--out DIR]`
//!
//! PATH is any PNG or JPEG. Without one it takes a photograph of Debian's wallpaper
//! packages (`sudo apt-get install lomiri-wallpapers`), or, when none is installed, a
//! generated 1920x1080 image, and says which. Images are scaled down to at most
//! `--max-side` pixels on their longer side (1920; 0 keeps the size): the whole-image
//! reference needs its largest convolution's patch matrix in one storage binding (about
//! 5 million pixels on a 128 MiB binding). Writes `edges.png`, `input.png` and
//! `histogram.csv` to DIR (`out/image_tiles`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use strata_cluster::mapreduce::local::LocalCluster;
use strata_cluster::mapreduce::tiles::{self, Tile};
use strata_cluster::mapreduce::{self, map_reduce};
use strata_cluster::tasks::{ExecOptions, TaskRegistry};
use strata_gpu::{GpuHandle, GpuOptions};
use strata_tensor::HostTensor;

/// Photographs of `lomiri-wallpapers` (through its dependency lomiri-wallpapers-20.04),
/// tried in order.
const PHOTOS: &[&str] = &[
    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
    "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
    "/usr/share/backgrounds/warty-final-ubuntu.png",
];

struct Args {
    path: Option<PathBuf>,
    nodes: usize,
    max_side: u32,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args { path: None, nodes: 2, max_side: 1920, out: PathBuf::from("out/image_tiles") };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => a.nodes = value("--nodes")?.parse().context("--nodes")?,
            "--max-side" => a.max_side = value("--max-side")?.parse().context("--max-side")?,
            "--out" => a.out = value("--out")?.into(),
            "-h" | "--help" => {
                println!("image_tiles [PATH] [--nodes N] [--max-side PIXELS] [--out DIR]");
                std::process::exit(0);
            }
            other if other.starts_with('-') => bail!("unknown option {other}"),
            other => a.path = Some(other.into()),
        }
    }
    ensure!((1..=16).contains(&a.nodes), "--nodes must be 1 to 16");
    Ok(a)
}

/// The grey image to filter, and what it is.
fn load(args: &Args) -> Result<(image::GrayImage, String)> {
    let path = match &args.path {
        Some(p) => Some(p.clone()),
        None => PHOTOS.iter().map(PathBuf::from).find(|p| p.exists()),
    };
    let Some(path) = path else {
        println!("no photograph found: `sudo apt-get install lomiri-wallpapers` for one; using a generated image");
        return Ok((generated(1920, 1080), "a generated 1920x1080 image".into()));
    };
    let img = image::open(&path).with_context(|| format!("reading {}", path.display()))?.to_luma8();
    let (w, h) = img.dimensions();
    let what = format!("{} ({w}x{h})", path.display());
    let side = args.max_side;
    if side > 0 && w.max(h) > side {
        let scale = f64::from(side) / f64::from(w.max(h));
        let (nw, nh) = (((f64::from(w) * scale).round() as u32).max(1), ((f64::from(h) * scale).round() as u32).max(1));
        let small = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
        return Ok((small, format!("{what}, scaled to {nw}x{nh}")));
    }
    Ok((img, what))
}

/// Rings and a gradient: something with edges when no photograph is at hand.
fn generated(w: u32, h: u32) -> image::GrayImage {
    image::GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (f64::from(x) - f64::from(w) / 2.0, f64::from(y) - f64::from(h) / 2.0);
        let ring = if (((dx * dx + dy * dy).sqrt() / 40.0) as u32).is_multiple_of(2) { 160.0 } else { 60.0 };
        image::Luma([(ring + f64::from(x) / f64::from(w) * 80.0) as u8])
    })
}

fn to_tensor(img: &image::GrayImage) -> HostTensor<f32> {
    let (w, h) = img.dimensions();
    HostTensor::new(vec![h as usize, w as usize], img.as_raw().iter().map(|&v| f32::from(v)).collect())
        .expect("sizes match")
}

fn save(out: &Path, edges: &HostTensor<f32>, input: &image::GrayImage, histogram: &[f32]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (h, w) = (edges.shape().dims()[0] as u32, edges.shape().dims()[1] as u32);
    let pixels = edges.data().iter().map(|&v| tiles::intensity(v)).collect();
    let img = image::GrayImage::from_raw(w, h, pixels).context("edge image size")?;
    img.save(out.join("edges.png")).context("writing edges.png")?;
    input.save(out.join("input.png")).context("writing input.png")?;
    let mut csv = String::from("intensity,pixels\n");
    for (i, c) in histogram.iter().enumerate() {
        csv.push_str(&format!("{i},{c}\n"));
    }
    std::fs::write(out.join("histogram.csv"), csv).context("writing histogram.csv")?;
    Ok(())
}

/// The tiled job's edge image and histogram, and the whole-image reference's.
struct Jobs {
    edges: HostTensor<f32>,
    histogram: HostTensor<f32>,
    whole: HostTensor<f32>,
    whole_histogram: HostTensor<f32>,
}

async fn jobs(cluster: &LocalCluster, image: &HostTensor<f32>) -> Result<Jobs> {
    let (h, w) = (image.shape().dims()[0], image.shape().dims()[1]);
    let options = tiles::options();
    let grid = tiles::grid(w, h, tiles::TILE)?;
    let t = Instant::now();
    let mut job =
        map_reduce(&cluster.client, tiles::shards(image, &grid)?, tiles::FILTER, mapreduce::SUM, &options).await?;
    let filtered: Vec<&HostTensor<f32>> = job.maps.iter().map(|m| &m.side[0]).collect();
    let edges = tiles::assemble(w, h, &grid, &filtered)?;
    let tiled_s = t.elapsed().as_secs_f64();
    let mut per_node = std::collections::BTreeMap::new();
    for m in &job.maps {
        *per_node.entry(m.node.as_str()).or_insert(0) += 1;
    }
    println!(
        "{} tiles of {}x{} with a {}-pixel halo: {:.2} s, tiles per node {per_node:?}, {} reduce tasks",
        grid.len(),
        tiles::TILE,
        tiles::TILE,
        tiles::HALO,
        tiled_s,
        job.reduces.len()
    );

    // The reference: the whole image as one tile, on one node.
    let t = Instant::now();
    let whole = tiles::shards(image, &[Tile::whole(w, h)])?;
    let mut reference = map_reduce(&cluster.client, whole, tiles::FILTER, mapreduce::SUM, &options).await?;
    println!("whole image as one tile on {}: {:.2} s", reference.maps[0].node, t.elapsed().as_secs_f64());
    Ok(Jobs {
        edges,
        histogram: job.result.tensors.swap_remove(0),
        whole: reference.maps.swap_remove(0).side.swap_remove(0),
        whole_histogram: reference.result.tensors.swap_remove(0),
    })
}

#[actix::main]
async fn main() -> Result<()> {
    let args = args()?;
    let (grey, what) = load(&args)?;
    println!("image: {what}");
    let image = to_tensor(&grey);
    let (w, h) = (grey.width() as usize, grey.height() as usize);

    // One GPU actor per node (separate devices of the same adapter here), opened before
    // the nodes start.
    let gpus = (0..args.nodes)
        .map(|_| GpuHandle::start(&GpuOptions::from_env()).map(Some))
        .collect::<Result<Vec<_>, _>>()
        .context("opening a GPU")?;
    println!(
        "{} nodes, each with {} ({})",
        args.nodes,
        gpus[0].as_ref().unwrap().info().name,
        gpus[0].as_ref().unwrap().info().backend
    );
    let dir = tempfile::tempdir()?;
    let registry = |_| {
        let r = TaskRegistry::new();
        tiles::register(&r);
        r
    };
    let exec = ExecOptions { gpu_slots: 2, ..ExecOptions::default() };
    let cluster = LocalCluster::start(dir.path(), gpus, registry, exec).await?;
    // Shut the cluster down (and release the devices) whatever happened.
    let result = jobs(&cluster, &image).await;
    cluster.shutdown().await;
    let Jobs { edges, histogram, whole, whole_histogram } = result?;

    let differ = edges.data().iter().zip(whole.data()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let same_hist = histogram == whole_histogram;
    println!(
        "tiled == whole image, bitwise: {} ({differ} of {} pixels differ); histograms equal: {same_hist}",
        differ == 0,
        w * h
    );
    save(&args.out, &edges, &grey, histogram.data())?;
    println!("wrote {}/edges.png, input.png and histogram.csv", args.out.display());
    ensure!(differ == 0 && same_hist, "the tiled result differs from the whole-image filter");
    Ok(())
}
