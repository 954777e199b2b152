// Per-channel batch statistics, first stage: partial Welford states.
//
// Walks the tensor as common.wgsl's WalkParams say; each invocation keeps a Welford
// state of its units, the workgroup merges the states of each channel unit in a fixed
// tree, and writes one partial per channel and split: (count, mean - pivot, M2, pivot).
// The pivot is the channel's first element; shifting by it keeps the mean of data
// such as 1e4 + 1e-3 * noise exact to f32. finalize.wgsl merges the splits in index
// order, so the result is the same bits on every run.
//   channels_first_vec4: a unit is 4 elements of one channel (S % 4 == 0).
//   channels_first_quad: a unit is up to 4 elements of one run (S % 4 != 0).
//   channels_last_vec4:  a unit is 4 adjacent channels (C % 4 == 0), one state each.
//   channels_last_vec16: a unit is 16 adjacent channels (C % 16 == 0) as 4 vec4s:
//                        a SIMD batch of a CPU adapter reads longer runs of a row.
//   scalar:              a unit is one element (channels-last, C % 4 != 0).
//
// Reads x; writes partials[channel * splits + split]; when `flags & 1`, one
// invocation also adds 1 to num_batches_tracked (running[count_index]).

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> running: array<u32>;

var<workgroup> sh_n: array<vec4<f32>, WG>;
var<workgroup> sh_mean: array<vec4<f32>, WG>;
var<workgroup> sh_m2: array<vec4<f32>, WG>;

// Tree-merges the states of each channel unit's rows in a fixed order
// (deterministic); row 0 ends with the merged state.
fn reduce_rows(t: u32, row: u32, w: Welford) -> Welford {
    sh_n[t] = w.n;
    sh_mean[t] = w.mean;
    sh_m2[t] = w.m2;
    workgroupBarrier();
    for (var half = WG / p.tile / 2u; half > 0u; half /= 2u) {
        if row < half {
            let o = walk_partner(p, t, half);
            let a = Welford(sh_n[t], sh_mean[t], sh_m2[t]);
            let b = Welford(sh_n[o], sh_mean[o], sh_m2[o]);
            let r = welford_merge(a, b);
            sh_n[t] = r.n;
            sh_mean[t] = r.mean;
            sh_m2[t] = r.m2;
        }
        workgroupBarrier();
    }
    return Welford(sh_n[t], sh_mean[t], sh_m2[t]);
}

fn count_batch(g: u32, t: u32) {
    if g == 0u && t == 0u && (p.flags & 1u) != 0u {
        running[p.count_index] += 1u;
    }
}

fn write_partial(c: u32, split: u32, w: Welford, lane: u32, pivot: f32) {
    partials[c * p.splits + split] = vec4<f32>(w.n[lane], w.mean[lane], w.m2[lane], pivot);
}

// The vec4 loop (channels-first runs, channels-last rows): Welford states of x - pivot.
fn loop_vec4(first: Walk, pivot: vec4<f32>) -> Welford {
    var acc = welford_empty();
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        acc = welford_push(acc, x4[walk_index(p, w)] - pivot);
    }
    return acc;
}

// Merges the workgroup's states of one channel (lane 0 of `w`) and writes its partial.
fn finish_channel(t: u32, first: Walk, w: Welford, pivot: f32) {
    let r = reduce_rows(t, first.row, w);
    if first.row == 0u && first.group < p.groups {
        write_partial(first.group, first.split, r, 0u, pivot);
    }
}

// Merges the workgroup's states of channels 4v..4v+3 (one per lane of `w`) and
// writes their partials.
fn finish_lanes(t: u32, first: Walk, v: u32, w: Welford, pivot: vec4<f32>) {
    let r = reduce_rows(t, first.row, w);
    if first.row == 0u && first.group < p.groups {
        for (var lane = 0u; lane < 4u; lane++) {
            write_partial(4u * v + lane, first.split, r, lane, pivot[lane]);
        }
    }
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    count_batch(g, t);
    let first = walk_begin(p, t, g);
    let pivot = x4[walk_group(p, first) * p.len].x;
    finish_channel(t, first, welford_collapse(loop_vec4(first, vec4<f32>(pivot))), pivot);
}

@compute @workgroup_size(WG)
fn channels_first_quad(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    count_batch(g, t);
    let first = walk_begin(p, t, g);
    let pivot = x[walk_group(p, first) * p.run];
    var acc = welford_empty();
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let v = vec4<f32>(x[i.x], x[i.y], x[i.z], x[i.w]);
        acc = welford_push_where(acc, v - pivot, quad_valid(p, w));
    }
    finish_channel(t, first, welford_collapse(acc), pivot);
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    count_batch(g, t);
    let first = walk_begin(p, t, g);
    let pivot = x4[walk_group(p, first)];
    finish_lanes(t, first, first.group, loop_vec4(first, pivot), pivot);
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    count_batch(g, t);
    let first = walk_begin(p, t, g);
    let u = 4u * walk_group(p, first);
    // Every channel of a row-walking invocation has seen the same number of
    // elements, so the four Welford states share one count and one reciprocal.
    var pivot: array<vec4<f32>, 4>;
    var mean: array<vec4<f32>, 4>;
    var m2: array<vec4<f32>, 4>;
    for (var k = 0u; k < 4u; k++) {
        pivot[k] = x4[u + k];
        mean[k] = vec4<f32>(0.0);
        m2[k] = vec4<f32>(0.0);
    }
    var n = 0.0;
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = 4u * walk_index(p, w);
        n += 1.0;
        let inv = 1.0 / n;
        for (var k = 0u; k < 4u; k++) {
            let d = x4[i + k] - pivot[k];
            let delta = d - mean[k];
            mean[k] += delta * inv;
            m2[k] += delta * (d - mean[k]);
        }
    }
    for (var k = 0u; k < 4u; k++) {
        finish_lanes(t, first, 4u * first.group + k, Welford(vec4<f32>(n), mean[k], m2[k]), pivot[k]);
    }
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    count_batch(g, t);
    let first = walk_begin(p, t, g);
    let pivot = x[walk_group(p, first) * p.len];
    var acc = welford_empty();
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        acc = welford_push_where(acc, vec4<f32>(x[walk_index(p, w)] - pivot), vec4<bool>(true, false, false, false));
    }
    finish_channel(t, first, acc, pivot);
}
