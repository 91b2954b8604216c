// Elementwise kernels over flat f32 buffers viewed as vec4: add/sub (a + alpha*b), mul,
// scale, axpy, ReLU and its gradient, per-channel bias, fill.
//
// Every kernel walks `n` elements as vec4s, each workgroup a contiguous range with its
// lanes interleaved (on a CPU adapter a workgroup runs on one thread, and a grid-wide
// stride defeats the prefetcher: 2.6x slower for Adam's seven streams). When `n` is not a
// multiple of 4 the last vec4 also covers up to 3 elements past the tensor; those lie in
// the buffer's padding (buffers are rounded up to 256 bytes) and are never read back.

struct Params {
    n: u32,        // elements in this chunk
    base: u32,     // index of the chunk's first element in the whole tensor
    alpha: f32,
    bits: u32,     // fill pattern
    inner: u32,    // elements per channel (bias)
    channels: u32, // channel count (bias)
    relu: u32,     // bias: apply ReLU to the result
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters (one SIMD batch, so each
// batch walks memory contiguously), 64 on GPUs. Workgroup arrays hold up to 64.
override WG: u32 = 64u;

// The vec4 range `[x, y)` of workgroup `wg` out of `groups`.
fn span(wg: u32, groups: u32) -> vec2<u32> {
    let nv = (p.n + 3u) / 4u;
    let per = (nv + groups - 1u) / groups;
    return vec2<u32>(min(wg * per, nv), min(wg * per + per, nv));
}

@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

// out = a + alpha * b
@compute @workgroup_size(WG)
fn add_scaled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        out[i] = fma(vec4<f32>(p.alpha), b[i], a[i]);
    }
}

// out = a * b
@compute @workgroup_size(WG)
fn mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        out[i] = a[i] * b[i];
    }
}

// out = x > 0 ? dy : 0, with a = x and b = dy
@compute @workgroup_size(WG)
fn relu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        out[i] = select(vec4<f32>(0.0), b[i], a[i] > vec4<f32>(0.0));
    }
}

@group(0) @binding(1) var<storage, read> x1: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y1: array<vec4<f32>>;

// y = alpha * x
@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        y1[i] = p.alpha * x1[i];
    }
}

// y += alpha * x (in place)
@compute @workgroup_size(WG)
fn axpy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        y1[i] = fma(vec4<f32>(p.alpha), x1[i], y1[i]);
    }
}

// y = max(x, 0)
@compute @workgroup_size(WG)
fn relu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        y1[i] = max(x1[i], vec4<f32>(0.0));
    }
}

@group(0) @binding(1) var<storage, read> xb: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> yb: array<vec4<f32>>;

// y = x + bias[channel] (then ReLU when p.relu == 1), for x laid out [n, channels, inner]
@compute @workgroup_size(WG)
fn add_channel_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        let e = p.base + i * 4u;
        let c = vec4<u32>(e, e + 1u, e + 2u, e + 3u) / p.inner % p.channels;
        let v = xb[i] + vec4<f32>(bias[c.x], bias[c.y], bias[c.z], bias[c.w]);
        yb[i] = select(v, max(v, vec4<f32>(0.0)), p.relu == 1u);
    }
}

@group(0) @binding(1) var<storage, read_write> words: array<vec4<u32>>;

// Every 32-bit word set to `bits` (f32 or u32 tensors alike).
@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) ng: vec3<u32>) {
    let r = span(wg.x, ng.x);
    for (var i = r.x + lid; i < r.y; i += WG) {
        words[i] = vec4<u32>(p.bits);
    }
}
