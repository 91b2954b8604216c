//! Sequential models: their description, PyTorch-style initialisation, and the GPU
//! programs of a training step.

use serde::{Deserialize, Serialize};
use strata_gpu::{GpuHandle, Op, TensorId};
use strata_tensor::geometry::{self, Conv2dParams};
use strata_tensor::{DType, HostTensor, Shape, SplitMix64, TensorError};

use crate::{NnError, Optimizer, Result};

/// One layer of a sequential model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// 2-D convolution with bias.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Square kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding.
        padding: usize,
    },
    /// 2-D max pooling.
    MaxPool2d {
        /// Square window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Rectified linear unit.
    Relu,
    /// `[n, c, h, w]` to `[n, c*h*w]` (PyTorch's flattening order).
    Flatten,
    /// Fully connected layer with bias; weight `[out, in]` as in PyTorch.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
    },
    /// Row-wise log-softmax (the model's output; NLL loss follows).
    LogSoftmax,
}

impl Layer {
    /// The layer's kind, as in error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Conv2d { .. } => "conv2d",
            Layer::MaxPool2d { .. } => "max_pool2d",
            Layer::Relu => "relu",
            Layer::Flatten => "flatten",
            Layer::Linear { .. } => "linear",
            Layer::LogSoftmax => "log_softmax",
        }
    }

    /// Number of parameters (weights and biases).
    pub fn param_count(&self) -> usize {
        self.params().iter().map(|p| p.1.numel()).sum()
    }

    /// Parameter shapes: `(suffix, shape, fan_in)`.
    pub(crate) fn params(&self) -> Vec<(&'static str, Shape, usize)> {
        match *self {
            Layer::Conv2d { in_channels, out_channels, kernel, .. } => {
                let fan_in = in_channels * kernel * kernel;
                vec![
                    ("weight", Shape::from([out_channels, in_channels, kernel, kernel]), fan_in),
                    ("bias", Shape::from([out_channels]), fan_in),
                ]
            }
            Layer::Linear { in_features, out_features } => vec![
                ("weight", Shape::from([out_features, in_features]), in_features),
                ("bias", Shape::from([out_features]), in_features),
            ],
            _ => Vec::new(),
        }
    }
}

/// A sequential model: named layers over an input of shape `[channels, height, width]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Model name (in errors and checkpoints).
    pub name: String,
    /// Input shape of one sample, `[channels, height, width]`.
    pub input: [usize; 3],
    /// Number of classes of the output.
    pub classes: usize,
    /// Layers in order, with PyTorch-style names (`conv1`, `fc1`, ...).
    pub layers: Vec<(String, Layer)>,
}

impl ModelSpec {
    /// The reference CNN of the design: conv(C->64, 3x3, pad 1) + ReLU + max-pool 2,
    /// conv(64->128, 3x3, pad 1) + ReLU + max-pool 2, linear(128*H/4*W/4 -> 512) + ReLU,
    /// linear(512 -> classes), log-softmax.
    pub fn reference_cnn(channels: usize, height: usize, width: usize, classes: usize) -> Self {
        let conv = |i, o| Layer::Conv2d { in_channels: i, out_channels: o, kernel: 3, stride: 1, padding: 1 };
        let pool = Layer::MaxPool2d { kernel: 2, stride: 2 };
        let flat = 128 * (height / 4) * (width / 4);
        let l = |n: &str, layer| (n.to_string(), layer);
        Self {
            name: "reference-cnn".into(),
            input: [channels, height, width],
            classes,
            layers: vec![
                l("conv1", conv(channels, 64)),
                l("relu1", Layer::Relu),
                l("pool1", pool.clone()),
                l("conv2", conv(64, 128)),
                l("relu2", Layer::Relu),
                l("pool2", pool),
                l("flatten", Layer::Flatten),
                l("fc1", Layer::Linear { in_features: flat, out_features: 512 }),
                l("relu3", Layer::Relu),
                l("fc2", Layer::Linear { in_features: 512, out_features: classes }),
                l("log_softmax", Layer::LogSoftmax),
            ],
        }
    }

