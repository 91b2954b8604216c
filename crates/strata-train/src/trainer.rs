//! The data-parallel trainer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_collective::{Compression, Group, ReduceOp, TensorReduce};
use strata_gpu::{GpuHandle, TensorId};
use strata_nn::checkpoint::{self, Checkpoint, TrainState};
use strata_nn::data::{Batch, Dataset, DistributedSampler, Loader};
use strata_nn::{Model, ModelSpec, Optimizer};
use strata_tensor::{HostTensor, Shape};

use crate::TrainError;
use crate::balance::{Balance, Balancer, Throughput};

type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Settings of a training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Samples per step on each rank; the global batch of a step is this times the world size.
    pub batch: usize,
    /// How the global batch is divided between ranks (see [`Balance`]).
    pub balance: Balance,
    /// With `Balance::Measured`, the ranks pool their throughput measurements and
    /// re-decide the split every this many steps.
    pub rebalance_every: u64,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// Seed of parameter initialisation and shuffling.
    pub seed: u64,
    /// Where checkpoints go (one per epoch), if anywhere.
    pub checkpoint_dir: Option<PathBuf>,
    /// Start from the latest checkpoint in `checkpoint_dir`.
    pub resume: bool,
    /// Compare the replicas' parameter checksums every this many steps (0: never).
    pub checksum_every: u64,
    /// Batch size of evaluation.
    pub eval_batch: usize,
    /// Gradient bucket size in bytes.
    pub bucket_bytes: usize,
    /// Batches the loader prepares ahead.
    pub prefetch: usize,
    /// Gradient buckets on the wire as bf16 or fp16, with error feedback: what rounding
    /// drops from a bucket on this rank is added to the same bucket at the next step.
    pub compression: Compression,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch: 64,
            balance: Balance::Equal,
            rebalance_every: 5,
            optimizer: Optimizer::Adam(Default::default()),
            seed: 0,
            checkpoint_dir: None,
            resume: false,
            checksum_every: 50,
            eval_batch: 250,
            bucket_bytes: strata_nn::BUCKET_BYTES_DEFAULT,
            prefetch: 4,
            compression: Compression::None,
        }
    }
}

/// Where a step's time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// GPU work and host transfers not overlapped by anything else.
    pub compute: Duration,
    /// All-reduce time not hidden behind the backward pass.
    pub comm_exposed: Duration,
    /// Waiting for the loader.
    pub data: Duration,
}

impl std::ops::AddAssign for StepTimes {
    fn add_assign(&mut self, o: Self) {
        self.compute += o.compute;
        self.comm_exposed += o.comm_exposed;
        self.data += o.data;
    }
}

/// One step's outcome on this rank.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Mean loss of this rank's batch.
    pub loss: f32,
    /// Correct predictions in this rank's batch.
    pub correct: u32,
    /// Samples in this rank's batch.
    pub samples: usize,
    /// Where the time went.
    pub times: StepTimes,
    /// This rank's own work in the step: all of it but the waits for the all-reduce and
    /// the replica check (the throughput measurement of `Balance::Measured`; the fixed
    /// costs, such as the optimiser, count too, so the split evens out whole steps).
    pub busy: Duration,
}

/// One epoch's outcome, over all ranks.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// Epoch number (1-based).
    pub epoch: u64,
    /// Mean training loss over this rank's steps.
    pub train_loss: f64,
    /// Training accuracy on this rank's samples.
    pub train_accuracy: f64,
    /// Test loss over the whole test set.
    pub test_loss: f64,
    /// Test accuracy over the whole test set.
    pub test_accuracy: f64,
    /// Training samples processed by all ranks.
    pub samples: usize,
    /// Wall time of the training part of the epoch.
    pub train_time: Duration,
    /// Wall time of the evaluation.
    pub eval_time: Duration,
    /// Summed step times of this rank.
    pub times: StepTimes,
}

/// A data-parallel trainer on one rank.
pub struct Trainer {
    gpu: GpuHandle,
    model: Model,
    group: Option<Group>,
    config: TrainConfig,
    step: u64,
    epoch: u64,
    segments_cache: Option<(usize, Vec<Vec<strata_gpu::Op>>)>,
    balancer: Balancer,
    /// This rank's throughput since the last rebalancing, and its previous batch size
    /// (a step at a new size builds new programs, so it is not measured).
    window: Throughput,
    last_samples: usize,
    /// Per gradient bucket, what compression's rounding dropped last step (this rank's).
    residuals: Vec<Vec<f32>>,
    /// Whether the buckets' all-reduce destinations exist on the device (the all-reduce
    /// writes into them piece by piece).
    reduced_allocated: bool,
}

