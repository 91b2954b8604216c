// Reductions: sum, max, min, argmax, argmin over a whole tensor or along one axis.
//
// Whole-tensor reductions run in two passes. `partials` gives each workgroup a
// contiguous range; each lane accumulates a strided sequence of vec4s (sums with Kahan
// compensation, so a lane's long run does not lose low bits), then the workgroup
// combines its 64 lanes as a binary tree in workgroup memory. `finish` reduces the
// partials of all chunks the same way. Ties in arg-reductions go to the lowest index;
// NaNs never win a comparison.
//
// OP: 0 sum, 1 max, 2 min, 3 argmax, 4 argmin.

override OP: u32 = 0u;

struct Params {
    n: u32,          // elements to reduce (this chunk, or the number of partials)
    base: u32,       // global index of element 0 of this chunk
    part_off: u32,   // where this chunk's partials go
    scale: f32,      // multiplier applied by `finish` (1/n for a mean)
    outer: u32,      // reduce_axis: [outer, len, inner]
    len: u32,
    inner: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs. Workgroup arrays hold up to 64.
override WG: u32 = 64u;

var<workgroup> tv: array<f32, 64>;
var<workgroup> ti: array<u32, 64>;

fn identity() -> f32 {
    switch OP {
        case 1u, 3u: { return -3.4028235e38; }
        case 2u, 4u: { return 3.4028235e38; }
        default: { return 0.0; }
    }
}

const NONE: u32 = 0xffffffffu;

// Whether candidate (v, i) beats current (cv, ci); index NONE marks "no element yet".
fn better(v: f32, i: u32, cv: f32, ci: u32) -> bool {
    if (i == NONE) {
        return false;
    }
    if (ci == NONE) {
        return true;
    }
    if (OP == 1u || OP == 3u) {
        return v > cv || (v == cv && i < ci);
    }
    return v < cv || (v == cv && i < ci);
}

fn tree(lid: u32) {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            if (OP == 0u) {
                tv[lid] = tv[lid] + tv[lid + s];
            } else if (better(tv[lid + s], ti[lid + s], tv[lid], ti[lid])) {
                tv[lid] = tv[lid + s];
                ti[lid] = ti[lid + s];
            }
        }
    }
    workgroupBarrier();
}

@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> pv: array<f32>;
@group(0) @binding(3) var<storage, read_write> pi: array<u32>;

@compute @workgroup_size(WG)
fn partials(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let nv = p.n / 4u;
    let per = (nv + ng.x - 1u) / ng.x;
    let start = wg.x * per;
    let end = min(start + per, nv);
    var best = identity();
    var best_i = NONE;
    if (OP == 0u) {
        var s = vec4<f32>(0.0);
        var comp = vec4<f32>(0.0);
        for (var i = start + lid; i < end; i += WG) {
            let y = xv[i] - comp;
            let t = s + y;
            comp = (t - s) - y;
            s = t;
        }
        // The tail (n % 4 elements) belongs to the last workgroup's lane 0.
        if (wg.x == ng.x - 1u && lid == 0u && p.n % 4u != 0u) {
            let tail = xv[nv];
            for (var j = 0u; j < p.n % 4u; j++) {
                s.x += tail[j];
            }
        }
        best = (s.x + s.y) + (s.z + s.w);
    } else {
        for (var i = start + lid; i < end; i += WG) {
            let v = xv[i];
            for (var j = 0u; j < 4u; j++) {
                if (better(v[j], i * 4u + j, best, best_i)) {
                    best = v[j];
                    best_i = i * 4u + j;
                }
            }
        }
        if (wg.x == ng.x - 1u && lid == 0u && p.n % 4u != 0u) {
            let tail = xv[nv];
            for (var j = 0u; j < p.n % 4u; j++) {
                if (better(tail[j], nv * 4u + j, best, best_i)) {
                    best = tail[j];
                    best_i = nv * 4u + j;
                }
            }
        }
        best_i = select(best_i + p.base, NONE, best_i == NONE);
    }
    tv[lid] = best;
    ti[lid] = best_i;
    tree(lid);
    if (lid == 0u) {
        pv[p.part_off + wg.x] = tv[0];
        pi[p.part_off + wg.x] = ti[0];
    }
}

@group(0) @binding(1) var<storage, read> fv: array<f32>;
@group(0) @binding(2) var<storage, read> fi: array<u32>;
@group(0) @binding(3) var<storage, read_write> outv: array<f32>;
@group(0) @binding(4) var<storage, read_write> outi: array<u32>;

// One workgroup reduces `n` partials into outv[0] / outi[0].
@compute @workgroup_size(WG)
fn finish(@builtin(local_invocation_index) lid: u32) {
    var best = identity();
    var best_i = NONE;
    var comp = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        if (OP == 0u) {
            let y = fv[i] - comp;
            let t = best + y;
            comp = (t - best) - y;
            best = t;
        } else if (better(fv[i], fi[i], best, best_i)) {
            best = fv[i];
            best_i = fi[i];
        }
    }
    tv[lid] = best;
    ti[lid] = best_i;
    tree(lid);
    if (lid == 0u) {
        outv[0] = tv[0] * p.scale;
        outi[0] = ti[0];
    }
}

@group(0) @binding(1) var<storage, read> ax: array<f32>;
@group(0) @binding(2) var<storage, read_write> av: array<f32>;
@group(0) @binding(3) var<storage, read_write> ai: array<u32>;

// One lane per output element of [outer, inner], walking the axis.
@compute @workgroup_size(WG)
fn axis_lane(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let outputs = p.outer * p.inner;
    for (var o = gid.x; o < outputs; o += ng.x * WG) {
        let base = (o / p.inner) * p.len * p.inner + o % p.inner;
        var best = identity();
        var best_i = NONE;
        var comp = 0.0;
        for (var k = 0u; k < p.len; k++) {
            let v = ax[base + k * p.inner];
            if (OP == 0u) {
                let y = v - comp;
                let t = best + y;
                comp = (t - best) - y;
                best = t;
            } else if (better(v, k, best, best_i)) {
                best = v;
                best_i = k;
            }
        }
        av[o] = best * p.scale;
        ai[o] = best_i;
    }
}

// One workgroup per output element, for few outputs over a long axis.
@compute @workgroup_size(WG)
fn axis_group(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wg.x + wg.y * 65535u;
    if (o >= p.outer * p.inner) {
        return;
    }
    let base = (o / p.inner) * p.len * p.inner + o % p.inner;
    var best = identity();
    var best_i = NONE;
    var comp = 0.0;
    for (var k = lid; k < p.len; k += WG) {
        let v = ax[base + k * p.inner];
        if (OP == 0u) {
            let y = v - comp;
            let t = best + y;
            comp = (t - best) - y;
            best = t;
        } else if (better(v, k, best, best_i)) {
            best = v;
            best_i = k;
        }
    }
    tv[lid] = best;
    ti[lid] = best_i;
    tree(lid);
    if (lid == 0u) {
        av[o] = tv[0] * p.scale;
        ai[o] = ti[0];
    }
}
