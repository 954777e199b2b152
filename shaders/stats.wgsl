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
//   channels_first_rows_vec4: S % 4 != 0 but C * S % 4 == 0, large batches: a batch
//                        item read as a row of C * S elements (apply.wgsl's rows view),
//                        one state per element position of the row, whose partials
//                        (C * S per split, position-major) finalize.wgsl merges per
//                        channel; no per-element channel lookup, and vec4 loads.
//   channels_first_rows_vec16: the rows view 16 elements per invocation (S ≥ 15 and
//                        C * S % 16 == 0, on CPU adapters): each lane's states
//                        merged into one per channel (two at most), partials per
//                        unit of 16 elements (two per split), which finalize.wgsl
//                        finds by channel.
//   channels_last_vec4:  a unit is 4 adjacent channels (C % 4 == 0), one state each.
//   channels_last_vec16: a unit is 16 adjacent channels (C % 16 == 0) as 4 vec4s:
//                        a SIMD batch of a CPU adapter reads longer runs of a row.
//   scalar:              a unit is one element (channels-last, C % 4 != 0).
//
// Reads x; writes partials[channel * splits + split] (rows view: partials[position *
// splits + split], or in 16 elements per invocation partials[(2 * unit + k) * splits
// + split]); with STATS_COUNT_BATCH, one invocation also adds 1 to
// num_batches_tracked (running[count_index]).
//
// The fused training forward (`fused_*`, for launches whose workgroups each hold
// whole channels: splits == 1) goes on where the others write their partials: row 0
// of each channel unit finalizes its channels as finalize.wgsl's `train` does (saved
// statistics, running statistics; not the cumulative average, which reads the batch
// count that workgroup 0 is incrementing), the workgroup shares their coefficients
// through workgroup memory, and walks its channels again to write y, as apply.wgsl
// does. One dispatch instead of three, and a workgroup's second read of its channels
// finds them in cache when they are small.
//
// The statistics with their finalize (`finalized_*`, for the same launches, where
// the tensor is too large for the fused forward): row 0 of each channel unit
// finalizes its channels as the fused forward does and writes their coefficients
// (coef = [hi | scale | shift], for apply.wgsl) instead of partials: no finalize
// dispatch, and no second walk after the barriers. These also serve the 16-channel
// walk (`finalized_channels_last_vec16`), which the fused forward does not take.

@group(0) @binding(0) var<uniform> p: WalkParams;
@group(0) @binding(1) var<storage, read> x: array<elem1>;
@group(0) @binding(1) var<storage, read> x4: array<elem4>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> running: array<u32>;
// The fused forward's own bindings (binding 2 is y instead of partials; for the
// finalized statistics, coef_out).
@group(0) @binding(2) var<storage, read_write> y4: array<elem4>;
@group(0) @binding(2) var<storage, read_write> coef_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> saved: array<f32>;
@group(0) @binding(5) var<storage, read> affine: array<f32>;
@group(0) @binding(6) var<uniform> fp: FinalizeParams;

var<workgroup> sh_n: array<vec4<f32>, WG>;
var<workgroup> sh_mean: array<vec4<f32>, WG>;
var<workgroup> sh_m2: array<vec4<f32>, WG>;

