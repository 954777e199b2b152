// Backward, third stage: dx = k_dy * dy + k_x * (x - hi) + k_c, with per-channel
// coefficients from backward_finalize.wgsl (coef = [hi | k_dy | k_x | k_c]).
//
// Walks the tensor as apply.wgsl does (same WalkParams and entry points); each
// invocation stays on one channel unit and loads its coefficients once, or in the
// flat walk once per run.
// With running statistics k_x = 0 and x is not read: the pipelines built with the
// override WITH_X false (a constant per pipeline rather than a flag in `p`, so that
// the loops carry no branch on it).
// The pipelines built with the override UNIFORM_COEF read the coefficients through
// `coef_window`, a uniform binding of the same buffer (where they fit in its
// COEF_WINDOW vec4s), as apply.wgsl's do.
// Reads x, dy, coef (or coef_window); writes dx.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<elem1>;
@group(0) @binding(1) var<storage, read> x4: array<elem4>;
@group(0) @binding(2) var<storage, read> dy: array<elem1>;
@group(0) @binding(2) var<storage, read> dy4: array<elem4>;
@group(0) @binding(3) var<storage, read_write> dx4: array<elem4>;
@group(0) @binding(4) var<storage, read> coef: array<f32>;
@group(0) @binding(4) var<storage, read> coef4: array<vec4<f32>>;
@group(0) @binding(5) var<uniform> coef_window: array<vec4<f32>, COEF_WINDOW>;

// true: the x term (batch statistics; set by the host per pipeline).
override WITH_X: bool;
// true: the coefficients read through coef_window (set by the host per pipeline).
override UNIFORM_COEF: bool;

// Element i of the coefficients.
fn coef_at(i: u32) -> f32 {
    if UNIFORM_COEF {
        return coef_window[i / 4u][i % 4u];
    }
    return coef[i];
}

// vec4 v of the coefficients.
fn coef4_at(v: u32) -> vec4<f32> {
    if UNIFORM_COEF {
        return coef_window[v];
    }
    return coef4[v];
}

// The dx coefficients of four lanes: one channel each, or one channel splatted.
struct Coef {
    hi: vec4<f32>,
    k_dy: vec4<f32>,
    k_x: vec4<f32>,
    k_c: vec4<f32>,
}

// dx of four lanes; `xv` is only read with the x term.
fn dx_of(k: Coef, g: vec4<f32>, xv: vec4<f32>) -> vec4<f32> {
    var r = g * k.k_dy + k.k_c;
    if WITH_X {
        r += (xv - k.hi) * k.k_x;
    }
    return r;
}

// Channel c's coefficients in every lane.
fn coef_channel(c: u32) -> Coef {
    let b = p.padded;
    return Coef(vec4<f32>(coef_at(c)), vec4<f32>(coef_at(b + c)), vec4<f32>(coef_at(2u * b + c)),
                vec4<f32>(coef_at(3u * b + c)));
}

// The coefficients of channels 4c..4c+3.
fn coef_group(c: u32) -> Coef {
    let seg = p.padded / 4u;
    return Coef(coef4_at(c), coef4_at(seg + c), coef4_at(2u * seg + c), coef4_at(3u * seg + c));
}

// `b` where `past` holds, else `a` (the rows view's pick between two channels).
fn pick(a: Coef, b: Coef, past: vec4<bool>) -> Coef {
    return Coef(select(a.hi, b.hi, past), select(a.k_dy, b.k_dy, past), select(a.k_x, b.k_x, past),
                select(a.k_c, b.k_c, past));
}

// ld4(x4[i]) when the x term is used (else not read).
fn x4_if_used(i: u32, k: Coef) -> vec4<f32> {
    if WITH_X {
        return ld4(x4[i]);
    }
    return k.hi;
}

// The vec4 loop (channels-first runs).
fn loop_vec4(first: Walk, k: Coef) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        dx4[i] = st4(dx_of(k, grad4(i), x4_if_used(i, k)));
    }
}

// The vec4 loop over rows (len == 1: channels-last, the rows view), its index
// advanced by one addition per step.
fn loop_vec4_rows(first: Walk, k: Coef) {
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        dx4[i] = st4(dx_of(k, grad4(i), x4_if_used(i, k)));
        i += step;
    }
}

