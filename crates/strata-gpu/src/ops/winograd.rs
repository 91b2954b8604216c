//! Winograd F(4x4, 3x3) convolution (`shaders/winograd.wgsl` and the GEMM kernels), and
//! the choice, per convolution geometry and direction, between it and im2col + GEMM.
//!
//! A 3x3 convolution at stride 1 computes each 4x4 output tile from the 6x6 input patch
//! under it with 36 multiplies per (input, output) channel pair instead of 144, as 36
//! matrix products over channels run as one batched GEMM. The input gradient is the
//! same convolution of the output gradient with the filter rotated and transposed. The
//! weight gradient is the adjoint: the input transform V (kept by the forward pass),
//! the output gradient's tiles through the transposed output transform, a batched GEMM
//! summing over tiles, and the transposed filter transform.
//!
//! Rounding differs from im2col (the transforms add and scale), within the tolerances
//! the tests hold both paths to, and it depends on a pixel's position in its tile, so
//! results computed on image tiles differ in the last bits from the whole image's; force
//! [`ConvAlgo::Im2col`] where bitwise equality across tilings matters.

use std::time::Instant;

use bytemuck::{Pod, Zeroable};
use strata_tensor::DType;
use strata_tensor::geometry::ConvGeometry;

use super::gemm::{Batch, Mat};
use super::{expect_binding, u};
use crate::{Gpu, GpuError, GpuTensor, Result};

const FILE: &str = "winograd.wgsl";
/// Transform positions per tile: (4 + 3 - 1)^2.
const POSITIONS: usize = 36;
/// Output pixels per tile side.
const TILE: usize = 4;
/// Elements between the positions of a transform holding `elems` per position: 16
/// floats past a multiple of 1024, so the 36 streams a transform kernel walks at once
/// fall into different cache sets (see `shaders/winograd.wgsl`).
fn position_stride(elems: usize) -> usize {
    elems.next_multiple_of(1024) + 16
}

/// Timed runs of each candidate when choosing (the fastest counts), after one untimed.
const TRIALS: usize = 3;

/// How convolutions with 3x3 filters at stride 1 and padding at most 2 are computed
/// (other convolutions, and those whose transforms of one image exceed a storage
/// binding, always use im2col + GEMM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ConvAlgo {
    /// Time both at the first use of each geometry and direction (forward, input
    /// gradient, weight gradient) and keep the faster for the rest of the process.
    #[default]
    Auto,
    /// im2col + GEMM.
    Im2col,
    /// Winograd F(4x4, 3x3) for the forward pass and both gradients.
    Winograd,
}

impl ConvAlgo {
    /// Parses `auto`, `im2col` or `winograd`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "im2col" => Some(Self::Im2col),
            "winograd" => Some(Self::Winograd),
            _ => None,
        }
    }

    /// The name [`ConvAlgo::from_name`] parses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Im2col => "im2col",
            Self::Winograd => "winograd",
        }
    }
}

/// One of the three products of a convolution's training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    Forward,
    InputGrad,
    WeightGrad,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::InputGrad => "input gradient",
            Self::WeightGrad => "weight gradient",
        }
    }
}

/// A convolution geometry and direction, the key of [`ConvAlgo::Auto`]'s choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    padding: (usize, usize),
    direction: Direction,
}

/// One choice [`ConvAlgo::Auto`] made, with the times it was made on.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConvChoice {
    /// `[n,ci,h,w] -> co, padding p` and the direction.
    pub case: String,
    /// The algorithm kept.
    pub algo: ConvAlgo,
    /// Fastest im2col run, seconds.
    pub im2col_s: f64,
    /// Fastest Winograd run, seconds.
    pub winograd_s: f64,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    c: u32,
    h: u32,
    w: u32,
    ho: u32,
    wo: u32,
    th: u32,
    tw: u32,
    pad_h: i32,
    pad_w: i32,
    n0: u32,
    nb: u32,
    p_ld: u32,
    co: u32,
    k_ld: u32,
    relu: u32,
    flip: u32,
    stride: u32,
    accumulate: u32,
    _pad: [u32; 2],
}

