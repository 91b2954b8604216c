//! Pipeline stages: a sequential model cut into contiguous ranges of layers, each bound to
//! its own GPU actor with activation storage for several micro-batches in flight.
//!
//! A stage's backward pass comes in two halves that can run apart: the input gradient
//! (what the previous stage waits for) and the weight gradients (which a zero-bubble
//! schedule defers). Weight gradients accumulate over a step's micro-batches in
//! micro-batch order, so every schedule and every cut produces bitwise the same sums.

use std::ops::Range;

use strata_gpu::{GpuHandle, Op, TensorId};
use strata_tensor::geometry::Conv2dParams;
use strata_tensor::{HostTensor, Shape};

use crate::model::{self, conv_params};
use crate::{Layer, ModelSpec, NnError, Optimizer, ParamSlot, Result};

/// Where a model is cut into pipeline stages: the first layer of each stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    starts: Vec<usize>,
    layers: usize,
}

impl Cut {
    /// Stage count.
    pub fn stages(&self) -> usize {
        self.starts.len()
    }

    /// The layer indices of stage `s`.
    pub fn range(&self, s: usize) -> Range<usize> {
        self.starts[s]..self.starts.get(s + 1).copied().unwrap_or(self.layers)
    }

    /// Index of the first layer of each stage (the first is 0).
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// The names of the layers that start stages 1.., as `--split` takes them.
    pub fn names(&self, spec: &ModelSpec) -> Vec<String> {
        self.starts[1..].iter().map(|&i| spec.layers[i].0.clone()).collect()
    }
}

fn cut_err(spec: &ModelSpec, message: String) -> NnError {
    NnError::Cut { model: spec.name.clone(), message }
}

fn is_fused_relu(spec: &ModelSpec, i: usize) -> bool {
    i > 0
        && spec.layers[i].1 == Layer::Relu
        && matches!(spec.layers[i - 1].1, Layer::Conv2d { .. } | Layer::Linear { .. })
}

impl ModelSpec {
    /// Layers a stage may start at: every layer but the first and a ReLU that follows a
    /// convolution or linear layer (cutting there would undo the fused ReLU).
    pub fn cut_candidates(&self) -> Vec<usize> {
        (1..self.layers.len()).filter(|&i| !is_fused_relu(self, i)).collect()
    }

    /// Units of work a balanced cut chooses between: layer ranges between consecutive
    /// [`ModelSpec::cut_candidates`].
    pub fn cut_units(&self) -> Vec<Range<usize>> {
        let mut bounds = vec![0];
        bounds.extend(self.cut_candidates());
        bounds.push(self.layers.len());
        bounds.windows(2).map(|w| w[0]..w[1]).collect()
    }

    /// The cut whose stages 1.. start at the named layers, in order. Refuses a name that is
    /// no layer, names out of order or repeated, and a ReLU fused into the layer before.
    pub fn cut_at(&self, names: &[String]) -> Result<Cut> {
        let mut starts = vec![0];
        for name in names {
            let Some(i) = self.layers.iter().position(|(n, _)| n == name) else {
                let all: Vec<&str> = self.layers.iter().map(|(n, _)| n.as_str()).collect();
                return Err(cut_err(self, format!("split point {name:?} names no layer (layers: {})", all.join(", "))));
            };
            if i == 0 {
                return Err(cut_err(
                    self,
                    format!("split point {name:?} is the first layer, which starts stage 0 already"),
                ));
            }
            if i <= *starts.last().expect("non-empty") {
                return Err(cut_err(self, format!("split point {name:?} is not after the previous split point")));
            }
            if is_fused_relu(self, i) {
                return Err(cut_err(
                    self,
                    format!(
                        "split point {name:?} is a ReLU fused into {:?} before it; split before {:?} or after {name:?}",
                        self.layers[i - 1].0,
                        self.layers[i - 1].0
                    ),
                ));
            }
            starts.push(i);
        }
        Ok(Cut { starts, layers: self.layers.len() })
    }

