// 2-D max pooling over NCHW planes, forward (value and winning index) and backward.
// The index is ih * w + iw within the plane; the first maximum in window order wins.

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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs. Workgroup arrays hold up to 64.
override WG: u32 = 64u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> idx: array<u32>;

@compute @workgroup_size(WG)
fn max_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let per = p.ho * p.wo;
    let total = p.planes * per;
    for (var o = gid.x; o < total; o += ng.x * WG) {
        let plane = o / per;
        let oh = (o % per) / p.wo;
        let ow = o % p.wo;
        let base = plane * p.h * p.w;
        var best = 0.0;
        var arg = NONE;
        for (var ki = 0u; ki < p.kh; ki++) {
            let ih = i32(oh * p.sh + ki) - i32(p.ph);
            if (ih < 0 || ih >= i32(p.h)) {
                continue;
            }
            for (var kj = 0u; kj < p.kw; kj++) {
                let iw = i32(ow * p.sw + kj) - i32(p.pw);
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
        y[o] = best;
        idx[o] = arg;
    }
}

@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> widx: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

// Each input pixel gathers the gradients of the windows it won (no atomics, so the
// result is deterministic even for overlapping windows).
@compute @workgroup_size(WG)
fn max_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let plane_len = p.h * p.w;
    let total = p.planes * plane_len;
    let per = p.ho * p.wo;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let plane = i / plane_len;
        let local = i % plane_len;
        let ih = local / p.w;
        let iw = local % p.w;
        // Windows oh with oh * sh - ph <= ih < oh * sh - ph + kh.
        let hi_h = (ih + p.ph) / p.sh;
        let lo_h = select(0u, (ih + p.ph + p.sh - p.kh) / p.sh, ih + p.ph + 1u > p.kh);
        let hi_w = (iw + p.pw) / p.sw;
        let lo_w = select(0u, (iw + p.pw + p.sw - p.kw) / p.sw, iw + p.pw + 1u > p.kw);
        var s = 0.0;
        for (var oh = lo_h; oh <= min(hi_h, p.ho - 1u); oh++) {
            for (var ow = lo_w; ow <= min(hi_w, p.wo - 1u); ow++) {
                let o = plane * per + oh * p.wo + ow;
                if (widx[o] == local) {
                    s += dy[o];
                }
            }
        }
        dx[i] = s;
    }
}
