// C[M, N] (+)= A @ B for GPUs: 64x64 tiles of C per workgroup of 16x16 invocations, each
// invocation 4x4 outputs, operands staged through workgroup memory 16 steps of k at a
// time. A and B are read through element strides, so transposed operands need no copy:
// A(i, k) = a[a_off + i * a_rs + k * a_cs], B(k, j) = b[b_off + k * b_rs + j * b_cs].
// Workgroup z runs product z of a batch, its operands a_bat, b_bat and c_bat elements
// after product 0's (the Winograd convolution's transform positions).

struct Params {
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
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const TILE: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> sa: array<f32, 1024>; // [TK][TILE]
var<workgroup> sb: array<f32, 1024>; // [TK][TILE]

@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let tx = lid3.x;
    let ty = lid3.y;
    let lid = ty * 16u + tx;
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let a_off = p.a_off + wg.z * p.a_bat;
    let b_off = p.b_off + wg.z * p.b_bat;
    let c_off = p.c_off + wg.z * p.c_bat;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            // A tile: consecutive invocations walk k, then rows.
            let ar = idx / TK;
            let ak = idx % TK;
            var av = 0.0;
            if (row0 + ar < p.m && k0 + ak < p.k) {
                av = a[a_off + (row0 + ar) * p.a_rs + (k0 + ak) * p.a_cs];
            }
            sa[ak * TILE + ar] = av;
            // B tile: consecutive invocations walk columns.
            let bk = idx / TILE;
            let bc = idx % TILE;
            var bv = 0.0;
            if (k0 + bk < p.k && col0 + bc < p.n) {
                bv = b[b_off + (k0 + bk) * p.b_rs + (col0 + bc) * p.b_cs];
            }
            sb[bk * TILE + bc] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var ra: array<f32, 4>;
            var rb: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                ra[i] = sa[kk * TILE + ty * 4u + i];
                rb[i] = sb[kk * TILE + tx * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(ra[i], rb[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + ty * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let cc = col0 + tx * 4u + j;
            if (r < p.m && cc < p.n) {
                let ci = c_off + r * p.ldc + cc;
                if (p.accumulate == 1u) {
                    c[ci] = c[ci] + acc[i][j];
                } else {
                    c[ci] = acc[i][j];
                }
            }
        }
    }
}