    /// A multilayer perceptron: flatten, then `depth` linear layers of `hidden` features
    /// with ReLUs (`fc1`..), a linear layer to the classes and log-softmax. With as many
    /// input features as `hidden`, its layers cost the same, which makes it the model of
    /// the pipeline benchmark (stages of equal work).
    pub fn mlp(input: [usize; 3], hidden: usize, depth: usize, classes: usize) -> Self {
        let features = input.iter().product();
        let mut layers = vec![("flatten".to_string(), Layer::Flatten)];
        for k in 1..=depth {
            let in_features = if k == 1 { features } else { hidden };
            layers.push((format!("fc{k}"), Layer::Linear { in_features, out_features: hidden }));
            layers.push((format!("relu{k}"), Layer::Relu));
        }
        let in_features = if depth == 0 { features } else { hidden };
        layers.push((format!("fc{}", depth + 1), Layer::Linear { in_features, out_features: classes }));
        layers.push(("log_softmax".into(), Layer::LogSoftmax));
        Self { name: format!("mlp-{hidden}x{depth}"), input, classes, layers }
    }

    fn layer_err(&self, layer: &str, source: TensorError) -> NnError {
        NnError::Layer { model: self.name.clone(), layer: layer.to_string(), source }
    }

    /// Activation shapes for a batch: input first, output last. Fails, naming the layer,
    /// when a layer does not fit what precedes it.
    pub fn shapes(&self, batch: usize) -> Result<Vec<Shape>> {
        let [c, h, w] = self.input;
        let mut shapes = vec![Shape::from([batch, c, h, w])];
        for (name, layer) in &self.layers {
            let x = shapes.last().expect("starts with the input");
            let e = |err| self.layer_err(name, err);
            let next = match layer {
                Layer::Conv2d { .. } => {
                    let p = layer.params();
                    let params = conv_params(layer);
                    geometry::conv2d(x, &p[0].1, Some(&p[1].1), params).map_err(e)?.output_shape()
                }
                Layer::MaxPool2d { kernel, stride } => {
                    geometry::max_pool2d(x, (*kernel, *kernel), Conv2dParams::new(*stride, 0))
                        .map_err(e)?
                        .output_shape()
                }
                Layer::Relu => x.clone(),
                Layer::Flatten => {
                    if x.rank() < 2 {
                        return Err(e(TensorError::shape(
                            "flatten",
                            format!("input {x} has no dimensions to flatten"),
                        )));
                    }
                    Shape::from([x.dim(0), x.dims()[1..].iter().product()])
                }
                Layer::Linear { .. } => {
                    let p = layer.params();
                    let (b, _, out) = geometry::linear(x, &p[0].1, Some(&p[1].1)).map_err(e)?;
                    Shape::from([b, out])
                }
                Layer::LogSoftmax => {
                    if x.rank() != 2 {
                        return Err(e(TensorError::shape(
                            "log_softmax",
                            format!("input {x} must be [batch, classes]"),
                        )));
                    }
                    x.clone()
                }
            };
            shapes.push(next);
        }
        let out = shapes.last().expect("non-empty");
        if out.dims() != [batch, self.classes] {
            return Err(NnError::DataMismatch {
                model: self.name.clone(),
                message: format!(
                    "the last layer produces {out}, expected [{batch},{}] for {} classes",
                    self.classes, self.classes
                ),
            });
        }
        if !matches!(self.layers.last(), Some((_, Layer::LogSoftmax))) {
            return Err(NnError::DataMismatch {
                model: self.name.clone(),
                message: "the last layer must be log_softmax".into(),
            });
        }
        Ok(shapes)
    }

    /// Checks that the model takes samples of `sample` shape with `classes` classes.
    pub fn check_data(&self, sample: [usize; 3], classes: usize) -> Result<()> {
        if sample != self.input {
            return Err(NnError::DataMismatch {
                model: self.name.clone(),
                message: format!("it takes samples of {:?} (C, H, W), the data has {sample:?}", self.input),
            });
        }
        if classes != self.classes {
            return Err(NnError::DataMismatch {
                model: self.name.clone(),
                message: format!("it predicts {} classes, the data has {classes}", self.classes),
            });
        }
        self.shapes(1).map(|_| ())
    }

