// Normalize + scale/shift: y = (x - hi) * scale + shift with per-channel coefficients
// from finalize.wgsl (coef = [hi | scale | shift], segments `padded` apart), or, in
// the pipelines built with the override FROM_RUNNING (the eval forward of a small
// tensor, one dispatch), computed by each invocation from the running statistics
// bound as `coef` (= [mean | var]), `affine` (= [gamma | beta], with APPLY_AFFINE)
// and `p.eps`, as finalize.wgsl's `eval` does. An override rather than a flag in `p`,
// so that the pipelines with finalize's coefficients carry no code of the other way.
//
// Walks the tensor as common.wgsl's WalkParams say (the walk of stats.wgsl); each
// invocation stays on one channel unit and loads its coefficients once.
//   channels_first_vec4: a unit is 4 elements of one channel (S % 4 == 0).
//   channels_first_flat: channels_first_vec4 as a flat walk (common.wgsl): each
//                        lane's coefficients reloaded when it enters a new run.
//   channels_first_quad: a unit is up to 4 elements of one run (S % 4 != 0).
//   channels_last_vec4:  a unit is 4 adjacent channels (C % 4 == 0).
//   channels_last_vec16: a unit is 16 adjacent channels (C % 16 == 0) as 4 vec4s.
//   channels_first_rows_vec4/_vec16: S % 4 != 0 but C * S % 4 (16) == 0: a batch item
//                        is read as a channels-last row with a channel every S.
//   scalar:              a unit is one element (channels-last, C % 4 != 0).
// The pipelines built with the override UNIFORM_COEF read finalize's coefficients
// through `coef_window`, a uniform binding of the same buffer (where they fit in its
// COEF_WINDOW vec4s), instead of `coef`: a CPU adapter loads a uniform array lane by
// lane without a storage load's branches and bounds checks.
// Reads x, coef (or coef_window) and (from the running statistics) affine; writes y.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<elem1>;
@group(0) @binding(1) var<storage, read> x4: array<elem4>;
@group(0) @binding(2) var<storage, read_write> y4: array<elem4>;
@group(0) @binding(3) var<storage, read> coef: array<f32>;
@group(0) @binding(3) var<storage, read> coef4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> affine: array<f32>;
@group(0) @binding(5) var<uniform> coef_window: array<vec4<f32>, COEF_WINDOW>;

// true: coefficients from the running statistics (set by the host per pipeline).
override FROM_RUNNING: bool;
// true: finalize's coefficients read through coef_window (set by the host per
// pipeline).
override UNIFORM_COEF: bool;

// Element i of finalize's coefficients.
fn coef_at(i: u32) -> f32 {
    if UNIFORM_COEF {
        return coef_window[i / 4u][i % 4u];
    }
    return coef[i];
}

// vec4 v of finalize's coefficients.
fn coef4_at(v: u32) -> vec4<f32> {
    if UNIFORM_COEF {
        return coef_window[v];
    }
    return coef4[v];
}

// Four channels' coefficients from their running means and variances; `ch`: the
// channels (for gamma and beta).
fn running_norm(mean: vec4<f32>, variance: vec4<f32>, ch: vec4<u32>) -> Norm {
    var k: array<vec3<f32>, 4>;
    for (var l = 0u; l < 4u; l++) {
        var gamma = 1.0;
        var beta = 0.0;
        if (p.flags & APPLY_AFFINE) != 0u {
            gamma = affine[ch[l]];
            beta = affine[p.padded + ch[l]];
        }
        k[l] = coefficients(running_stats(p.eps, mean[l], variance[l]), gamma, beta);
    }
    return Norm(vec4<f32>(k[0].x, k[1].x, k[2].x, k[3].x), vec4<f32>(k[0].y, k[1].y, k[2].y, k[3].y),
                vec4<f32>(k[0].z, k[1].z, k[2].z, k[3].z));
}

// Channel c's coefficients in every lane.
fn coef_channel(c: u32) -> Norm {
    if FROM_RUNNING {
        return running_norm(vec4<f32>(coef[c]), vec4<f32>(coef[p.padded + c]), vec4<u32>(c));
    }
    return Norm(vec4<f32>(coef_at(c)), vec4<f32>(coef_at(p.padded + c)),
                vec4<f32>(coef_at(2u * p.padded + c)));
}

// The coefficients of channels 4c..4c+3.
fn coef_group(c: u32) -> Norm {
    let seg = p.padded / 4u;
    if FROM_RUNNING {
        return running_norm(coef4[c], coef4[seg + c], vec4<u32>(4u * c) + vec4<u32>(0u, 1u, 2u, 3u));
    }
    return Norm(coef4_at(c), coef4_at(seg + c), coef4_at(2u * seg + c));
}

// `b` where `past` holds, else `a` (the rows view's pick between two channels).
fn pick(a: Norm, b: Norm, past: vec4<bool>) -> Norm {
    return Norm(select(a.hi, b.hi, past), select(a.scale, b.scale, past),
                select(a.shift, b.shift, past));
}

