// Backward of a ReLU, in place on the gradient: g = g where the ReLU's output h is
// positive, else 0 (h > 0 exactly where the input was). One invocation per element;
// reads h, reads and writes g.

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read_write> g: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.len) {
        return;
    }
    g[i] = select(0.0, g[i], h[i] > 0.0);
}
