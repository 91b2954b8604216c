// 2-D max pooling over NCHW planes, forward (value and winning index) and backward.
// The index is ih * w + iw within the plane; the first maximum in window order wins.
//
// Grid: y walks planes (image, channel), x walks rows, each lane a whole row; window
// positions advance by increments, since integer division costs a scalar division per
// lane on CPU adapters.

struct Params {
    planes: u32,
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
    relu_mask: u32, // backward: 1 = also apply ReLU's gradient, with the pool input as mask
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs.
override WG: u32 = 64u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> idx: array<u32>;

@compute @workgroup_size(WG)
fn max_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var plane = wg.y; plane < p.planes; plane += ng.y) {
        let base = plane * p.h * p.w;
        for (var oh = gid.x; oh < p.ho; oh += ng.x * WG) {
            let out_row = (plane * p.ho + oh) * p.wo;
            let ih0 = i32(oh * p.sh) - i32(p.ph);
            var iw0 = -i32(p.pw);
            for (var ow = 0u; ow < p.wo; ow++) {
                var best = 0.0;
                var arg = NONE;
                for (var ki = 0u; ki < p.kh; ki++) {
                    let ih = ih0 + i32(ki);
                    if (ih < 0 || ih >= i32(p.h)) {
                        continue;
                    }
                    for (var kj = 0u; kj < p.kw; kj++) {
                        let iw = iw0 + i32(kj);
                        if (iw < 0 || iw >= i32(p.w)) {
                            continue;
                        }
                        let i = u32(ih) * p.w + u32(iw);
                        let v = x[base + i];
                        if (arg == NONE || v > best) {
                            best = v;
                            arg = i;
                        }
                    }
                }
                y[out_row + ow] = best;
                idx[out_row + ow] = arg;
                iw0 += i32(p.sw);
            }
        }
    }
}

@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> widx: array<u32>;
@group(0) @binding(3) var<storage, read> px: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

// Each input pixel gathers the gradients of the windows it won (no atomics, so the
// result is deterministic even for overlapping windows). With relu_mask, pixels whose
// pool input is not positive get no gradient (the ReLU before the pool).
@compute @workgroup_size(WG)
fn max_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let disjoint = p.kh <= p.sh && p.kw <= p.sw;
    for (var plane = wg.y; plane < p.planes; plane += ng.y) {
        let in_base = plane * p.h * p.w;
        let out_base = plane * p.ho * p.wo;
        for (var ih = gid.x; ih < p.h; ih += ng.x * WG) {
            // Windows oh with oh * sh - ph <= ih < oh * sh - ph + kh.
            let hi_h = min((ih + p.ph) / p.sh, p.ho - 1u);
            let lo_h = select(0u, (ih + p.ph + p.sh - p.kh) / p.sh, ih + p.ph + 1u > p.kh);
            // Along the row, track the window and the offset within it by increments.
            var ow = 0u;
            var in_win = p.pw;
            for (var iw = 0u; iw < p.w; iw++) {
                let local = ih * p.w + iw;
                var s = 0.0;
                if (disjoint) {
                    if (in_win < p.kw && ow < p.wo && lo_h <= hi_h) {
                        let o = out_base + lo_h * p.wo + ow;
                        s = select(0.0, dy[o], widx[o] == local);
                    }
                } else {
                    let hi_w = min((iw + p.pw) / p.sw, p.wo - 1u);
                    let lo_w = select(0u, (iw + p.pw + p.sw - p.kw) / p.sw, iw + p.pw + 1u > p.kw);
                    for (var oh = lo_h; oh <= hi_h; oh++) {
                        for (var w2 = lo_w; w2 <= hi_w; w2++) {
                            let o = out_base + oh * p.wo + w2;
                            if (widx[o] == local) {
                                s += dy[o];
                            }
                        }
                    }
                }
                if (p.relu_mask == 1u && px[in_base + local] <= 0.0) {
                    s = 0.0;
                }
                dx[in_base + local] = s;
                in_win += 1u;
                if (in_win == p.sw) {
                    in_win = 0u;
                    ow += 1u;
                }
            }
        }
    }
}

// The backward pass when the windows tile the input exactly (kernel = stride, no
// padding, h = ho * kh, w = wo * kw), as in the usual 2x2/2 pooling: each window
// scatters its gradient to its winner and zeros to the rest, so every input pixel is
// written once and each window's gradient and index are read once (about a third of
// the memory operations of the gather above). Each lane walks one row of windows.
@compute @workgroup_size(WG)
fn max_pool_backward_tiled(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var plane = wg.y; plane < p.planes; plane += ng.y) {
        let in_base = plane * p.h * p.w;
        for (var oh = gid.x; oh < p.ho; oh += ng.x * WG) {
            let o_row = (plane * p.ho + oh) * p.wo;
            let ih0 = oh * p.kh;
            var iw0 = 0u;
            for (var ow = 0u; ow < p.wo; ow++) {
                let arg = widx[o_row + ow];
                var g = dy[o_row + ow];
                if (p.relu_mask == 1u && px[in_base + arg] <= 0.0) {
                    g = 0.0;
                }
                for (var ki = 0u; ki < p.kh; ki++) {
                    let row = (ih0 + ki) * p.w;
                    for (var kj = 0u; kj < p.kw; kj++) {
                        let local = row + iw0 + kj;
                        dx[in_base + local] = select(0.0, g, local == arg);
                    }
                }
                iw0 += p.kw;
            }
        }
    }
}
