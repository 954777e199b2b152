// Backward, first stage: per-channel partial sums of dy and dy * (x - mean).
//
// Walks and splits the tensor as stats.wgsl (the same WalkParams and entry points,
// and one more: channels_first_packed, for S % 4 != 0 and C % 4 == 0, where a unit
// is the runs of 4 consecutive channels (packed units, below), 4 * S elements
// read as S vec4s, each element summed into its channel's lane; the statistics pass
// reads such tensors as rows or in quads, as its Welford update per element would
// cost more than the loads save); one workgroup writes one partial per channel and split:
// (sum dy, sum dy * (x - hi), 0, 0), where hi is the high part of the saved mean
// pair (x - hi is exact near the mean; the low part is applied by
// backward_finalize.wgsl). Sums run in a fixed order: deterministic.
// In the pipelines built with the override WITH_X false only sum dy is needed and x
// is not read (a constant per pipeline rather than a flag in `p`, so that the loops
// carry no branch on it).
//
// Reads x, dy, saved = [mean | invstd | hi | lo]; writes partials[channel * splits + split].

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<elem1>;
@group(0) @binding(1) var<storage, read> x4: array<elem4>;
@group(0) @binding(2) var<storage, read> dy: array<elem1>;
@group(0) @binding(2) var<storage, read> dy4: array<elem4>;
@group(0) @binding(3) var<storage, read> saved: array<f32>;
@group(0) @binding(3) var<storage, read> saved4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> sh_dy: array<vec4<f32>, WG>;
var<workgroup> sh_dyx: array<vec4<f32>, WG>;

// Sums of one invocation, lane by lane.
struct Sums {
    dy: vec4<f32>,
    dyx: vec4<f32>,
}

// true: also sum dy * (x - hi) (set by the host per pipeline).
override WITH_X: bool;

fn accumulate(acc: Sums, g: vec4<f32>, xv: vec4<f32>, hi: vec4<f32>) -> Sums {
    var r = acc;
    r.dy += g;
    if WITH_X {
        r.dyx += g * (xv - hi);
    }
    return r;
}

// The packed walk (channels-first with S % 4 != 0 and C % 4 == 0): a channel unit is
// four consecutive channels, whose runs in a batch item are 4 * S consecutive
// elements, read as len = S vec4s (16-byte aligned, as C % 4 == 0); component e of
// the unit's vec4 s belongs to its channel (4s + e) / S, found by comparisons (an
// integer division per element would cost CPU adapters more than the load).
fn packed_channels(p: WalkParams, w: Walk) -> vec4<u32> {
    let k = vec4<u32>(4u * w.s) + vec4<u32>(0u, 1u, 2u, 3u);
    let one = vec4<u32>(1u);
    let zero = vec4<u32>(0u);
    return select(zero, one, k >= vec4<u32>(p.rep)) + select(zero, one, k >= vec4<u32>(2u * p.rep))
         + select(zero, one, k >= vec4<u32>(3u * p.rep));
}

// Adds one element (dy `g`, x `xv`) to the lane of its channel `ch` (0..3) of a
// packed unit: the other lanes add exact zeros, chosen by select (a one-hot mask
// multiplied in would turn a NaN or inf of this channel into NaN in theirs).
fn packed_push(acc: Sums, ch: u32, g: f32, xv: f32, hi: vec4<f32>) -> Sums {
    let mine = vec4<u32>(0u, 1u, 2u, 3u) == vec4<u32>(ch);
    let zero = vec4<f32>(0.0);
    var r = acc;
    r.dy += select(zero, vec4<f32>(g), mine);
    if WITH_X {
        r.dyx += select(zero, g * (vec4<f32>(xv) - hi), mine);
    }
    return r;
}

// Sums each channel unit's rows in a fixed order (deterministic): within subgroups
// first where they serve (subgroup_rows), then a tree through workgroup memory; row
// 0 ends with the sums.
fn reduce_rows(t: u32, row: u32, s: Sums) -> Sums {
    let rows = WG / p.tile;
    let unit = select(p.tile, 1u, p.runs != 0u);
    let span = subgroup_rows(t, unit, rows);
    var own = s;
    for (var d = 1u; d < span; d *= 2u) {
        let m = d * unit;
        own = Sums(own.dy + shuffle_xor4(own.dy, m), own.dyx + shuffle_xor4(own.dyx, m));
    }
    sh_dy[t] = own.dy;
    sh_dyx[t] = own.dyx;
    workgroupBarrier();
    for (var half = rows / 2u; half >= span; half /= 2u) {
        if row < half && row % span == 0u {
            let o = walk_partner(p, t, half);
            sh_dy[t] += sh_dy[o];
            sh_dyx[t] += sh_dyx[o];
        }
        workgroupBarrier();
    }
    return Sums(sh_dy[t], sh_dyx[t]);
}

