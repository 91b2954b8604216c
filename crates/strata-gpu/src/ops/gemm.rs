//! Matrix multiplication (`shaders/gemm_subgroup.wgsl`, `shaders/gemm_tiled.wgsl`),
//! linear layers, and the 2-D layout kernel (`shaders/layout.wgsl`) that packs operands.
//!
//! The tiled kernel reads any strides. The subgroup kernel (CPU adapters) wants A and B
//! row-major with rows aligned to vec4; operands that are not get packed into aligned
//! scratch first, and [`Gpu::matmul`] picks between computing `C` and `C^T` by which
//! needs less packing (for a linear layer's `x @ W^T`, transposing the small batch
//! instead of the large weight).

use bytemuck::{Pod, Zeroable};
use strata_tensor::cpu::ReduceOp;
use strata_tensor::{DType, geometry};

use super::{expect_binding, expect_dtype, u};
use crate::{GemmKernel, Gpu, GpuTensor, Result};

/// A logical matrix inside a tensor: element `(i, j)` is at
/// `off + i * ld + j`, or `off + j * ld + i` when `trans`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) t: &'a GpuTensor,
    pub(crate) off: usize,
    pub(crate) ld: usize,
    pub(crate) trans: bool,
}

impl<'a> Mat<'a> {
    pub(crate) fn rows(t: &'a GpuTensor, ld: usize) -> Self {
        Self { t, off: 0, ld, trans: false }
    }

    pub(crate) fn transposed(t: &'a GpuTensor, ld: usize) -> Self {
        Self { t, off: 0, ld, trans: true }
    }