// Merges the states of each channel unit's rows in a fixed order (deterministic):
// within subgroups first where they serve (subgroup_rows), then a tree through
// workgroup memory; row 0 ends with the merged state.
fn reduce_rows(t: u32, row: u32, w: Welford) -> Welford {
    let rows = WG / p.tile;
    let unit = select(p.tile, 1u, p.runs != 0u);
    let span = subgroup_rows(t, unit, rows);
    var own = w;
    for (var d = 1u; d < span; d *= 2u) {
        let m = d * unit;
        own = welford_merge(own, Welford(shuffle_xor4(own.n, m), shuffle_xor4(own.mean, m),
                                         shuffle_xor4(own.m2, m)));
    }
    sh_n[t] = own.n;
    sh_mean[t] = own.mean;
    sh_m2[t] = own.m2;
    workgroupBarrier();
    for (var half = rows / 2u; half >= span; half /= 2u) {
        if row < half && row % span == 0u {
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

// Start of invocation t's walk; the first invocation of the launch also counts the
// batch in num_batches_tracked when asked (STATS_COUNT_BATCH), stopping at 2^32 - 1
// (a count of 0 would make the cumulative average divide by zero).
fn begin(t: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Walk {
    let g = workgroup_linear(wid, nwg);
    if g == 0u && t == 0u && (p.flags & STATS_COUNT_BATCH) != 0u {
        let n = running[p.count_index];
        running[p.count_index] = n + u32(n != 0xffffffffu);
    }
    return walk_begin(p, t, g);
}

fn write_partial(c: u32, split: u32, w: Welford, lane: u32, pivot: f32) {
    partials[c * p.splits + split] = vec4<f32>(w.n[lane], w.mean[lane], w.m2[lane], pivot);
}

// Welford means and M2 of four channels (lanes) whose count is kept outside, shared
// with other such states of the same rows: each step takes one reciprocal of the
// count for all of them, instead of a division per lane.
struct Moments {
    mean: vec4<f32>,
    m2: vec4<f32>,
}

fn moments_push(s: Moments, d: vec4<f32>, inv: f32) -> Moments {
    let delta = d - s.mean;
    let mean = s.mean + delta * inv;
    return Moments(mean, s.m2 + delta * (d - mean));
}

// Four values pushed in order into a state of n values (counts exact in f32).
fn moments_push4(s: Moments, n: f32, d0: vec4<f32>, d1: vec4<f32>, d2: vec4<f32>,
                 d3: vec4<f32>) -> Moments {
    let s1 = moments_push(s, d0, 1.0 / (n + 1.0));
    let s2 = moments_push(s1, d1, 1.0 / (n + 2.0));
    let s3 = moments_push(s2, d2, 1.0 / (n + 3.0));
    return moments_push(s3, d3, 1.0 / (n + 4.0));
}

// The vec4 loop (channels-first runs): Welford states of x - pivot, whose four lanes
// see the same number of elements. Four units a step while the walk has them: their
// loads issued together (four in flight on a GPU, not one), pushed in walk order
// (the same bits as one unit a step).
fn loop_vec4(first: Walk, pivot: vec4<f32>) -> Welford {
    var s = Moments(vec4<f32>(0.0), vec4<f32>(0.0));
    var n = 0.0;
    var w = first;
    loop {
        let q = walk_four(p, w);
        if !q.full {
            break;
        }
        let v0 = ld4(x4[q.i.x]);
        let v1 = ld4(x4[q.i.y]);
        let v2 = ld4(x4[q.i.z]);
        let v3 = ld4(x4[q.i.w]);
        s = moments_push4(s, n, v0 - pivot, v1 - pivot, v2 - pivot, v3 - pivot);
        n += 4.0;
        w = q.next;
    }
    for (; w.j < w.end; w = walk_next(p, w)) {
        n += 1.0;
        s = moments_push(s, ld4(x4[walk_index(p, w)]) - pivot, 1.0 / n);
    }
    return Welford(vec4<f32>(n), s.mean, s.m2);
}

// loop_vec4 over rows (len == 1: channels-last, the rows view), its index advanced by
// one addition per step; four rows a step as loop_vec4's units.
fn loop_vec4_rows(first: Walk, pivot: vec4<f32>) -> Welford {
    var s = Moments(vec4<f32>(0.0), vec4<f32>(0.0));
    var n = 0.0;
    let step = row_step(p);
    var i = walk_index(p, first);
    var j = first.j;
    for (; j + 3u * p.block < first.end; j += 4u * p.block) {
        let v0 = ld4(x4[i]);
        let v1 = ld4(x4[i + step]);
        let v2 = ld4(x4[i + 2u * step]);
        let v3 = ld4(x4[i + 3u * step]);
        s = moments_push4(s, n, v0 - pivot, v1 - pivot, v2 - pivot, v3 - pivot);
        n += 4.0;
        i += 4u * step;
    }
    for (; j < first.end; j += p.block) {
        n += 1.0;
        s = moments_push(s, ld4(x4[i]) - pivot, 1.0 / n);
        i += step;
    }
    return Welford(vec4<f32>(n), s.mean, s.m2);
}

// The quad loop (channels-first, S % 4 != 0): Welford states of x - pivot, a lane
// per element of a quad.
fn loop_quad(first: Walk, pivot: f32) -> Welford {
    var acc = welford_empty();
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = quad_indices(p, w);
        let v = vec4<f32>(ld1(x[word(i.x)], i.x), ld1(x[word(i.y)], i.y), ld1(x[word(i.z)], i.z), ld1(x[word(i.w)], i.w));
        acc = welford_push_where(acc, v - pivot, quad_valid(p, w));
    }
    return acc;
}

// The scalar loop (channels-last rows, C % 4 != 0): the Welford state in lane 0.
fn loop_scalar(first: Walk, pivot: f32) -> Welford {
    var s = Moments(vec4<f32>(0.0), vec4<f32>(0.0));
    var n = 0.0;
    let step = row_step(p);
    var i = walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        n += 1.0;
        s = moments_push(s, vec4<f32>(ld1(x[word(i)], i) - pivot, 0.0, 0.0, 0.0), 1.0 / n);
        i += step;
    }
    return Welford(vec4<f32>(n, 0.0, 0.0, 0.0), s.mean, s.m2);
}

// An invocation's walk, Welford state and pivot after its loop, for the variants
// that the partial statistics, the fused forward and the finalized statistics share
// (one channel in lane 0, or in the channels-last vec4 walk four adjacent channels).
struct Start {
    first: Walk,
    w: Welford,
    pivot: vec4<f32>,
}

fn start_channels_first_vec4(t: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Start {
    let first = begin(t, wid, nwg);
    let pivot = ld4(x4[walk_group(p, first) * p.len]).x;
    return Start(first, welford_collapse(loop_vec4(first, vec4<f32>(pivot))), vec4<f32>(pivot));
}

fn start_channels_first_quad(t: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Start {
    let first = begin(t, wid, nwg);
    let pivot = ld1(x[word(walk_group(p, first) * p.run)], walk_group(p, first) * p.run);
    return Start(first, welford_collapse(loop_quad(first, pivot)), vec4<f32>(pivot));
}

fn start_channels_last_vec4(t: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Start {
    let first = begin(t, wid, nwg);
    let pivot = ld4(x4[walk_group(p, first)]);
    return Start(first, loop_vec4_rows(first, pivot), pivot);
}

fn start_scalar(t: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Start {
    let first = begin(t, wid, nwg);
    let pivot = ld1(x[word(walk_group(p, first) * p.len)], walk_group(p, first) * p.len);
    return Start(first, loop_scalar(first, pivot), vec4<f32>(pivot));
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
    let s = start_channels_first_vec4(t, wid, nwg);
    finish_channel(t, s.first, s.w, s.pivot.x);
}

@compute @workgroup_size(WG)
fn channels_first_quad(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_first_quad(t, wid, nwg);
    finish_channel(t, s.first, s.w, s.pivot.x);
}

// The pivots of the rows view's channel c and the next (common.wgsl): their first
// elements, read through x4 (an entry point may use only one of a binding's two
// views).
fn row_pivots(c: u32) -> vec2<f32> {
    let a = c * p.rep;
    let b = row_next(p, c) * p.rep;
    return vec2<f32>(ld4(x4[a / 4u])[a % 4u], ld4(x4[b / 4u])[b % 4u]);
}

// The rows view: each lane stays on four element positions of a batch item, each
// pivoted by its channel's first element; partials per position.
@compute @workgroup_size(WG)
fn channels_first_rows_vec4(@builtin(local_invocation_index) t: u32,
                            @builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = begin(t, wid, nwg);
    let e = 4u * walk_group(p, first);
    let c = row_channel(p, e);
    let pv = row_pivots(c);
    let pivot = select(vec4<f32>(pv.x), vec4<f32>(pv.y), row_past(p, c, e));
    finish_lanes(t, first, first.group, loop_vec4_rows(first, pivot), pivot);
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_last_vec4(t, wid, nwg);
    finish_lanes(t, s.first, s.first.group, s.w, s.pivot);
}

// Sixteen elements per invocation (channels-last: adjacent channels), as four named
// states (not an array indexed in a loop, which a CPU adapter may keep in memory
// rather than in registers) of x minus the pivots p0..p3; every element of a
// row-walking invocation has seen the same number of rows, so the four share one
// count and one reciprocal.
struct States16 {
    n: f32,
    s0: Moments,
    s1: Moments,
    s2: Moments,
    s3: Moments,
}

fn loop_vec16(first: Walk, p0: vec4<f32>, p1: vec4<f32>, p2: vec4<f32>, p3: vec4<f32>) -> States16 {
    let zero = Moments(vec4<f32>(0.0), vec4<f32>(0.0));
    var s0 = zero;
    var s1 = zero;
    var s2 = zero;
    var s3 = zero;
    var n = 0.0;
    let step = 4u * row_step(p);
    var i = 4u * walk_index(p, first);
    for (var j = first.j; j < first.end; j += p.block) {
        n += 1.0;
        let inv = 1.0 / n;
        s0 = moments_push(s0, ld4(x4[i]) - p0, inv);
        s1 = moments_push(s1, ld4(x4[i + 1u]) - p1, inv);
        s2 = moments_push(s2, ld4(x4[i + 2u]) - p2, inv);
        s3 = moments_push(s3, ld4(x4[i + 3u]) - p3, inv);
        i += step;
    }
    return States16(n, s0, s1, s2, s3);
}

// An invocation's walk of 16 adjacent channels (channels-last), their pivots (their
// first row) and states, for the partial and the finalized statistics.
struct Start16 {
    first: Walk,
    q: States16,
    p0: vec4<f32>,
    p1: vec4<f32>,
    p2: vec4<f32>,
    p3: vec4<f32>,
}

fn start_channels_last_vec16(t: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Start16 {
    let first = begin(t, wid, nwg);
    let u = 4u * walk_group(p, first);
    let p0 = ld4(x4[u]);
    let p1 = ld4(x4[u + 1u]);
    let p2 = ld4(x4[u + 2u]);
    let p3 = ld4(x4[u + 3u]);
    return Start16(first, loop_vec16(first, p0, p1, p2, p3), p0, p1, p2, p3);
}

// The Welford state of one vec4 `s` of the 16 channels of `q`.
fn state16(q: States16, s: Moments) -> Welford {
    return Welford(vec4<f32>(q.n), s.mean, s.m2);
}

@compute @workgroup_size(WG)
fn channels_last_vec16(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_last_vec16(t, wid, nwg);
    let v = 4u * s.first.group;
    finish_lanes(t, s.first, v, state16(s.q, s.q.s0), s.p0);
    finish_lanes(t, s.first, v + 1u, state16(s.q, s.q.s1), s.p1);
    finish_lanes(t, s.first, v + 2u, state16(s.q, s.q.s2), s.p2);
    finish_lanes(t, s.first, v + 3u, state16(s.q, s.q.s3), s.p3);
}

// The sum of v0..v3 over the positions whose `past` is `second` (the others add 0).
fn pick(v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, past: RowPast16,
        second: bool) -> vec4<f32> {
    let zero = vec4<f32>(0.0);
    let s = vec4<bool>(second);
    return select(zero, v0, past.v0 == s) + select(zero, v1, past.v1 == s)
         + select(zero, v2, past.v2 == s) + select(zero, v3, past.v3 == s);
}

// Of the 16 element positions whose states `q` holds, those in channel c (`past`
// false) and those in c + 1 (`past` true) merged into one state each: lane x and
// lane y. The positions of a channel share its pivot and their count, so each
// merged mean is their mean, and M2 adds the spread of their means about it.
fn pair_state(q: States16, past: RowPast16) -> Welford {
    let zero = vec4<f32>(0.0);
    let one = vec4<f32>(1.0);
    let b0 = select(zero, one, past.v0);
    let b1 = select(zero, one, past.v1);
    let b2 = select(zero, one, past.v2);
    let b3 = select(zero, one, past.v3);
    let kb = dot(b0 + b1 + b2 + b3, one);
    let k = vec2<f32>(16.0 - kb, kb);
    // Each channel's positions picked by select, the other's replaced by exact
    // zeros (multiplying by a 0/1 mask would carry a NaN or inf of one channel into
    // the other).
    let sums = vec2<f32>(dot(pick(q.s0.mean, q.s1.mean, q.s2.mean, q.s3.mean, past, false), one),
                         dot(pick(q.s0.mean, q.s1.mean, q.s2.mean, q.s3.mean, past, true), one));
    let mean = select(vec2<f32>(0.0), sums / k, k > vec2<f32>(0.0));
    let ma = vec4<f32>(mean.x);
    let mb = vec4<f32>(mean.y);
    let d0 = q.s0.mean - select(ma, mb, past.v0);
    let d1 = q.s1.mean - select(ma, mb, past.v1);
    let d2 = q.s2.mean - select(ma, mb, past.v2);
    let d3 = q.s3.mean - select(ma, mb, past.v3);
    let e0 = q.s0.m2 + q.n * d0 * d0;
    let e1 = q.s1.m2 + q.n * d1 * d1;
    let e2 = q.s2.m2 + q.n * d2 * d2;
    let e3 = q.s3.m2 + q.n * d3 * d3;
    let m2 = vec2<f32>(dot(pick(e0, e1, e2, e3, past, false), one),
                       dot(pick(e0, e1, e2, e3, past, true), one));
    return Welford(vec4<f32>(q.n * k, 0.0, 0.0), vec4<f32>(mean, 0.0, 0.0), vec4<f32>(m2, 0.0, 0.0));
}

// The rows view 16 elements per invocation (S ≥ 15, so in two channels at most,
// common.wgsl): four states per lane as channels_last_vec16's, each element
// pivoted by its channel's first element; after its walk each lane merges them into
// one state per channel (pair_state), the workgroup merges its rows, and unit u
// writes two partials: partials[(2u + k) * splits + split], k = 0 for the channel of
// its first element and 1 for the next (empty where the unit ends in the first).
@compute @workgroup_size(WG)
fn channels_first_rows_vec16(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = begin(t, wid, nwg);
    let e = ROW_UNIT * walk_group(p, first);
    let c = row_channel(p, e);
    let pv = row_pivots(c);
    let pa = vec4<f32>(pv.x);
    let pb = vec4<f32>(pv.y);
    let past = row_past16(p, c, e);
    let q = loop_vec16(first, select(pa, pb, past.v0), select(pa, pb, past.v1),
                       select(pa, pb, past.v2), select(pa, pb, past.v3));
    let r = reduce_rows(t, first.row, pair_state(q, past));
    if first.row == 0u && first.group < p.groups {
        write_partial(2u * first.group, first.split, r, 0u, pa.x);
        write_partial(2u * first.group + 1u, first.split, r, 1u, pb.x);
    }
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_scalar(t, wid, nwg);
    finish_channel(t, s.first, s.w, s.pivot.x);
}

// ----- fused training forward ---------------------------------------------------

// Channel c's statistics from lane `lane` of its merged state: writes its saved and
// (when asked) running statistics, returns its coefficients (hi, scale, shift).
fn finalize_channel(c: u32, r: Welford, lane: u32, pivot: f32) -> vec3<f32> {
    let b = batch_stats(fp, pivot, r.mean[lane], r.m2[lane]);
    saved[c] = b.hi + b.lo;
    saved[fp.padded + c] = b.invstd;
    saved[2u * fp.padded + c] = b.hi;
    saved[3u * fp.padded + c] = b.lo;
    if (fp.flags & FINALIZE_UPDATE_RUNNING) != 0u {
        let m = running_after(fp, bitcast<f32>(running[c]), bitcast<f32>(running[fp.padded + c]), b, 0u);
        running[c] = bitcast<u32>(m.x);
        running[fp.padded + c] = bitcast<u32>(m.y);
    }
    var gamma = 1.0;
    var beta = 0.0;
    if (fp.flags & FINALIZE_AFFINE) != 0u {
        gamma = affine[c];
        beta = affine[fp.padded + c];
    }
    return coefficients(b, gamma, beta);
}

// Merges the workgroup's states of each channel unit (`lanes` channels: 4 for the
// channels-last vec4 units, whose lanes are adjacent channels; else 1, in lane 0),
// finalizes them, and gives every invocation its channel unit's coefficients.
fn fused_norm(t: u32, first: Walk, w: Welford, pivot: vec4<f32>, lanes: u32) -> Norm {
    let r = reduce_rows(t, first.row, w);
    workgroupBarrier();
    let slot = first.group % p.tile;
    if first.row == 0u && first.group < p.groups {
        var k: array<vec4<f32>, 3>;
        for (var lane = 0u; lane < lanes; lane++) {
            let v = finalize_channel(lanes * first.group + lane, r, lane, pivot[lane]);
            for (var q = 0u; q < 3u; q++) {
                k[q][lane] = v[q];
            }
        }
        for (var q = 0u; q < 3u; q++) {
            k[q] = select(k[q], vec4<f32>(k[q].x), lanes == 1u);
        }
        sh_n[slot] = k[0];
        sh_mean[slot] = k[1];
        sh_m2[slot] = k[2];
    }
    workgroupBarrier();
    return Norm(sh_n[slot], sh_mean[slot], sh_m2[slot]);
}

fn normalize_vec4(first: Walk, k: Norm) {
    for (var w = first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        y4[i] = st4(epilogue4(normalize(k, ld4(x4[i])), i));
    }
}

@compute @workgroup_size(WG)
fn fused_channels_first_vec4(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_first_vec4(t, wid, nwg);
    normalize_vec4(s.first, fused_norm(t, s.first, s.w, s.pivot, 1u));
}

@compute @workgroup_size(WG)
fn fused_channels_first_quad(@builtin(local_invocation_index) t: u32,
                             @builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_first_quad(t, wid, nwg);
    let k = fused_norm(t, s.first, s.w, s.pivot, 1u);
    for (var w = s.first; w.j < w.end; w = walk_next(p, w)) {
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
fn fused_channels_last_vec4(@builtin(local_invocation_index) t: u32,
                            @builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_last_vec4(t, wid, nwg);
    normalize_vec4(s.first, fused_norm(t, s.first, s.w, s.pivot, 4u));
}

@compute @workgroup_size(WG)
fn fused_scalar(@builtin(local_invocation_index) t: u32,
                @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_scalar(t, wid, nwg);
    let k = fused_norm(t, s.first, s.w, s.pivot, 1u);
    for (var w = s.first; w.j < w.end; w = walk_next(p, w)) {
        let i = walk_index(p, w);
        put1(i, epilogue1(normalize(k, vec4<f32>(ld1(x[word(i)], i))).x, i));
    }
}

// ----- statistics with their finalize -------------------------------------------

// Merges the workgroup's states of each channel unit (`lanes` channels, as in
// fused_norm: channels lanes * v.. of `w`'s lanes), finalizes them and writes their
// coefficients.
fn finalize_units(t: u32, first: Walk, v: u32, w: Welford, pivot: vec4<f32>, lanes: u32) {
    let r = reduce_rows(t, first.row, w);
    if first.row == 0u && first.group < p.groups {
        for (var lane = 0u; lane < lanes; lane++) {
            let c = lanes * v + lane;
            let k = finalize_channel(c, r, lane, pivot[lane]);
            coef_out[c] = k.x;
            coef_out[fp.padded + c] = k.y;
            coef_out[2u * fp.padded + c] = k.z;
        }
    }
}

@compute @workgroup_size(WG)
fn finalized_channels_first_vec4(@builtin(local_invocation_index) t: u32,
                                 @builtin(workgroup_id) wid: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_first_vec4(t, wid, nwg);
    finalize_units(t, s.first, s.first.group, s.w, s.pivot, 1u);
}

@compute @workgroup_size(WG)
fn finalized_channels_first_quad(@builtin(local_invocation_index) t: u32,
                                 @builtin(workgroup_id) wid: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_first_quad(t, wid, nwg);
    finalize_units(t, s.first, s.first.group, s.w, s.pivot, 1u);
}

@compute @workgroup_size(WG)
fn finalized_channels_last_vec4(@builtin(local_invocation_index) t: u32,
                                @builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_last_vec4(t, wid, nwg);
    finalize_units(t, s.first, s.first.group, s.w, s.pivot, 4u);
}

@compute @workgroup_size(WG)
fn finalized_scalar(@builtin(local_invocation_index) t: u32,
                    @builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_scalar(t, wid, nwg);
    finalize_units(t, s.first, s.first.group, s.w, s.pivot, 1u);
}

// The 16-channel walk finalized: its four vec4s of channels one after another.
@compute @workgroup_size(WG)
fn finalized_channels_last_vec16(@builtin(local_invocation_index) t: u32,
                                 @builtin(workgroup_id) wid: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = start_channels_last_vec16(t, wid, nwg);
    let v = 4u * s.first.group;
    finalize_units(t, s.first, v, state16(s.q, s.q.s0), s.p0, 4u);
    finalize_units(t, s.first, v + 1u, state16(s.q, s.q.s1), s.p1, 4u);
    finalize_units(t, s.first, v + 2u, state16(s.q, s.q.s2), s.p2, 4u);
    finalize_units(t, s.first, v + 3u, state16(s.q, s.q.s3), s.p3, 4u);
}
