//! Dataset statistics on a cluster: the per-class mean image and the pixel histogram of
//! Fashion-MNIST's 60,000 training images, sharded over three nodes that each read
//! their shards from their own disk (map tasks placed near the data), combined by a tree
//! of reduce tasks; then the same job as one shard on one node, and a plain loop on this
//! thread, all compared exactly.
//!
//! `cargo run --release -p strata-examples --example fashion_stats [-- DIR] [--nodes N]
//! [--shards S] [--out DIR]`
//!
//! DIR holds the IDX files (`/usr/share/datasets/fashion-mnist`, from Debian's
//! `dataset-fashion-mnist`, which `scripts/bootstrap.sh` installs). Writes `means.png`
//! (the ten class means side by side), `means.csv` and `histogram.csv` to the output
//! directory (`out/fashion_stats`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use strata_cluster::mapreduce::class_stats::{self, ClassStats, Labelled};
use strata_cluster::mapreduce::local::LocalCluster;
use strata_cluster::mapreduce::{MapReduceOptions, map_reduce};
use strata_cluster::tasks::{ExecOptions, TaskRegistry};
use strata_gpu::{GpuHandle, GpuOptions};

const CLASSES: usize = 10;
const NAMES: [&str; CLASSES] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

struct Args {
    data: PathBuf,
    nodes: usize,
    shards: usize,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        data: PathBuf::from(strata_nn::data::FASHION_MNIST_DIR),
        nodes: 3,
        shards: 6,
        out: PathBuf::from("out/fashion_stats"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => a.nodes = value("--nodes")?.parse().context("--nodes")?,
            "--shards" => a.shards = value("--shards")?.parse().context("--shards")?,
            "--out" => a.out = value("--out")?.into(),
            "-h" | "--help" => {
                println!("fashion_stats [DIR] [--nodes N] [--shards S] [--out DIR]");
                std::process::exit(0);
            }
            other if other.starts_with('-') => bail!("unknown option {other}"),
            other => a.data = other.into(),
        }
    }
    ensure!((1..=16).contains(&a.nodes), "--nodes must be 1 to 16");
    ensure!((1..=1000).contains(&a.shards), "--shards must be 1 to 1000");
    Ok(a)
}

/// The training set as 8-bit values, as a node reads it from its disk.
fn read(dir: &Path) -> Result<Labelled, String> {
    let images = dir.join("train-images-idx3-ubyte.gz");
    let labels = dir.join("train-labels-idx1-ubyte.gz");
    let (x, [_, rows, cols]) = strata_nn::data::read_idx_images(&images).map_err(|e| e.to_string())?;
    let labels = strata_nn::data::read_idx_labels(&labels).map_err(|e| e.to_string())?;
    // The loader scales to [0, 1]; the values were bytes, so this recovers them exactly.
    let pixels = x.iter().map(|&v| (v * 255.0).round() as u8).collect();
    Ok(Labelled { pixels, labels, sample: rows * cols })
}

/// A node's data source: reads the dataset once, then serves ranges of it.
fn source(dir: PathBuf) -> class_stats::Source {
    let cache: Arc<Mutex<Option<Arc<Labelled>>>> = Arc::default();
    Arc::new(move |range: std::ops::Range<usize>| {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some(Arc::new(read(&dir)?));
        }
        let all = c.as_ref().expect("just loaded");
        if range.end > all.len() {
            return Err(format!("samples {range:?} beyond the {} in {}", all.len(), dir.display()));
        }
        let s = all.sample;
        Ok(Labelled {
            pixels: all.pixels[range.start * s..range.end * s].to_vec(),
            labels: all.labels[range.clone()].to_vec(),
            sample: s,
        })
    })
}

fn save(out: &Path, stats: &ClassStats) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let means = stats.means();
    let side = (stats.sample as f64).sqrt() as u32;
    if (side * side) as usize == stats.sample {
        // The class means side by side, each scaled up 4 times.
        let (s, k) = (side, 4);
        let img = image::GrayImage::from_fn(s * k * CLASSES as u32, s * k, |x, y| {
            let (c, px, py) = ((x / (s * k)) as usize, (x % (s * k)) / k, y / k);
            image::Luma([means[c * stats.sample + (py * s + px) as usize].round() as u8])
        });
        img.save(out.join("means.png")).context("writing means.png")?;
    }
    let mut csv = String::from("class,name,count,mean pixel values\n");
    for (c, (name, count)) in NAMES.iter().zip(&stats.counts).enumerate() {
        let row: Vec<String> = means[c * stats.sample..(c + 1) * stats.sample].iter().map(|m| format!("{m}")).collect();
        csv.push_str(&format!("{c},{name},{count},{}\n", row.join(" ")));
    }
    std::fs::write(out.join("means.csv"), csv).context("writing means.csv")?;
    let mut csv = String::from("value,pixels\n");
    for (v, n) in stats.histogram.iter().enumerate() {
        csv.push_str(&format!("{v},{n}\n"));
    }
    std::fs::write(out.join("histogram.csv"), csv).context("writing histogram.csv")?;
    Ok(())
}