    /// Parameter names (`conv1.weight`, ...) and shapes, in layer order.
    pub fn params(&self) -> Vec<(String, Shape)> {
        self.layers
            .iter()
            .flat_map(|(n, l)| l.params().into_iter().map(move |(s, shape, _)| (format!("{n}.{s}"), shape)))
            .collect()
    }

    /// Parameters initialised as PyTorch does by default (`kaiming_uniform_` with
    /// `a = sqrt(5)` for weights, uniform in `±1/sqrt(fan_in)` for biases: both come to
    /// `±1/sqrt(fan_in)`), from `seed`.
    pub fn init(&self, seed: u64) -> Vec<HostTensor> {
        let mut rng = SplitMix64(seed);
        let mut out = Vec::new();
        for (_, layer) in &self.layers {
            for (_, shape, fan_in) in layer.params() {
                let bound = 1.0 / (fan_in as f32).sqrt();
                let data = (0..shape.numel()).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
                out.push(HostTensor::new(shape, data).expect("shape and data agree"));
            }
        }
        out
    }
}

pub(crate) fn conv_params(layer: &Layer) -> Conv2dParams {
    match layer {
        Layer::Conv2d { stride, padding, .. } => Conv2dParams::new(*stride, *padding),
        _ => unreachable!("only convolutions have convolution parameters"),
    }
}

/// A parameter on the GPU actor: its value, its gradient and its optimiser state.
#[derive(Clone, Debug)]
pub struct ParamSlot {
    /// PyTorch-style name, e.g. `fc1.weight`.
    pub name: String,
    /// Shape.
    pub shape: Shape,
    /// The value.
    pub value: TensorId,
    /// The gradient of the last backward pass.
    pub grad: TensorId,
    /// Optimiser state (Adam: first and second moments; SGD: momentum buffer, unused).
    pub state: [TensorId; 2],
}

/// Gradients all-reduced together: flattened into one buffer as soon as the backward
/// pass has produced them, so their all-reduce overlaps the rest of the backward pass.
#[derive(Clone, Debug)]
pub struct Bucket {
    /// Indices into [`Model::params`].
    pub params: Vec<usize>,
    /// The flat gradients after the backward segment.
    pub flat: TensorId,
    /// The flat gradients after the all-reduce (uploaded by the trainer).
    pub reduced: TensorId,
    /// Element count.
    pub len: usize,
}

/// A model bound to a GPU actor.
pub struct Model {
    spec: ModelSpec,
    /// Parameters in layer order.
    pub params: Vec<ParamSlot>,
    /// Gradient buckets, last layers first.
    pub buckets: Vec<Bucket>,
    layer_params: Vec<Vec<usize>>,
    acts: Vec<TensorId>,
    grads: Vec<TensorId>,
    aux: Vec<TensorId>,
    cols: Vec<TensorId>,
    /// `fused[i]`: layer `i` is a ReLU computed inside layer `i - 1` (convolution or linear).
    fused: Vec<bool>,
    /// Input batch handle.
    pub input: TensorId,
    /// Targets handle (`u32`).
    pub targets: TensorId,
    /// Mean loss of the last forward pass (scalar).
    pub loss: TensorId,
    /// Correct predictions of the last forward pass (scalar).
    pub correct: TensorId,
    first_param_layer: usize,
}

/// Default bucket size: gradients are grouped until a bucket holds this many bytes.
pub const BUCKET_BYTES_DEFAULT: usize = 4 << 20;

