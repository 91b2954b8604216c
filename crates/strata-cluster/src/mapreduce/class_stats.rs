//! Statistics of a labelled image dataset (Fashion-MNIST, say) whose shards the nodes
//! read from their own disks: per-class mean images and a pixel histogram.
//!
//! A shard is a range of sample indices; its map task ([`MAP`]) asks the node's data
//! [`Source`] for that range, so no pixel crosses the network, and returns exact
//! integer statistics ([`ClassStats`]): per class the sample count and the per-pixel
//! sums of the 8-bit values, and the counts of each pixel value. The class sums are a
//! GEMM on the node's GPU actor (one-hot labels transposed times pixels); the products
//! are 0 or a pixel value and every partial sum is an integer below 2^24 (chunks of at
//! most [`GPU_CHUNK`] samples, at most 255 each), so f32 holds them exactly in any
//! summation order, and the chunks are added in `u64`. A node without a GPU computes the
//! same integers on its CPU. The reduce ([`REDUCE`]) adds the integers, and the means
//! are taken once from the final sums ([`ClassStats::means`]), so the result equals a
//! single-node computation exactly.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_gpu::GpuHandle;
use strata_tensor::HostTensor;

use super::{Partial, Shard, reducer};
use crate::tasks::{TaskContext, TaskFuture, TaskInput, TaskOutput, TaskRegistry, decode, encode};

/// The map task: statistics of a range of samples.
pub const MAP: &str = "class_stats.map";
/// The reduce task: sums of statistics.
pub const REDUCE: &str = "class_stats.reduce";
/// Pixel values: 8-bit.
pub const BINS: usize = 256;
/// Samples per GEMM on the GPU at most: `GPU_CHUNK * 255 < 2^24`, so f32 sums stay
/// exact (fewer when a storage binding holds fewer).
pub const GPU_CHUNK: usize = 65_536;

/// Samples with their labels: `pixels` holds `labels.len()` samples of `sample` 8-bit
/// values each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labelled {
    /// The pixel values, sample after sample.
    pub pixels: Vec<u8>,
    /// Each sample's class.
    pub labels: Vec<u32>,
    /// Values per sample.
    pub sample: usize,
}

impl Labelled {
    /// Samples held.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn check(&self, classes: usize) -> Result<(), String> {
        if self.pixels.len() != self.labels.len() * self.sample {
            return Err(format!(
                "{} pixel values are not {} samples of {}",
                self.pixels.len(),
                self.labels.len(),
                self.sample
            ));
        }
        if let Some((i, l)) = self.labels.iter().enumerate().find(|(_, l)| **l as usize >= classes) {
            return Err(format!("sample {i} has class {l}, beyond the {classes} classes"));
        }
        Ok(())
    }
}

/// A node's data: the samples of an index range, read from its own disk.
pub type Source = Arc<dyn Fn(Range<usize>) -> Result<Labelled, String> + Send + Sync>;

/// Exact statistics of some samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassStats {
    /// Number of classes.
    pub classes: usize,
    /// Values per sample.
    pub sample: usize,
    /// Samples per class.
    pub counts: Vec<u64>,
    /// Per class, the sums of each value position: `classes x sample`.
    pub sums: Vec<u64>,
    /// Occurrences of each value 0..=255 over all samples and positions.
    pub histogram: Vec<u64>,
}

impl ClassStats {
    /// Statistics of no samples.
    pub fn new(classes: usize, sample: usize) -> Self {
        Self { classes, sample, counts: vec![0; classes], sums: vec![0; classes * sample], histogram: vec![0; BINS] }
    }

    /// The statistics computed on this thread, the plain way (the reference).
    pub fn of(data: &Labelled, classes: usize) -> Result<Self, String> {
        data.check(classes)?;
        let mut s = Self::new(classes, data.sample);
        for (i, &l) in data.labels.iter().enumerate() {
            let l = l as usize;
            s.counts[l] += 1;
            let px = &data.pixels[i * data.sample..(i + 1) * data.sample];
            for (acc, &v) in s.sums[l * data.sample..(l + 1) * data.sample].iter_mut().zip(px) {
                *acc += u64::from(v);
            }
        }
        s.count_values(data);
        Ok(s)
    }

    fn count_values(&mut self, data: &Labelled) {
        for &v in &data.pixels {
            self.histogram[usize::from(v)] += 1;
        }
    }

