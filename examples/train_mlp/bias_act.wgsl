// Bias and activation, in place on a rows x cols activation h (row-major):
// h = act(h + bias[col]). The bias is skipped with HAS_BIAS = 0 (a ReLU after batch
// norm), the ReLU with RELU = 0 (a Linear feeding batch norm or the loss). One
// invocation per element; reads bias, reads and writes h.

struct Params {
    len: u32,      // rows * cols
    cols: u32,
    has_bias: u32,
    relu: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> bias: array<f32>;
@group(0) @binding(2) var<storage, read_write> h: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.len) {
        return;
    }
    var v = h[i];
    if (p.has_bias != 0u) {
        v += bias[i % p.cols];
    }
    if (p.relu != 0u) {
        v = max(v, 0.0);
    }
    h[i] = v;
}