impl Model {
    /// Binds `spec` to `gpu`, allocating handles; gradients are bucketed by `bucket_bytes`.
    pub fn new(spec: ModelSpec, gpu: &GpuHandle, bucket_bytes: usize) -> Result<Self> {
        spec.shapes(1)?;
        let id = || gpu.new_id();
        let mut params = Vec::new();
        let mut layer_params = Vec::new();
        for (name, layer) in &spec.layers {
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
        let first_param_layer = layer_params.iter().position(|p| !p.is_empty()).ok_or_else(|| {
            NnError::DataMismatch { model: spec.name.clone(), message: "the model has no parameters to train".into() }
        })?;
        // Buckets from the last layer backwards.
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        let mut bytes = 0;
        for lp in layer_params.iter().rev() {
            if lp.is_empty() {
                continue;
            }
            for &p in lp.iter().rev() {
                current.push(p);
                bytes += params[p].shape.numel() * 4;
            }
            if bytes >= bucket_bytes {
                let len = current.iter().map(|&p| params[p].shape.numel()).sum();
                buckets.push(Bucket { params: std::mem::take(&mut current), flat: id(), reduced: id(), len });
                bytes = 0;
            }
        }
        if !current.is_empty() {
            let len = current.iter().map(|&p| params[p].shape.numel()).sum();
            buckets.push(Bucket { params: current, flat: id(), reduced: id(), len });
        }
        let n = spec.layers.len();
        let fused = (0..n)
            .map(|i| {
                i > 0
                    && spec.layers[i].1 == Layer::Relu
                    && matches!(spec.layers[i - 1].1, Layer::Conv2d { .. } | Layer::Linear { .. })
            })
            .collect();
        Ok(Self {
            cols: (0..n).map(|_| id()).collect(),
            fused,
            acts: (0..=n).map(|_| id()).collect(),
            grads: (0..=n).map(|_| id()).collect(),
            aux: (0..n).map(|_| id()).collect(),
            input: TensorId(0),
            targets: id(),
            loss: id(),
            correct: id(),
            spec,
            params,
            buckets,
            layer_params,
            first_param_layer,
        }
        .with_input())
    }

    fn with_input(mut self) -> Self {
        self.input = self.acts[0];
        self
    }

    /// The model's description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Uploads parameter values (in [`ModelSpec::params`] order) and zeroes the optimiser state.
    pub async fn upload_params(&self, gpu: &GpuHandle, values: &[HostTensor]) -> Result<()> {
        upload_params(&self.spec.name, "the model", &self.params, gpu, values).await
    }

    /// Parameter values, in [`ModelSpec::params`] order.
    pub async fn download_params(&self, gpu: &GpuHandle) -> Result<Vec<HostTensor>> {
        download_params(&self.params, gpu).await
    }

    /// Optimiser state tensors as `(name, tensor)`, e.g. `fc1.weight.exp_avg`.
    pub async fn download_state(&self, gpu: &GpuHandle, optimizer: &Optimizer) -> Result<Vec<(String, HostTensor)>> {
        download_state(&self.params, gpu, optimizer).await
    }

    /// Restores optimiser state saved by [`Model::download_state`].
    pub async fn upload_state(
        &self,
        gpu: &GpuHandle,
        optimizer: &Optimizer,
        state: &[(String, HostTensor)],
    ) -> Result<()> {
        upload_state(&self.spec.name, &self.params, gpu, optimizer, state).await
    }

    /// The forward pass over the batch at [`Model::input`]; with `loss`, also the mean
    /// NLL loss and the correct-prediction count against [`Model::targets`]. A ReLU after a
    /// convolution or linear layer is fused into that layer's output pass.
    pub fn forward(&self, batch: usize, loss: bool) -> Result<Vec<Op>> {
        let shapes = self.spec.shapes(batch)?;
        let n = self.spec.layers.len();
        let mut ops = Vec::new();
        for (i, (_, layer)) in self.spec.layers.iter().enumerate() {
            if self.fused[i] {
                continue;
            }
            let relu = i + 1 < n && self.fused[i + 1];
            let x = self.acts[i];
            let out = if relu { self.acts[i + 2] } else { self.acts[i + 1] };
            let p = &self.layer_params[i];
            ops.push(match layer {
                Layer::Conv2d { .. } => Op::Conv2d {
                    x,
                    w: self.params[p[0]].value,
                    bias: Some(self.params[p[1]].value),
                    params: conv_params(layer),
                    out,
                    relu,
                    col: Some(self.cols[i]),
                },
                Layer::MaxPool2d { kernel, stride } => Op::MaxPool2d {
                    x,
                    kernel: (*kernel, *kernel),
                    params: Conv2dParams::new(*stride, 0),
                    out,
                    indices: self.aux[i],
                },
                Layer::Relu => Op::Relu { x, out },
                Layer::Flatten => Op::Reshape { x, shape: shapes[i + 1].clone(), out },
                Layer::Linear { .. } => {
                    Op::Linear { x, w: self.params[p[0]].value, bias: Some(self.params[p[1]].value), out, relu }
                }
                Layer::LogSoftmax => Op::LogSoftmax { x, out },
            });
        }
        if loss {
            let logp = *self.acts.last().expect("non-empty");
            ops.push(Op::NllLoss { logp, targets: self.targets, out: self.loss });
            ops.push(Op::CorrectCount { logits: logp, targets: self.targets, out: self.correct });
        }
        Ok(ops)
    }

    /// The backward pass, cut into one segment per bucket: segment `k` ends when bucket
    /// `k`'s gradients exist and (with `flatten`) copies them into `Bucket::flat`. A fused
    /// ReLU's gradient joins the max-pool backward after it when there is one.
    pub fn backward(&self, batch: usize, flatten: bool) -> Result<Vec<Vec<Op>>> {
        let shapes = self.spec.shapes(batch)?;
        let n = self.spec.layers.len();
        let logp = self.acts[n];
        let mut segments = Vec::new();
        let mut ops = vec![Op::NllLossBackward { logp, targets: self.targets, out: self.grads[n] }];
        let mut bucket = 0;
        let mut relu_done = vec![false; n];
        for i in (self.first_param_layer..n).rev() {
            let (x, dy, dx) = (self.acts[i], self.grads[i + 1], self.grads[i]);
            let p = &self.layer_params[i];
            let layer = &self.spec.layers[i].1;
            match layer {
                Layer::Conv2d { .. } => ops.push(Op::Conv2dBackward {
                    x,
                    w: self.params[p[0]].value,
                    dy,
                    params: conv_params(layer),
                    dx: (i > self.first_param_layer).then_some(dx),
                    dw: Some(self.params[p[0]].grad),
                    db: Some(self.params[p[1]].grad),
                    col: Some(self.cols[i]),
                }),
                Layer::MaxPool2d { kernel, stride } => {
                    // Pool after a fused ReLU: one pass for both gradients, into the
                    // gradient of the ReLU's input.
                    let fuse = i > 0 && self.fused[i - 1];
                    if fuse {
                        relu_done[i - 1] = true;
                    }
                    ops.push(Op::MaxPool2dBackward {
                        dy,
                        indices: self.aux[i],
                        input_shape: shapes[i].clone(),
                        kernel: (*kernel, *kernel),
                        params: Conv2dParams::new(*stride, 0),
                        out: if fuse { self.grads[i - 1] } else { dx },
                        relu_output: fuse.then_some(x),
                    });
                }
                Layer::Relu if relu_done[i] => {}
                // A fused ReLU's input was never stored: its output gives the same mask.
                Layer::Relu if self.fused[i] => ops.push(Op::ReluBackward { x: self.acts[i + 1], dy, out: dx }),
                Layer::Relu => ops.push(Op::ReluBackward { x, dy, out: dx }),
                Layer::Flatten => ops.push(Op::Reshape { x: dy, shape: shapes[i].clone(), out: dx }),
                Layer::Linear { .. } => ops.push(Op::LinearBackward {
                    x,
                    w: self.params[p[0]].value,
                    dy,
                    dx: Some(dx),
                    dw: Some(self.params[p[0]].grad),
                    db: Some(self.params[p[1]].grad),
                }),
                Layer::LogSoftmax => ops.push(Op::LogSoftmaxBackward { y: self.acts[i + 1], dy, out: dx }),
            }
            // Close every bucket whose last parameter now has its gradient.
            while bucket < self.buckets.len() && self.buckets[bucket].params.iter().all(|q| self.layer_of(*q) >= i) {
                if flatten {
                    let b = &self.buckets[bucket];
                    ops.push(Op::Concat { srcs: b.params.iter().map(|&q| self.params[q].grad).collect(), out: b.flat });
                }
                segments.push(std::mem::take(&mut ops));
                bucket += 1;
            }
        }
        debug_assert!(
            ops.is_empty() && bucket == self.buckets.len(),
            "every bucket closes by the first parameter layer"
        );
        Ok(segments)
    }

    fn layer_of(&self, param: usize) -> usize {
        self.layer_params.iter().position(|lp| lp.contains(&param)).expect("every parameter belongs to a layer")
    }

    /// The optimiser step at 1-based `step`; with `from_reduced`, gradients are first cut
    /// out of the all-reduced buckets (`Bucket::reduced`).
    pub fn apply(&self, optimizer: &Optimizer, step: u32, from_reduced: bool) -> Vec<Op> {
        let mut ops = Vec::new();
        if from_reduced {
            for b in &self.buckets {
                let outs = b.params.iter().map(|&q| (self.params[q].grad, self.params[q].shape.clone())).collect();
                ops.push(Op::Split { src: b.reduced, outs });
            }
        }
        for s in &self.params {
            ops.push(optimizer.op(s, step));
        }
        ops
    }
}

/// Uploads `values` into `params` (in order) and zeroes their optimiser state; `owner`
/// names the holder in errors ("the model", "stage 1").
pub(crate) async fn upload_params(
    model: &str,
    owner: &str,
    params: &[ParamSlot],
    gpu: &GpuHandle,
    values: &[HostTensor],
) -> Result<()> {
    if values.len() != params.len() {
        return Err(NnError::DataMismatch {
            model: model.to_string(),
            message: format!("{} parameter tensors given, {owner} has {}", values.len(), params.len()),
        });
    }
    for (slot, v) in params.iter().zip(values) {
        if *v.shape() != slot.shape {
            return Err(NnError::DataMismatch {
                model: model.to_string(),
                message: format!("parameter {} has shape {}, the value {}", slot.name, slot.shape, v.shape()),
            });
        }
        gpu.upload_as(slot.value, v.clone()).await?;
    }
    let zeros = params
        .iter()
        .flat_map(|s| s.state.iter().map(|&id| Op::Zeros { shape: s.shape.clone(), dtype: DType::F32, out: id }))
        .collect();
    gpu.run(zeros).await?;
    Ok(())
}

/// The values of `params`, in order.
pub(crate) async fn download_params(params: &[ParamSlot], gpu: &GpuHandle) -> Result<Vec<HostTensor>> {
    let mut out = Vec::with_capacity(params.len());
    for s in params {
        out.push(gpu.download(s.value).await?);
    }
    Ok(out)
}

/// The optimiser state of `params` as `(name, tensor)`, e.g. `fc1.weight.exp_avg`.
pub(crate) async fn download_state(
    params: &[ParamSlot],
    gpu: &GpuHandle,
    optimizer: &Optimizer,
) -> Result<Vec<(String, HostTensor)>> {
    let mut out = Vec::new();
    for s in params {
        for (suffix, id) in optimizer.state_names().iter().zip(s.state) {
            out.push((format!("{}.{suffix}", s.name), gpu.download(id).await?));
        }
    }
    Ok(out)
}

/// Restores optimiser state saved by [`download_state`].
pub(crate) async fn upload_state(
    model: &str,
    params: &[ParamSlot],
    gpu: &GpuHandle,
    optimizer: &Optimizer,
    state: &[(String, HostTensor)],
) -> Result<()> {
    for s in params {
        for (suffix, id) in optimizer.state_names().iter().zip(s.state) {
            let name = format!("{}.{suffix}", s.name);
            let t = state.iter().find(|(n, _)| *n == name).map(|(_, t)| t).ok_or_else(|| NnError::DataMismatch {
                model: model.to_string(),
                message: format!("optimiser state {name} is missing"),
            })?;
            gpu.upload_as(id, t.clone()).await?;
        }
    }
    Ok(())
}