fn lane_sum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn write_partial(c: u32, split: u32, sdy: f32, sdyx: f32) {
    partials[c * p.splits + split] = vec4<f32>(sdy, sdyx, 0.0, 0.0);
}

// The high part of the mean: channel c's in every lane, or channels 4v..4v+3's.
fn hi_channel(c: u32) -> vec4<f32> {
    return vec4<f32>(saved[2u * p.padded + c]);
}

fn hi_group(v: u32) -> vec4<f32> {
    return saved4[2u * p.padded / 4u + v];
}

// ld4(x4[i]) when the x sum is wanted (else not read).
fn x4_if_wanted(i: u32, hi: vec4<f32>) -> vec4<f32> {
    if WITH_X {
        return ld4(x4[i]);
    }
    return hi;
}

// Units i0..i3 of a walk: their loads issued together (four in flight on a GPU,
// not one), summed in walk order (the same bits as one unit a step).
fn accumulate4(acc: Sums, i0: u32, i1: u32, i2: u32, i3: u32, hi: vec4<f32>) -> Sums {
    let g0 = grad4(i0);
    let g1 = grad4(i1);
    let g2 = grad4(i2);
    let g3 = grad4(i3);
    let x0 = x4_if_wanted(i0, hi);
    let x1 = x4_if_wanted(i1, hi);
    let x2 = x4_if_wanted(i2, hi);
    let x3 = x4_if_wanted(i3, hi);
    store_dz4(i0, g0);
    store_dz4(i1, g1);
    store_dz4(i2, g2);
    store_dz4(i3, g3);
    return accumulate(accumulate(accumulate(accumulate(acc, g0, x0, hi), g1, x1, hi), g2, x2, hi),
                      g3, x3, hi);
}

// The vec4 loop (channels-first runs), four units a step while the walk has them
// (accumulate4).
fn loop_vec4(first: Walk, hi: vec4<f32>) -> Sums {
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    var w = first;
    loop {
        let q = walk_four(p, w);
        if !q.full {
            break;
        }
        acc = accumulate4(acc, q.i.x, q.i.y, q.i.z, q.i.w, hi);
        w = q.next;
    }
    for (; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        let g = grad4(i);
        store_dz4(i, g);
        acc = accumulate(acc, g, x4_if_wanted(i, hi), hi);
    }
    return acc;
}

// The vec4 loop over rows (len == 1: channels-last), its index advanced by one
// addition per step; four rows a step as loop_vec4's units.
fn loop_vec4_rows(first: Walk, hi: vec4<f32>) -> Sums {
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    let step = row_step(p);
    var i = walk_index(p, first);
    var j = first.j;
    for (; j + 3u * p.block < first.end; j += 4u * p.block) {
        acc = accumulate4(acc, i, i + step, i + 2u * step, i + 3u * step, hi);
        i += 4u * step;
    }
    for (; j < first.end; j += p.block) {
        let g = grad4(i);
        store_dz4(i, g);
        acc = accumulate(acc, g, x4_if_wanted(i, hi), hi);
        i += step;
    }
    return acc;
}

// Sums the lanes (all of one channel), merges over the workgroup, writes the partial.
fn finish_channel(t: u32, first: Walk, acc: Sums) {
    let one = Sums(vec4<f32>(lane_sum(acc.dy), 0.0, 0.0, 0.0), vec4<f32>(lane_sum(acc.dyx), 0.0, 0.0, 0.0));
    let r = reduce_rows(t, first.row, one);
    if first.row == 0u && first.group < p.groups {
        write_partial(first.group, first.split, r.dy.x, r.dyx.x);
    }
}

// Merges the sums of channels 4v..4v+3 (one per lane) and writes their partials.
fn finish_lanes(t: u32, first: Walk, v: u32, acc: Sums) {
    let r = reduce_rows(t, first.row, acc);
    if first.row == 0u && first.group < p.groups {
        for (var lane = 0u; lane < 4u; lane++) {
            write_partial(4u * v + lane, first.split, r.dy[lane], r.dyx[lane]);
        }
    }
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    finish_channel(t, first, loop_vec4(first, hi_channel(walk_group(p, first))));
}

@compute @workgroup_size(WG)
fn channels_first_quad(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    finish_channel(t, first, loop_quad(first, hi_channel(walk_group(p, first))));
}

// The quad loop (channels-first runs with S % 4 != 0).
fn loop_quad(first: Walk, hi: vec4<f32>) -> Sums {
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let valid = quad_valid(p, w);
        var xv = hi;
        if WITH_X {
            xv = select(hi, vec4<f32>(ld1(x[word(i.x)], i.x), ld1(x[word(i.y)], i.y), ld1(x[word(i.z)], i.z), ld1(x[word(i.w)], i.w)), valid);
        }
        let gq = grad_quad(i);
        store_dz_quad(i, gq);
        let g = select(vec4<f32>(0.0), gq, valid);
        acc = accumulate(acc, g, xv, hi);
    }
    return acc;
}

