//! Datasets: IDX (MNIST, Fashion-MNIST; raw or `.gz`) and the CIFAR-10 binary format,
//! normalisation, a distributed sampler and a loader thread that prepares batches ahead.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use strata_tensor::{HostTensor, SplitMix64};

use crate::{NnError, Result};

/// Where Debian's `dataset-fashion-mnist` package puts its files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// An in-memory labelled image dataset, normalised.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Name, e.g. `fashion-mnist/train`.
    pub name: String,
    /// Samples, each `[channels, height, width]`, row-major after one another.
    pub images: Vec<f32>,
    /// Class of each sample.
    pub labels: Vec<u32>,
    /// `[channels, height, width]`.
    pub sample: [usize; 3],
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn sample_len(&self) -> usize {
        self.sample.iter().product()
    }

    /// The first `n` samples (or all).
    pub fn truncate(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.images.truncate(n * self.sample_len());
        self.labels.truncate(n);
        self
    }

    /// Per-channel mean and standard deviation.
    pub fn channel_stats(&self) -> Vec<(f32, f32)> {
        let [c, h, w] = self.sample;
        let plane = h * w;
        (0..c)
            .map(|ch| {
                let (mut s, mut s2, mut n) = (0f64, 0f64, 0f64);
                for img in self.images.chunks(c * plane) {
                    for &v in &img[ch * plane..(ch + 1) * plane] {
                        s += f64::from(v);
                        s2 += f64::from(v) * f64::from(v);
                        n += 1.0;
                    }
                }
                let mean = s / n.max(1.0);
                ((mean) as f32, (s2 / n.max(1.0) - mean * mean).max(1e-12).sqrt() as f32)
            })
            .collect()
    }

    /// Normalises every channel as `(x - mean) / std`.
    pub fn normalize(&mut self, stats: &[(f32, f32)]) {
        let [c, h, w] = self.sample;
        let plane = h * w;
        for img in self.images.chunks_mut(c * plane) {
            for (ch, &(mean, std)) in stats.iter().enumerate() {
                for v in &mut img[ch * plane..(ch + 1) * plane] {
                    *v = (*v - mean) / std;
                }
            }
        }
    }

    /// The batch of the given sample indices.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let len = self.sample_len();
        let mut x = Vec::with_capacity(indices.len() * len);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(&self.images[i * len..(i + 1) * len]);
            y.push(self.labels[i]);
        }
        let [c, h, w] = self.sample;
        Batch {
            x: HostTensor::new([indices.len(), c, h, w], x).expect("sizes agree"),
            y: HostTensor::new([indices.len()], y).expect("sizes agree"),
        }
    }
}

/// A batch of inputs `[n, c, h, w]` and labels `[n]`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Inputs.
    pub x: HostTensor,
    /// Labels.
    pub y: HostTensor<u32>,
}

fn data_err(path: &Path, message: impl Into<String>) -> NnError {
    NnError::Data { path: path.to_path_buf(), message: message.into() }
}

/// Deflate cannot expand data by more than about 1032:1 (zlib's technical notes), so a
/// gzip file of `n` bytes holds at most this many; a header promising more is refused
/// before anything is inflated.
fn gzip_output_max(compressed: u64) -> u64 {
    compressed.saturating_mul(1032).saturating_add(1 << 10)
}

/// Reads an IDX file (gunzipping it when it ends in `.gz`): a header of `header_len`
/// bytes, then exactly the body that `body` derives from the header (its byte count and
/// a description of the promise for errors). Never reads past that length, so neither a
/// lying header nor a gzip bomb can fill memory.
fn read_idx(
    path: &Path,
    kind: &str,
    header_len: usize,
    body: impl FnOnce(&[u8]) -> Result<(u64, String)>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| data_err(path, e.to_string()))?;
    let size = file.metadata().map_err(|e| data_err(path, e.to_string()))?.len();
    let gz = path.extension().is_some_and(|e| e == "gz");
    let mut reader: Box<dyn Read> =
        if gz { Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file))) } else { Box::new(file) };
    let read_err = |e: std::io::Error| {
        if gz { data_err(path, format!("not a valid gzip file: {e}")) } else { data_err(path, e.to_string()) }
    };
    let mut header = Vec::with_capacity(header_len);
    (&mut reader).take(header_len as u64).read_to_end(&mut header).map_err(read_err)?;
    if header.len() < header_len {
        return Err(data_err(
            path,
            format!("{} bytes is too short for an {kind} header ({header_len} bytes)", header.len()),
        ));
    }
    let (want, promise) = body(&header)?;
    if gz && want > gzip_output_max(size) {
        return Err(data_err(path, format!("{promise}, more than a {size}-byte gzip file can hold")));
    }
    let mut data = Vec::new();
    reader.take(want + 1).read_to_end(&mut data).map_err(read_err)?;
    if data.len() as u64 != want {
        let holds = if data.len() as u64 > want { format!("more than {want}") } else { data.len().to_string() };
        return Err(data_err(path, format!("{promise}, the file holds {holds} bytes")));
    }
    Ok((header, data))
}

