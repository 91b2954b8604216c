// Classification heads: row-wise log-softmax and its gradient, mean negative
// log-likelihood and its gradient, and the count of correct predictions.
//
// Targets are u32 class indices, checked on the host when they are uploaded; a target
// out of range here reads a clamped class and never touches memory outside the row.

struct Params {
    rows: u32,
    classes: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs. Workgroup arrays hold up to 64.
override WG: u32 = 64u;

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn log_softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    for (var r = gid.x; r < p.rows; r += ng.x * WG) {
        let base = r * p.classes;
        var m = x[base];
        for (var c = 1u; c < p.classes; c++) {
            m = max(m, x[base + c]);
        }
        var s = 0.0;
        for (var c = 0u; c < p.classes; c++) {
            s += exp(x[base + c] - m);
        }
        let lse = m + log(s);
        for (var c = 0u; c < p.classes; c++) {
            y[base + c] = x[base + c] - lse;
        }
    }
}

@group(0) @binding(1) var<storage, read> ly: array<f32>;
@group(0) @binding(2) var<storage, read> ldy: array<f32>;
@group(0) @binding(3) var<storage, read_write> ldx: array<f32>;

// dx = dy - exp(y) * sum(dy), per row.
@compute @workgroup_size(WG)
fn log_softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    for (var r = gid.x; r < p.rows; r += ng.x * WG) {
        let base = r * p.classes;
        var s = 0.0;
        for (var c = 0u; c < p.classes; c++) {
            s += ldy[base + c];
        }
        for (var c = 0u; c < p.classes; c++) {
            ldx[base + c] = ldy[base + c] - exp(ly[base + c]) * s;
        }
    }
}

@group(0) @binding(1) var<storage, read> logp: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> part: array<f32, 64>;

fn tree_sum(lid: u32, v: f32) -> f32 {
    part[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            part[lid] += part[lid + s];
        }
    }
    workgroupBarrier();
    return part[0];
}

// out[0] = -scale * sum_r logp[r, targets[r]]  (scale = 1 / rows for the mean); one workgroup.
@compute @workgroup_size(WG)
fn nll_loss(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var comp = 0.0;
    for (var r = lid; r < p.rows; r += WG) {
        let t = min(targets[r], p.classes - 1u);
        let v = logp[r * p.classes + t] - comp;
        let u = s + v;
        comp = (u - s) - v;
        s = u;
    }
    let total = tree_sum(lid, s);
    if (lid == 0u) {
        out[0] = -p.scale * total;
    }
}

@group(0) @binding(1) var<storage, read> ntarget: array<u32>;
@group(0) @binding(2) var<storage, read_write> dlogp: array<f32>;

// dlogp[r, c] = -scale where c == targets[r], else 0.
@compute @workgroup_size(WG)
fn nll_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let total = p.rows * p.classes;
    for (var i = gid.x; i < total; i += ng.x * WG) {
        let r = i / p.classes;
        let c = i % p.classes;
        dlogp[i] = select(0.0, -p.scale, ntarget[r] == c);
    }
}

// out[0] = number of rows whose first maximal logit is at the targets class; one workgroup.
@compute @workgroup_size(WG)
fn correct_count(@builtin(local_invocation_index) lid: u32) {
    var n = 0.0;
    for (var r = lid; r < p.rows; r += WG) {
        let base = r * p.classes;
        var best = logp[base];
        var arg = 0u;
        for (var c = 1u; c < p.classes; c++) {
            let v = logp[base + c];
            if (v > best) {
                best = v;
                arg = c;
            }
        }
        n += select(0.0, 1.0, arg == targets[r]);
    }
    let total = tree_sum(lid, n);
    if (lid == 0u) {
        out[0] = total;
    }
}
