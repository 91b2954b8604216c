//! One stage of one replica of a pipeline, on this node.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_collective::{CollectiveError, Group, GroupOptions, ReduceOp, TensorReduce};
use strata_gpu::{GpuHandle, Op, TensorId};
use strata_net::MembershipEvent;
use strata_nn::checkpoint::{self, Checkpoint, TrainState};
use strata_nn::data::{Dataset, DistributedSampler};
use strata_nn::{Accumulate, Cut, ModelSpec, NnError, Optimizer, StageModel};
use strata_tensor::{HostTensor, Shape, SplitMix64};
use tokio::sync::{Notify, mpsc};

use super::partition::{UnitCost, balance};
use super::schedule::{Next, Schedule, StagePlan, Work};
use super::timeline::{Event, EventKind, Timeline, decode, encode, now_us};
use crate::TrainError;
use crate::trainer::{flatten, unflatten};

type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Settings of pipeline training.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Stages `S`; the world size must be a multiple (`R = world / S` replicas).
    pub stages: usize,
    /// Micro-batches per step `m`.
    pub micro_batches: usize,
    /// Samples per micro-batch; a step takes `R * m * micro_batch` samples.
    pub micro_batch: usize,
    /// The schedule.
    pub schedule: Schedule,
    /// The layers that start stages 1.. (`S - 1` names); `None` balances the stages by
    /// each layer's forward + backward time measured on each stage's own adapter.
    pub split: Option<Vec<String>>,
    /// Memory each stage may use for parameters, optimiser state and activations, if
    /// limited (the balancer keeps to it).
    pub stage_memory_bytes: Option<u64>,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Where per-stage checkpoints go (`stage-S/epoch-N`), if anywhere.
    pub checkpoint_dir: Option<PathBuf>,
    /// Start from the newest epoch every stage has a checkpoint of.
    pub resume: bool,
    /// Record the timeline of the first this many steps of the run (0: none).
    pub timeline_steps: u64,
    /// Samples per evaluation micro-batch.
    pub eval_batch: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stages: 2,
            micro_batches: 4,
            micro_batch: 16,
            schedule: Schedule::OneFOneB,
            split: None,
            stage_memory_bytes: None,
            optimizer: Optimizer::Adam(Default::default()),
            seed: 0,
            checkpoint_dir: None,
            resume: false,
            timeline_steps: 64,
            eval_batch: 250,
        }
    }
}

/// One step's outcome on this node.
#[derive(Clone, Copy, Debug)]
pub struct PipelineStats {
    /// Mean loss over this replica's micro-batches (last stage only; NaN elsewhere).
    pub loss: f32,
    /// Correct predictions in this replica's micro-batches (last stage only).
    pub correct: u32,
    /// Samples in the global batch.
    pub samples: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// Most micro-batches this stage held at once during the step.
    pub activation_peak: usize,
}

const INFO_CUT: &str = "pipeline_cut";
const INFO_STAGE: &str = "pipeline_stage";
const INFO_STAGES: &str = "pipeline_stages";

/// One stage of one replica of a pipeline: its layers on this node's GPU actor, the
/// schedule's plan each step, transfers to and from the neighbouring stages, and the
/// all-reduce with the same stage of the other replicas.
pub struct PipelineTrainer {
    gpu: GpuHandle,
    stage: StageModel,
    cut: Cut,
    config: PipelineConfig,
    world: Option<Group>,
    pipe: Option<Group>,
    dp: Option<Group>,
    membership: Option<mpsc::Receiver<MembershipEvent>>,
    s: usize,
    r: usize,
    replicas: usize,
    step: u64,
    epoch: u64,
    steps_run: u64,
    events: Vec<Event>,
    step_losses: Vec<f32>,
    peak: usize,
}

fn layer_names(spec: &ModelSpec, cut: &Cut, s: usize) -> String {
    let r = cut.range(s);
    format!("{}..{}", spec.layers[r.start].0, spec.layers[r.end - 1].0)
}

