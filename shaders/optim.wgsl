// Optimiser steps, in place, with PyTorch's update rules (torch.optim.Adam and SGD).
// The host folds the bias corrections into step_size = lr / (1 - beta1^t) and
// bc2_sqrt = sqrt(1 - beta2^t).

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,   // Adam: beta1;       SGD: momentum
    beta2: f32,   // Adam: beta2;       SGD: dampening
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    first: u32,   // SGD: 1 on the first step (the buffer takes the gradient as is)
    nesterov: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs. Workgroup arrays hold up to 64.
override WG: u32 = 64u;

@group(0) @binding(1) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> m: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> v: array<vec4<f32>>;

// Each workgroup updates a contiguous range, its lanes interleaved: on a CPU adapter a
// workgroup runs on one thread, and seven streams read with a grid-wide stride defeat
// the prefetcher (2.6x slower on lavapipe, 3.2M parameters).
fn range_of(wg: u32, groups: u32, nv: u32) -> vec2<u32> {
    let per = (nv + groups - 1u) / groups;
    return vec2<u32>(min(wg * per, nv), min(wg * per + per, nv));
}

@compute @workgroup_size(WG)
fn adam(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = range_of(wg.x, ng.x, (p.n + 3u) / 4u);
    for (var i = r.x + lid; i < r.y; i += WG) {
        let w = param[i];
        let g = grad[i] + p.weight_decay * w;
        let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
        let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
        param[i] = w - p.step_size * mi / denom;
    }
}

@group(0) @binding(1) var<storage, read_write> sparam: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> sgrad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> buf: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn sgd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = range_of(wg.x, ng.x, (p.n + 3u) / 4u);
    let momentum = p.beta1;
    let dampening = p.beta2;
    for (var i = r.x + lid; i < r.y; i += WG) {
        let w = sparam[i];
        var g = sgrad[i] + p.weight_decay * w;
        if (momentum != 0.0) {
            var b = g;
            if (p.first == 0u) {
                b = momentum * buf[i] + (1.0 - dampening) * g;
            }
            buf[i] = b;
            g = select(b, g + momentum * b, p.nesterov == 1u);
        }
        sparam[i] = w - p.lr * g;
    }
}
