// C = A @ B for the example's dense layers: C is M x N (row-major, from c_off), A is
// M x K and B is K x N, each read through a row stride and a column stride, so one
// kernel forms the three products of a Linear layer: X @ W (forward), X^T @ dY (dW)
// and dY @ W^T (dX).
//
// Each invocation computes a 4 x 4 block of C, so that every value it loads serves
// four multiply-adds; a workgroup of WG x WG invocations covers a (4 WG) x (4 WG)
// tile. No workgroup memory and no barriers: on CPU adapters (lavapipe), where the
// caches do what workgroup memory would, barriers cost more than they save. Each
// element is summed in ascending k in one f32 accumulator. Reads a, b; writes c
// (overwritten).

override WG: u32 = 8u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    a_row: u32,   // stride between rows of A (consecutive m)
    a_col: u32,   // stride between columns of A (consecutive k)
    b_off: u32,
    b_row: u32,   // stride between rows of B (consecutive k)
    b_col: u32,   // stride between columns of B (consecutive n)
    c_off: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(WG, WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= p.m || col0 >= p.n) {
        return;
    }
    // Rows and columns past the edge read the last one (valid memory) and are
    // not written.
    let rows = min(vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    let cols = min(vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u));
    var ia = vec4<u32>(p.a_off) + rows * p.a_row;
    var ib = vec4<u32>(p.b_off) + cols * p.b_col;
    var acc: array<vec4<f32>, 4>;
    for (var k = 0u; k < p.k; k++) {
        let av = vec4<f32>(a[ia.x], a[ia.y], a[ia.z], a[ia.w]);
        let bv = vec4<f32>(b[ib.x], b[ib.y], b[ib.z], b[ib.w]);
        acc[0] += av.x * bv;
        acc[1] += av.y * bv;
        acc[2] += av.z * bv;
        acc[3] += av.w * bv;
        ia += vec4<u32>(p.a_col);
        ib += vec4<u32>(p.b_row);
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + i;
        if (row < p.m) {
            for (var j = 0u; j < 4u; j++) {
                if (col0 + j < p.n) {
                    c[p.c_off + row * p.n + col0 + j] = acc[i][j];
                }
            }
        }
    }
}