    /// The cut into `stages` stages starting at the given unit boundaries (indices into
    /// [`ModelSpec::cut_units`]); for a balancer's result.
    pub fn cut_units_at(&self, stages: usize, unit_starts: &[usize]) -> Result<Cut> {
        let units = self.cut_units();
        if stages == 0 || stages > units.len() {
            return Err(cut_err(
                self,
                format!(
                    "{stages} stages asked for, but the model can be cut into at most {} (its layers {} with fused ReLUs kept whole)",
                    units.len(),
                    self.layers.len()
                ),
            ));
        }
        if unit_starts.len() != stages
            || unit_starts.first() != Some(&0)
            || unit_starts.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(cut_err(self, format!("unit starts {unit_starts:?} do not make {stages} stages")));
        }
        let starts = unit_starts.iter().map(|&u| units.get(u).map(|r| r.start)).collect::<Option<Vec<_>>>();
        let starts = starts.ok_or_else(|| cut_err(self, format!("unit starts {unit_starts:?} past the last unit")))?;
        Ok(Cut { starts, layers: self.layers.len() })
    }

    /// Checks that `stages` stages can be made at all.
    pub fn check_stages(&self, stages: usize) -> Result<()> {
        let units = self.cut_units().len();
        if stages == 0 || stages > units {
            return Err(cut_err(
                self,
                format!(
                    "{stages} pipeline stages asked for, but the model has {} layers that can be cut into at most {units} stages (a ReLU stays with the layer it is fused into)",
                    self.layers.len()
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Slot {
    acts: Vec<TensorId>,
    grads: Vec<TensorId>,
    aux: Vec<TensorId>,
    cols: Vec<TensorId>,
    targets: TensorId,
    loss: TensorId,
    correct: TensorId,
}

/// One pipeline stage bound to a GPU actor: its layers' parameters, gradients and
/// optimiser state, and activations for `slots` micro-batches in flight.
pub struct StageModel {
    spec: ModelSpec,
    stage: usize,
    stages: usize,
    range: Range<usize>,
    /// This stage's parameters, in layer order.
    pub params: Vec<ParamSlot>,
    /// Per parameter: where a micro-batch's weight gradient goes before it is added up.
    scratch: Vec<TensorId>,
    /// Per local layer: indices into `params`.
    layer_params: Vec<Vec<usize>>,
    /// `fused[i]`: local layer `i` is a ReLU computed inside layer `i - 1`.
    fused: Vec<bool>,
    slots: Vec<Slot>,
    /// Where the flattened gradients go for an all-reduce between replicas.
    pub flat: TensorId,
    /// The all-reduced flat gradients.
    pub reduced: TensorId,
    /// First local layer whose backward is needed: the first parameter layer on stage 0,
    /// every layer elsewhere (the previous stage needs the input gradient).
    stop: usize,
}

impl StageModel {
    /// Binds stage `stage` of `cut` of `spec` to `gpu` with `slots` activation sets.
    pub fn new(spec: ModelSpec, cut: &Cut, stage: usize, slots: usize, gpu: &GpuHandle) -> Result<Self> {
        spec.shapes(1)?;
        if stage >= cut.stages() || slots == 0 {
            return Err(cut_err(&spec, format!("stage {stage} of {} with {slots} slots", cut.stages())));
        }
        let range = cut.range(stage);
        let id = || gpu.new_id();
        let mut params = Vec::new();
        let mut layer_params = Vec::new();
        for (name, layer) in &spec.layers[range.clone()] {
            let mut mine = Vec::new();
            for (suffix, shape, _) in layer.params() {
                mine.push(params.len());
                params.push(ParamSlot {
                    name: format!("{name}.{suffix}"),
                    shape,
                    value: id(),
                    grad: id(),
                    state: [id(), id()],
                });
            }
            layer_params.push(mine);
        }
        let n = range.len();
        let fused: Vec<bool> = (0..n).map(|i| i > 0 && is_fused_relu(&spec, range.start + i)).collect();
        let stop = if stage == 0 { layer_params.iter().position(|p| !p.is_empty()).unwrap_or(n) } else { 0 };
        let slots = (0..slots)
            .map(|_| Slot {
                acts: (0..=n).map(|_| id()).collect(),
                grads: (0..=n).map(|_| id()).collect(),
                aux: (0..n).map(|_| id()).collect(),
                cols: (0..n).map(|_| id()).collect(),
                targets: id(),
                loss: id(),
                correct: id(),
            })
            .collect();
        Ok(Self {
            scratch: params.iter().map(|_| id()).collect(),
            flat: id(),
            reduced: id(),
            stages: cut.stages(),
            spec,
            stage,
            range,
            params,
            layer_params,
            fused,
            slots,
            stop,
        })
    }

    /// The whole model's description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// This stage's layer indices in the whole model.
    pub fn layers(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Whether this stage ends with the model's output (and computes the loss).
    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.stages
    }

    /// Activation sets.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The input of micro-batch slot `slot` (the batch on stage 0, else the previous
    /// stage's output).
    pub fn input(&self, slot: usize) -> TensorId {
        self.slots[slot].acts[0]
    }

    /// The output of slot `slot` (sent to the next stage).
    pub fn output(&self, slot: usize) -> TensorId {
        *self.slots[slot].acts.last().expect("non-empty")
    }

    /// The gradient of slot `slot`'s input (sent to the previous stage).
    pub fn input_grad(&self, slot: usize) -> TensorId {
        self.slots[slot].grads[0]
    }

    /// The gradient of slot `slot`'s output (received from the next stage).
    pub fn output_grad(&self, slot: usize) -> TensorId {
        *self.slots[slot].grads.last().expect("non-empty")
    }

    /// Targets of slot `slot` (`u32`, last stage only).
    pub fn targets(&self, slot: usize) -> TensorId {
        self.slots[slot].targets
    }

    /// Mean loss and correct count of slot `slot`'s last forward (last stage only).
    pub fn loss(&self, slot: usize) -> (TensorId, TensorId) {
        (self.slots[slot].loss, self.slots[slot].correct)
    }

    /// Shape of this stage's input for micro-batches of `batch` samples.
    pub fn input_shape(&self, batch: usize) -> Result<Shape> {
        Ok(self.spec.shapes(batch)?[self.range.start].clone())
    }

    /// Shape of this stage's output for micro-batches of `batch` samples.
    pub fn output_shape(&self, batch: usize) -> Result<Shape> {
        Ok(self.spec.shapes(batch)?[self.range.end].clone())
    }

    /// This stage's share of `spec.init(seed)` (so a pipeline starts where one node does).
    pub fn init(&self, seed: u64) -> Vec<HostTensor> {
        let skip: usize = self.spec.layers[..self.range.start].iter().map(|(_, l)| l.params().len()).sum();
        self.spec.init(seed).into_iter().skip(skip).take(self.params.len()).collect()
    }

    /// Bytes of parameters, gradients and optimiser state, and bytes of one micro-batch's
    /// activations and gradients, for micro-batches of `batch` samples.
    pub fn memory(spec: &ModelSpec, layers: Range<usize>, batch: usize) -> Result<(u64, u64)> {
        let shapes = spec.shapes(batch)?;
        let params: usize = spec.layers[layers.clone()].iter().flat_map(|(_, l)| l.params()).map(|p| p.1.numel()).sum();
        let acts: usize = shapes[layers.start..=layers.end].iter().map(Shape::numel).sum();
        Ok((params as u64 * 4 * 4, acts as u64 * 4 * 2))
    }

    /// Uploads parameter values (this stage's, in order) and zeroes the optimiser state.
    pub async fn upload_params(&self, gpu: &GpuHandle, values: &[HostTensor]) -> Result<()> {
        model::upload_params(&self.spec.name, &format!("stage {}", self.stage), &self.params, gpu, values).await
    }

    /// The forward pass of slot `slot` over a micro-batch of `batch` samples; on the last
    /// stage also its mean loss and correct count.
    pub fn forward(&self, slot: usize, batch: usize) -> Result<Vec<Op>> {
        let shapes = self.spec.shapes(batch)?;
        let s = &self.slots[slot];
        let n = self.range.len();
        let mut ops = Vec::new();
        for i in 0..n {
            if self.fused[i] {
                continue;
            }
            let layer = &self.spec.layers[self.range.start + i].1;
            let relu = i + 1 < n && self.fused[i + 1];
            let (x, out) = (s.acts[i], if relu { s.acts[i + 2] } else { s.acts[i + 1] });
            let p = &self.layer_params[i];
            ops.push(match layer {
                Layer::Conv2d { .. } => Op::Conv2d {
                    x,
                    w: self.params[p[0]].value,
                    bias: Some(self.params[p[1]].value),
                    params: conv_params(layer),
                    out,
                    relu,
                    col: Some(s.cols[i]),
                },
                Layer::MaxPool2d { kernel, stride } => Op::MaxPool2d {
                    x,
                    kernel: (*kernel, *kernel),
                    params: Conv2dParams::new(*stride, 0),
                    out,
                    indices: s.aux[i],
                },
                Layer::Relu => Op::Relu { x, out },
                Layer::Flatten => Op::Reshape { x, shape: shapes[self.range.start + i + 1].clone(), out },
                Layer::Linear { .. } => {
                    Op::Linear { x, w: self.params[p[0]].value, bias: Some(self.params[p[1]].value), out, relu }
                }
                Layer::LogSoftmax => Op::LogSoftmax { x, out },
            });
        }
        if self.is_last() {
            ops.push(Op::NllLoss { logp: s.acts[n], targets: s.targets, out: s.loss });
            ops.push(Op::CorrectCount { logits: s.acts[n], targets: s.targets, out: s.correct });
        }
        Ok(ops)
    }

    /// Backward work of slot `slot` (micro-batches of `batch` samples): with `input`, the
    /// input-gradient half (the whole chain of activation gradients down to this stage's
    /// input); with `weight`, the weight and bias gradients, added to the accumulated
    /// gradients (`Accumulate::First` overwrites them: the step's first micro-batch).
    /// The weight half alone needs the activation gradients the input half left.
    pub fn backward(&self, slot: usize, batch: usize, input: bool, weight: Option<Accumulate>) -> Result<Vec<Op>> {
        let shapes = self.spec.shapes(batch)?;
        let s = &self.slots[slot];
        let n = self.range.len();
        let mut ops = Vec::new();
        if input && self.is_last() {
            ops.push(Op::NllLossBackward { logp: s.acts[n], targets: s.targets, out: s.grads[n] });
        }
        let mut adds = Vec::new();
        // The weight gradient outputs of a parameter layer, and the additions after.
        let weight_out = |p: &[usize], adds: &mut Vec<Op>| {
            weight.map(|acc| {
                let outs: Vec<TensorId> = p
                    .iter()
                    .map(|&q| match acc {
                        Accumulate::First => self.params[q].grad,
                        Accumulate::Add => {
                            adds.push(Op::Axpy { alpha: 1.0, x: self.scratch[q], y: self.params[q].grad });
                            self.scratch[q]
                        }
                    })
                    .collect();
                (outs[0], outs[1])
            })
        };
        let mut relu_done = vec![false; n];
        for i in (self.stop..n).rev() {
            let (x, dy, dx) = (s.acts[i], s.grads[i + 1], s.grads[i]);
            let g = self.range.start + i;
            let layer = &self.spec.layers[g].1;
            let p = &self.layer_params[i];
            // A parameter layer's input gradient is needed unless it is stage 0's first.
            let want_dx = input && (i > self.stop || self.stage > 0);
            match layer {
                Layer::Conv2d { .. } => {
                    let w = weight_out(p, &mut adds);
                    if want_dx || w.is_some() {
                        ops.push(Op::Conv2dBackward {
                            x,
                            w: self.params[p[0]].value,
                            dy,
                            params: conv_params(layer),
                            dx: want_dx.then_some(dx),
                            dw: w.map(|w| w.0),
                            db: w.map(|w| w.1),
                            col: Some(s.cols[i]),
                        });
                    }
                }
                Layer::Linear { .. } => {
                    let w = weight_out(p, &mut adds);
                    if want_dx || w.is_some() {
                        ops.push(Op::LinearBackward {
                            x,
                            w: self.params[p[0]].value,
                            dy,
                            dx: want_dx.then_some(dx),
                            dw: w.map(|w| w.0),
                            db: w.map(|w| w.1),
                        });
                    }
                }
                _ if !input => {}
                Layer::MaxPool2d { kernel, stride } => {
                    let fuse = i > 0 && self.fused[i - 1];
                    if fuse {
                        relu_done[i - 1] = true;
                    }
                    ops.push(Op::MaxPool2dBackward {
                        dy,
                        indices: s.aux[i],
                        input_shape: shapes[g].clone(),
                        kernel: (*kernel, *kernel),
                        params: Conv2dParams::new(*stride, 0),
                        out: if fuse { s.grads[i - 1] } else { dx },
                        relu_output: fuse.then_some(x),
                    });
                }
                Layer::Relu if relu_done[i] => {}
                Layer::Relu if self.fused[i] => ops.push(Op::ReluBackward { x: s.acts[i + 1], dy, out: dx }),
                Layer::Relu => ops.push(Op::ReluBackward { x, dy, out: dx }),
                Layer::Flatten => ops.push(Op::Reshape { x: dy, shape: shapes[g].clone(), out: dx }),
                Layer::LogSoftmax => ops.push(Op::LogSoftmaxBackward { y: s.acts[i + 1], dy, out: dx }),
            }
        }
        ops.extend(adds);
        Ok(ops)
    }

    /// Scales the accumulated gradients by `scale` (one over the micro-batch count) and,
    /// with `flatten`, concatenates them into [`StageModel::flat`] for an all-reduce.
    pub fn finish_gradients(&self, scale: f32, flatten: bool) -> Vec<Op> {
        let mut ops: Vec<Op> = self.params.iter().map(|p| Op::Scale { x: p.grad, alpha: scale, out: p.grad }).collect();
        if flatten && !self.params.is_empty() {
            ops.push(Op::Concat { srcs: self.params.iter().map(|p| p.grad).collect(), out: self.flat });
        }
        ops
    }

    /// Every tensor handle the stage uses (to free them).
    pub fn tensor_ids(&self) -> Vec<TensorId> {
        let mut ids = vec![self.flat, self.reduced];
        ids.extend(self.scratch.iter().copied());
        for p in &self.params {
            ids.extend([p.value, p.grad, p.state[0], p.state[1]]);
        }
        for s in &self.slots {
            ids.extend(s.acts.iter().chain(&s.grads).chain(&s.aux).chain(&s.cols).copied());
            ids.extend([s.targets, s.loss, s.correct]);
        }
        ids
    }

    /// Elements of the flattened gradients.
    pub fn flat_len(&self) -> usize {
        self.params.iter().map(|p| p.shape.numel()).sum()
    }

    /// The optimiser step at 1-based `step`; with `from_reduced`, gradients are first cut
    /// out of [`StageModel::reduced`].
    pub fn apply(&self, optimizer: &Optimizer, step: u32, from_reduced: bool) -> Vec<Op> {
        let mut ops = Vec::new();
        if from_reduced && !self.params.is_empty() {
            let outs = self.params.iter().map(|p| (p.grad, p.shape.clone())).collect();
            ops.push(Op::Split { src: self.reduced, outs });
        }
        ops.extend(self.params.iter().map(|p| optimizer.op(p, step)));
        ops
    }

    /// Parameter values in order.
    pub async fn download_params(&self, gpu: &GpuHandle) -> Result<Vec<HostTensor>> {
        model::download_params(&self.params, gpu).await
    }

    /// Optimiser state tensors as `(name, tensor)`, e.g. `fc1.weight.exp_avg`.
    pub async fn download_state(&self, gpu: &GpuHandle, optimizer: &Optimizer) -> Result<Vec<(String, HostTensor)>> {
        model::download_state(&self.params, gpu, optimizer).await
    }

    /// Restores optimiser state saved by [`StageModel::download_state`].
    pub async fn upload_state(
        &self,
        gpu: &GpuHandle,
        optimizer: &Optimizer,
        state: &[(String, HostTensor)],
    ) -> Result<()> {
        model::upload_state(&self.spec.name, &self.params, gpu, optimizer, state).await
    }
}

/// How a micro-batch's weight gradients meet the step's accumulated gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// Overwrite them (the step's first micro-batch).
    First,
    /// Add to them.
    Add,
}