// The loop over 16 channels (four vec4) per invocation, with their coefficients as
// four named values (not an array indexed in a loop, which a CPU adapter may keep
// in memory rather than in registers).
fn loop_vec16(first: Walk, k0: Coef, k1: Coef, k2: Coef, k3: Coef) {
    let step = 4u * row_step(p);
    var i = 4u * walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        dx4[i] = st4(dx_of(k0, grad4(i), x4_if_used(i, k0)));
        dx4[i + 1u] = st4(dx_of(k1, grad4(i + 1u), x4_if_used(i + 1u, k1)));
        dx4[i + 2u] = st4(dx_of(k2, grad4(i + 2u), x4_if_used(i + 2u, k2)));
        dx4[i + 3u] = st4(dx_of(k3, grad4(i + 3u), x4_if_used(i + 3u, k3)));
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

// channels_first_vec4 as a flat walk (common.wgsl): each lane's coefficients
// reloaded when it enters a new run.
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
            dx4[i] = st4(dx_of(k, grad4(i), x4_if_used(i, k)));
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
fn loop_quad(first: Walk, k: Coef) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        var xv = k.hi;
        if WITH_X {
            xv = vec4<f32>(ld1(x[word(i.x)], i.x), ld1(x[word(i.y)], i.y), ld1(x[word(i.z)], i.z), ld1(x[word(i.w)], i.w));
        }
        let r = dx_of(k, grad_quad(i), xv);
        // Past the run, indices repeat the last element and write its same value.
        put1(i.x, r.x);
        put1(i.y, r.y);
        put1(i.z, r.z);
        put1(i.w, r.w);
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    loop_vec4_rows(first, coef_group(walk_group(p, first)));
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let u = 4u * walk_group(p, first);
    loop_vec16(first, coef_group(u), coef_group(u + 1u), coef_group(u + 2u), coef_group(u + 3u));
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
fn loop_scalar(first: Walk, k: Coef) {
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        var xv = k.hi.x;
        if WITH_X {
            xv = ld1(x[word(i)], i);
        }
        put1(i, dx_of(k, vec4<f32>(grad1(i)), vec4<f32>(xv)).x);
        i += step;
    }
}

// ----- merged: the backward sums' partials merged in the dx pass ------------------
//
// A backward in two dispatches where the sums split (GPUs; built with WITH_X):
// backward_reduce.wgsl's partials, then these kernels. Each workgroup first adds
// the partials of its tile's channels (`count` channels from `c0`, WG / count
// invocations per channel: lane l those at s = l, l + lanes, ..., then a fixed
// tree over the lanes), one lane per channel derives dgamma, dbeta and the dx
// coefficients as backward_finalize.wgsl does (dgamma and dbeta written by the
// workgroups of split 0 only, one per channel) and puts the coefficients in
// workgroup memory; then the walk writes dx. Tiles as apply.wgsl's merged
// normalize's; the host bounds the repeated reads of partials likewise.
// Binds partials at binding 4 (the others' coef), the backward_finalize parameters,
// saved, affine, dgamma and dbeta.

@group(0) @binding(4) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(5) var<uniform> bp: BackwardFinalizeParams;
@group(0) @binding(6) var<storage, read> saved: array<f32>;
@group(0) @binding(7) var<storage, read> affine: array<f32>;
@group(0) @binding(8) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(9) var<storage, read_write> dbeta: array<f32>;

var<workgroup> sh_merge: array<vec4<f32>, WG>;

// Adds the partials of channels c0 .. c0 + count - 1 (count a power of two, at most
// WG); afterwards sh_merge[i] holds channel c0 + i's (hi, k_dy, k_x, k_c).
fn merge_channels(t: u32, c0: u32, count: u32, split: u32) {
    let lanes = WG / count;
    let slot = t / lanes;
    let lane = t % lanes;
    let c = c0 + slot;
    let live = c < bp.channels;
    var sum = vec2<f32>(0.0);
    if live {
        for (var s = lane; s < bp.splits; s += lanes) {
            sum += partials[c * bp.splits + s].xy;
        }
    }
    sh_merge[t] = vec4<f32>(sum, 0.0, 0.0);
    workgroupBarrier();
    for (var half = lanes / 2u; half > 0u; half /= 2u) {
        if lane < half {
            sh_merge[t] += sh_merge[t + half];
        }
        workgroupBarrier();
    }
    let merged = sh_merge[t].xy;
    workgroupBarrier();
    if lane == 0u && live {
        let b = backward_channel(bp, merged, saved[bp.padded + c], saved[3u * bp.padded + c], affine[c]);
        if split == 0u {
            let acc = (bp.flags & BACKWARD_ACCUMULATE) != 0u;
            if (bp.flags & BACKWARD_WANT_DGAMMA) != 0u {
                dgamma[c] = select(b.dgamma, dgamma[c] + b.dgamma, acc);
            }
            if (bp.flags & BACKWARD_WANT_DBETA) != 0u {
                dbeta[c] = select(b.dbeta, dbeta[c] + b.dbeta, acc);
            }
        }
        sh_merge[slot] = vec4<f32>(saved[2u * bp.padded + c], b.k);
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
fn merged_channel(i: u32) -> Coef {
    let k = sh_merge[i];
    return Coef(vec4<f32>(k.x), vec4<f32>(k.y), vec4<f32>(k.z), vec4<f32>(k.w));
}

// Merged channels 4u .. 4u + 3 of the tile, one per lane.
fn merged_group(u: u32) -> Coef {
    let a = sh_merge[4u * u];
    let b = sh_merge[4u * u + 1u];
    let c = sh_merge[4u * u + 2u];
    let d = sh_merge[4u * u + 3u];
    return Coef(vec4<f32>(a.x, b.x, c.x, d.x), vec4<f32>(a.y, b.y, c.y, d.y),
                vec4<f32>(a.z, b.z, c.z, d.z), vec4<f32>(a.w, b.w, c.w, d.w));
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