// Channels 4v..4v+3 packed (channels-first, S % 4 != 0, C % 4 == 0): each element
// summed into its channel's lane.
@compute @workgroup_size(WG)
fn channels_first_packed(@builtin(local_invocation_index) t: u32,
                         @builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let hi = hi_group(walk_group(p, first));
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        let g = grad4(i);
        store_dz4(i, g);
        let xv = x4_if_wanted(i, hi);
        // The four components by name (not indexed in a loop: see channels_last_vec16).
        let ch = packed_channels(p, w);
        acc = packed_push(acc, ch.x, g.x, xv.x, hi);
        acc = packed_push(acc, ch.y, g.y, xv.y, hi);
        acc = packed_push(acc, ch.z, g.z, xv.z, hi);
        acc = packed_push(acc, ch.w, g.w, xv.w, hi);
    }
    finish_lanes(t, first, first.group, acc);
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let v = walk_group(p, first);
    finish_lanes(t, first, first.group, loop_vec4_rows(first, hi_group(v)));
}

// Sixteen channels per invocation, as four named sums (not an array indexed in a
// loop, which a CPU adapter may keep in memory rather than in registers).
@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let u = 4u * walk_group(p, first);
    let h0 = hi_group(u);
    let h1 = hi_group(u + 1u);
    let h2 = hi_group(u + 2u);
    let h3 = hi_group(u + 3u);
    let zero = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    var a0 = zero;
    var a1 = zero;
    var a2 = zero;
    var a3 = zero;
    let step = 4u * row_step(p);
    var i = 4u * walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        let g0 = grad4(i);
        let g1 = grad4(i + 1u);
        let g2 = grad4(i + 2u);
        let g3 = grad4(i + 3u);
        store_dz4(i, g0);
        store_dz4(i + 1u, g1);
        store_dz4(i + 2u, g2);
        store_dz4(i + 3u, g3);
        a0 = accumulate(a0, g0, x4_if_wanted(i, h0), h0);
        a1 = accumulate(a1, g1, x4_if_wanted(i + 1u, h1), h1);
        a2 = accumulate(a2, g2, x4_if_wanted(i + 2u, h2), h2);
        a3 = accumulate(a3, g3, x4_if_wanted(i + 3u, h3), h3);
        i += step;
    }
    let v = 4u * first.group;
    finish_lanes(t, first, v, a0);
    finish_lanes(t, first, v + 1u, a1);
    finish_lanes(t, first, v + 2u, a2);
    finish_lanes(t, first, v + 3u, a3);
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    // Lanes 1..3 hold zeros, so the lane sum is lane 0 exactly.
    finish_channel(t, first, loop_scalar(first, hi_channel(walk_group(p, first))));
}

// The scalar loop (channels-last, C % 4 != 0): one element per step, in lane 0.
fn loop_scalar(first: Walk, hi: vec4<f32>) -> Sums {
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        var xv = hi;
        if WITH_X {
            xv = vec4<f32>(ld1(x[word(i)], i), hi.yzw);
        }
        let g = grad1(i);
        store_dz1(i, g);
        acc = accumulate(acc, vec4<f32>(g, 0.0, 0.0, 0.0), xv, hi);
        i += step;
    }
    return acc;
}

// ----- fused backward -----------------------------------------------------------
//
// For launches whose workgroups each hold whole channels (splits == 1), built with
// WITH_X: the sums as above, merged over the workgroup; row 0 of each channel unit
// writes its channels' dgamma and dbeta (backward_finalize.wgsl's rules) and shares
// the sums through workgroup memory; every invocation derives its channels' dx
// coefficients from them and walks its units again to write dx. One dispatch
// instead of three, and the second read of a workgroup's x and dy finds them in
// cache when its channels are small.
// Binds dx at binding 4 (the others' partials), then dgamma, dbeta, affine and the
// backward_finalize parameters.

@group(0) @binding(4) var<storage, read_write> dx4: array<elem4>;
@group(0) @binding(5) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(6) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(7) var<storage, read> affine: array<f32>;
@group(0) @binding(8) var<uniform> bp: BackwardFinalizeParams;

// dx coefficients of four lanes: dx = k_dy * dy + k_x * (x - hi) + k_c.
struct DxCoef {
    hi: vec4<f32>,
    k_dy: vec4<f32>,
    k_x: vec4<f32>,
    k_c: vec4<f32>,
}

fn dx_of(k: DxCoef, g: vec4<f32>, xv: vec4<f32>) -> vec4<f32> {
    return k.k_dy * g + k.k_x * (xv - k.hi) + k.k_c;
}