    /// The statistics with the class sums computed on `gpu` (see the module docs). The
    /// counting runs on a blocking thread and the GEMM's inputs are made on the GPU
    /// actor's, so the caller's thread (a node's) stays free.
    pub async fn of_gpu(gpu: &GpuHandle, data: Arc<Labelled>, classes: usize) -> Result<Self, String> {
        data.check(classes)?;
        let (sample, len) = (data.sample, data.len());
        let counting = data.clone();
        let mut s = blocking(move || {
            let mut s = Self::new(classes, sample);
            for &l in &counting.labels {
                s.counts[l as usize] += 1;
            }
            s.count_values(&counting);
            Ok(s)
        })
        .await?;
        // As many samples per GEMM as one storage binding holds, and exactness allows.
        let per_binding = gpu.info().max_storage_binding_bytes as usize / (sample.max(classes) * 4).max(1);
        let chunk = GPU_CHUNK.min(per_binding).max(1);
        for start in (0..len).step_by(chunk) {
            let end = (start + chunk).min(len);
            let data = data.clone();
            let sums = gpu
                .with(move |ex| {
                    let n = end - start;
                    // One-hot labels, transposed: [classes, n].
                    let mut onehot = vec![0f32; classes * n];
                    for (j, &l) in data.labels[start..end].iter().enumerate() {
                        onehot[l as usize * n + j] = 1.0;
                    }
                    let a = HostTensor::new(vec![classes, n], onehot).expect("sizes match");
                    let px = data.pixels[start * sample..end * sample].iter().map(|&v| f32::from(v)).collect();
                    let b = HostTensor::new(vec![n, sample], px).expect("sizes match");
                    let g = ex.gpu();
                    let (a, b) = (g.upload(&a)?, g.upload(&b)?);
                    let c = g.matmul(&a, &b, false, false)?;
                    g.download::<f32>(&c)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            for (i, (acc, &v)) in s.sums.iter_mut().zip(sums.data()).enumerate() {
                // An inexact sum would be a broken kernel, not rounding: say so.
                if v.fract() != 0.0 || !(0.0..16_777_216.0).contains(&v) {
                    let (c, p) = (i / sample, i % sample);
                    return Err(format!("the GPU sum of class {c} position {p} is {v}, not an exact count"));
                }
                *acc += v as u64;
            }
        }
        Ok(s)
    }

    /// Adds `other`'s statistics.
    pub fn merge(&mut self, other: &Self) -> Result<(), String> {
        if (self.classes, self.sample) != (other.classes, other.sample) {
            return Err(format!(
                "statistics of {} classes of {} values cannot merge with {} classes of {}",
                self.classes, self.sample, other.classes, other.sample
            ));
        }
        for (a, b) in
            [(&mut self.counts, &other.counts), (&mut self.sums, &other.sums), (&mut self.histogram, &other.histogram)]
        {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        Ok(())
    }

    /// Per class, the mean of each value position (`classes x sample`; zero for a class
    /// without samples), taken once from the exact sums.
    pub fn means(&self) -> Vec<f32> {
        self.sums
            .iter()
            .enumerate()
            .map(|(i, &s)| match self.counts[i / self.sample.max(1)] {
                0 => 0.0,
                c => (s as f64 / c as f64) as f32,
            })
            .collect()
    }

    /// Encodes for a task's result.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a task's result.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        decode(bytes).map_err(|e| format!("malformed class statistics: {e}"))
    }
}

/// Runs `f` on tokio's blocking threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("the blocking part failed: {e}"))?
}

#[derive(Serialize, Deserialize)]
struct MapArgs {
    start: usize,
    end: usize,
    classes: usize,
}

/// The shard of samples `range` of a dataset of `classes` classes, held by `node`
/// (`bytes` bytes of it).
pub fn shard(range: Range<usize>, classes: usize, node: &str, bytes: u64) -> Shard {
    Shard::new(encode(&MapArgs { start: range.start, end: range.end, classes }), Vec::new()).near(node, bytes)
}

/// Registers [`MAP`], reading samples from `source`, and [`REDUCE`] in `registry`.
pub fn register(registry: &TaskRegistry, source: Source) {
    registry.register(MAP, move |ctx: TaskContext, input: TaskInput| -> TaskFuture {
        let source = source.clone();
        Box::pin(async move {
            let a: MapArgs = decode(&input.args).map_err(|e| format!("{MAP}: malformed arguments: {e}"))?;
            let what = format!("{MAP}: samples {}..{} on {}", a.start, a.end, ctx.node);
            // Reading is blocking IO, and the node's thread must keep answering its peers.
            let range = a.start..a.end;
            let data = Arc::new(blocking(move || source(range)).await.map_err(|e| format!("{what}: {e}"))?);
            if data.len() != a.end.saturating_sub(a.start) {
                return Err(format!("{what}: the source gave {} samples", data.len()));
            }
            let classes = a.classes;
            let stats = match &ctx.gpu {
                Some(gpu) => ClassStats::of_gpu(gpu, data, classes).await,
                None => blocking(move || ClassStats::of(&data, classes)).await,
            }
            .map_err(|e| format!("{what}: {e}"))?;
            Ok(TaskOutput { data: stats.encode(), tensors: Vec::new() })
        })
    });
    registry.register(
        REDUCE,
        reducer(|parts: Vec<Partial>| {
            let mut parts = parts.iter().map(|p| ClassStats::decode(&p.data));
            let mut acc = parts.next().ok_or("nothing to reduce")??;
            for p in parts {
                acc.merge(&p?)?;
            }
            Ok(Partial { data: acc.encode(), tensors: Vec::new() })
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_merge_and_take_means_once() {
        let data = Labelled { pixels: vec![0, 10, 255, 3, 4, 5], labels: vec![1, 1, 0], sample: 2 };
        let s = ClassStats::of(&data, 3).unwrap();
        assert_eq!((s.counts.clone(), s.sums.clone()), (vec![1, 2, 0], vec![4, 5, 255, 13, 0, 0]));
        assert_eq!(s.means(), vec![4.0, 5.0, 127.5, 6.5, 0.0, 0.0]);
        assert_eq!(s.histogram[255] + s.histogram[0], 2);
        let first = Labelled { pixels: data.pixels[..4].to_vec(), labels: vec![1, 1], sample: 2 };
        let second = Labelled { pixels: data.pixels[4..].to_vec(), labels: vec![0], sample: 2 };
        let mut m = ClassStats::of(&first, 3).unwrap();
        m.merge(&ClassStats::of(&second, 3).unwrap()).unwrap();
        assert_eq!(m, s);
        let bad = Labelled { labels: vec![1, 3, 0], ..data };
        assert_eq!(ClassStats::of(&bad, 3).unwrap_err(), "sample 1 has class 3, beyond the 3 classes");
        let e = m.merge(&ClassStats::new(2, 2)).unwrap_err();
        assert_eq!(e, "statistics of 3 classes of 2 values cannot merge with 2 classes of 2");
    }
}
