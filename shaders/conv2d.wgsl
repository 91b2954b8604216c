// Convolution as im2col + GEMM, and the layout kernels around it.
//
// For a chunk of `nb` images starting at image `n0`, the patch matrix col has one row per
// (input channel, kernel row, kernel column) and one column per output pixel
// p = n_local * ho * wo + oh * wo + ow, with row stride p_ld (a multiple of 4).
//   forward:   Y'[co, p] = W[co, :] . col[:, p]          then Y' -> NCHW (+ bias)
//   backward:  dW^T += col . dY^T,  dcol = W^T . dY',   dcol -> dx (col2im)
// The GEMMs live in gemm_*.wgsl; this file moves data between layouts.
//
// Integer division has no SIMD form on CPUs, so on lavapipe every `/` or `%` of a
// non-constant costs one scalar division per lane. The kernels therefore take the
// (row, plane, image) coordinate from the workgroup grid's y dimension and walk the
// remaining coordinates with increments, dividing once per lane, not once per element.

struct Params {
    ci: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    ho: u32,
    wo: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    n0: u32,
    nb: u32,
    p_ld: u32,   // row stride of col / dcol / Y' / dY'
    co: u32,
    co_ld: u32,  // row stride of dY^T
    relu: u32,   // cp_to_nchw: apply ReLU to the output
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs. Workgroup arrays hold up to 64.
override WG: u32 = 64u;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> col4: array<vec4<f32>>;

// Patch values for 4 consecutive columns of one patch row. Grid: y walks patch rows,
// x walks runs of RUN vec4 within the row. The inner loop is branch-free: a lane's
// output coordinate advances with selects, and taps outside the image (or columns past
// the chunk) load a clamped address and are replaced by zero.
const RUN: u32 = 4u;

struct Cursor {
    nl: u32,
    oh: u32,
    ow: u32,
    q: u32,
}

fn tap(cur: Cursor, c: u32, ki: u32, kj: u32, cols: u32) -> f32 {
    let ih = i32(cur.oh * p.sh + ki) - i32(p.ph);
    let iw = i32(cur.ow * p.sw + kj) - i32(p.pw);
    let inside = ih >= 0 && ih < i32(p.h) && iw >= 0 && iw < i32(p.w) && cur.q < cols;
    let ihc = u32(clamp(ih, 0, i32(p.h) - 1));
    let iwc = u32(clamp(iw, 0, i32(p.w) - 1));
    let n = min(p.n0 + cur.nl, p.n0 + p.nb - 1u);
    return select(0.0, x[((n * p.ci + c) * p.h + ihc) * p.w + iwc], inside);
}

fn advance(cur: Cursor) -> Cursor {
    var r = cur;
    r.q += 1u;
    r.ow += 1u;
    let wrap_w = r.ow == p.wo;
    r.ow = select(r.ow, 0u, wrap_w);
    r.oh = select(r.oh, r.oh + 1u, wrap_w);
    let wrap_h = r.oh == p.ho;
    r.oh = select(r.oh, 0u, wrap_h);
    r.nl = select(r.nl, r.nl + 1u, wrap_h);
    return r;
}

@compute @workgroup_size(WG)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let kk = p.kh * p.kw;
    let pix = p.ho * p.wo;
    let cols = p.nb * pix;
    let row_vec4 = p.p_ld / 4u;
    let runs = (row_vec4 + RUN - 1u) / RUN;
    let lanes = ng.x * WG;
    for (var row = wg.y; row < p.ci * kk; row += ng.y) {
        let c = row / kk;
        let ki = (row / p.kw) % p.kh;
        let kj = row % p.kw;
        let row4 = row * row_vec4;
        for (var run = gid.x; run < runs; run += lanes) {
            let q0 = run * RUN * 4u;
            var cur = Cursor(q0 / pix, (q0 % pix) / p.wo, q0 % p.wo, q0);
            for (var v = 0u; v < RUN; v++) {
                let a0 = tap(cur, c, ki, kj, cols);
                cur = advance(cur);
                let a1 = tap(cur, c, ki, kj, cols);
                cur = advance(cur);
                let a2 = tap(cur, c, ki, kj, cols);
                cur = advance(cur);
                let a3 = tap(cur, c, ki, kj, cols);
                cur = advance(cur);
                let q4 = run * RUN + v;
                if (q4 < row_vec4) {
                    col4[row4 + q4] = vec4<f32>(a0, a1, a2, a3);
                }
            }
        }
    }
}