/// Finds `name` or `name.gz` in `dir`.
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(data_err(&dir.join(name), format!("missing (looked for {name} and {name}.gz)")))
}

const IDX_IMAGES: u32 = 0x0000_0803;
const IDX_LABELS: u32 = 0x0000_0801;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn check_magic(path: &Path, b: &[u8], want: u32, kind: &str) -> Result<()> {
    let magic = be32(b, 0);
    if magic != want {
        return Err(data_err(
            path,
            format!("magic number {magic:#010x} is not an {kind} file (expected {want:#010x})"),
        ));
    }
    Ok(())
}

/// Reads an IDX image file (`[n, rows, cols]` of `u8`), scaled to `[0, 1]`.
pub fn read_idx_images(path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
    let (h, b) = read_idx(path, "IDX image", 16, |h| {
        check_magic(path, h, IDX_IMAGES, "IDX image")?;
        let (n, rows, cols) = (be32(h, 4), be32(h, 8), be32(h, 12));
        let promise = format!("header promises {n} images of {rows}x{cols}");
        let want = u64::from(n)
            .checked_mul(u64::from(rows))
            .and_then(|v| v.checked_mul(u64::from(cols)))
            .filter(|&v| usize::try_from(v).is_ok())
            .ok_or_else(|| data_err(path, format!("{promise}, more bytes than memory can address")))?;
        Ok((want, format!("{promise} ({want} bytes)")))
    })?;
    let dims = [be32(&h, 4) as usize, be32(&h, 8) as usize, be32(&h, 12) as usize];
    Ok((b.iter().map(|&v| f32::from(v) / 255.0).collect(), dims))
}

/// Reads an IDX label file.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u32>> {
    let (_, b) = read_idx(path, "IDX label", 8, |h| {
        check_magic(path, h, IDX_LABELS, "IDX label")?;
        let n = be32(h, 4);
        Ok((u64::from(n), format!("header promises {n} labels")))
    })?;
    Ok(b.iter().map(|&v| u32::from(v)).collect())
}

fn idx_split(dir: &Path, prefix: &str, name: &str) -> Result<Dataset> {
    let ip = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (images, [n, h, w]) = read_idx_images(&ip)?;
    let labels = read_idx_labels(&lp)?;
    if labels.len() != n {
        return Err(data_err(&lp, format!("{} labels for {n} images in {}", labels.len(), ip.display())));
    }
    let classes = labels.iter().max().map_or(0, |m| *m as usize + 1).max(10);
    Ok(Dataset { name: format!("{name}/{prefix}"), images, labels, sample: [1, h, w], classes })
}

const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

fn cifar_file(path: &Path) -> Result<(Vec<f32>, Vec<u32>)> {
    let b = std::fs::read(path).map_err(|e| data_err(path, e.to_string()))?;
    if b.is_empty() || b.len() % CIFAR_RECORD != 0 {
        return Err(data_err(
            path,
            format!("{} bytes is not a whole number of CIFAR-10 records ({CIFAR_RECORD} bytes each)", b.len()),
        ));
    }
    let mut images = Vec::with_capacity(b.len());
    let mut labels = Vec::with_capacity(b.len() / CIFAR_RECORD);
    for (i, r) in b.chunks(CIFAR_RECORD).enumerate() {
        if r[0] > 9 {
            return Err(data_err(path, format!("record {i} has label {}, CIFAR-10 has 10 classes", r[0])));
        }
        labels.push(u32::from(r[0]));
        images.extend(r[1..].iter().map(|&v| f32::from(v) / 255.0));
    }
    Ok((images, labels))
}

