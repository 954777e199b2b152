// Elementwise steps of the sequence that the fused batch norm replaces (and the
// benchmarks time it against): the activation alone, out = act(a) (ACT, the
// module's); a residual add, out = a + b; the activation's backward, out = a where
// the activation passes the gradient at its output b (a = dy, b = y), else 0. Each
// walks the tensor as one channel of vec4s (common.wgsl's walk, as copy.wgsl does).
// Reads a (and b); writes out.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> a: array<elem4>;
@group(0) @binding(2) var<storage, read> b: array<elem4>;
@group(0) @binding(3) var<storage, read_write> out: array<elem4>;

@compute @workgroup_size(WG)
fn act(@builtin(local_invocation_index) t: u32,
       @builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var w = walk_begin(p, t, workgroup_linear(wid, nwg)); w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        out[i] = st4(act4(ld4(a[i])));
    }
}

@compute @workgroup_size(WG)
fn add(@builtin(local_invocation_index) t: u32,
       @builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var w = walk_begin(p, t, workgroup_linear(wid, nwg)); w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        out[i] = st4(ld4(a[i]) + ld4(b[i]));
    }
}

@compute @workgroup_size(WG)
fn backward(@builtin(local_invocation_index) t: u32,
            @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var w = walk_begin(p, t, workgroup_linear(wid, nwg)); w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        out[i] = st4(select(vec4<f32>(0.0), ld4(a[i]), passes4(ld4(b[i]))));
    }
}
