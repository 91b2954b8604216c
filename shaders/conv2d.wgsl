// Convolution as im2col + GEMM, and the layout kernels around it.
//
// For a chunk of `nb` images starting at image `n0`, the patch matrix col has one row per
// (input channel, kernel row, kernel column) and one column per output pixel
// p = n_local * ho * wo + oh * wo + ow, with row stride p_ld (a multiple of 4).
//   forward:   Y'[co, p] = W[co, :] . col[:, p]          then Y' -> NCHW (+ bias)
//   backward:  dW^T += col . dY^T,  dcol = W^T . dY',   dcol -> dx (col2im)
// The GEMMs live in gemm_*.wgsl; this file moves data between layouts.

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
}

@group(0) @binding(0) var<uniform> p: Params;

const WG: u32 = 64u;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> col: array<f32>;
@group(0) @binding(2) var<storage, read_write> col4: array<vec4<f32>>;

fn patch_value(row: u32, nl: u32, oh: u32, ow: u32) -> f32 {
    let kk = p.kh * p.kw;
    let c = row / kk;
    let ki = (row / p.kw) % p.kh;
    let kj = row % p.kw;
    let ih = i32(oh * p.sh + ki) - i32(p.ph);
    let iw = i32(ow * p.sw + kj) - i32(p.pw);
    let inside = ih >= 0 && ih < i32(p.h) && iw >= 0 && iw < i32(p.w);
    let ihc = u32(clamp(ih, 0, i32(p.h) - 1));
    let iwc = u32(clamp(iw, 0, i32(p.w) - 1));
    let v = x[(((p.n0 + nl) * p.ci + c) * p.h + ihc) * p.w + iwc];
    return select(0.0, v, inside);
}

// One invocation per (patch row, image, output row): writes wo values.
@compute @workgroup_size(64)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let items = p.ci * p.kh * p.kw * p.nb * p.ho;
    for (var it = gid.x; it < items; it += ng.x * WG) {
        let oh = it % p.ho;
        let t = it / p.ho;
        let nl = t % p.nb;
        let row = t / p.nb;
        let base = row * p.p_ld + (nl * p.ho + oh) * p.wo;
        for (var ow = 0u; ow < p.wo; ow++) {
            col[base + ow] = patch_value(row, nl, oh, ow);
        }
    }
}

// As im2col, for wo % 4 == 0: whole vec4 stores.
@compute @workgroup_size(64)
fn im2col_v4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let items = p.ci * p.kh * p.kw * p.nb * p.ho;
    for (var it = gid.x; it < items; it += ng.x * WG) {
        let oh = it % p.ho;
        let t = it / p.ho;
        let nl = t % p.nb;
        let row = t / p.nb;
        let base4 = (row * p.p_ld + (nl * p.ho + oh) * p.wo) / 4u;
        for (var ow = 0u; ow < p.wo; ow += 4u) {
            col4[base4 + ow / 4u] = vec4<f32>(
                patch_value(row, nl, oh, ow),
                patch_value(row, nl, oh, ow + 1u),
                patch_value(row, nl, oh, ow + 2u),
                patch_value(row, nl, oh, ow + 3u),
            );
        }
    }
}

@group(0) @binding(1) var<storage, read> dcol: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;

// dx for the chunk's images: every input pixel gathers the patch entries it fed.
@compute @workgroup_size(64)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let items = p.nb * p.ci * p.h;
    for (var it = gid.x; it < items; it += ng.x * WG) {
        let ih = it % p.h;
        let t = it / p.h;
        let c = t % p.ci;
        let nl = t / p.ci;
        let out_base = (((p.n0 + nl) * p.ci + c) * p.h + ih) * p.w;
        for (var iw = 0u; iw < p.w; iw++) {
            var s = 0.0;
            for (var ki = 0u; ki < p.kh; ki++) {
                let oh_s = i32(ih + p.ph) - i32(ki);
                if (oh_s < 0 || u32(oh_s) % p.sh != 0u || u32(oh_s) / p.sh >= p.ho) {
                    continue;
                }
                let oh = u32(oh_s) / p.sh;
                for (var kj = 0u; kj < p.kw; kj++) {
                    let ow_s = i32(iw + p.pw) - i32(kj);
                    if (ow_s < 0 || u32(ow_s) % p.sw != 0u || u32(ow_s) / p.sw >= p.wo) {
                        continue;
                    }
                    let ow = u32(ow_s) / p.sw;
                    let row = (c * p.kh + ki) * p.kw + kj;
                    s += dcol[row * p.p_ld + (nl * p.ho + oh) * p.wo + ow];
                }
            }
            dx[out_base + iw] = s;
        }
    }
}