impl PipelineTrainer {
    /// Sets up this node's stage: checks the configuration (before any step: too many
    /// stages, an unknown split point, a world that is not a multiple of the stages, a
    /// checkpoint of another cut), decides the cut (given, from the checkpoint being
    /// resumed, or balanced by measured time), binds the stage and initialises it (the
    /// same parameters a single node would start from, or the checkpoint).
    pub async fn new(gpu: GpuHandle, world: Option<Group>, spec: ModelSpec, config: PipelineConfig) -> Result<Self> {
        let n = world.as_ref().map_or(1, |g| g.world());
        let rank = world.as_ref().map_or(0, |g| g.rank());
        let stages = config.stages;
        if stages == 0 || config.micro_batches == 0 || config.micro_batch == 0 || config.eval_batch == 0 {
            return Err(TrainError::Config(
                "pipeline stages, micro-batches and batch sizes must all be at least 1".into(),
            ));
        }
        spec.check_stages(stages)?;
        if !n.is_multiple_of(stages) {
            return Err(TrainError::Config(format!(
                "{n} nodes cannot hold {stages}-stage pipelines: the node count must be a multiple of the stage count"
            )));
        }
        spec.shapes(config.micro_batch)?;
        if let Some(w) = world.as_ref().filter(|w| w.world() > 1) {
            agree(w, &spec, &config).await?;
        }
        let (s, r, replicas) = (rank % stages, rank / stages, n / stages);
        // Subgroups: this replica's stages in order, and this stage's replicas.
        let (pipe, dp) = match &world {
            Some(w) => {
                let node = w.node().clone();
                let members = w.members();
                let pipe_members: Vec<String> = members[r * stages..(r + 1) * stages].to_vec();
                let dp_members: Vec<String> = (0..replicas).map(|k| members[k * stages + s].clone()).collect();
                let pipe = (stages > 1)
                    .then(|| Group::new(node.clone(), pipe_members, GroupOptions::default()))
                    .transpose()?;
                let dp = (replicas > 1).then(|| Group::new(node, dp_members, GroupOptions::default())).transpose()?;
                (pipe, dp)
            }
            None => (None, None),
        };
        let membership = match &world {
            Some(w) => Some(w.node().subscribe().await.map_err(CollectiveError::from)?),
            None => None,
        };
        // The checkpoint to resume, if any: its cut is the run's cut.
        let resumed = match (&config.checkpoint_dir, config.resume) {
            (Some(dir), true) => resume_point(&world, dir, s, stages).await?,
            (None, true) => return Err(TrainError::Config("--resume needs a checkpoint directory".into())),
            _ => None,
        };
        let cut = match (&config.split, &resumed) {
            (Some(names), _) if names.len() + 1 != stages => {
                return Err(TrainError::Config(format!(
                    "{} split points given for {stages} stages (a cut into S stages names S - 1 layers)",
                    names.len()
                )));
            }
            (Some(names), Some((path, ck))) => {
                let cut = spec.cut_at(names)?;
                check_cut(&spec, &cut, path, ck)?;
                cut
            }
            (Some(names), None) => spec.cut_at(names)?,
            (None, Some((path, ck))) => {
                let names = ck.state.info.get(INFO_CUT).cloned().unwrap_or_default();
                let names: Vec<String> = names.split(',').filter(|n| !n.is_empty()).map(String::from).collect();
                let cut = spec.cut_at(&names).map_err(|e| {
                    TrainError::Nn(NnError::Checkpoint { path: path.clone(), message: format!("its cut: {e}") })
                })?;
                check_cut(&spec, &cut, path, ck)?;
                cut
            }
            (None, None) if stages == 1 => spec.cut_at(&[])?,
            (None, None) => balanced_cut(&gpu, world.as_ref(), &spec, &config).await?,
        };
        let slots = config.schedule.activation_bound(stages, s, config.micro_batches);
        let stage = StageModel::new(spec, &cut, s, slots, &gpu)?;
        let mut t = Self {
            gpu,
            stage,
            cut,
            config,
            world,
            pipe,
            dp,
            membership,
            s,
            r,
            replicas,
            step: 0,
            epoch: 0,
            steps_run: 0,
            events: Vec::new(),
            step_losses: Vec::new(),
            peak: 0,
        };
        t.initialise(resumed).await?;
        tracing::info!(
            "pipeline stage {s} of {stages} (replica {r} of {replicas}): layers {}, {} micro-batch slots, schedule {}",
            layer_names(t.stage.spec(), &t.cut, s),
            slots,
            t.config.schedule
        );
        Ok(t)
    }

    async fn initialise(&mut self, resumed: Option<(PathBuf, Checkpoint)>) -> Result<()> {
        let shapes: Vec<Shape> = self.stage.params.iter().map(|p| p.shape.clone()).collect();
        let (params, state, meta) = match &resumed {
            Some((path, ck)) => {
                let mut params = Vec::new();
                for p in &self.stage.params {
                    let t = ck.params.iter().find(|(n, _)| *n == p.name).map(|(_, t)| t.clone()).ok_or_else(|| {
                        NnError::Checkpoint { path: path.clone(), message: format!("parameter {} is missing", p.name) }
                    })?;
                    if *t.shape() != p.shape {
                        return Err(NnError::Checkpoint {
                            path: path.clone(),
                            message: format!("parameter {} has shape {}, the model {}", p.name, t.shape(), p.shape),
                        }
                        .into());
                    }
                    params.push(t);
                }
                (params, Some(ck.optimizer.clone()), [ck.state.epoch as f32, ck.state.step as f32])
            }
            None => (self.stage.init(self.config.seed), None, [0.0, 0.0]),
        };
        // Replicas of a stage start from replica 0's values.
        let (params, meta) = match &self.dp {
            Some(g) => {
                let flat = flatten(&params);
                let flat = g.broadcast(0, flat).await?;
                (unflatten(&flat, &shapes), g.broadcast(0, meta.to_vec()).await?)
            }
            None => (params, meta.to_vec()),
        };
        self.stage.upload_params(&self.gpu, &params).await?;
        (self.epoch, self.step) = (meta[0] as u64, meta[1] as u64);
        if self.epoch > 0 || self.step > 0 {
            let names: Vec<(String, Shape)> = self
                .stage
                .params
                .iter()
                .flat_map(|p| {
                    self.config
                        .optimizer
                        .state_names()
                        .iter()
                        .map(move |n| (format!("{}.{n}", p.name), p.shape.clone()))
                })
                .collect();
            let mut values: Vec<HostTensor> = names
                .iter()
                .map(|(n, shape)| {
                    state
                        .as_ref()
                        .and_then(|st| st.iter().find(|(m, _)| m == n).map(|(_, t)| t.clone()))
                        .unwrap_or_else(|| HostTensor::zeros(shape.clone()))
                })
                .collect();
            if let Some(g) = &self.dp {
                let shapes: Vec<Shape> = names.iter().map(|(_, s)| s.clone()).collect();
                let flat = flatten(&values);
                values = unflatten(&g.broadcast(0, flat).await?, &shapes);
            }
            let named: Vec<(String, HostTensor)> = names.into_iter().map(|(n, _)| n).zip(values).collect();
            self.stage.upload_state(&self.gpu, &self.config.optimizer, &named).await?;
        }
        Ok(())
    }