@group(0) @binding(1) var<storage, read> dcol: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;

// Output coordinate fed by input coordinate `i` through kernel tap `k` along one axis,
// or `limit` (out of range) when there is none.
fn source(i: u32, pad: u32, k: u32, stride: u32, limit: u32) -> u32 {
    let s = i32(i + pad) - i32(k);
    if (stride == 1u) {
        return select(u32(s), limit, s < 0);
    }
    let ok = s >= 0 && u32(s) % stride == 0u;
    return select(limit, u32(s) / stride, ok);
}

// dx for the chunk's images: every input pixel gathers the patch entries it fed.
// Grid: y walks (image, channel) planes, x walks input rows.
@compute @workgroup_size(WG)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let last = p.kh * p.kw * p.ci * p.p_ld - 1u;
    // Images vary fastest across workgroups: consecutive workgroups then read the same
    // kh * kw rows of the patch gradient at consecutive columns, which streams, instead
    // of jumping kh * kw rows (a cache miss per short segment) from channel to channel.
    for (var plane = wg.y; plane < p.nb * p.ci; plane += ng.y) {
        let nl = plane % p.nb;
        let c = plane / p.nb;
        let col_base = nl * p.ho * p.wo;
        for (var ih = gid.x; ih < p.h; ih += ng.x * WG) {
            let out_base = (((p.n0 + nl) * p.ci + c) * p.h + ih) * p.w;
            for (var iw = 0u; iw < p.w; iw++) {
                var s = 0.0;
                for (var ki = 0u; ki < p.kh; ki++) {
                    let oh = source(ih, p.ph, ki, p.sh, p.ho);
                    let row_base = (c * p.kh + ki) * p.kw;
                    for (var kj = 0u; kj < p.kw; kj++) {
                        let ow = source(iw, p.pw, kj, p.sw, p.wo);
                        let ok = oh < p.ho && ow < p.wo;
                        let idx = min((row_base + kj) * p.p_ld + col_base + oh * p.wo + ow, last);
                        s += select(0.0, dcol[idx], ok);
                    }
                }
                dx[out_base + iw] = s;
            }
        }
    }
}

@group(0) @binding(1) var<storage, read> ycp: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> ycp4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y4: array<vec4<f32>>;

// y[n0 + nl, co, :] = Y'[co, nl * pix + :] + bias[co]. Grid: y walks (image, channel)
// planes, x walks pixels.
@compute @workgroup_size(WG)
fn cp_to_nchw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let pix = p.ho * p.wo;
    for (var plane = wg.y; plane < p.nb * p.co; plane += ng.y) {
        let c = plane % p.co;
        let src = c * p.p_ld + (plane / p.co) * pix;
        let dst = (p.n0 * p.co + plane) * pix;
        let b = bias[c];
        for (var i = gid.x; i < pix; i += ng.x * WG) {
            let v = ycp[src + i] + b;
            y[dst + i] = select(v, max(v, 0.0), p.relu == 1u);
        }
    }
}

// As cp_to_nchw, for ho * wo % 4 == 0.
@compute @workgroup_size(WG)
fn cp_to_nchw_v4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let pix4 = p.ho * p.wo / 4u;
    for (var plane = wg.y; plane < p.nb * p.co; plane += ng.y) {
        let c = plane % p.co;
        let src = (c * p.p_ld) / 4u + (plane / p.co) * pix4;
        let dst = (p.n0 * p.co + plane) * pix4;
        let b = vec4<f32>(bias[c]);
        for (var i = gid.x; i < pix4; i += ng.x * WG) {
            let v = ycp4[src + i] + b;
            y4[dst + i] = select(v, max(v, vec4<f32>(0.0)), p.relu == 1u);
        }
    }
}

@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dcp: array<f32>;
@group(0) @binding(1) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dcp4: array<vec4<f32>>;

