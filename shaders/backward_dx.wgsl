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
@group(0) @binding(4) var<storage, read> coef4: array<vec4<f32>>;

fn with_x() -> bool {
    return (p.flags & 1u) != 0u;
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
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

// dx coefficients of four channels (one vec4 lane each).
struct Coef4 {
    hi: vec4<f32>,
    k_dy: vec4<f32>,
    k_x: vec4<f32>,
    k_c: vec4<f32>,
}

fn dx_of(k: Coef4, g: vec4<f32>, xv: vec4<f32>) -> vec4<f32> {
    var r = g * k.k_dy + k.k_c;
    if with_x() {
        r += (xv - k.hi) * k.k_x;
    }
    return r;
}

// Coefficients of channel group `c` (channels 4c..4c+3).
fn coef_group(c: u32) -> Coef4 {
    let seg = p.padded / 4u;
    return Coef4(coef4[c], coef4[seg + c], coef4[2u * seg + c], coef4[3u * seg + c]);
}

// Coefficients of the channels `ch`, gathered.
fn coef_gather(ch: vec4<u32>) -> Coef4 {
    var r: array<vec4<f32>, 4>;
    for (var s = 0u; s < 4u; s++) {
        let b = s * p.padded;
        r[s] = vec4<f32>(coef[b + ch.x], coef[b + ch.y], coef[b + ch.z], coef[b + ch.w]);
    }
    return Coef4(r[0], r[1], r[2], r[3]);
}

// The channels-last loop: one vec4 of coefficients per lane.
fn rows_vec4(first: Walk, k: Coef4) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        var xv = k.hi;
        if with_x() {
            xv = x4[i];
        }
        dx4[i] = dx_of(k, dy4[i], xv);
    }
}

// The channels-last loop over 16 channels (four vec4) per invocation.
fn rows_vec16(first: Walk, k: array<Coef4, 4>) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = 4u * walk_index(p, w);
        for (var q = 0u; q < 4u; q++) {
            var xv = k[q].hi;
            if with_x() {
                xv = x4[i + q];
            }
            dx4[i + q] = dx_of(k[q], dy4[i + q], xv);
        }
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    rows_vec4(first, coef_group(walk_group(p, first)));
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    let u = 4u * walk_group(p, first);
    var k: array<Coef4, 4>;
    for (var q = 0u; q < 4u; q++) {
        k[q] = coef_group(u + q);
    }
    rows_vec16(first, k);
}

// A channels-first tensor with S % 4 != 0 read as rows of C * S elements (a channel
// every `rep` = S elements): channels_last_vec4 with each lane's coefficients
// gathered once.
@compute @workgroup_size(WG)
fn channels_first_rows_vec4(@builtin(local_invocation_index) t: u32,
                            @builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    rows_vec4(first, coef_gather(row_channels(p, walk_group(p, first))));
}

// channels_first_rows_vec4 with 16 channels per invocation.
@compute @workgroup_size(WG)
fn channels_first_rows_vec16(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    let u = 4u * walk_group(p, first);
    var k: array<Coef4, 4>;
    for (var q = 0u; q < 4u; q++) {
        k[q] = coef_gather(row_channels(p, u + q));
    }
    rows_vec16(first, k);
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
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