/// One Winograd convolution: `src` `[n, c, h, w]` to `[n, co, ho, wo]`.
#[derive(Clone, Copy, Debug)]
struct Shape3 {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    ho: usize,
    wo: usize,
    /// Padding before the first row and column (negative: rows and columns skipped).
    pad: (i32, i32),
}

impl Shape3 {
    fn tiles(&self) -> (usize, usize) {
        (self.ho.div_ceil(TILE), self.wo.div_ceil(TILE))
    }

    fn forward(g: &ConvGeometry) -> Self {
        let pad = (g.params.padding.0 as i32, g.params.padding.1 as i32);
        Self { n: g.n, c: g.ci, h: g.h, w: g.w, co: g.co, ho: g.ho, wo: g.wo, pad }
    }

    /// dx = dy convolved with the rotated, transposed filter, padded by 2 - padding.
    fn input_grad(g: &ConvGeometry) -> Self {
        let pad = (2 - g.params.padding.0 as i32, 2 - g.params.padding.1 as i32);
        Self { n: g.n, c: g.co, h: g.ho, w: g.wo, co: g.ci, ho: g.h, wo: g.w, pad }
    }
}

/// Whether `wino_output_rows` writes the output of `s`: 4 tiles per row (a lane's 4
/// tiles are one tile row), and the pixels under every tile row start and end at
/// multiples of 4 elements (vec4 stores).
fn output_rows(s: &Shape3) -> bool {
    let (th, tw) = s.tiles();
    let last_rows = s.ho - TILE * (th - 1);
    tw == 4 && (s.ho * s.wo).is_multiple_of(4) && (last_rows * s.wo).is_multiple_of(4)
}

/// Whether Winograd F(4x4, 3x3) computes this convolution.
fn applies(g: &ConvGeometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.params.stride == (1, 1) && g.params.padding.0 <= 2 && g.params.padding.1 <= 2
}

impl Gpu {
    /// The algorithm for 3x3 stride-1 convolutions.
    pub fn conv_algo(&self) -> ConvAlgo {
        self.conv_algo
    }

    /// Sets the algorithm for 3x3 stride-1 convolutions (also `STRATA_CONV_ALGO`);
    /// choices [`ConvAlgo::Auto`] made earlier are kept.
    pub fn set_conv_algo(&mut self, algo: ConvAlgo) {
        self.conv_algo = algo;
    }

    /// The choices [`ConvAlgo::Auto`] has made so far, sorted by case.
    pub fn conv_choices(&self) -> Vec<ConvChoice> {
        let mut v: Vec<ConvChoice> = self.conv_choices.values().cloned().collect();
        v.sort_by(|a, b| a.case.cmp(&b.case));
        v
    }

    /// Images per chunk and the row stride of V and M, or `None` when one image's
    /// transforms exceed a storage binding.
    fn winograd_plan(&self, s: &Shape3) -> Option<(usize, usize)> {
        let binding = self.info().max_storage_binding_bytes as usize;
        let (th, tw) = s.tiles();
        let tiles = th * tw;
        // V, M (forward) and dM^T (weight gradient) rows, whichever is widest.
        let rows = s.c.max(s.co.next_multiple_of(4));
        let per_image = POSITIONS * tiles * rows * 4;
        let nb = (binding.min(self.scratch_bytes_max) / per_image.max(1)).clamp(1, s.n);
        let p_ld = (nb * tiles).next_multiple_of(4);
        let fits = POSITIONS * position_stride(rows * p_ld) * 4 <= binding
            && POSITIONS * position_stride(s.co.next_multiple_of(4) * s.c.next_multiple_of(4)) * 4 <= binding;
        fits.then_some((nb, p_ld))
    }