    fn vec4_rows(&self) -> bool {
        !self.trans && self.ld.is_multiple_of(4) && self.off.is_multiple_of(4)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SubgroupParams {
    m: u32,
    n4: u32,
    k: u32,
    lda4: u32,
    ldb4: u32,
    ldc4: u32,
    a_off4: u32,
    b_off4: u32,
    c_off4: u32,
    accumulate: u32,
    b_cpb4: u32,
    b_img4: u32,
    c_cpb4: u32,
    c_img4: u32,
    epilogue: u32,
    a_bat4: u32,
    b_bat4: u32,
    c_bat4: u32,
    _pad: u32,
}

/// Extras of the subgroup GEMM: batched column layouts of B and C (an NCHW tensor seen
/// as `[channels, images * pixels]`) and a bias-and-ReLU epilogue.
#[derive(Clone, Copy, Default)]
pub(crate) struct Fused<'a> {
    /// `(columns per image, vec4 stride between images)` of B, in vec4.
    pub(crate) b_batch: Option<(usize, usize)>,
    /// The same for C.
    pub(crate) c_batch: Option<(usize, usize)>,
    /// Bias added per row of C.
    pub(crate) bias: Option<&'a GpuTensor>,
    /// ReLU after the bias.
    pub(crate) relu: bool,
    /// A batch of products (workgroup z), default one.
    pub(crate) batch: Batch,
}

/// `count` products run by one dispatch: product `z` reads and writes its A, B and C
/// `z * a`, `z * b` and `z * c` elements after product 0's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batch {
    pub(crate) count: usize,
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) c: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Self { count: 1, a: 0, b: 0, c: 0 }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TiledParams {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    a_rs: u32,
    a_cs: u32,
    b_off: u32,
    b_rs: u32,
    b_cs: u32,
    c_off: u32,
    ldc: u32,
    accumulate: u32,
    a_bat: u32,
    b_bat: u32,
    c_bat: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PackParams {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_ld: u32,
    trans: u32,
    dst_rows: u32,
    dst_cols: u32,
    dst_ld: u32,
    dst_off: u32,
    _pad: [u32; 3],
}

/// Rows of C per subgroup-GEMM workgroup.
const SG_TILE_ROWS: usize = 16;
/// vec4 columns of C per subgroup-GEMM workgroup.
const SG_TILE_VEC4: usize = 16;
/// Rows and columns of C per tiled-GEMM workgroup.
const TILED_TILE: usize = 64;

impl Gpu {
    /// Writes the `rows x cols` logical matrix `src` into `dst` at `dst_off` with row
    /// stride `dst_ld`, zero-filling up to `dst_rows x dst_cols`.
    pub(crate) fn pack_into(
        &mut self,
        op: &'static str,
        src: Mat<'_>,
        rows: usize,
        cols: usize,
        dst: &GpuTensor,
        dst_off: usize,
        dst_ld: usize,
        dst_rows: usize,
        dst_cols: usize,
    ) -> Result<()> {
        let p = PackParams {
            rows: u(rows),
            cols: u(cols),
            src_off: u(src.off),
            src_ld: u(src.ld),
            trans: u32::from(src.trans),
            dst_rows: u(dst_rows),
            dst_cols: u(dst_cols),
            dst_ld: u(dst_ld),
            dst_off: u(dst_off),
            _pad: [0; 3],
        };
        let args = [src.t.arg(), dst.arg()];
        if self.profiling() {
            self.profile_tag = Some(format!("{op} {dst_rows}x{dst_cols}{}", if src.trans { " from T" } else { "" }));
        }
        let groups = self.plane_grid(dst_cols, 1, dst_rows);
        self.dispatch(op, ("layout.wgsl", "pack2d"), &[], &p, &args, groups)
    }

    /// A new `[rows, cols4]` tensor holding `src` with rows padded to `cols4` columns.
    fn pack(&mut self, op: &'static str, src: Mat<'_>, rows: usize, cols: usize, cols4: usize) -> Result<GpuTensor> {
        let dst = self.empty([rows, cols4], DType::F32)?;
        self.pack_into(op, src, rows, cols, &dst, 0, cols4, rows, cols4)?;
        Ok(dst)
    }

    /// Records `C (+)= A @ B` for logical `m x k` A, `k x n` B and `m x n` C (`c.trans`
    /// must be false). `k` must be at least 1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_into(
        &mut self,
        op: &'static str,
        m: usize,
        n: usize,
        k: usize,
        a: Mat<'_>,
        b: Mat<'_>,
        c: Mat<'_>,
        accumulate: bool,
    ) -> Result<()> {
        assert!(k > 0 && m > 0 && n > 0 && !c.trans, "gemm_into needs a non-empty product into a row-major C");
        match self.gemm {
            GemmKernel::Tiled => self.gemm_tiled(op, m, n, k, a, b, c, accumulate, Batch::default()),
            GemmKernel::Subgroup8 => {
                let k4 = k.next_multiple_of(4);
                let n4 = n.next_multiple_of(4);
                let a_packed;
                let a = if a.vec4_rows() {
                    a
                } else {
                    a_packed = self.pack(op, a, m, k, k4)?;
                    Mat::rows(&a_packed, k4)
                };
                let b_packed;
                let b = if b.vec4_rows() {
                    b
                } else {
                    b_packed = self.pack(op, b, k, n, n4)?;
                    Mat::rows(&b_packed, n4)
                };
                if !c.vec4_rows() {
                    let scratch = self.empty([m, n4], DType::F32)?;
                    if accumulate {
                        self.pack_into(op, c, m, n, &scratch, 0, n4, m, n4)?;
                    }
                    self.gemm_into(op, m, n, k, a, b, Mat::rows(&scratch, n4), accumulate)?;
                    return self.pack_into(op, Mat::rows(&scratch, n4), m, n, c.t, c.off, c.ld, m, n);
                }
                self.gemm_subgroup(op, m, n4, k, a, b, c, accumulate, Fused::default())
            }
        }
    }

    /// The tiled GEMM (any strides) for a batch of products.
    #[allow(clippy::too_many_arguments)]
    fn gemm_tiled(
        &mut self,
        op: &'static str,
        m: usize,
        n: usize,
        k: usize,
        a: Mat<'_>,
        b: Mat<'_>,
        c: Mat<'_>,
        accumulate: bool,
        batch: Batch,
    ) -> Result<()> {
        let stride = |mm: &Mat<'_>| if mm.trans { (1, mm.ld) } else { (mm.ld, 1) };
        let (a_rs, a_cs) = stride(&a);
        let (b_rs, b_cs) = stride(&b);
        let p = TiledParams {
            m: u(m),
            n: u(n),
            k: u(k),
            a_off: u(a.off),
            a_rs: u(a_rs),
            a_cs: u(a_cs),
            b_off: u(b.off),
            b_rs: u(b_rs),
            b_cs: u(b_cs),
            c_off: u(c.off),
            ldc: u(c.ld),
            accumulate: u32::from(accumulate),
            a_bat: u(batch.a),
            b_bat: u(batch.b),
            c_bat: u(batch.c),
            _pad: 0,
        };
        let groups = [u(n.div_ceil(TILED_TILE)), u(m.div_ceil(TILED_TILE)), u(batch.count)];
        self.dispatch(op, ("gemm_tiled.wgsl", "gemm"), &[], &p, &[a.t.arg(), b.t.arg(), c.t.arg()], groups)
    }

    /// `batch.count` products `C_z (+)= A_z @ B_z` in one dispatch, with operands already in
    /// the layout of the device's GEMM kernel: for the subgroup kernel, A, B and C
    /// row-major with vec4-aligned rows, offsets and batch strides, and C's rows at least
    /// `n` rounded up to 4 long (the padding columns are written).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_batched(
        &mut self,
        op: &'static str,
        batch: Batch,
        m: usize,
        n: usize,
        k: usize,
        a: Mat<'_>,
        b: Mat<'_>,
        c: Mat<'_>,
        accumulate: bool,
    ) -> Result<()> {
        assert!(k > 0 && m > 0 && n > 0 && batch.count > 0, "gemm_batched needs non-empty products");
        match self.gemm {
            GemmKernel::Tiled => self.gemm_tiled(op, m, n, k, a, b, c, accumulate, batch),
            GemmKernel::Subgroup8 => {
                debug_assert!([batch.a, batch.b, batch.c].iter().all(|s| s.is_multiple_of(4)));
                let fused = Fused { batch, ..Fused::default() };
                self.gemm_subgroup(op, m, n.next_multiple_of(4), k, a, b, c, accumulate, fused)
            }
        }
    }

    /// The subgroup GEMM on operands already in its layout (see [`Gpu::gemm_into`]), with
    /// the extras of [`Fused`].
    pub(crate) fn gemm_subgroup(
        &mut self,
        op: &'static str,
        m: usize,
        n4: usize,
        k: usize,
        a: Mat<'_>,
        b: Mat<'_>,
        c: Mat<'_>,
        accumulate: bool,
        fused: Fused<'_>,
    ) -> Result<()> {
        debug_assert!(a.vec4_rows() && b.vec4_rows() && c.vec4_rows() && n4.is_multiple_of(4));
        let (b_cpb4, b_img4) = fused.b_batch.unwrap_or((0, 0));
        let (c_cpb4, c_img4) = fused.c_batch.unwrap_or((0, 0));
        let p = SubgroupParams {
            m: u(m),
            n4: u(n4 / 4),
            k: u(k),
            lda4: u(a.ld / 4),
            ldb4: u(b.ld / 4),
            ldc4: u(c.ld / 4),
            a_off4: u(a.off / 4),
            b_off4: u(b.off / 4),
            c_off4: u(c.off / 4),
            accumulate: u32::from(accumulate),
            b_cpb4: u(b_cpb4),
            b_img4: u(b_img4),
            c_cpb4: u(c_cpb4),
            c_img4: u(c_img4),
            epilogue: u32::from(fused.bias.is_some()) | (u32::from(fused.relu) << 1),
            a_bat4: u(fused.batch.a / 4),
            b_bat4: u(fused.batch.b / 4),
            c_bat4: u(fused.batch.c / 4),
            _pad: 0,
        };
        // Row blocks in x: consecutive workgroups share a panel of B (see the shader).
        let groups = [u(m.div_ceil(SG_TILE_ROWS)), u((n4 / 4).div_ceil(SG_TILE_VEC4)), u(fused.batch.count)];
        if self.profiling() {
            let batch = if fused.batch.count > 1 { format!("{}x ", fused.batch.count) } else { String::new() };
            self.profile_tag = Some(format!("{op} {batch}{m}x{n4}x{k}"));
        }
        // Without a bias, A stands in for the binding (A has at least m elements; the
        // values read are ignored).
        let bias = fused.bias.unwrap_or(a.t);
        self.dispatch(
            op,
            ("gemm_subgroup.wgsl", "gemm"),
            &[],
            &p,
            &[a.t.arg(), b.t.arg(), c.t.arg(), bias.arg()],
            groups,
        )
    }

    /// `op(a) @ op(b)` where `op` transposes when the flag is set; both operands `[rows, cols]` f32.
    pub fn matmul(&mut self, a: &GpuTensor, b: &GpuTensor, trans_a: bool, trans_b: bool) -> Result<GpuTensor> {
        const OP: &str = "matmul";
        expect_dtype(OP, "a", a, DType::F32)?;
        expect_dtype(OP, "b", b, DType::F32)?;
        let (m, k, n) = geometry::matmul(a.shape(), b.shape(), trans_a, trans_b)?;
        let limit = self.info().max_storage_binding_bytes;
        expect_binding(OP, "a", a, limit)?;
        expect_binding(OP, "b", b, limit)?;
        let c = self.empty([m, n], DType::F32)?;
        if m == 0 || n == 0 {
            return Ok(c);
        }
        if k == 0 {
            self.fill(&c, 0.0)?;
            return Ok(c);
        }
        expect_binding(OP, "result", &c, limit)?;
        let am = Mat { t: a, off: 0, ld: a.shape().dim(1), trans: trans_a };
        let bm = Mat { t: b, off: 0, ld: b.shape().dim(1), trans: trans_b };
        if self.gemm == GemmKernel::Subgroup8 {
            // Elements the subgroup kernel would have to repack in each formulation.
            let pack = |needed: bool, elems: usize| if needed { elems } else { 0 };
            let direct =
                pack(trans_a || k % 4 != 0, m * k) + pack(trans_b || n % 4 != 0, k * n) + pack(n % 4 != 0, m * n);
            let transposed = pack(!trans_b || k % 4 != 0, n * k) + pack(!trans_a || m % 4 != 0, k * m) + m * n;
            if transposed < direct {
                // C^T = op(b)^T @ op(a)^T, then transpose C^T into C.
                let m4 = m.next_multiple_of(4);
                let ct = self.empty([n, m4], DType::F32)?;
                let bt = Mat { trans: !trans_b, ..bm };
                let at = Mat { trans: !trans_a, ..am };
                self.gemm_into(OP, n, m, k, bt, at, Mat::rows(&ct, m4), false)?;
                self.pack_into(OP, Mat::transposed(&ct, m4), m, n, &c, 0, n, m, n)?;
                return Ok(c);
            }
        }
        self.gemm_into(OP, m, n, k, am, bm, Mat::rows(&c, n), false)?;
        Ok(c)
    }

    /// Linear layer `x @ w^T + bias`: `x` `[batch, in]`, `w` `[out, in]` (PyTorch layout).
    pub fn linear(&mut self, x: &GpuTensor, w: &GpuTensor, bias: Option<&GpuTensor>) -> Result<GpuTensor> {
        self.linear_act(x, w, bias, false)
    }

    /// [`Gpu::linear`] followed by a ReLU fused into the bias pass when `relu`.
    pub fn linear_act(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        relu: bool,
    ) -> Result<GpuTensor> {
        geometry::linear(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
        let y = self.matmul(x, w, false, true)?;
        match (bias, relu) {
            (Some(b), _) => self.add_channel_bias_act(&y, b, relu),
            (None, true) => self.relu(&y),
            (None, false) => Ok(y),
        }
    }

    /// Gradients `(dx, dw, db)` of [`Gpu::linear`] for output gradient `dy` `[batch, out]`.
    pub fn linear_backward(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
    ) -> Result<(GpuTensor, GpuTensor, GpuTensor)> {
        let (batch, _, out) = geometry::linear(x.shape(), w.shape(), None)?;
        if dy.shape().dims() != [batch, out] {
            return Err(strata_tensor::TensorError::shape(
                "linear_backward",
                format!("output gradient {} must be [{batch},{out}]", dy.shape()),
            )
            .into());
        }
        let dx = self.matmul(dy, w, false, false)?;
        let dw = self.matmul(dy, x, true, false)?;
        let db = self.reduce(dy, ReduceOp::Sum, Some(0))?;
        Ok((dx, dw, db))
    }

    /// [`Gpu::linear_backward`] in two optional halves: the input gradient `dx` and the
    /// weight and bias gradients `(dw, db)`, each computed only when asked for (the same
    /// GEMMs, so the halves equal the whole bitwise).
    pub fn linear_backward_parts(
        &mut self,
        x: &GpuTensor,
        w: &GpuTensor,
        dy: &GpuTensor,
        input_grad: bool,
        weight_grad: bool,
    ) -> Result<crate::BackwardParts> {
        let (batch, _, out) = geometry::linear(x.shape(), w.shape(), None)?;
        if dy.shape().dims() != [batch, out] {
            return Err(strata_tensor::TensorError::shape(
                "linear_backward",
                format!("output gradient {} must be [{batch},{out}]", dy.shape()),
            )
            .into());
        }
        let dx = if input_grad { Some(self.matmul(dy, w, false, false)?) } else { None };
        let weight = if weight_grad {
            Some((self.matmul(dy, x, true, false)?, self.reduce(dy, ReduceOp::Sum, Some(0))?))
        } else {
            None
        };
        Ok(crate::BackwardParts { dx, weight })
    }
}