/// Loads a training and a test set from `dir`: IDX files (`train-images-idx3-ubyte[.gz]`,
/// ...) or CIFAR-10 binary files (`data_batch_1.bin` .. `_5`, `test_batch.bin`, possibly
/// in `cifar-10-batches-bin/`). Both are normalised with the training set's statistics.
pub fn load_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
    if !dir.is_dir() {
        return Err(data_err(dir, "no such directory (point --data at IDX or CIFAR-10 files)"));
    }
    let name = dir.file_name().map_or("data".to_string(), |n| n.to_string_lossy().into_owned());
    let cifar =
        [dir.to_path_buf(), dir.join("cifar-10-batches-bin")].into_iter().find(|d| d.join("test_batch.bin").exists());
    let (mut train, mut test) = match cifar {
        Some(d) => {
            let mut train = Dataset {
                name: format!("{name}/train"),
                images: Vec::new(),
                labels: Vec::new(),
                sample: [3, 32, 32],
                classes: 10,
            };
            for i in 1..=5 {
                let (x, y) = cifar_file(&d.join(format!("data_batch_{i}.bin")))?;
                train.images.extend(x);
                train.labels.extend(y);
            }
            let (x, y) = cifar_file(&d.join("test_batch.bin"))?;
            (train, Dataset { name: format!("{name}/test"), images: x, labels: y, sample: [3, 32, 32], classes: 10 })
        }
        None => (idx_split(dir, "train", &name)?, idx_split(dir, "t10k", &name)?),
    };
    if train.sample != test.sample {
        return Err(data_err(dir, format!("training samples are {:?}, test samples {:?}", train.sample, test.sample)));
    }
    // An empty set would train on nothing and report 0/0 accuracy.
    for (what, set) in [("training", &train), ("test", &test)] {
        if set.is_empty() {
            return Err(data_err(dir, format!("the {what} set holds no samples")));
        }
    }
    let classes = train.classes.max(test.classes);
    train.classes = classes;
    test.classes = classes;
    let stats = train.channel_stats();
    train.normalize(&stats);
    test.normalize(&stats);
    Ok((train, test))
}

/// Gives every rank a disjoint share of each epoch, like PyTorch's `DistributedSampler`:
/// the same seeded permutation everywhere, padded by wrapping around to a multiple of the
/// world size, rank `r` taking every `world`-th index from position `r`.
#[derive(Clone, Debug)]
pub struct DistributedSampler {
    len: usize,
    rank: usize,
    world: usize,
    seed: u64,
    shuffle: bool,
}

impl DistributedSampler {
    /// A sampler over `len` samples for `rank` of `world`.
    pub fn new(len: usize, rank: usize, world: usize, seed: u64, shuffle: bool) -> Self {
        assert!(world > 0 && rank < world, "rank {rank} outside world {world}");
        Self { len, rank, world, seed, shuffle }
    }

    /// Samples per rank per epoch.
    pub fn per_rank(&self) -> usize {
        self.len.div_ceil(self.world)
    }

    /// This rank's indices for `epoch`.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = SplitMix64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let total = self.per_rank() * self.world;
        let padded: Vec<usize> = (0..total).map(|i| order[i % self.len.max(1)]).collect();
        padded.into_iter().skip(self.rank).step_by(self.world).collect()
    }
}

/// Prepares batches on a thread of its own, `ahead` batches ahead of the consumer.
pub struct Loader {
    rx: mpsc::Receiver<Batch>,
    _thread: std::thread::JoinHandle<()>,
}