/// Error feedback for one bucket: adds the residual of the previous step to `x` and
/// keeps what rounding `x` to `wire` will drop (the all-reduce rounds each rank's input).
fn error_feedback(wire: Compression, x: &mut [f32], residual: &mut [f32]) {
    for (v, r) in x.iter_mut().zip(residual.iter_mut()) {
        let s = *v + *r;
        *r = s - wire.round_one(s);
        *v = s;
    }
}

/// What one pass over (part of) an epoch's data gave on this rank.
struct EpochRun {
    loss_sum: f64,
    correct: u64,
    samples: usize,
    all_samples: usize,
    steps: u64,
    times: StepTimes,
}

fn fnv64(data: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in data {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Packs a `u64` into four exactly representable `f32`s (16 bits each).
fn u64_to_f32s(v: u64) -> [f32; 4] {
    [0, 16, 32, 48].map(|s| ((v >> s) & 0xffff) as f32)
}

fn f32s_to_u64(v: &[f32]) -> u64 {
    v.iter().take(4).enumerate().fold(0u64, |acc, (i, x)| acc | ((*x as u64) << (16 * i)))
}

pub(crate) fn flatten(ts: &[HostTensor]) -> Vec<f32> {
    ts.iter().flat_map(|t| t.data().iter().copied()).collect()
}

pub(crate) fn unflatten(flat: &[f32], shapes: &[Shape]) -> Vec<HostTensor> {
    let mut off = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.numel();
            let t = HostTensor::new(s.clone(), flat[off..off + n].to_vec()).expect("sizes agree");
            off += n;
            t
        })
        .collect()
}

/// The all-reduce of a step: the mean of equal shares, or the sum of shares already
/// weighted by their part of the global batch.
fn reduce_op(weight: Option<f32>) -> ReduceOp {
    if weight.is_some() { ReduceOp::Sum } else { ReduceOp::Mean }
}

/// Scales a rank's mean gradient by its part of the global batch (`n / global`).
fn weigh(grads: &mut [f32], weight: Option<f32>) {
    if let Some(w) = weight {
        grads.iter_mut().for_each(|g| *g *= w);
    }
}

impl EpochRun {
    fn add(&mut self, s: &StepStats, all_samples: usize) {
        self.times += s.times;
        self.loss_sum += f64::from(s.loss);
        self.correct += u64::from(s.correct);
        self.samples += s.samples;
        self.all_samples += all_samples;
        self.steps += 1;
    }

    fn summary(&self, wall: Duration) -> (f64, f64, usize, Duration, StepTimes) {
        (
            self.loss_sum / self.steps.max(1) as f64,
            self.correct as f64 / self.samples.max(1) as f64,
            self.all_samples,
            wall,
            self.times,
        )
    }
}

impl Trainer {
    /// Sets up training on this rank: binds the model, then initialises it from rank 0
    /// (a fresh seeded initialisation, or the latest checkpoint with `resume`), broadcast
    /// to every rank.
    pub async fn new(gpu: GpuHandle, group: Option<Group>, spec: ModelSpec, config: TrainConfig) -> Result<Self> {
        if config.batch == 0 || config.eval_batch == 0 {
            return Err(TrainError::Config("batch sizes must be at least 1".into()));
        }
        let world = group.as_ref().map_or(1, |g| g.world());
        if config.batch.checked_mul(world).is_none() {
            return Err(TrainError::Config(format!("a batch of {} on each of {world} ranks overflows", config.batch)));
        }
        if config.balance == Balance::Measured && config.rebalance_every == 0 {
            return Err(TrainError::Config("measured balance needs rebalance_every of at least 1 step".into()));
        }
        let balancer = Balancer::new(&config.balance, world)?;
        let model = Model::new(spec, &gpu, config.bucket_bytes)?;
        let mut t = Self {
            gpu,
            model,
            group,
            config,
            step: 0,
            epoch: 0,
            segments_cache: None,
            balancer,
            window: Throughput::default(),
            last_samples: 0,
            residuals: Vec::new(),
            reduced_allocated: false,
        };
        t.initialise().await?;
        Ok(t)
    }