/// The statistics sharded over the nodes, and as one shard on one node.
async fn jobs(cluster: &LocalCluster, n: usize, sample: usize, args: &Args) -> Result<(ClassStats, ClassStats)> {
    let options = MapReduceOptions::default();
    let bytes_per_sample = (sample + 1) as u64;

    // Shard i is held by node i % nodes; every node has the files, and says so for its
    // own shards only, so the data is spread and placement follows it.
    let ranges = strata_tensor::shard::even_ranges(n, args.shards);
    let shards = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            class_stats::shard(
                r.clone(),
                CLASSES,
                &format!("node-{}", i % args.nodes),
                r.len() as u64 * bytes_per_sample,
            )
        })
        .collect();
    let t = Instant::now();
    let job = map_reduce(&cluster.client, shards, class_stats::MAP, class_stats::REDUCE, &options).await?;
    let sharded_s = t.elapsed().as_secs_f64();
    let stats = ClassStats::decode(&job.result.data).map_err(anyhow::Error::msg)?;
    let at_home = job.maps.iter().enumerate().filter(|(i, m)| m.node == format!("node-{}", i % args.nodes)).count();
    println!(
        "{} shards on {} nodes: {sharded_s:.2} s ({at_home} of {} map tasks ran on the node holding their shard, {} reduce tasks)",
        args.shards,
        args.nodes,
        job.maps.len(),
        job.reduces.len()
    );

    // The same job as one shard on one node.
    let t = Instant::now();
    let one = vec![class_stats::shard(0..n, CLASSES, "node-0", n as u64 * bytes_per_sample)];
    let single = map_reduce(&cluster.client, one, class_stats::MAP, class_stats::REDUCE, &options).await?;
    let single_s = t.elapsed().as_secs_f64();
    let single = ClassStats::decode(&single.result.data).map_err(anyhow::Error::msg)?;
    println!("one shard on one node: {single_s:.2} s");
    Ok((stats, single))
}

#[actix::main]
async fn main() -> Result<()> {
    let args = args()?;
    let t = Instant::now();
    let all = read(&args.data).map_err(anyhow::Error::msg).with_context(|| {
        format!("no Fashion-MNIST in {}: install dataset-fashion-mnist (scripts/bootstrap.sh)", args.data.display())
    })?;
    let n = all.len();
    println!("{n} training images of {} pixels read in {:.2} s", all.sample, t.elapsed().as_secs_f64());
    // The plain loop on this thread, before the nodes start: it would hold up their
    // heartbeats, which run on this thread too.
    let t = Instant::now();
    let plain = ClassStats::of(&all, CLASSES).map_err(anyhow::Error::msg)?;
    let plain_s = t.elapsed().as_secs_f64();

    let gpus = (0..args.nodes)
        .map(|_| GpuHandle::start(&GpuOptions::from_env()).map(Some))
        .collect::<Result<Vec<_>, _>>()
        .context("opening a GPU")?;
    let dir = tempfile::tempdir()?;
    let data = args.data.clone();
    let registry = move |_| {
        let r = TaskRegistry::new();
        class_stats::register(&r, source(data.clone()));
        r
    };
    let cluster = LocalCluster::start(dir.path(), gpus, registry, ExecOptions::default()).await?;
    // Shut the cluster down (and release the devices) whatever happened.
    let result = jobs(&cluster, n, all.sample, &args).await;
    cluster.shutdown().await;
    let (stats, single) = result?;
    println!("plain loop on this thread: {plain_s:.2} s");

    let same = stats == single && stats == plain;
    let means_equal = stats.means() == single.means() && stats.means() == plain.means();
    println!("sharded == one node == plain loop: statistics {same}, means bitwise {means_equal}");
    let means = stats.means();
    for (c, (name, count)) in NAMES.iter().zip(&stats.counts).enumerate() {
        let m = &means[c * stats.sample..(c + 1) * stats.sample];
        let avg = m.iter().map(|&v| f64::from(v)).sum::<f64>() / m.len() as f64;
        println!("  {c} {name:<12} {count:>5} images, mean pixel {avg:6.2}");
    }
    let zeros = stats.histogram[0] as f64 / stats.histogram.iter().sum::<u64>() as f64;
    println!("  pixel histogram: {:.1}% of pixels are 0, {} are 255", 100.0 * zeros, stats.histogram[255]);
    save(&args.out, &stats)?;
    println!("wrote {}/means.png, means.csv and histogram.csv", args.out.display());
    ensure!(same && means_equal, "the sharded statistics differ from the single-node ones");
    Ok(())
}