    /// Whether `direction` of `g` runs Winograd, measuring both algorithms at the first
    /// use of a geometry and direction under [`ConvAlgo::Auto`].
    pub(crate) fn conv_uses_winograd(&mut self, g: &ConvGeometry, direction: Direction) -> bool {
        let shape = match direction {
            Direction::InputGrad => Shape3::input_grad(g),
            Direction::Forward | Direction::WeightGrad => Shape3::forward(g),
        };
        if !applies(g) || self.winograd_plan(&shape).is_none() {
            return false;
        }
        match self.conv_algo {
            ConvAlgo::Im2col => false,
            ConvAlgo::Winograd => true,
            ConvAlgo::Auto => {
                let (n, ci, h, w, co, padding) = (g.n, g.ci, g.h, g.w, g.co, g.params.padding);
                let key = ConvKey { n, ci, h, w, co, padding, direction };
                if let Some(c) = self.conv_choices.get(&key) {
                    return c.algo == ConvAlgo::Winograd;
                }
                let case = format!("[{n},{ci},{h},{w}] -> {co}, padding {padding:?}, {}", direction.name());
                let choice = match self.isolated(|gpu| gpu.time_conv_algos(g, direction)) {
                    Ok((im2col_s, winograd_s)) => {
                        let algo = if winograd_s < im2col_s { ConvAlgo::Winograd } else { ConvAlgo::Im2col };
                        ConvChoice { case, algo, im2col_s, winograd_s }
                    }
                    Err(e) => {
                        tracing::warn!("timing the convolution {case} failed, using im2col: {e}");
                        ConvChoice { case, algo: ConvAlgo::Im2col, im2col_s: f64::NAN, winograd_s: f64::NAN }
                    }
                };
                tracing::info!(
                    "convolution {}: {} (im2col {:.2} ms, winograd {:.2} ms)",
                    choice.case,
                    choice.algo.name(),
                    choice.im2col_s * 1e3,
                    choice.winograd_s * 1e3
                );
                let winograd = choice.algo == ConvAlgo::Winograd;
                self.conv_choices.insert(key, choice);
                winograd
            }
        }
    }

    /// Fastest of [`TRIALS`] runs of each algorithm on stand-in operands (run inside
    /// [`Gpu::isolated`]), interleaved so a change in machine load hits both. Nothing
    /// is reused from a forward pass: each weight-gradient candidate builds its own
    /// input transform.
    fn time_conv_algos(&mut self, g: &ConvGeometry, direction: Direction) -> Result<(f64, f64)> {
        let filled = |gpu: &mut Gpu, shape: strata_tensor::Shape, v: f32| -> Result<GpuTensor> {
            let t = gpu.empty(shape, DType::F32)?;
            gpu.fill(&t, v)?;
            Ok(t)
        };
        let x = filled(self, strata_tensor::Shape::from([g.n, g.ci, g.h, g.w]), 0.5)?;
        let w = filled(self, strata_tensor::Shape::from([g.co, g.ci, g.kh, g.kw]), 0.25)?;
        let b = filled(self, strata_tensor::Shape::from([g.co]), 0.125)?;
        let dy = filled(self, g.output_shape(), 0.5)?;
        let run = |gpu: &mut Gpu, winograd: bool| -> Result<f64> {
            let start = Instant::now();
            match (direction, winograd) {
                (Direction::Forward, false) => drop(gpu.conv2d_im2col(g, &x, &w, &b, false, true)?),
                (Direction::Forward, true) => drop(gpu.conv2d_winograd(g, &x, &w, &b, false, true)?),
                (Direction::InputGrad, false) => {
                    let plan = gpu.conv_plan("conv2d_backward", *g)?;
                    gpu.conv2d_input_grad_im2col(&plan, &w, &dy)?;
                }
                (Direction::InputGrad, true) => drop(gpu.conv2d_input_grad_winograd(g, &w, &dy)?),
                (Direction::WeightGrad, false) => {
                    let plan = gpu.conv_plan("conv2d_backward", *g)?;
                    gpu.conv2d_weight_grad_im2col(&plan, &x, &dy, None)?;
                }
                (Direction::WeightGrad, true) => drop(gpu.conv2d_weight_grad_winograd(g, &x, &dy, None)?),
            }
            gpu.sync()?;
            Ok(start.elapsed().as_secs_f64())
        };
        run(self, false)?;
        run(self, true)?;
        let (mut im2col, mut winograd) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..TRIALS {
            im2col = im2col.min(run(self, false)?);
            winograd = winograd.min(run(self, true)?);
        }
        Ok((im2col, winograd))
    }