    /// This rank and the world size.
    pub fn rank_world(&self) -> (usize, usize) {
        self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()))
    }

    /// The group of ranks, when training data-parallel.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// The GPU actor.
    pub fn gpu(&self) -> &GpuHandle {
        &self.gpu
    }

    /// Samples per step on this rank.
    pub fn batch_size(&self) -> usize {
        self.config.batch
    }

    /// Samples per rank of a full global batch under the current shares (equal ones
    /// with `Balance::Equal`).
    pub fn split(&self) -> Vec<usize> {
        let (_, world) = self.rank_world();
        self.balancer.split(self.config.batch * world).expect("checked in Trainer::new")
    }

    /// The shares: current weights and, with `Balance::Measured`, the smoothed throughputs.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Epochs completed (also after resuming).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The bound model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    async fn initialise(&mut self) -> Result<()> {
        let spec = self.model.spec().clone();
        let shapes: Vec<Shape> = spec.params().into_iter().map(|(_, s)| s).collect();
        let (rank, _) = self.rank_world();
        // Rank 0 decides: a checkpoint or a fresh initialisation.
        let mut resumed: Option<Checkpoint> = None;
        if rank == 0 && self.config.resume {
            let dir = self
                .config
                .checkpoint_dir
                .as_ref()
                .ok_or_else(|| TrainError::Config("--resume needs a checkpoint directory".into()))?;
            resumed = checkpoint::load_latest(dir)?;
            if resumed.is_none() {
                tracing::warn!("no checkpoint in {}; starting fresh", dir.display());
            }
        }
        let (params, meta) = match &resumed {
            Some(ck) => {
                let dir = self.config.checkpoint_dir.as_ref().expect("checked above");
                (ck.params_for(&spec, dir)?, [u64_to_f32s(ck.state.epoch), u64_to_f32s(ck.state.step)].concat())
            }
            None if rank == 0 => (spec.init(self.config.seed), vec![0.0; 8]),
            None => (shapes.iter().map(|s| HostTensor::zeros(s.clone())).collect(), vec![0.0; 8]),
        };
        let (params, meta) = match &self.group {
            Some(g) if g.world() > 1 => {
                let flat = g.broadcast(0, flatten(&params)).await?;
                let meta = g.broadcast(0, meta).await?;
                (unflatten(&flat, &shapes), meta)
            }
            _ => (params, meta),
        };
        self.model.upload_params(&self.gpu, &params).await?;
        self.epoch = f32s_to_u64(&meta[0..4]);
        self.step = f32s_to_u64(&meta[4..8]);
        if self.epoch > 0 || self.step > 0 {
            // Optimiser state follows the parameters.
            let names: Vec<(String, Shape)> = self
                .model
                .params
                .iter()
                .flat_map(|p| {
                    self.config
                        .optimizer
                        .state_names()
                        .iter()
                        .map(move |s| (format!("{}.{s}", p.name), p.shape.clone()))
                })
                .collect();
            let state: Vec<HostTensor> = match &resumed {
                Some(ck) => names
                    .iter()
                    .map(|(n, s)| {
                        ck.optimizer
                            .iter()
                            .find(|(m, _)| m == n)
                            .map(|(_, t)| t.clone())
                            .unwrap_or_else(|| HostTensor::zeros(s.clone()))
                    })
                    .collect(),
                None => names.iter().map(|(_, s)| HostTensor::zeros(s.clone())).collect(),
            };
            let shapes: Vec<Shape> = names.iter().map(|(_, s)| s.clone()).collect();
            let state = match &self.group {
                Some(g) if g.world() > 1 => unflatten(&g.broadcast(0, flatten(&state)).await?, &shapes),
                _ => state,
            };
            let named: Vec<(String, HostTensor)> = names.into_iter().map(|(n, _)| n).zip(state).collect();
            self.model.upload_state(&self.gpu, &self.config.optimizer, &named).await?;
            tracing::info!("resumed at epoch {} step {}", self.epoch, self.step);
        }
        Ok(())
    }

    fn distributed(&self) -> bool {
        self.group.as_ref().is_some_and(|g| g.world() > 1)
    }

    async fn download_many(&self, ids: Vec<TensorId>) -> Result<Vec<HostTensor>> {
        let r = self
            .gpu
            .with(move |ex| ids.iter().map(|&id| ex.download::<f32>(id)).collect::<strata_gpu::Result<Vec<_>>>())
            .await??;
        Ok(r)
    }

    /// One optimiser step on `batch`: forward, backward with bucketed all-reduce, update.
    /// Every rank's batch has the same size, and gradients are averaged.
    pub async fn step(&mut self, batch: Batch) -> Result<StepStats> {
        self.step_weighted(batch, None).await
    }

    /// One optimiser step on this rank's `batch`, a slice of a global batch of `global`
    /// samples whose other slices the other ranks hold (of any sizes). This rank's mean
    /// gradient is weighted by `batch / global` and the buckets are summed, so the update
    /// is that of one node on the global batch (up to the rounding of another summation order).
    pub async fn step_share(&mut self, batch: Batch, global: usize) -> Result<StepStats> {
        let n = batch.y.data().len();
        if n == 0 || n > global || (!self.distributed() && n != global) {
            let (rank, world) = self.rank_world();
            return Err(TrainError::Config(format!(
                "rank {rank} of {world} cannot take {n} samples as its share of a global batch of {global}"
            )));
        }
        self.step_weighted(batch, Some((n as f64 / global as f64) as f32)).await
    }

    async fn step_weighted(&mut self, batch: Batch, weight: Option<f32>) -> Result<StepStats> {
        let start = Instant::now();
        let n = batch.y.data().len();
        let (model, gpu) = (&self.model, &self.gpu);
        gpu.upload_as(model.input, batch.x).await?;
        gpu.upload_as(model.targets, batch.y).await?;
        let distributed = self.distributed();
        let segments = match &self.segments_cache {
            Some((b, s)) if *b == n => s.clone(),
            _ => {
                let s = model.backward(n, distributed)?;
                self.segments_cache = Some((n, s.clone()));
                s
            }
        };
        // Each backward segment is consumed once, in order: the first runs with the forward
        // pass, the rest one per bucket (or all at once on a single rank).
        let mut segments = segments.into_iter();
        let mut first = model.forward(n, true)?;
        first.extend(segments.next().expect("a model has at least one bucket"));
        let model = &self.model;
        let mut exposed = Duration::ZERO;
        if distributed {
            let group = self.group.as_ref().expect("distributed");
            let op = reduce_op(weight);
            if !self.reduced_allocated {
                for b in &model.buckets {
                    let zeros = HostTensor::new([b.len], vec![0.0f32; b.len]).map_err(strata_nn::NnError::from)?;
                    gpu.upload_as(b.reduced, zeros).await?;
                }
                self.reduced_allocated = true;
            }
            gpu.run(first).await?;
            let wire = self.config.compression;
            let spec = TensorReduce::new(op).wire(wire);
            let mut residuals = std::mem::take(&mut self.residuals);
            residuals.resize_with(model.buckets.len(), Vec::new);
            for (bucket, residual) in model.buckets.iter().zip(residuals.iter_mut()) {
                if wire != Compression::None && residual.len() != bucket.len {
                    *residual = vec![0.0; bucket.len];
                }
                let next = segments.next();
                // The bucket goes from the device into the all-reduce and back in pieces;
                // their reads are queued on the GPU actor before the next segment, which
                // runs while the pieces cross the network.
                let comm_part = async {
                    let r = group
                        .all_reduce_tensor_with(gpu, bucket.flat, bucket.reduced, bucket.len, &spec, |range, x| {
                            // Weighted first: the residual is what the wire drops of what is sent.
                            weigh(x, weight);
                            if wire != Compression::None {
                                error_feedback(wire, x, &mut residual[range]);
                            }
                        })
                        .await;
                    (r, Instant::now())
                };
                let gpu_part = async {
                    if let Some(seg) = next {
                        gpu.run(seg).await?;
                        // `run` returns once the work is submitted; wait for the device, so
                        // that the time counted as exposed communication is really that.
                        gpu.with(|ex| ex.gpu().sync()).await??;
                    }
                    Ok::<_, TrainError>(Instant::now())
                };
                let ((reduced, comm_done), gpu_result) = tokio::join!(comm_part, gpu_part);
                let gpu_done = gpu_result?;
                reduced?;
                exposed += comm_done.saturating_duration_since(gpu_done);
            }
            self.residuals = residuals;
        } else {
            first.extend(segments.flatten());
            gpu.run(first).await?;
        }
        self.step += 1;
        gpu.run(model.apply(&self.config.optimizer, self.step as u32, distributed)).await?;
        let out = self.download_many(vec![model.loss, model.correct]).await?;
        let (loss, correct) = (out[0].data()[0], out[1].data()[0] as u32);
        let busy = start.elapsed().saturating_sub(exposed);
        if self.config.checksum_every > 0 && self.step.is_multiple_of(self.config.checksum_every) {
            self.verify_replicas().await?;
        }
        let total = start.elapsed();
        Ok(StepStats {
            loss,
            correct,
            samples: n,
            times: StepTimes { compute: total.saturating_sub(exposed), comm_exposed: exposed, data: Duration::ZERO },
            busy,
        })
    }

    /// Compares a checksum of every rank's parameters with rank 0's.
    pub async fn verify_replicas(&self) -> Result<()> {
        let Some(group) = self.group.as_ref().filter(|g| g.world() > 1) else { return Ok(()) };
        let params = self.model.download_params(&self.gpu).await?;
        let mine = params.iter().fold(0u64, |h, t| h.rotate_left(7) ^ fnv64(t.data()));
        let all = group.all_gather(&u64_to_f32s(mine)).await?;
        let ours = f32s_to_u64(&all[0..4]);
        for r in 1..group.world() {
            let theirs = f32s_to_u64(&all[r * 4..r * 4 + 4]);
            if theirs != ours {
                return Err(TrainError::Diverged { step: self.step, rank: r, theirs, ours });
            }
        }
        Ok(())
    }

    /// Trains one epoch, calling `on_step` after every step. With `Balance::Equal` this
    /// rank takes its shard of `train` (`DistributedSampler`); otherwise each step's global
    /// batch is the next `batch * world` indices of the epoch's order (those one node would
    /// take) and this rank takes its contiguous slice of it by the current shares. A last
    /// global batch with fewer samples than ranks is left out. Returns mean loss, accuracy
    /// of this rank, samples over all ranks, wall time and step times.
    pub async fn train_epoch(
        &mut self,
        train: &Arc<Dataset>,
        on_step: impl FnMut(&StepStats),
    ) -> Result<(f64, f64, usize, Duration, StepTimes)> {
        let start = Instant::now();
        let r = self.run_epoch(train, None, on_step).await?;
        self.epoch += 1;
        Ok(r.summary(start.elapsed()))
    }

    /// Trains the first `steps` steps of the current epoch's data as `train_epoch` would,
    /// without counting an epoch (benchmarks).
    pub async fn train_steps(
        &mut self,
        train: &Arc<Dataset>,
        steps: u64,
        on_step: impl FnMut(&StepStats),
    ) -> Result<(f64, f64, usize, Duration, StepTimes)> {
        let start = Instant::now();
        Ok(self.run_epoch(train, Some(steps), on_step).await?.summary(start.elapsed()))
    }

    async fn run_epoch(
        &mut self,
        train: &Arc<Dataset>,
        limit: Option<u64>,
        mut on_step: impl FnMut(&StepStats),
    ) -> Result<EpochRun> {
        let (rank, world) = self.rank_world();
        let mut run =
            EpochRun { loss_sum: 0.0, correct: 0, samples: 0, all_samples: 0, steps: 0, times: StepTimes::default() };
        let more = |run: &EpochRun| limit.is_none_or(|l| run.steps < l);
        if self.config.balance.by_shares() {
            let order = DistributedSampler::new(train.len(), 0, 1, self.config.seed, true).indices(self.epoch);
            let full = self.config.batch * world;
            for global in order.chunks(full) {
                if !more(&run) || global.len() < world {
                    break;
                }
                let counts = self.balancer.split(global.len())?;
                let first: usize = counts[..rank].iter().sum();
                let t = Instant::now();
                let batch = train.batch(&global[first..first + counts[rank]]);
                let waited = t.elapsed();
                let mut s = self.step_share(batch, global.len()).await?;
                s.times.data = waited;
                run.add(&s, global.len());
                on_step(&s);
                self.measure(&s);
                if self.step.is_multiple_of(self.config.rebalance_every.max(1)) {
                    self.rebalance(full).await?;
                }
            }
        } else {
            let sampler = DistributedSampler::new(train.len(), rank, world, self.config.seed, true);
            let loader =
                Loader::new(train.clone(), sampler.indices(self.epoch), self.config.batch, self.config.prefetch);
            while more(&run) {
                let t = Instant::now();
                let Some(batch) = loader.next_batch() else { break };
                let waited = t.elapsed();
                let mut s = self.step(batch).await?;
                s.times.data = waited;
                run.add(&s, s.samples * world);
                on_step(&s);
            }
        }
        Ok(run)
    }

    /// Adds a step to this rank's throughput window, unless its batch size is new.
    fn measure(&mut self, s: &StepStats) {
        if s.samples == self.last_samples {
            self.window.samples += s.samples;
            self.window.busy += s.busy;
        }
        self.last_samples = s.samples;
    }

    /// Pools every rank's throughput window and lets the balancer re-decide the shares;
    /// every rank computes the same split from the same gathered numbers.
    async fn rebalance(&mut self, global: usize) -> Result<()> {
        let mine = std::mem::take(&mut self.window);
        if self.config.balance != Balance::Measured {
            return Ok(());
        }
        let Some(group) = self.group.as_ref().filter(|g| g.world() > 1) else { return Ok(()) };
        let all = group.all_gather(&[mine.samples as f32, mine.busy.as_secs_f32()]).await?;
        let measured: Vec<Throughput> = all
            .chunks_exact(2)
            .map(|c| match Duration::try_from_secs_f32(c[1]) {
                Ok(busy) => Throughput { samples: c[0] as usize, busy },
                Err(_) => Throughput::default(),
            })
            .collect();
        if self.balancer.observe(global, &measured) {
            tracing::info!(
                step = self.step,
                "global batch of {global} now split {:?} (smoothed samples/s per rank {:.1?})",
                self.balancer.split(global)?,
                self.balancer.rates().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Loss and accuracy over all of `test`, each rank evaluating its share.
    pub async fn evaluate(&self, test: &Arc<Dataset>) -> Result<(f64, f64)> {
        let (rank, world) = self.rank_world();
        let indices: Vec<usize> = (rank..test.len()).step_by(world).collect();
        let (mut loss_sum, mut correct, mut count) = (0f64, 0f64, 0f64);
        for chunk in indices.chunks(self.config.eval_batch) {
            let b = test.batch(chunk);
            let n = chunk.len();
            self.gpu.upload_as(self.model.input, b.x).await?;
            self.gpu.upload_as(self.model.targets, b.y).await?;
            self.gpu.run(self.model.forward(n, true)?).await?;
            let out = self.download_many(vec![self.model.loss, self.model.correct]).await?;
            loss_sum += f64::from(out[0].data()[0]) * n as f64;
            correct += f64::from(out[1].data()[0]);
            count += n as f64;
        }
        let totals = match self.group.as_ref().filter(|g| g.world() > 1) {
            Some(g) => g.all_reduce(vec![loss_sum as f32, correct as f32, count as f32], ReduceOp::Sum).await?,
            None => vec![loss_sum as f32, correct as f32, count as f32],
        };
        let count = f64::from(totals[2]).max(1.0);
        Ok((f64::from(totals[0]) / count, f64::from(totals[1]) / count))
    }

    /// Writes a checkpoint of the current state (rank 0 only; others return `None`).
    pub async fn checkpoint(&self, info: std::collections::HashMap<String, String>) -> Result<Option<PathBuf>> {
        let (Some(dir), (0, _)) = (&self.config.checkpoint_dir, self.rank_world()) else { return Ok(None) };
        let names: Vec<String> = self.model.params.iter().map(|p| p.name.clone()).collect();
        let params = names.into_iter().zip(self.model.download_params(&self.gpu).await?).collect();
        let optimizer = self.model.download_state(&self.gpu, &self.config.optimizer).await?;
        let state = TrainState { epoch: self.epoch, step: self.step, spec: self.model.spec().clone(), info };
        Ok(Some(checkpoint::save(dir, &Checkpoint { params, optimizer, state })?))
    }

    /// Current parameters (for tests and export).
    pub async fn params(&self) -> Result<Vec<HostTensor>> {
        Ok(self.model.download_params(&self.gpu).await?)
    }
}
