// Winograd F(4x4, 3x3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016), for 3x3 filters at stride 1. Each 4x4 block of output pixels
// (a tile) is computed from the 6x6 input patch under it:
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A
// with the interpolation points 0, 1, -1, 2, -2 and infinity. The elementwise product
// summed over input channels is, for each of the 36 transform positions t, one matrix
// product M_t = U_t @ V_t over channels, run by the GEMM kernels as a batch of 36:
//   U [36][co][k_ld]   filter transform, k_ld = input channels rounded up to 4
//   V [36][c][p_ld]    input transform, one column per tile of the chunk's images
//   M [36][co][p_ld]   products; the output transform turns them into NCHW pixels
// The input gradient is the same convolution of dy with the filter rotated by 180
// degrees and its channels swapped (`flip`), padded by 2 - padding.

struct Params {
    c: u32,       // input channels of this convolution
    h: u32,       // input plane
    w: u32,
    ho: u32,      // output plane
    wo: u32,
    th: u32,      // tiles per image along each axis
    tw: u32,
    pad_h: i32,   // padding (2 - padding for the input gradient; may be negative)
    pad_w: i32,
    n0: u32,      // the chunk's first image
    nb: u32,      // images in the chunk
    p_ld: u32,    // row stride of V and M: tiles of the chunk rounded up to 4
    co: u32,      // output channels of this convolution
    k_ld: u32,    // row stride of U: c rounded up to 4
    relu: u32,    // output: apply ReLU after the bias
    flip: u32,    // filter: rotate and swap channels (input gradient)
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host: 8 on CPU adapters, 64 on GPUs.
override WG: u32 = 64u;

// (G g G^T) along one axis: g (3 taps) to 6 transform positions.
fn g6(g0: f32, g1: f32, g2: f32) -> array<f32, 6> {
    let e = g0 + g2;
    return array<f32, 6>(
        0.25 * g0,
        -(e + g1) / 6.0,
        -(e - g1) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    );
}

// B^T d along one axis: 6 inputs to 6 transform positions.
fn bt6(d: array<f32, 6>) -> array<f32, 6> {
    return array<f32, 6>(
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * (d[1] + d[2]) + d[3] + d[4],
        4.0 * (d[1] - d[2]) - d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        2.0 * (d[1] - d[3]) - d[2] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    );
}

// A^T m along one axis: 6 transform positions to 4 outputs.
fn at4(e: array<f32, 6>) -> vec4<f32> {
    let s12 = e[1] + e[2];
    let d12 = e[1] - e[2];
    let s34 = e[3] + e[4];
    let d34 = e[3] - e[4];
    return vec4<f32>(e[0] + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + e[5]);
}

@group(0) @binding(1) var<storage, read> wf: array<f32>;
@group(0) @binding(2) var<storage, read_write> u: array<f32>;

// U[t][o][i] for every output channel o and input channel i < k_ld (zero past c).
// Grid: y walks output channels, x walks input channels.
@compute @workgroup_size(WG)
fn wino_filter(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let plane = p.co * p.k_ld;
    for (var o = wg.y; o < p.co; o += ng.y) {
        for (var i = gid.x; i < p.k_ld; i += ng.x * WG) {
            let inside = i < p.c;
            let ic = min(i, p.c - 1u);
            // Forward: w[o][i][a][b]. Input gradient: w[i][o][2 - a][2 - b].
            let base = select((o * p.c + ic) * 9u, (ic * p.co + o) * 9u, p.flip == 1u);
            var g: array<f32, 9>;
            for (var k = 0u; k < 9u; k++) {
                let src = select(k, 8u - k, p.flip == 1u);
                g[k] = select(0.0, wf[base + src], inside);
            }
            // Rows: G g (6x3), then columns: (G g) G^T (6x6).
            let c0 = g6(g[0], g[3], g[6]);
            let c1 = g6(g[1], g[4], g[7]);
            let c2 = g6(g[2], g[5], g[8]);
            for (var r = 0u; r < 6u; r++) {
                let row = g6(c0[r], c1[r], c2[r]);
                for (var s = 0u; s < 6u; s++) {
                    u[(r * 6u + s) * plane + o * p.k_ld + i] = row[s];
                }
            }
        }
    }
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<f32>;

// V[t][ci][q] for every tile q < p_ld of the chunk (zero past the last tile). Grid: y walks
// input channels, x walks tiles; consecutive lanes take neighbouring tiles, so each of
// the 36 stores of a SIMD batch is contiguous.
@compute @workgroup_size(WG)
fn wino_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let tiles = p.th * p.tw;
    let cols = p.nb * tiles;
    let plane = p.c * p.p_ld;
    for (var ci = wg.y; ci < p.c; ci += ng.y) {
        for (var q = gid.x; q < p.p_ld; q += ng.x * WG) {
            let nl = min(q / tiles, p.nb - 1u);
            let r = q % tiles;
            let ih0 = i32((r / p.tw) * 4u) - p.pad_h;
            let iw0 = i32((r % p.tw) * 4u) - p.pad_w;
            let base = ((p.n0 + nl) * p.c + ci) * p.h * p.w;
            let live = q < cols;
            // d B, row by row (B^T applied along each row).
            var rows: array<array<f32, 6>, 6>;
            for (var a = 0u; a < 6u; a++) {
                let ih = ih0 + i32(a);
                let row_ok = live && ih >= 0 && ih < i32(p.h);
                let ihc = u32(clamp(ih, 0, i32(p.h) - 1));
                var d: array<f32, 6>;
                for (var b = 0u; b < 6u; b++) {
                    let iw = iw0 + i32(b);
                    let ok = row_ok && iw >= 0 && iw < i32(p.w);
                    let iwc = u32(clamp(iw, 0, i32(p.w) - 1));
                    d[b] = select(0.0, x[base + ihc * p.w + iwc], ok);
                }
                rows[a] = bt6(d);
            }
            // Then B^T down each column.
            for (var s = 0u; s < 6u; s++) {
                let col = bt6(array<f32, 6>(rows[0][s], rows[1][s], rows[2][s], rows[3][s], rows[4][s], rows[5][s]));
                for (var r6 = 0u; r6 < 6u; r6++) {
                    v[(r6 * 6u + s) * plane + ci * p.p_ld + q] = col[r6];
                }
            }
        }
    }
}

@group(0) @binding(1) var<storage, read> m: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// y[n0 + nl][o] for every output channel o and tile q of the chunk: A^T M_q A + bias,
// ReLU when asked, pixels past the output plane skipped. Grid: y walks output
// channels, x walks tiles.
@compute @workgroup_size(WG)
fn wino_output(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let tiles = p.th * p.tw;
    let cols = p.nb * tiles;
    let plane = p.co * p.p_ld;
    for (var o = wg.y; o < p.co; o += ng.y) {
        let b = bias[o];
        for (var q = gid.x; q < cols; q += ng.x * WG) {
            let nl = q / tiles;
            let r = q % tiles;
            let oh0 = (r / p.tw) * 4u;
            let ow0 = (r % p.tw) * 4u;
            let src = o * p.p_ld + q;
            // A^T along each row of M, then down the columns.
            var rows: array<vec4<f32>, 6>;
            for (var a = 0u; a < 6u; a++) {
                let t = a * 6u * plane + src;
                rows[a] = at4(array<f32, 6>(
                    m[t],
                    m[t + plane],
                    m[t + 2u * plane],
                    m[t + 3u * plane],
                    m[t + 4u * plane],
                    m[t + 5u * plane],
                ));
            }
            let out = ((p.n0 + nl) * p.co + o) * p.ho * p.wo;
            for (var j = 0u; j < 4u; j++) {
                let col = at4(array<f32, 6>(rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j]));
                let ow = ow0 + j;
                for (var i = 0u; i < 4u; i++) {
                    let oh = oh0 + i;
                    if (oh < p.ho && ow < p.wo) {
                        let val = col[i] + b;
                        y[out + oh * p.wo + ow] = select(val, max(val, 0.0), p.relu == 1u);
                    }
                }
            }
        }
    }
}
