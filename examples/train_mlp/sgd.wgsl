// Plain SGD step on a parameter tensor (weights or bias): w = w - lr * g, the rule of
// torch.optim.SGD without momentum or weight decay (the same one the crate's
// AffineOptimizer applies to gamma and beta). One invocation per element; reads g,
// reads and writes w.

struct Params {
    len: u32,
    lr: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> w: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.len) {
        return;
    }
    w[i] = w[i] - p.lr * g[i];
}