// The vec4 loop (channels-first runs).
fn loop_vec4(first: Walk, k: Norm) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y4[i] = st4(epilogue4(normalize(k, ld4(x4[i])), i));
    }
}

// The vec4 loop over rows (len == 1: channels-last, the rows view), its index
// advanced by one addition per step.
fn loop_vec4_rows(first: Walk, k: Norm) {
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        y4[i] = st4(epilogue4(normalize(k, ld4(x4[i])), i));
        i += step;
    }
}

// The loop over rows 16 channels (four vec4) per invocation, with their coefficients as
// four named values (not an array indexed in a loop, which a CPU adapter may keep
// in memory rather than in registers).
fn loop_vec16(first: Walk, k0: Norm, k1: Norm, k2: Norm, k3: Norm) {
    let step = 4u * row_step(p);
    var i = 4u * walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        y4[i] = st4(epilogue4(normalize(k0, ld4(x4[i])), i));
        y4[i + 1u] = st4(epilogue4(normalize(k1, ld4(x4[i + 1u])), i + 1u));
        y4[i + 2u] = st4(epilogue4(normalize(k2, ld4(x4[i + 2u])), i + 2u));
        y4[i + 3u] = st4(epilogue4(normalize(k3, ld4(x4[i + 3u])), i + 3u));
        i += step;
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
fn channels_first_flat(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    var c = flat_channel(p, first);
    for (var w = first; w.j < w.end; w = flat_next_run(p, w)) {
        let k = coef_channel(c);
        loop {
            let i = walk_index(p, w);
            y4[i] = st4(epilogue4(normalize(k, ld4(x4[i])), i));
            w = flat_step(p, w);
            if !flat_in_run(p, w) {
                break;
            }
        }
        c = flat_next_channel(p, c);
    }
}

@compute @workgroup_size(WG)
fn channels_first_quad(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_quad(first, coef_channel(walk_group(p, first)));
}

// The quad loop (channels-first runs with S % 4 != 0).
fn loop_quad(first: Walk, k: Norm) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let v = epilogue_quad(normalize(k, vec4<f32>(ld1(x[word(i.x)], i.x), ld1(x[word(i.y)], i.y), ld1(x[word(i.z)], i.z), ld1(x[word(i.w)], i.w))), i);
        // Past the run, indices repeat the last element and write its same value.
        put1(i.x, v.x);
        put1(i.y, v.y);
        put1(i.z, v.z);
        put1(i.w, v.w);
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_vec4_rows(first, coef_group(walk_group(p, first)));
}

// A channels-first tensor with S % 4 != 0 read as rows of C * S elements (a channel
// every `rep` = S elements, common.wgsl's rows view): channels_last_vec4 with each
// lane's coefficients picked once from its two channels'.
@compute @workgroup_size(WG)
fn channels_first_rows_vec4(@builtin(local_invocation_index) t: u32,
                            @builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let e = 4u * walk_group(p, first);
    let c = row_channel(p, e);
    loop_vec4_rows(first, pick(coef_channel(c), coef_channel(row_next(p, c)), row_past(p, c, e)));
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let u = 4u * walk_group(p, first);
    loop_vec16(first, coef_group(u), coef_group(u + 1u), coef_group(u + 2u), coef_group(u + 3u));
}

// channels_first_rows_vec4 with 16 elements per invocation (S ≥ 15: still two
// channels).
@compute @workgroup_size(WG)
fn channels_first_rows_vec16(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let e = ROW_UNIT * walk_group(p, first);
    let c = row_channel(p, e);
    let a = coef_channel(c);
    let b = coef_channel(row_next(p, c));
    let past = row_past16(p, c, e);
    loop_vec16(first, pick(a, b, past.v0), pick(a, b, past.v1), pick(a, b, past.v2),
               pick(a, b, past.v3));
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_scalar(first, coef_channel(walk_group(p, first)));
}

// The loop over rows one element per invocation (channels-last, C % 4 != 0).
fn loop_scalar(first: Walk, k: Norm) {
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        put1(i, epilogue1((ld1(x[word(i)], i) - k.hi.x) * k.scale.x + k.shift.x, i));
        i += step;
    }
}

// ----- merged: the statistics' partials merged in the normalize -----------------
//
// A training forward in two dispatches where the statistics split (GPUs): stats.wgsl's
// partials, then these kernels. Each workgroup first merges the partials of its
// tile's channels (`count` channels from `c0`, WG / count invocations per channel:
// lane l those at s = l, l + lanes, ..., then a fixed tree over the lanes; the same
// bits in every workgroup and on every run), one lane per channel finalizes it as
// finalize.wgsl's `train` does (saved and running statistics, written by the
// workgroups of split 0 only, one per channel) and puts its coefficients in
// workgroup memory; then the walk normalizes. Channels-first a tile is `tile`
// channels; channels-last (the host's merged rows walk, tiles of 16 channels) 4 *
// tile channels in vec4 units, or `tile` in f32. Every workgroup of a channel
// repeats its merge: the host bounds those reads (all workgroups together) to a
// sixteenth of the tensor (common.rs, MERGED_REREAD).
// Binds partials at binding 3 (the others' coef), affine, then FinalizeParams,
// saved and running.

