// Normalize + scale/shift: y = (x - hi) * scale + shift with per-channel coefficients
// from finalize.wgsl (coef = [hi | scale | shift], segments `padded` apart).
//
// Walks the tensor as common.wgsl's WalkParams say (the walk of stats.wgsl); each
// invocation stays on one channel unit and loads its coefficients once.
//   channels_first_vec4: a unit is 4 elements of one channel (S % 4 == 0).
//   channels_first_quad: a unit is up to 4 elements of one run (S % 4 != 0).
//   channels_last_vec4:  a unit is 4 adjacent channels (C % 4 == 0).
//   channels_last_vec16: a unit is 16 adjacent channels (C % 16 == 0) as 4 vec4s.
//   channels_first_rows_vec4/_vec16: S % 4 != 0 but C * S % 4 (16) == 0: a batch item
//                        is read as a channels-last row with a channel every S.
//   scalar:              a unit is one element (channels-last, C % 4 != 0).
// Reads x and coef; writes y.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> coef: array<f32>;
@group(0) @binding(3) var<storage, read> coef4: array<vec4<f32>>;

// Coefficient segment `seg` (coef = segments `padded` apart) of the channels `ch`.
fn coef_of(seg: u32, ch: vec4<u32>) -> vec4<f32> {
    let b = seg * p.padded;
    return vec4<f32>(coef[b + ch.x], coef[b + ch.y], coef[b + ch.z], coef[b + ch.w]);
}

// The channels-last loop: one vec4 of coefficients per lane.
fn rows_vec4(first: Walk, hi: vec4<f32>, scale: vec4<f32>, shift: vec4<f32>) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y4[i] = (x4[i] - hi) * scale + shift;
    }
}

// The channels-last loop over 16 channels (four vec4) per invocation.
fn rows_vec16(first: Walk, hi: array<vec4<f32>, 4>, scale: array<vec4<f32>, 4>,
              shift: array<vec4<f32>, 4>) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = 4u * walk_index(p, w);
        for (var k = 0u; k < 4u; k++) {
            y4[i + k] = (x4[i + k] - hi[k]) * scale[k] + shift[k];
        }
    }
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    let c = walk_group(p, first);
    let hi = coef[c];
    let scale = coef[p.padded + c];
    let shift = coef[2u * p.padded + c];
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y4[i] = (x4[i] - hi) * scale + shift;
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
    let scale = coef[p.padded + c];
    let shift = coef[2u * p.padded + c];
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let v = (vec4<f32>(x[i.x], x[i.y], x[i.z], x[i.w]) - hi) * scale + shift;
        // Past the run, indices repeat the last element and write its same value.
        y[i.x] = v.x;
        y[i.y] = v.y;
        y[i.z] = v.z;
        y[i.w] = v.w;
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let seg = p.padded / 4u;
    let first = walk_begin(p, t, g);
    let c = walk_group(p, first);
    rows_vec4(first, coef4[c], coef4[seg + c], coef4[2u * seg + c]);
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
    let ch = row_channels(p, walk_group(p, first));
    rows_vec4(first, coef_of(0u, ch), coef_of(1u, ch), coef_of(2u, ch));
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let seg = p.padded / 4u;
    let first = walk_begin(p, t, g);
    let u = 4u * walk_group(p, first);
    var hi: array<vec4<f32>, 4>;
    var scale: array<vec4<f32>, 4>;
    var shift: array<vec4<f32>, 4>;
    for (var k = 0u; k < 4u; k++) {
        hi[k] = coef4[u + k];
        scale[k] = coef4[seg + u + k];
        shift[k] = coef4[2u * seg + u + k];
    }
    rows_vec16(first, hi, scale, shift);
}

// channels_first_rows_vec4 with 16 channels per invocation.
@compute @workgroup_size(WG)
fn channels_first_rows_vec16(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    let u = 4u * walk_group(p, first);
    var hi: array<vec4<f32>, 4>;
    var scale: array<vec4<f32>, 4>;
    var shift: array<vec4<f32>, 4>;
    for (var k = 0u; k < 4u; k++) {
        let ch = row_channels(p, u + k);
        hi[k] = coef_of(0u, ch);
        scale[k] = coef_of(1u, ch);
        shift[k] = coef_of(2u, ch);
    }
    rows_vec16(first, hi, scale, shift);
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    let c = walk_group(p, first);
    let hi = coef[c];
    let scale = coef[p.padded + c];
    let shift = coef[2u * p.padded + c];
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y[i] = (x[i] - hi) * scale + shift;
    }
}