// dY'[co, nl * pix + :] = dy[n0 + nl, co, :]. Grid as cp_to_nchw.
@compute @workgroup_size(WG)
fn nchw_to_cp(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let pix = p.ho * p.wo;
    for (var plane = wg.y; plane < p.nb * p.co; plane += ng.y) {
        let dst = (plane % p.co) * p.p_ld + (plane / p.co) * pix;
        let src = (p.n0 * p.co + plane) * pix;
        for (var i = gid.x; i < pix; i += ng.x * WG) {
            dcp[dst + i] = dy[src + i];
        }
    }
}

// As nchw_to_cp, for ho * wo % 4 == 0.
@compute @workgroup_size(WG)
fn nchw_to_cp_v4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let pix4 = p.ho * p.wo / 4u;
    for (var plane = wg.y; plane < p.nb * p.co; plane += ng.y) {
        let dst = ((plane % p.co) * p.p_ld) / 4u + (plane / p.co) * pix4;
        let src = (p.n0 * p.co + plane) * pix4;
        for (var i = gid.x; i < pix4; i += ng.x * WG) {
            dcp4[dst + i] = dy4[src + i];
        }
    }
}

@group(0) @binding(1) var<storage, read> dyt_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dyt: array<vec4<f32>>;

// dY^T[nl * pix + hw, co] = dy[n0 + nl, co, hw], four channels per store; channels past
// co repeat the last one (they only reach padding columns of the GEMM result).
// Grid: y walks images, x walks pixels; each lane writes a whole row of dY^T.
@compute @workgroup_size(WG)
fn nchw_to_pc(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let pix = p.ho * p.wo;
    let co4 = p.co_ld / 4u;
    for (var nl = wg.y; nl < p.nb; nl += ng.y) {
        let src = (p.n0 + nl) * p.co * pix;
        for (var hw = gid.x; hw < pix; hw += ng.x * WG) {
            let dst = (nl * pix + hw) * co4;
            for (var c4 = 0u; c4 < co4; c4++) {
                let c = min(vec4<u32>(c4 * 4u) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.co - 1u));
                dyt[dst + c4] = vec4<f32>(
                    dyt_src[src + c.x * pix + hw],
                    dyt_src[src + c.y * pix + hw],
                    dyt_src[src + c.z * pix + hw],
                    dyt_src[src + c.w * pix + hw],
                );
            }
        }
    }
}

@group(0) @binding(1) var<storage, read> gy: array<f32>;
@group(0) @binding(2) var<storage, read_write> db: array<f32>;

var<workgroup> part: array<f32, 64>;

// db[co] = sum over images and pixels of dy[n, co, :]; one workgroup per channel,
// `nb` images from n0 (the whole batch).
@compute @workgroup_size(WG)
fn bias_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.x;
    let pix = p.ho * p.wo;
    var s = 0.0;
    var comp = 0.0;
    for (var n = 0u; n < p.nb; n++) {
        let base = ((p.n0 + n) * p.co + c) * pix;
        for (var i = lid; i < pix; i += WG) {
            let v = gy[base + i] - comp;
            let t = s + v;
            comp = (t - s) - v;
            s = t;
        }
    }
    part[lid] = s;
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        workgroupBarrier();
        if (lid < st) {
            part[lid] += part[lid + st];
        }
    }
    if (lid == 0u) {
        db[c] = part[0];
    }
}

@group(0) @binding(1) var<storage, read> gy4: array<vec4<f32>>;

// As bias_grad, for ho * wo % 4 == 0: vec4 loads (a lane's load on lavapipe costs about
// the same for a vec4 as for two scalars, measured).
@compute @workgroup_size(WG)
fn bias_grad4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.x;
    let pix4 = p.ho * p.wo / 4u;
    var s = vec4<f32>(0.0);
    var comp = vec4<f32>(0.0);
    for (var n = 0u; n < p.nb; n++) {
        let base = ((p.n0 + n) * p.co + c) * pix4;
        for (var i = lid; i < pix4; i += WG) {
            let v = gy4[base + i] - comp;
            let t = s + v;
            comp = (t - s) - v;
            s = t;
        }
    }
    part[lid] = (s.x + s.y) + (s.z + s.w);
    for (var st = WG / 2u; st > 0u; st >>= 1u) {
        workgroupBarrier();
        if (lid < st) {
            part[lid] += part[lid + st];
        }
    }
    if (lid == 0u) {
        db[c] = part[0];
    }
}