    /// U (`co` rows of `c` rounded up to 4 per position): the transformed filter of `s` from `w`, which is
    /// `[co, c, 3, 3]`, or with `flip` `[c, co, 3, 3]` rotated by 180 degrees.
    fn winograd_filter(&mut self, op: &'static str, w: &GpuTensor, s: &Shape3, flip: bool) -> Result<GpuTensor> {
        let k_ld = s.c.next_multiple_of(4);
        let stride = position_stride(s.co * k_ld);
        let t = self.empty([POSITIONS, stride / 4, 4], DType::F32)?;
        expect_binding(op, "transformed filter", &t, self.info().max_storage_binding_bytes)?;
        let p = Params {
            c: u(s.c),
            co: u(s.co),
            k_ld: u(k_ld),
            flip: u32::from(flip),
            stride: u(stride),
            ..Params::zeroed()
        };
        let groups = self.plane_grid(k_ld, 1, s.co);
        self.dispatch(op, (FILE, "wino_filter"), &[], &p, &[w.arg(), t.arg()], groups)?;
        Ok(t)
    }

    /// The input transform V `[36, c, p_ld]` of images `n0..n0 + nb` of `src` into `v`.
    fn winograd_input(
        &mut self,
        op: &'static str,
        s: &Shape3,
        src: &GpuTensor,
        v: &GpuTensor,
        n0: usize,
        nb: usize,
        p_ld: usize,
    ) -> Result<()> {
        let p = Params { stride: u(position_stride(s.c * p_ld)), ..self.winograd_params(s, n0, nb, p_ld, false) };
        // Four tiles per lane; neighbours in one row when rows hold a multiple of 4; two or
        // four such rows when they hold 4 (whole images: p_ld is the tile count).
        let (th, tw) = s.tiles();
        let (entry, groups) = if tw == 4 && th.is_multiple_of(4) {
            ("wino_input_rows4", self.plane_grid(p_ld / 16, 1, s.c))
        } else if tw == 4 && th.is_multiple_of(2) {
            ("wino_input_rows2", self.plane_grid(p_ld / 8, 1, s.c))
        } else if tw.is_multiple_of(4) {
            ("wino_input_rows", self.plane_grid(p_ld / 4, 1, s.c))
        } else {
            ("wino_input", self.plane_grid(p_ld / 4, 1, s.c))
        };
        self.dispatch(op, (FILE, entry), &[], &p, &[src.arg(), v.arg()], groups)
    }

    fn winograd_params(&self, s: &Shape3, n0: usize, nb: usize, p_ld: usize, relu: bool) -> Params {
        let (th, tw) = s.tiles();
        Params {
            c: u(s.c),
            h: u(s.h),
            w: u(s.w),
            ho: u(s.ho),
            wo: u(s.wo),
            th: u(th),
            tw: u(tw),
            pad_h: s.pad.0,
            pad_w: s.pad.1,
            n0: u(n0),
            nb: u(nb),
            p_ld: u(p_ld),
            co: u(s.co),
            k_ld: u(s.c.next_multiple_of(4)),
            relu: u32::from(relu),
            flip: 0,
            stride: 0,
            accumulate: 0,
            _pad: [0; 2],
        }
    }