@group(0) @binding(1) var<storage, read> ycp: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> ycp4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y4: array<vec4<f32>>;

// y[n0 + nl, co, hw] = Y'[co, nl * hw_len + hw] + bias[co]
@compute @workgroup_size(64)
fn cp_to_nchw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let hw_len = p.ho * p.wo;
    let total = p.nb * p.co * hw_len;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let hw = i % hw_len;
        let t = i / hw_len;
        let c = t % p.co;
        let nl = t / p.co;
        y[(p.n0 * p.co) * hw_len + i] = ycp[c * p.p_ld + nl * hw_len + hw] + bias[c];
    }
}

// As cp_to_nchw, for ho * wo % 4 == 0.
@compute @workgroup_size(64)
fn cp_to_nchw_v4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let hw4 = p.ho * p.wo / 4u;
    let total = p.nb * p.co * hw4;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let hw = i % hw4;
        let t = i / hw4;
        let c = t % p.co;
        let nl = t / p.co;
        y4[p.n0 * p.co * hw4 + i] = ycp4[(c * p.p_ld) / 4u + nl * hw4 + hw] + vec4<f32>(bias[c]);
    }
}

@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dcp: array<f32>;
@group(0) @binding(1) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dcp4: array<vec4<f32>>;

// dY'[co, nl * hw_len + hw] = dy[n0 + nl, co, hw]
@compute @workgroup_size(64)
fn nchw_to_cp(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let hw_len = p.ho * p.wo;
    let total = p.nb * p.co * hw_len;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let hw = i % hw_len;
        let t = i / hw_len;
        let c = t % p.co;
        let nl = t / p.co;
        dcp[c * p.p_ld + nl * hw_len + hw] = dy[p.n0 * p.co * hw_len + i];
    }
}

// As nchw_to_cp, for ho * wo % 4 == 0.
@compute @workgroup_size(64)
fn nchw_to_cp_v4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let hw4 = p.ho * p.wo / 4u;
    let total = p.nb * p.co * hw4;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let hw = i % hw4;
        let t = i / hw4;
        let c = t % p.co;
        let nl = t / p.co;
        dcp4[(c * p.p_ld) / 4u + nl * hw4 + hw] = dy4[p.n0 * p.co * hw4 + i];
    }
}

@group(0) @binding(1) var<storage, read> dyt_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dyt: array<vec4<f32>>;

// dY^T[nl * hw_len + hw, co] = dy[n0 + nl, co, hw], four channels per store; channels
// past co repeat the last one (they only reach padding columns of the GEMM result).
@compute @workgroup_size(64)
fn nchw_to_pc(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let hw_len = p.ho * p.wo;
    let co4 = p.co_ld / 4u;
    let total = p.nb * hw_len * co4;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let c4 = i % co4;
        let pix = i / co4;
        let hw = pix % hw_len;
        let nl = pix / hw_len;
        let base = (p.n0 + nl) * p.co * hw_len + hw;
        let c = min(vec4<u32>(c4 * 4u) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.co - 1u));
        dyt[i] = vec4<f32>(
            dyt_src[base + c.x * hw_len],
            dyt_src[base + c.y * hw_len],
            dyt_src[base + c.z * hw_len],
            dyt_src[base + c.w * hw_len],
        );
    }
}

@group(0) @binding(1) var<storage, read> gy: array<f32>;
@group(0) @binding(2) var<storage, read_write> db: array<f32>;

var<workgroup> part: array<f32, 64>;

// db[co] = sum over images and pixels of dy[n, co, :]; one workgroup per channel,
// `nb` images from n0 (the whole batch).
@compute @workgroup_size(64)
fn bias_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.x;
    let hw_len = p.ho * p.wo;
    let total = p.nb * hw_len;
    var s = 0.0;
    var comp = 0.0;
    for (var i = lid; i < total; i += WG) {
        let v = gy[((i / hw_len) * p.co + c) * hw_len + i % hw_len] - comp;
        let t = s + v;
        comp = (t - s) - v;
        s = t;
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