impl Loader {
    /// Batches of `batch` samples over `indices` (the last one may be smaller).
    pub fn new(data: Arc<Dataset>, indices: Vec<usize>, batch: usize, ahead: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel(ahead.max(1));
        let thread = std::thread::Builder::new()
            .name("strata-loader".into())
            .spawn(move || {
                for chunk in indices.chunks(batch.max(1)) {
                    if tx.send(data.batch(chunk)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the loader thread");
        Self { rx, _thread: thread }
    }

    /// The next batch, blocking until it is ready; `None` at the end.
    pub fn next_batch(&self) -> Option<Batch> {
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dir: &Path, prefix: &str, n: usize, magic_ok: bool) {
        let mut img = Vec::new();
        img.extend_from_slice(&(if magic_ok { IDX_IMAGES } else { 0x1234 }).to_be_bytes());
        for v in [n as u32, 4, 5] {
            img.extend_from_slice(&v.to_be_bytes());
        }
        img.extend((0..n * 20).map(|i| (i % 251) as u8));
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), &img).unwrap();
        let mut lab = IDX_LABELS.to_be_bytes().to_vec();
        lab.extend_from_slice(&(n as u32).to_be_bytes());
        lab.extend((0..n).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), &lab).unwrap();
    }

    #[test]
    fn idx_files_load_and_bad_ones_are_named() {
        let d = tempfile::tempdir().unwrap();
        idx(d.path(), "train", 30, true);
        idx(d.path(), "t10k", 10, true);
        let (train, test) = load_dir(d.path()).unwrap();
        assert_eq!((train.len(), test.len(), train.sample, train.classes), (30, 10, [1, 4, 5], 10));
        let stats = train.channel_stats();
        assert!(stats[0].0.abs() < 1e-5 && (stats[0].1 - 1.0).abs() < 1e-4, "normalised: {stats:?}");

        idx(d.path(), "t10k", 10, false);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("t10k-images-idx3-ubyte: magic number 0x00001234 is not an IDX image file"), "{e}");
        std::fs::write(
            d.path().join("t10k-images-idx3-ubyte"),
            [0u8, 0, 8, 3, 0, 0, 0, 9, 0, 0, 0, 4, 0, 0, 0, 5, 1, 2],
        )
        .unwrap();
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("header promises 9 images of 4x5 (180 bytes), the file holds 2 bytes"), "{e}");
        std::fs::remove_file(d.path().join("t10k-labels-idx1-ubyte")).unwrap();
        idx(d.path(), "t10k", 10, true);
        std::fs::remove_file(d.path().join("t10k-labels-idx1-ubyte")).unwrap();
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("t10k-labels-idx1-ubyte: missing"), "{e}");
        idx(d.path(), "t10k", 0, true);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.ends_with("the test set holds no samples"), "{e}");
    }

    fn gz(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::best());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    }

    fn image_header(n: u32, rows: u32, cols: u32) -> Vec<u8> {
        [IDX_IMAGES, n, rows, cols].iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    #[test]
    fn an_idx_header_whose_size_overflows_is_refused() {
        let d = tempfile::tempdir().unwrap();
        // 2^31 * 2^31 * 4 = 2^64 wraps to 0, which an empty body would match.
        let p = d.path().join("images-idx3-ubyte");
        std::fs::write(&p, image_header(1 << 31, 1 << 31, 4)).unwrap();
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("header promises 2147483648 images of 2147483648x4, more bytes than memory can address"),
            "{e}"
        );
    }

    #[test]
    fn gzip_output_is_bounded_by_the_header() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("train-images-idx3-ubyte.gz");
        // One 28x28 image promised, 16 MiB of zeros inflated: reading stops after 785 bytes.
        let mut bomb = image_header(1, 28, 28);
        bomb.resize(16 + (16 << 20), 0);
        gz(&p, &bomb);
        assert!(std::fs::metadata(&p).unwrap().len() < 64 << 10);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("header promises 1 images of 28x28 (784 bytes), the file holds more than 784 bytes"),
            "{e}"
        );
        // A header promising more than deflate can produce from the file is refused unread.
        let mut small = image_header(1 << 20, 1 << 10, 1 << 10);
        small.extend([0u8; 100]);
        gz(&p, &small);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("header promises 1048576 images of 1024x1024 (1099511627776 bytes), more than a"), "{e}");
        assert!(e.ends_with("-byte gzip file can hold"), "{e}");
        // An honest gzip file loads.
        let mut ok = image_header(2, 2, 3);
        ok.extend([0u8, 51, 102, 153, 204, 255, 1, 2, 3, 4, 5, 6]);
        gz(&p, &ok);
        let (x, dims) = read_idx_images(&p).unwrap();
        assert_eq!((dims, x.len(), x[5]), ([2, 2, 3], 12, 1.0));
        gz(&p, &ok[..20]);
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.ends_with("(12 bytes), the file holds 4 bytes"), "{e}");
    }

    #[test]
    fn cifar_files_load() {
        let d = tempfile::tempdir().unwrap();
        let record = |label: u8| {
            let mut r = vec![label];
            r.extend((0..3072).map(|i| (i % 200) as u8));
            r
        };
        for i in 1..=5 {
            std::fs::write(d.path().join(format!("data_batch_{i}.bin")), [record(1), record(2)].concat()).unwrap();
        }
        std::fs::write(d.path().join("test_batch.bin"), record(9)).unwrap();
        let (train, test) = load_dir(d.path()).unwrap();
        assert_eq!((train.len(), test.len(), train.sample), (10, 1, [3, 32, 32]));
        std::fs::write(d.path().join("test_batch.bin"), [7u8; 100]).unwrap();
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin: 100 bytes is not a whole number of CIFAR-10 records"), "{e}");
    }

    #[test]
    fn sampler_shards_are_disjoint_and_cover_the_epoch() {
        for (len, world) in [(10, 1), (10, 2), (11, 3), (100, 4)] {
            let mut all: Vec<usize> = Vec::new();
            for rank in 0..world {
                let s = DistributedSampler::new(len, rank, world, 7, true);
                let idx = s.indices(3);
                assert_eq!(idx.len(), s.per_rank());
                all.extend(idx);
            }
            all.sort();
            all.dedup();
            assert_eq!(all.len(), len, "every sample appears (padding repeats a few)");
            let a = DistributedSampler::new(len, 0, world, 7, true);
            assert_eq!(a.indices(1), a.indices(1));
            if len > 10 {
                assert_ne!(a.indices(1), a.indices(2), "epochs shuffle differently");
            }
        }
    }
}