    fn winograd_plan_or_err(&self, op: &'static str, s: &Shape3) -> Result<(usize, usize)> {
        self.winograd_plan(s).ok_or_else(|| GpuError::BindingTooLarge {
            op,
            what: "winograd transforms of one image",
            bytes: (POSITIONS * s.tiles().0 * s.tiles().1 * s.c.max(s.co.next_multiple_of(4)) * 4) as u64,
            limit_bytes: self.info().max_storage_binding_bytes,
        })
    }

    /// `y` = Winograd convolution of `src` with the transformed filter `ut`, plus `bias`
    /// per output channel, then ReLU when `relu`; images in chunks that fit the scratch
    /// limit. With `keep`, returns V when the batch fitted one chunk.
    #[allow(clippy::too_many_arguments)]
    fn winograd_run(
        &mut self,
        op: &'static str,
        s: &Shape3,
        src: &GpuTensor,
        ut: &GpuTensor,
        bias: &GpuTensor,
        relu: bool,
        y: &GpuTensor,
        keep: bool,
    ) -> Result<Option<GpuTensor>> {
        let (nb, p_ld) = self.winograd_plan_or_err(op, s)?;
        let (th, tw) = s.tiles();
        let k_ld = s.c.next_multiple_of(4);
        let (us, vs) = (position_stride(s.co * k_ld), position_stride(s.c * p_ld));
        let v = self.empty([POSITIONS, vs / 4, 4], DType::F32)?;
        let ms = position_stride(s.co * p_ld);
        let m = self.empty([POSITIONS, ms / 4, 4], DType::F32)?;
        for n0 in (0..s.n).step_by(nb) {
            let nbc = nb.min(s.n - n0);
            let cols = nbc * th * tw;
            self.winograd_input(op, s, src, &v, n0, nbc, p_ld)?;
            let batch = Batch { count: POSITIONS, a: us, b: vs, c: ms };
            let (a, b, c) = (Mat::rows(ut, k_ld), Mat::rows(&v, p_ld), Mat::rows(&m, p_ld));
            self.gemm_batched(op, batch, s.co, cols, s.c, a, b, c, false)?;
            let p = Params { stride: u(ms), ..self.winograd_params(s, n0, nbc, p_ld, relu) };
            let groups = self.plane_grid(cols.div_ceil(4), 1, s.co);
            let args = [m.arg(), bias.arg(), y.arg()];
            if output_rows(s) {
                let constants = [("WO", s.wo as f64)];
                self.dispatch(op, (FILE, "wino_output_rows"), &constants, &p, &args, groups)?;
            } else {
                self.dispatch(op, (FILE, "wino_output"), &[], &p, &args, groups)?;
            }
        }
        Ok((keep && nb >= s.n).then_some(v))
    }

    /// The forward pass of a 3x3 stride-1 convolution by Winograd; with `keep`, also
    /// the input transform for [`Gpu::conv2d_weight_grad_winograd`] (one chunk only).
    pub(crate) fn conv2d_winograd(
        &mut self,
        g: &ConvGeometry,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: &GpuTensor,
        relu: bool,
        keep: bool,
    ) -> Result<(GpuTensor, Option<GpuTensor>)> {
        const OP: &str = "conv2d";
        let s = Shape3::forward(g);
        let ut = self.winograd_filter(OP, w, &s, false)?;
        let y = self.empty(g.output_shape(), DType::F32)?;
        let v = self.winograd_run(OP, &s, x, &ut, bias, relu, &y, keep)?;
        Ok((y, v))
    }

    /// The input gradient of a 3x3 stride-1 convolution by Winograd.
    pub(crate) fn conv2d_input_grad_winograd(
        &mut self,
        g: &ConvGeometry,
        w: &GpuTensor,
        dy: &GpuTensor,
    ) -> Result<GpuTensor> {
        const OP: &str = "conv2d_backward";
        let s = Shape3::input_grad(g);
        let ut = self.winograd_filter(OP, w, &s, true)?;
        let dx = self.empty([g.n, g.ci, g.h, g.w], DType::F32)?;
        let zero = self.zeros([g.ci], DType::F32)?;
        self.winograd_run(OP, &s, dy, &ut, &zero, false, &dx, false)?;
        Ok(dx)
    }

