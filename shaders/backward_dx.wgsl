// Backward, third stage: dx = k_dy * dy + k_x * (x - hi) + k_c, with per-channel
// coefficients from backward_finalize.wgsl (coef = [hi | k_dy | k_x | k_c]).
//
// Walks the tensor as apply.wgsl does (same WalkParams and entry points); each
// invocation stays on one channel unit and loads its coefficients once.
// With running statistics k_x = 0 and x is not read (flags & 1 == 0).
// Reads x, dy, coef; writes dx.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> coef: array<f32>;

fn with_x() -> bool {
    return (p.flags & 1u) != 0u;
}

// Coefficient segment `seg` of the four channels `ch` (coef = segments `padded` apart).
fn coef_of(seg: u32, ch: vec4<u32>) -> vec4<f32> {
    let b = seg * p.padded;
    return vec4<f32>(coef[b + ch.x], coef[b + ch.y], coef[b + ch.z], coef[b + ch.w]);
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    if g >= walk_workgroups(p) {
        return;
    }
    let first = walk_begin(p, t, g);
    let c = walk_group(p, first);
    let hi = coef[c];
    let k_dy = coef[p.padded + c];
    let k_x = coef[2u * p.padded + c];
    let k_c = coef[3u * p.padded + c];
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        var r = dy4[i] * k_dy + k_c;
        if with_x() {
            r += (x4[i] - hi) * k_x;
        }
        dx4[i] = r;
    }
}

@compute @workgroup_size(WG)
fn channels_first_quad(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    if g >= walk_workgroups(p) {
        return;
    }
    let first = walk_begin(p, t, g);
    let c = walk_group(p, first);
    let hi = coef[c];
    let k_dy = coef[p.padded + c];
    let k_x = coef[2u * p.padded + c];
    let k_c = coef[3u * p.padded + c];
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        var r = vec4<f32>(dy[i.x], dy[i.y], dy[i.z], dy[i.w]) * k_dy + k_c;
        if with_x() {
            r += (vec4<f32>(x[i.x], x[i.y], x[i.z], x[i.w]) - hi) * k_x;
        }
        // Past the run, indices repeat the last element and write its same value.
        dx[i.x] = r.x;
        dx[i.y] = r.y;
        dx[i.z] = r.z;
        dx[i.w] = r.w;
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    if g >= walk_workgroups(p) {
        return;
    }
    let first = walk_begin(p, t, g);
    let ch = row_channels(p, walk_group(p, first));
    let hi = coef_of(0u, ch);
    let k_dy = coef_of(1u, ch);
    let k_x = coef_of(2u, ch);
    let k_c = coef_of(3u, ch);
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        var r = dy4[i] * k_dy + k_c;
        if with_x() {
            r += (x4[i] - hi) * k_x;
        }
        dx4[i] = r;
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    if g >= walk_workgroups(p) {
        return;
    }
    let first = walk_begin(p, t, g);
    let u = 4u * walk_group(p, first);
    var hi: array<vec4<f32>, 4>;
    var k_dy: array<vec4<f32>, 4>;
    var k_x: array<vec4<f32>, 4>;
    var k_c: array<vec4<f32>, 4>;
    for (var k = 0u; k < 4u; k++) {
        let ch = row_channels(p, u + k);
        hi[k] = coef_of(0u, ch);
        k_dy[k] = coef_of(1u, ch);
        k_x[k] = coef_of(2u, ch);
        k_c[k] = coef_of(3u, ch);
    }
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = 4u * walk_index(p, w);
        for (var k = 0u; k < 4u; k++) {
            var r = dy4[i + k] * k_dy[k] + k_c[k];
            if with_x() {
                r += (x4[i + k] - hi[k]) * k_x[k];
            }
            dx4[i + k] = r;
        }
    }
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    if g >= walk_workgroups(p) {
        return;
    }
    let first = walk_begin(p, t, g);
    let c = walk_group(p, first);
    let hi = coef[c];
    let k_dy = coef[p.padded + c];
    let k_x = coef[2u * p.padded + c];
    let k_c = coef[3u * p.padded + c];
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        var r = dy[i] * k_dy + k_c;
        if with_x() {
            r += (x[i] - hi) * k_x;
        }
        dx[i] = r;
    }
}