@group(0) @binding(3) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(5) var<uniform> fp: FinalizeParams;
@group(0) @binding(6) var<storage, read_write> saved: array<f32>;
@group(0) @binding(7) var<storage, read_write> running: array<u32>;

var<workgroup> sh_merge: array<vec4<f32>, WG>;

// Merges the partials of channels c0 .. c0 + count - 1 (count a power of two, at
// most WG); afterwards sh_merge[i] holds channel c0 + i's (hi, scale, shift).
fn merge_channels(t: u32, c0: u32, count: u32, split: u32) {
    let lanes = WG / count;
    let slot = t / lanes;
    let lane = t % lanes;
    let c = c0 + slot;
    let live = c < fp.channels;
    var acc = welford_empty();
    var pivot = 0.0;
    if live {
        let at = c * fp.splits;
        pivot = partials[at].w;
        for (var s = lane; s < fp.splits; s += lanes) {
            acc = welford_merge(acc, scalar_state(partials[at + s]));
        }
    }
    sh_merge[t] = vec4<f32>(acc.n.x, acc.mean.x, acc.m2.x, 0.0);
    workgroupBarrier();
    for (var half = lanes / 2u; half > 0u; half /= 2u) {
        if lane < half {
            let r = welford_merge(scalar_state(sh_merge[t]), scalar_state(sh_merge[t + half]));
            sh_merge[t] = vec4<f32>(r.n.x, r.mean.x, r.m2.x, 0.0);
        }
        workgroupBarrier();
    }
    let merged = sh_merge[t];
    workgroupBarrier();
    if lane == 0u && live {
        let b = batch_stats(fp, pivot, merged.y, merged.z);
        if split == 0u {
            saved[c] = b.hi + b.lo;
            saved[fp.padded + c] = b.invstd;
            saved[2u * fp.padded + c] = b.hi;
            saved[3u * fp.padded + c] = b.lo;
            if (fp.flags & FINALIZE_UPDATE_RUNNING) != 0u {
                let r = running_after(fp, bitcast<f32>(running[c]), bitcast<f32>(running[fp.padded + c]),
                                      b, running[fp.count_index]);
                running[c] = bitcast<u32>(r.x);
                running[fp.padded + c] = bitcast<u32>(r.y);
            }
        }
        var gamma = 1.0;
        var beta = 0.0;
        if (fp.flags & FINALIZE_AFFINE) != 0u {
            gamma = affine[c];
            beta = affine[fp.padded + c];
        }
        sh_merge[slot] = vec4<f32>(coefficients(b, gamma, beta), 0.0);
    }
    workgroupBarrier();
}

// Start of invocation t's walk in a merged kernel, after its workgroup merged the
// partials of its tile's channels (`width` per channel unit: 4 in the
// channels-last vec4 walk, else 1).
fn merged_begin(t: u32, wid: vec3<u32>, nwg: vec3<u32>, width: u32) -> Walk {
    let g = workgroup_linear(wid, nwg);
    let first = walk_begin(p, t, g);
    merge_channels(t, width * tile_start(p, g), width * p.tile, first.split);
    return first;
}

// Merged channel i of the tile in every lane.
fn merged_channel(i: u32) -> Norm {
    let k = sh_merge[i];
    return Norm(vec4<f32>(k.x), vec4<f32>(k.y), vec4<f32>(k.z));
}

// Merged channels 4u .. 4u + 3 of the tile, one per lane.
fn merged_group(u: u32) -> Norm {
    let a = sh_merge[4u * u];
    let b = sh_merge[4u * u + 1u];
    let c = sh_merge[4u * u + 2u];
    let d = sh_merge[4u * u + 3u];
    return Norm(vec4<f32>(a.x, b.x, c.x, d.x), vec4<f32>(a.y, b.y, c.y, d.y),
                vec4<f32>(a.z, b.z, c.z, d.z));
}

@compute @workgroup_size(WG)
fn merged_channels_first_vec4(@builtin(local_invocation_index) t: u32,
                              @builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = merged_begin(t, wid, nwg, 1u);
    loop_vec4(first, merged_channel(first.group % p.tile));
}

@compute @workgroup_size(WG)
fn merged_channels_first_quad(@builtin(local_invocation_index) t: u32,
                              @builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = merged_begin(t, wid, nwg, 1u);
    loop_quad(first, merged_channel(first.group % p.tile));
}

@compute @workgroup_size(WG)
fn merged_channels_last_vec4(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = merged_begin(t, wid, nwg, 4u);
    loop_vec4_rows(first, merged_group(first.group % p.tile));
}

@compute @workgroup_size(WG)
fn merged_scalar(@builtin(local_invocation_index) t: u32,
                 @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = merged_begin(t, wid, nwg, 1u);
    loop_scalar(first, merged_channel(first.group % p.tile));
}
