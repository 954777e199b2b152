// A plain vec4 copy (of the tensors' element type), dst = src: the bandwidth yardstick the benchmarks compare every
// kernel against. It walks the tensor as one channel (common.wgsl's walk, with the
// adapter's tuning), so it reads and writes memory in the order the other kernels do.
// Reads src; writes dst.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> src: array<elem4>;
@group(0) @binding(2) var<storage, read_write> dst: array<elem4>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) t: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    for (var w = walk_begin(p, t, g); w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        dst[i] = src[i];
    }
}
