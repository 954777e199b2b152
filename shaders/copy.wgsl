// A plain vec4 copy, dst = src: the bandwidth yardstick the benchmarks compare every
// kernel against. Walks memory exactly as apply.wgsl does (see ElementwiseParams; len = channels = 1). Reads src; writes dst.

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) t: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    var q = workgroup_linear(wid, nwg) * WG * p.items + t;
    for (var k = 0u; k < p.items && q < p.units; k++) {
        dst[q] = src[q];
        q += WG;
    }
}