// dgamma and dbeta where asked, added to the buffers' contents when accumulating.
fn write_grads(c: u32, b: BackwardChannel) {
    let acc = (bp.flags & BACKWARD_ACCUMULATE) != 0u;
    if (bp.flags & BACKWARD_WANT_DGAMMA) != 0u {
        dgamma[c] = select(b.dgamma, dgamma[c] + b.dgamma, acc);
    }
    if (bp.flags & BACKWARD_WANT_DBETA) != 0u {
        dbeta[c] = select(b.dbeta, dbeta[c] + b.dbeta, acc);
    }
}

fn channel_of(c: u32, sum: vec2<f32>) -> BackwardChannel {
    return backward_channel(bp, sum, saved[bp.padded + c], saved[3u * bp.padded + c], affine[c]);
}

// Merges the workgroup's sums of each channel unit (`lanes` channels: 4 for the
// channels-last vec4 units, else 1 whose vec4 lanes are summed), writes dgamma and
// dbeta, and gives every invocation its unit's dx coefficients.
fn fused_coef(t: u32, first: Walk, acc: Sums, lanes: u32) -> DxCoef {
    var mine = acc;
    if lanes == 1u {
        mine = Sums(vec4<f32>(lane_sum(acc.dy), 0.0, 0.0, 0.0), vec4<f32>(lane_sum(acc.dyx), 0.0, 0.0, 0.0));
    }
    let r = reduce_rows(t, first.row, mine);
    workgroupBarrier();
    let slot = first.group % p.tile;
    let live = first.group < p.groups;
    if first.row == 0u && live {
        sh_dy[slot] = r.dy;
        sh_dyx[slot] = r.dyx;
        for (var lane = 0u; lane < lanes; lane++) {
            let c = lanes * first.group + lane;
            write_grads(c, channel_of(c, vec2<f32>(r.dy[lane], r.dyx[lane])));
        }
    }
    workgroupBarrier();
    var k = DxCoef(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if live {
        let sums = Sums(sh_dy[slot], sh_dyx[slot]);
        for (var lane = 0u; lane < lanes; lane++) {
            let c = lanes * first.group + lane;
            let b = channel_of(c, vec2<f32>(sums.dy[lane], sums.dyx[lane]));
            k.hi[lane] = saved[2u * bp.padded + c];
            k.k_dy[lane] = b.k.x;
            k.k_x[lane] = b.k.y;
            k.k_c[lane] = b.k.z;
        }
        if lanes == 1u {
            k = DxCoef(vec4<f32>(k.hi.x), vec4<f32>(k.k_dy.x), vec4<f32>(k.k_x.x), vec4<f32>(k.k_c.x));
        }
    }
    return k;
}

fn dx_vec4(first: Walk, k: DxCoef) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        dx4[i] = st4(dx_of(k, grad4(i), ld4(x4[i])));
    }
}

@compute @workgroup_size(WG)
fn fused_channels_first_vec4(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let acc = loop_vec4(first, hi_channel(walk_group(p, first)));
    dx_vec4(first, fused_coef(t, first, acc, 1u));
}

@compute @workgroup_size(WG)
fn fused_channels_first_quad(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let k = fused_coef(t, first, loop_quad(first, hi_channel(walk_group(p, first))), 1u);
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let v = dx_of(k, grad_quad(i), vec4<f32>(ld1(x[word(i.x)], i.x), ld1(x[word(i.y)], i.y), ld1(x[word(i.z)], i.z), ld1(x[word(i.w)], i.w)));
        // Past the run, indices repeat the last element and write its same value.
        put1(i.x, v.x);
        put1(i.y, v.y);
        put1(i.z, v.z);
        put1(i.w, v.w);
    }
}

@compute @workgroup_size(WG)
fn fused_channels_last_vec4(@builtin(local_invocation_index) t: u32,
                            @builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    // The high parts through `saved` (an entry point may use only one of a
    // binding's two views, and channel_of reads this one).
    let h = 2u * p.padded + 4u * walk_group(p, first);
    let hi = vec4<f32>(saved[h], saved[h + 1u], saved[h + 2u], saved[h + 3u]);
    let acc = loop_vec4_rows(first, hi);
    dx_vec4(first, fused_coef(t, first, acc, 4u));
}

@compute @workgroup_size(WG)
fn fused_scalar(@builtin(local_invocation_index) t: u32,
                @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = walk_begin(p, t, workgroup_linear(wid, nwg));
    let k = fused_coef(t, first, loop_scalar(first, hi_channel(walk_group(p, first))), 1u);
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        put1(i, dx_of(k, vec4<f32>(grad1(i)), vec4<f32>(ld1(x[word(i)], i))).x);
        i += step;
    }
}
