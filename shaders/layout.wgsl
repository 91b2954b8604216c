// Layout changes of 2-D matrices: transposing, padding and strided copies.
//
// pack2d writes dst[r, c] (r < dst_rows, c < dst_cols, row stride dst_ld) from the
// logical source matrix S (rows x cols) read at src_off with row stride src_ld, or
// transposed (S[r, c] = src[src_off + c * src_ld + r]) when trans = 1. Cells outside S
// are written as zero, which is how GEMM operands get padded to a multiple of 4.

struct Params {
    rows: u32,
    cols: u32,
    src_off: u32,
    src_ld: u32,
    trans: u32,
    dst_rows: u32,
    dst_cols: u32,
    dst_ld: u32,
    dst_off: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Lanes per workgroup, set by the host (8 on CPU adapters, 64 on GPUs).
override WG: u32 = 64u;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// Grid: y walks destination rows, x walks columns (no integer division per element,
// which costs a scalar division per lane on CPU adapters).
@compute @workgroup_size(WG)
fn pack2d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var r = wg.y; r < p.dst_rows; r += ng.y) {
        let dst_row = p.dst_off + r * p.dst_ld;
        for (var c = gid.x; c < p.dst_cols; c += ng.x * WG) {
            var v = 0.0;
            if (r < p.rows && c < p.cols) {
                if (p.trans == 1u) {
                    v = src[p.src_off + c * p.src_ld + r];
                } else {
                    v = src[p.src_off + r * p.src_ld + c];
                }
            }
            dst[dst_row + c] = v;
        }
    }
}