    /// This node's stage and replica, and the stage and replica counts.
    pub fn position(&self) -> (usize, usize, usize, usize) {
        (self.s, self.r, self.config.stages, self.replicas)
    }

    /// The configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The cut.
    pub fn cut(&self) -> &Cut {
        &self.cut
    }

    /// The bound stage.
    pub fn stage(&self) -> &StageModel {
        &self.stage
    }

    /// The GPU actor.
    pub fn gpu(&self) -> &GpuHandle {
        &self.gpu
    }

    /// Epochs completed (also after resuming).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Samples per step over all replicas.
    pub fn global_batch(&self) -> usize {
        self.replicas * self.config.micro_batches * self.config.micro_batch
    }

    /// Most micro-batches this stage has held at once so far.
    pub fn activation_peak(&self) -> usize {
        self.peak
    }

    /// This stage's loss of every step of this run (last stages only).
    pub fn step_losses(&self) -> &[f32] {
        &self.step_losses
    }

    /// One step over `global` (the step's global batch of sample indices into `data`,
    /// `R * m * micro_batch` of them): this replica's micro-batches run through the
    /// pipeline by the schedule, then the accumulated gradients are averaged over the
    /// replicas and the optimiser steps.
    pub async fn train_step(&mut self, data: &Dataset, global: &[usize]) -> Result<PipelineStats> {
        let (m, b) = (self.config.micro_batches, self.config.micro_batch);
        if global.len() != self.global_batch() {
            return Err(TrainError::Config(format!(
                "a step takes {} samples ({} replicas x {m} micro-batches x {b}), {} given",
                self.global_batch(),
                self.replicas,
                global.len()
            )));
        }
        let start = Instant::now();
        let mine = &global[self.r * m * b..(self.r + 1) * m * b];
        let stages = self.config.stages;
        let (first, last) = (self.s == 0, self.s + 1 == stages);
        let micro: Vec<_> = if first || last { mine.chunks(b).map(|c| data.batch(c)).collect() } else { Vec::new() };
        let in_shape = self.stage.input_shape(b)?;
        let out_shape = self.stage.output_shape(b)?;
        let step = self.steps_run;
        let record = step < self.config.timeline_steps;
        let events = RefCell::new(Vec::new());
        let ev = |kind, micro: usize, start_us| {
            if record {
                events.borrow_mut().push(Event {
                    replica: self.r as u32,
                    stage: self.s as u32,
                    step,
                    micro: micro as u32,
                    kind,
                    start_us,
                    end_us: now_us(),
                });
            }
        };
        let acts: RefCell<VecDeque<Vec<f32>>> = RefCell::new(VecDeque::new());
        let grads: RefCell<VecDeque<Vec<f32>>> = RefCell::new(VecDeque::new());
        let (acts_in, grads_in) = (Cell::new(0usize), Cell::new(0usize));
        let arrived = Notify::new();
        let (to_next, mut next_rx) = mpsc::channel::<(usize, Vec<f32>)>(m);
        let (to_prev, mut prev_rx) = mpsc::channel::<(usize, Vec<f32>)>(m);
        let losses = RefCell::new(Vec::with_capacity(m));
        let pipe = self.pipe.as_ref();
        let peak = Cell::new(0usize);

        let compute = async {
            let (to_next, to_prev) = (to_next, to_prev);
            let mut plan = StagePlan::new(self.config.schedule, stages, self.s, m);
            loop {
                let next = plan.next(|a| match a.work {
                    Work::Forward => acts_in.get() > a.micro,
                    _ => grads_in.get() > a.micro,
                });
                let a = match next {
                    Next::Done => break,
                    Next::Wait => {
                        arrived.notified().await;
                        continue;
                    }
                    Next::Run(a) => a,
                };
                peak.set(peak.get().max(plan.held()));
                let t0 = now_us();
                let slot = a.micro % self.stage.slots();
                let acc = if a.micro == 0 { Accumulate::First } else { Accumulate::Add };
                match a.work {
                    Work::Forward => {
                        let mut f32_in = Vec::new();
                        let mut u32_in = Vec::new();
                        if first {
                            f32_in.push((self.stage.input(slot), micro[a.micro].x.clone()));
                        } else {
                            let v = acts.borrow_mut().pop_front().expect("arrived");
                            f32_in.push((self.stage.input(slot), host(&in_shape, v)?));
                        }
                        if last {
                            u32_in.push((self.stage.targets(slot), micro[a.micro].y.clone()));
                        }
                        let ops = self.stage.forward(slot, b)?;
                        let out = if last {
                            let (l, c) = self.stage.loss(slot);
                            vec![l, c]
                        } else {
                            vec![self.stage.output(slot)]
                        };
                        let mut got = run_on(&self.gpu, f32_in, u32_in, ops, out).await?;
                        ev(EventKind::Forward, a.micro, t0);
                        if last {
                            losses.borrow_mut().push((got[0][0], got[1][0]));
                        } else {
                            let _ = to_next.send((a.micro, got.remove(0))).await;
                        }
                    }
                    Work::Backward | Work::BackwardInput => {
                        let mut f32_in = Vec::new();
                        if !last {
                            let v = grads.borrow_mut().pop_front().expect("arrived");
                            f32_in.push((self.stage.output_grad(slot), host(&out_shape, v)?));
                        }
                        let weight = (a.work == Work::Backward).then_some(acc);
                        let ops = self.stage.backward(slot, b, true, weight)?;
                        let out = if first { Vec::new() } else { vec![self.stage.input_grad(slot)] };
                        let mut got = run_on(&self.gpu, f32_in, Vec::new(), ops, out).await?;
                        ev(if weight.is_some() { EventKind::Backward } else { EventKind::BackwardInput }, a.micro, t0);
                        if !first {
                            let _ = to_prev.send((a.micro, got.remove(0))).await;
                        }
                    }
                    Work::BackwardWeight => {
                        let ops = self.stage.backward(slot, b, false, Some(acc))?;
                        run_on(&self.gpu, Vec::new(), Vec::new(), ops, Vec::new()).await?;
                        ev(EventKind::BackwardWeight, a.micro, t0);
                    }
                }
            }
            Ok::<_, TrainError>(())
        };
        let recv_acts = async {
            if let (Some(p), false) = (pipe, first) {
                for j in 0..m {
                    let t0 = now_us();
                    let v = p.recv(self.s - 1, in_shape.numel()).await?;
                    ev(EventKind::Recv, j, t0);
                    acts.borrow_mut().push_back(v);
                    acts_in.set(j + 1);
                    arrived.notify_one();
                }
            }
            Ok::<_, TrainError>(())
        };
        let recv_grads = async {
            if let (Some(p), false) = (pipe, last) {
                for j in 0..m {
                    let t0 = now_us();
                    let v = p.recv(self.s + 1, out_shape.numel()).await?;
                    ev(EventKind::Recv, j, t0);
                    grads.borrow_mut().push_back(v);
                    grads_in.set(j + 1);
                    arrived.notify_one();
                }
            }
            Ok::<_, TrainError>(())
        };
        let send_next = async {
            while let Some((j, v)) = next_rx.recv().await {
                let t0 = now_us();
                pipe.expect("more than one stage").send(self.s + 1, v).await?;
                ev(EventKind::Send, j, t0);
            }
            Ok::<_, TrainError>(())
        };
        let send_prev = async {
            while let Some((j, v)) = prev_rx.recv().await {
                let t0 = now_us();
                pipe.expect("more than one stage").send(self.s - 1, v).await?;
                ev(EventKind::Send, j, t0);
            }
            Ok::<_, TrainError>(())
        };
        let mut membership = self.membership.take();
        let members: Vec<String> = self.world.as_ref().map(|w| w.members().to_vec()).unwrap_or_default();
        let watch = watchdog(membership.as_mut(), &members, self.config.stages);
        let work = async { tokio::try_join!(compute, recv_acts, recv_grads, send_next, send_prev) };
        let outcome = tokio::select! {
            r = work => r.map(|_| ()),
            e = watch => Err(e),
        };
        self.membership = membership;
        if let Err(e) = outcome {
            return Err(self.explain(e).await);
        }
        // The step's gradients: scaled by 1/m, averaged over replicas, applied.
        let t0 = now_us();
        self.step += 1;
        let step_no = u32::try_from(self.step).unwrap_or(u32::MAX);
        let scale = 1.0 / m as f32;
        match self.dp.as_ref().filter(|_| self.stage.flat_len() > 0) {
            Some(g) => {
                let len = self.stage.flat_len();
                let mut uploads = Vec::new();
                if self.steps_run == 0 {
                    // The all-reduce writes its result into this tensor piece by piece.
                    uploads.push((self.stage.reduced, HostTensor::new([len], vec![0.0; len]).map_err(NnError::from)?));
                }
                let ops = self.stage.finish_gradients(scale, true);
                run_on(&self.gpu, uploads, Vec::new(), ops, Vec::new()).await?;
                let spec = TensorReduce::new(ReduceOp::Mean);
                if let Err(e) = g.all_reduce_tensor(&self.gpu, self.stage.flat, self.stage.reduced, len, &spec).await {
                    return Err(self.explain(e.into()).await);
                }
                let ops = self.stage.apply(&self.config.optimizer, step_no, true);
                run_on(&self.gpu, Vec::new(), Vec::new(), ops, Vec::new()).await?;
            }
            None => {
                let mut ops = self.stage.finish_gradients(scale, false);
                ops.extend(self.stage.apply(&self.config.optimizer, step_no, false));
                run_on(&self.gpu, Vec::new(), Vec::new(), ops, Vec::new()).await?;
            }
        }
        ev(EventKind::Optimizer, 0, t0);
        self.events.extend(events.into_inner());
        self.steps_run += 1;
        self.peak = self.peak.max(peak.get());
        let losses = losses.into_inner();
        let (loss, correct) = if last {
            let loss = losses.iter().map(|l| l.0).sum::<f32>() / m as f32;
            self.step_losses.push(loss);
            (loss, losses.iter().map(|l| l.1 as u32).sum())
        } else {
            (f32::NAN, 0)
        };
        Ok(PipelineStats {
            loss,
            correct,
            samples: global.len(),
            seconds: start.elapsed().as_secs_f64(),
            activation_peak: peak.get(),
        })
    }