    /// The weight and bias gradients `[co, ci, 3, 3]` and `[co]` of a 3x3 stride-1
    /// convolution by Winograd, reusing the forward pass's input transform `saved` when
    /// it has the right shape; the bias gradient comes from the output gradient's
    /// transform.
    pub(crate) fn conv2d_weight_grad_winograd(
        &mut self,
        g: &ConvGeometry,
        x: &GpuTensor,
        dy: &GpuTensor,
        saved: Option<&GpuTensor>,
    ) -> Result<(GpuTensor, GpuTensor)> {
        const OP: &str = "conv2d_backward";
        let s = Shape3::forward(g);
        let (nb, p_ld) = self.winograd_plan_or_err(OP, &s)?;
        let (th, tw) = s.tiles();
        let co_ld = s.co.next_multiple_of(4);
        let (vs, ds, us) = (position_stride(s.c * p_ld), position_stride(p_ld * co_ld), position_stride(s.c * co_ld));
        let reuse = saved.filter(|v| nb >= s.n && v.shape().dims() == [POSITIONS, vs / 4, 4]);
        let fresh;
        let v = match reuse {
            Some(v) => v,
            None => {
                fresh = self.empty([POSITIONS, vs / 4, 4], DType::F32)?;
                &fresh
            }
        };
        let dmt = self.empty([POSITIONS, ds / 4, 4], DType::F32)?;
        let dut = self.empty([POSITIONS, us / 4, 4], DType::F32)?;
        let db = self.empty([g.co], DType::F32)?;
        for (i, n0) in (0..s.n).step_by(nb).enumerate() {
            let nbc = nb.min(s.n - n0);
            let cols = nbc * th * tw;
            if reuse.is_none() {
                self.winograd_input(OP, &s, x, v, n0, nbc, p_ld)?;
            }
            let p = Params { k_ld: u(co_ld), stride: u(ds), ..self.winograd_params(&s, n0, nbc, p_ld, false) };
            // Two groups of 4 channels per lane (adjacent stores) where they pair up.
            let per_lane = if co_ld.is_multiple_of(8) { 2 } else { 1 };
            let entry = if per_lane == 2 { "wino_dy2" } else { "wino_dy" };
            let groups = self.plane_grid(co_ld / 4 / per_lane, 1, p_ld);
            self.dispatch(OP, (FILE, entry), &[], &p, &[dy.arg(), dmt.arg()], groups)?;
            let pb = Params { accumulate: u32::from(i > 0), ..p };
            let groups = self.plane_grid(co_ld / 4, 1, 1);
            self.dispatch(OP, (FILE, "wino_bias_grad"), &[], &pb, &[dmt.arg(), db.arg()], groups)?;
            // dU^T_t [c, co] (+)= V_t [c, tiles] @ dM^T_t [tiles, co]
            let batch = Batch { count: POSITIONS, a: vs, b: ds, c: us };
            let (a, b, c) = (Mat::rows(v, p_ld), Mat::rows(&dmt, co_ld), Mat::rows(&dut, co_ld));
            self.gemm_batched(OP, batch, s.c, s.co, cols, a, b, c, i > 0)?;
        }
        let dw = self.empty([g.co, g.ci, 3, 3], DType::F32)?;
        let p = Params { c: u(s.c), co: u(s.co), k_ld: u(co_ld), stride: u(us), ..Params::zeroed() };
        let groups = self.plane_grid(s.co, 1, s.c);
        self.dispatch(OP, (FILE, "wino_filter_grad"), &[], &p, &[dut.arg(), dw.arg()], groups)?;
        Ok((dw, db))
    }
}
