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

// Channel c's coefficients in every lane.
fn coef_channel(c: u32) -> Norm {
    return Norm(vec4<f32>(coef[c]), vec4<f32>(coef[p.padded + c]), vec4<f32>(coef[2u * p.padded + c]));
}

// The coefficients of channels 4c..4c+3.
fn coef_group(c: u32) -> Norm {
    let seg = p.padded / 4u;
    return Norm(coef4[c], coef4[seg + c], coef4[2u * seg + c]);
}

// The coefficients of the channels `ch`, gathered.
fn coef_gather(ch: vec4<u32>) -> Norm {
    var r: array<vec4<f32>, 3>;
    for (var s = 0u; s < 3u; s++) {
        let b = s * p.padded;
        r[s] = vec4<f32>(coef[b + ch.x], coef[b + ch.y], coef[b + ch.z], coef[b + ch.w]);
    }
    return Norm(r[0], r[1], r[2]);
}

// The vec4 loop (channels-first runs, channels-last rows).
fn loop_vec4(first: Walk, k: Norm) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y4[i] = normalize(k, x4[i]);
    }
}

// The channels-last loop over 16 channels (four vec4) per invocation.
fn loop_vec16(first: Walk, k: array<Norm, 4>) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = 4u * walk_index(p, w);
        for (var q = 0u; q < 4u; q++) {
            y4[i + q] = normalize(k[q], x4[i + q]);
        }
    }
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_vec4(first, coef_channel(walk_group(p, first)));
}

@compute @workgroup_size(WG)
fn channels_first_quad(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let k = coef_channel(walk_group(p, first));
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let v = normalize(k, vec4<f32>(x[i.x], x[i.y], x[i.z], x[i.w]));
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
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_vec4(first, coef_group(walk_group(p, first)));
}

// A channels-first tensor with S % 4 != 0 read as rows of C * S elements (a channel
// every `rep` = S elements): channels_last_vec4 with each lane's coefficients
// gathered once.
@compute @workgroup_size(WG)
fn channels_first_rows_vec4(@builtin(local_invocation_index) t: u32,
                            @builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_vec4(first, coef_gather(row_channels(p, walk_group(p, first))));
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let u = 4u * walk_group(p, first);
    var k: array<Norm, 4>;
    for (var q = 0u; q < 4u; q++) {
        k[q] = coef_group(u + q);
    }
    loop_vec16(first, k);
}

// channels_first_rows_vec4 with 16 channels per invocation.
@compute @workgroup_size(WG)
fn channels_first_rows_vec16(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let u = 4u * walk_group(p, first);
    var k: array<Norm, 4>;
    for (var q = 0u; q < 4u; q++) {
        k[q] = coef_gather(row_channels(p, u + q));
    }
    loop_vec16(first, k);
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let k = coef_channel(walk_group(p, first));
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y[i] = (x[i] - k.hi.x) * k.scale.x + k.shift.x;
    }
}