    /// Names the lost stage when a step failed because a member failed: waits up to the
    /// failure timeout for the membership to say who, since a neighbour's departure can be
    /// reported before the failure that caused it.
    async fn explain(&self, e: TrainError) -> TrainError {
        if matches!(e, TrainError::StageLost { .. }) {
            return e;
        }
        let Some(w) = &self.world else { return e };
        let node = w.node();
        let wait = Duration::from_millis(node.config().failure_timeout_ms) + Duration::from_secs(1);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(members) = node.members().await
                && let Some(m) = members
                    .iter()
                    .find(|m| m.state == strata_net::MemberState::Failed && w.members().contains(&m.info.name))
            {
                let rank = w.members().iter().position(|n| *n == m.info.name).expect("member");
                return TrainError::StageLost {
                    node: m.info.name.clone(),
                    stage: rank % self.config.stages,
                    replica: rank / self.config.stages,
                    reason: format!("failed (silent past the failure timeout); this stage stopped with: {e}"),
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        e
    }

    /// Trains one epoch: the epoch's shuffled samples in global batches (a last partial
    /// batch is dropped, as every micro-batch has the same size), calling `on_step` after
    /// every step. Returns the mean loss and accuracy of the last stages over all
    /// replicas, the samples trained and the wall time.
    pub async fn train_epoch(
        &mut self,
        data: &Arc<Dataset>,
        mut on_step: impl FnMut(&PipelineStats),
    ) -> Result<(f64, f64, usize, Duration)> {
        let indices = DistributedSampler::new(data.len(), 0, 1, self.config.seed, true).indices(self.epoch);
        let g = self.global_batch();
        if indices.len() < g {
            return Err(TrainError::Config(format!(
                "the training set has {} samples, fewer than one global batch of {g}",
                indices.len()
            )));
        }
        let start = Instant::now();
        let (mut loss, mut correct, mut samples) = (0f64, 0u64, 0usize);
        let steps = indices.len() / g;
        for t in 0..steps {
            let st = self.train_step(data, &indices[t * g..(t + 1) * g]).await?;
            if st.loss.is_finite() {
                loss += f64::from(st.loss);
                correct += u64::from(st.correct);
            }
            samples += st.samples;
            on_step(&st);
        }
        self.epoch += 1;
        let totals = self.sum_over_last_stages(vec![loss as f32, correct as f32]).await?;
        let per_replica = (self.config.micro_batches * self.config.micro_batch * steps) as f64;
        Ok((
            f64::from(totals[0]) / (steps as f64 * self.replicas as f64),
            f64::from(totals[1]) / (per_replica * self.replicas as f64),
            samples,
            start.elapsed(),
        ))
    }

    /// `v` summed over the last stages of all replicas (other stages add nothing).
    async fn sum_over_last_stages(&self, mut v: Vec<f32>) -> Result<Vec<f32>> {
        if self.s + 1 != self.config.stages {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
        Ok(match &self.world {
            Some(w) if w.world() > 1 => w.all_reduce(v, ReduceOp::Sum).await?,
            _ => v,
        })
    }

    /// The mean loss of every step of this run, over the replicas, on every node.
    pub async fn gather_step_losses(&self) -> Result<Vec<f32>> {
        let steps = self.steps_run as usize;
        let mine = if self.s + 1 == self.config.stages {
            self.step_losses.iter().map(|l| l / self.replicas as f32).collect()
        } else {
            vec![0.0; steps]
        };
        self.sum_over_last_stages(mine).await
    }

    /// Loss and accuracy over all of `test`, through the pipeline (each replica its share).
    pub async fn evaluate(&self, test: &Arc<Dataset>) -> Result<(f64, f64)> {
        let indices: Vec<usize> = (self.r..test.len()).step_by(self.replicas).collect();
        let stages = self.config.stages;
        let (first, last) = (self.s == 0, self.s + 1 == stages);
        let (mut loss_sum, mut correct, mut count) = (0f64, 0f64, 0f64);
        for chunk in indices.chunks(self.config.eval_batch) {
            let n = chunk.len();
            let batch = (first || last).then(|| test.batch(chunk));
            let mut f32_in = Vec::new();
            let mut u32_in = Vec::new();
            if first {
                f32_in.push((self.stage.input(0), batch.as_ref().expect("first").x.clone()));
            } else {
                let p = self.pipe.as_ref().expect("more than one stage");
                let shape = self.stage.input_shape(n)?;
                let v = p.recv(self.s - 1, shape.numel()).await?;
                f32_in.push((self.stage.input(0), host(&shape, v)?));
            }
            if last {
                u32_in.push((self.stage.targets(0), batch.as_ref().expect("last").y.clone()));
            }
            let (l, c) = self.stage.loss(0);
            let out = if last { vec![l, c] } else { vec![self.stage.output(0)] };
            let mut got = run_on(&self.gpu, f32_in, u32_in, self.stage.forward(0, n)?, out).await?;
            if last {
                loss_sum += f64::from(got[0][0]) * n as f64;
                correct += f64::from(got[1][0]);
                count += n as f64;
            } else {
                self.pipe.as_ref().expect("more than one stage").send(self.s + 1, got.remove(0)).await?;
            }
        }
        let t = self.sum_over_last_stages(vec![loss_sum as f32, correct as f32, count as f32]).await?;
        let count = f64::from(t[2]).max(1.0);
        Ok((f64::from(t[0]) / count, f64::from(t[1]) / count))
    }

    /// Writes this stage's checkpoint (replica 0 of each stage; others return `None`) to
    /// `dir/stage-S/epoch-N`, naming parameters as the whole model does and recording
    /// the cut; [`merge_stage_checkpoints`] makes them one single-node checkpoint.
    pub async fn checkpoint(&self, mut info: HashMap<String, String>) -> Result<Option<PathBuf>> {
        let Some(dir) = &self.config.checkpoint_dir else { return Ok(None) };
        if self.r != 0 {
            return Ok(None);
        }
        info.insert(INFO_CUT.into(), self.cut.names(self.stage.spec()).join(","));
        info.insert(INFO_STAGE.into(), self.s.to_string());
        info.insert(INFO_STAGES.into(), self.config.stages.to_string());
        let names = self.stage.params.iter().map(|p| p.name.clone());
        let params = names.zip(self.stage.download_params(&self.gpu).await?).collect();
        let optimizer = self.stage.download_state(&self.gpu, &self.config.optimizer).await?;
        let state = TrainState { epoch: self.epoch, step: self.step, spec: self.stage.spec().clone(), info };
        let path = checkpoint::save(&stage_dir(dir, self.s), &Checkpoint { params, optimizer, state })?;
        Ok(Some(path))
    }

    /// This stage's parameters.
    pub async fn params(&self) -> Result<Vec<HostTensor>> {
        Ok(self.stage.download_params(&self.gpu).await?)
    }

    /// Every stage's parameters in the whole model's order, on every node of replica 0
    /// (empty elsewhere): for tests and export.
    pub async fn all_params(&self) -> Result<Vec<HostTensor>> {
        let spec = self.stage.spec().clone();
        let shapes: Vec<Shape> = spec.params().into_iter().map(|(_, s)| s).collect();
        let mine = flatten(&self.params().await?);
        let Some(w) = self.world.as_ref().filter(|w| w.world() > 1) else { return Ok(unflatten(&mine, &shapes)) };
        // Each stage contributes its slice of the whole flat vector; the sum assembles it.
        let total: usize = shapes.iter().map(Shape::numel).sum();
        let offset: usize = spec.layers[..self.cut.range(self.s).start].iter().map(|(_, l)| l.param_count()).sum();
        let mut flat = vec![0.0f32; total];
        if self.r == 0 {
            flat[offset..offset + mine.len()].copy_from_slice(&mine);
        }
        let flat = w.all_reduce(flat, ReduceOp::Sum).await?;
        Ok(unflatten(&flat, &shapes))
    }

    /// The recorded timeline of every stage, gathered on every node.
    pub async fn gather_timeline(&self) -> Result<Timeline> {
        let mut events = self.events.clone();
        if let Some(w) = self.world.as_ref().filter(|w| w.world() > 1) {
            let mine = encode(&self.events);
            let lens = w.all_gather(&[f32::from_bits(mine.len() as u32)]).await?;
            let max = lens.iter().map(|l| l.to_bits() as usize).max().unwrap_or(0);
            let mut padded = mine;
            padded.resize(max, 0.0);
            let all = w.all_gather(&padded).await?;
            events = Vec::new();
            for (k, len) in lens.iter().enumerate() {
                let words = &all[k * max..k * max + len.to_bits() as usize];
                events.extend(decode(words).ok_or_else(|| TrainError::Config("a malformed timeline".into()))?);
            }
        }
        Ok(Timeline { stages: self.config.stages, replicas: self.replicas, events })
    }
}

/// Checks that every node runs the same model and pipeline settings: a stage of another
/// model would send activations of other shapes, and other settings a different schedule.
async fn agree(world: &Group, spec: &ModelSpec, c: &PipelineConfig) -> Result<()> {
    let text = format!(
        "{}|{}|{}|{}|{}|{:?}",
        serde_json::to_string(spec).unwrap_or_default(),
        c.stages,
        c.micro_batches,
        c.micro_batch,
        c.schedule,
        c.split
    );
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let words = [h as u32, (h >> 32) as u32].map(f32::from_bits);
    let all = world.all_gather(&words).await?;
    for (r, theirs) in all.chunks(2).enumerate() {
        if theirs.iter().zip(&words).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(TrainError::Config(format!(
                "node {} (rank {r}) runs another model or other pipeline settings than this node (rank {}): every node must give the same model, stages, micro-batches, batch size, schedule and split",
                world.members()[r],
                world.rank()
            )));
        }
    }
    Ok(())
}

fn stage_dir(dir: &Path, s: usize) -> PathBuf {
    dir.join(format!("stage-{s}"))
}

fn host(shape: &Shape, v: Vec<f32>) -> Result<HostTensor> {
    Ok(HostTensor::new(shape.clone(), v).map_err(NnError::from)?)
}

/// Uploads, runs and downloads in one message to the GPU actor; returns when the work is
/// done.
async fn run_on(
    gpu: &GpuHandle,
    f32_in: Vec<(TensorId, HostTensor)>,
    u32_in: Vec<(TensorId, HostTensor<u32>)>,
    ops: Vec<Op>,
    out: Vec<TensorId>,
) -> Result<Vec<Vec<f32>>> {
    let r = gpu
        .with(move |ex| {
            for (id, t) in &f32_in {
                ex.upload(*id, t)?;
            }
            for (id, t) in &u32_in {
                ex.upload(*id, t)?;
            }
            ex.run(&ops)?;
            if out.is_empty() {
                // Wait for the work, so that the timeline charges it to this action rather
                // than to the next one that reads something back.
                ex.gpu().sync()?;
            }
            out.iter().map(|&id| ex.download::<f32>(id).map(HostTensor::into_data)).collect::<strata_gpu::Result<_>>()
        })
        .await??;
    Ok(r)
}

/// Fails as soon as the membership reports a member of the pipeline failed.
async fn watchdog(rx: Option<&mut mpsc::Receiver<MembershipEvent>>, members: &[String], stages: usize) -> TrainError {
    if let Some(rx) = rx {
        while let Some(e) = rx.recv().await {
            if let MembershipEvent::Failed { name, silent_ms } = e
                && let Some(rank) = members.iter().position(|m| *m == name)
            {
                return TrainError::StageLost {
                    node: name,
                    stage: rank % stages,
                    replica: rank / stages,
                    reason: format!("failed (silent for {silent_ms} ms)"),
                };
            }
        }
    }
    std::future::pending().await
}

fn check_cut(spec: &ModelSpec, cut: &Cut, path: &Path, ck: &Checkpoint) -> Result<()> {
    let theirs = ck.state.info.get(INFO_CUT).cloned().unwrap_or_default();
    let ours = cut.names(spec).join(",");
    if theirs != ours || ck.state.spec != *spec {
        return Err(NnError::Cut {
            model: spec.name.clone(),
            message: format!(
                "checkpoint {} was written by a pipeline cut before [{theirs}] of model {}, this run cuts before [{ours}]; resume with that cut, or merge the stage checkpoints (strata checkpoint merge) and start a new pipeline from the merged model",
                path.display(),
                ck.state.spec.name
            ),
        }
        .into());
    }
    Ok(())
}

/// The checkpoint this stage resumes from: the newest epoch that every stage has (a
/// crash between two stages' saves leaves them one epoch apart). `None` when no stage has
/// one; an error when some stages have checkpoints and others none.
async fn resume_point(
    world: &Option<Group>,
    dir: &Path,
    s: usize,
    stages: usize,
) -> Result<Option<(PathBuf, Checkpoint)>> {
    let sdir = stage_dir(dir, s);
    let latest = checkpoint::load_latest(&sdir)?;
    let mine = latest.as_ref().map_or(-1.0, |ck| ck.state.epoch as f32);
    let all = match world.as_ref().filter(|w| w.world() > 1) {
        Some(w) => w.all_gather(&[mine]).await?,
        None => vec![mine],
    };
    let epochs: Vec<f32> = all.iter().copied().take(stages).collect();
    if epochs.iter().all(|&e| e < 0.0) {
        tracing::warn!("no checkpoint in {}; starting fresh", dir.display());
        return Ok(None);
    }
    if let Some(missing) = epochs.iter().position(|&e| e < 0.0) {
        return Err(TrainError::Config(format!(
            "stage {missing} has no checkpoint in {} while stage {} has epoch {}; cannot resume a pipeline with a stage missing",
            stage_dir(dir, missing).display(),
            epochs.iter().position(|&e| e >= 0.0).expect("some"),
            epochs.iter().cloned().fold(0.0, f32::max)
        )));
    }
    let common = epochs.iter().cloned().fold(f32::INFINITY, f32::min) as u64;
    match latest {
        Some(ck) if ck.state.epoch == common => Ok(Some((sdir.join(format!("epoch-{common}")), ck))),
        _ => {
            let path = sdir.join(format!("epoch-{common}"));
            tracing::warn!("stages disagree on their newest checkpoint; resuming every stage from epoch {common}");
            Ok(Some((path.clone(), checkpoint::load(&path)?)))
        }
    }
}

/// Measures each cut unit's forward + backward time on this node's adapter (the fastest
/// of a few runs after a warm-up: interference only ever adds time), with micro-batches
/// of `batch` samples.
async fn measure_units(gpu: &GpuHandle, spec: &ModelSpec, batch: usize) -> Result<Vec<f64>> {
    let units = spec.cut_units();
    let names: Vec<String> = units[1..].iter().map(|r| spec.layers[r.start].0.clone()).collect();
    let cut = spec.cut_at(&names)?;
    let mut rng = SplitMix64(0x5eed);
    let mut out = Vec::new();
    for u in 0..units.len() {
        let st = StageModel::new(spec.clone(), &cut, u, 1, gpu)?;
        st.upload_params(gpu, &st.init(0)).await?;
        let random = |shape: Shape, rng: &mut SplitMix64| {
            let data = (0..shape.numel()).map(|_| rng.next_f32() - 0.5).collect();
            HostTensor::new(shape, data).expect("sizes agree")
        };
        let mut f32_in = vec![(st.input(0), random(st.input_shape(batch)?, &mut rng))];
        let mut u32_in = Vec::new();
        if st.is_last() {
            u32_in.push((st.targets(0), HostTensor::new([batch], vec![0u32; batch]).map_err(NnError::from)?));
        } else {
            f32_in.push((st.output_grad(0), random(st.output_shape(batch)?, &mut rng)));
        }
        let mut ops = st.forward(0, batch)?;
        ops.extend(st.backward(0, batch, true, Some(Accumulate::First))?);
        let mut times = Vec::new();
        for i in 0..6 {
            let t = Instant::now();
            let (f, us, o) = (if i == 0 { f32_in.clone() } else { Vec::new() }, u32_in.clone(), ops.clone());
            gpu.with(move |ex| {
                for (id, t) in &f {
                    ex.upload(*id, t)?;
                }
                for (id, t) in &us {
                    ex.upload(*id, t)?;
                }
                ex.run(&o)?;
                ex.gpu().sync()
            })
            .await??;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        out.push(times.iter().copied().fold(f64::INFINITY, f64::min));
        gpu.free(st.tensor_ids()).await?;
        f32_in.clear();
    }
    Ok(out)
}

/// The cut balanced by measured time: every node measures every unit on its adapter,
/// the measurements are shared, and every node computes the same cut from them (stage
/// `s` priced by replica 0's stage-`s` node).
async fn balanced_cut(
    gpu: &GpuHandle,
    world: Option<&Group>,
    spec: &ModelSpec,
    config: &PipelineConfig,
) -> Result<Cut> {
    let stages = config.stages;
    let mine: Vec<f32> = measure_units(gpu, spec, config.micro_batch).await?.into_iter().map(|t| t as f32).collect();
    let u = mine.len();
    let all = match world.filter(|w| w.world() > 1) {
        Some(w) => w.all_gather(&mine).await?,
        None => mine.repeat(stages),
    };
    let units: Vec<UnitCost> = spec
        .cut_units()
        .into_iter()
        .enumerate()
        .map(|(k, r)| {
            let (param_bytes, act_bytes) = StageModel::memory(spec, r, config.micro_batch).unwrap_or((0, 0));
            UnitCost { seconds: (0..stages).map(|s| f64::from(all[s * u + k])).collect(), param_bytes, act_bytes }
        })
        .collect();
    let held: Vec<usize> =
        (0..stages).map(|s| config.schedule.activation_bound(stages, s, config.micro_batches)).collect();
    let budget = vec![config.stage_memory_bytes; stages];
    let b =
        balance(&units, stages, &held, &budget).map_err(|m| NnError::Cut { model: spec.name.clone(), message: m })?;
    let cut = spec.cut_units_at(stages, &b.starts)?;
    tracing::info!(
        "balanced cut before {:?}: measured ms per micro-batch per stage {:?}, bytes per stage {:?}",
        cut.names(spec),
        b.stage_seconds.iter().map(|t| (t * 1e4).round() / 10.0).collect::<Vec<_>>(),
        b.stage_bytes
    );
    Ok(cut)
}

/// Merges the newest common epoch of the stage checkpoints in `dir` (`stage-S/epoch-N`)
/// into one single-node checkpoint in `out` (`out/epoch-N`): the same safetensors layout
/// and PyTorch names as a checkpoint of single-node training, so anything that loads one
/// loads the other.
pub fn merge_stage_checkpoints(dir: &Path, out: &Path) -> Result<PathBuf> {
    let first = checkpoint::load_latest(&stage_dir(dir, 0))?
        .ok_or_else(|| TrainError::Config(format!("no stage checkpoint in {}", stage_dir(dir, 0).display())))?;
    let stages: usize = first
        .state
        .info
        .get(INFO_STAGES)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TrainError::Config(format!("{} holds no pipeline stage checkpoint", dir.display())))?;
    let mut cks = Vec::new();
    for s in 0..stages {
        let ck = checkpoint::load_latest(&stage_dir(dir, s))?
            .ok_or_else(|| TrainError::Config(format!("stage {s} has no checkpoint in {}", dir.display())))?;
        cks.push(ck);
    }
    let epoch = cks.iter().map(|c| c.state.epoch).min().expect("a stage");
    for (s, ck) in cks.iter_mut().enumerate() {
        if ck.state.epoch != epoch {
            *ck = checkpoint::load(&stage_dir(dir, s).join(format!("epoch-{epoch}")))?;
        }
        if ck.state.info.get(INFO_CUT) != first.state.info.get(INFO_CUT) || ck.state.spec != first.state.spec {
            return Err(TrainError::Config(format!(
                "stage {s}'s checkpoint in {} is of another cut or model",
                dir.display()
            )));
        }
    }
    let spec = first.state.spec.clone();
    let mut params = Vec::new();
    let mut optimizer = Vec::new();
    for ck in &cks {
        params.extend(ck.params.iter().cloned());
        optimizer.extend(ck.optimizer.iter().cloned());
    }
    let mut info = first.state.info.clone();
    for k in [INFO_CUT, INFO_STAGE, INFO_STAGES] {
        info.remove(k);
    }
    let merged = Checkpoint { params, optimizer, state: TrainState { epoch, step: cks[0].state.step, spec, info } };
    // The merged checkpoint must be one a single node loads.
    merged.params_for(&merged.state.spec, out)?;
    Ok(checkpoint::save(out, &merged)?)
}
