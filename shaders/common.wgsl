// Shared by the kernels (prepended to each kernel's source by the host): the
// workgroup size, the walk over a tensor's channels, and Welford states merged with
// Chan's formula.

// Invocations per workgroup; set by the host through pipeline constants.
override WG: u32;

// The walk shared by every per-element kernel (stats, apply, backward_reduce,
// backward_dx, and copy as the yardstick). The tensor is `groups` channel units (a
// channel, or in the channels-last vec4 kernels four adjacent channels), each
// `per_channel` units (vec4 or f32) long; unit j of channel unit g sits at
//     (j / len) * stride + g * len + j % len
// (channels-first: runs of len = S or S/4 units, stride = C * len; channels-last:
// len = 1, stride = units per row). A workgroup takes `tile` channel units (a power
// of two) and one of `splits` chunks of `chunk` units of them. Each invocation stays
// on one channel unit of its tile (so it loads its channel's values once and never
// divides per element) as one of the tile's WG / tile rows: with `runs` (channels-
// first) a channel's rows are consecutive invocations, reading along its run;
// without (channels-last) invocation t is unit t % tile, so consecutive invocations
// read along a tensor row. The rows of a channel unit form lane blocks of
// `block` invocations; each block owns `block_len` consecutive units of the chunk
// and its lanes step `block` units at a time. On a GPU one block spans the whole
// workgroup (each step reads one contiguous row); on a CPU adapter a block is one
// SIMD batch, which then streams through memory of its own.
struct WalkParams {
    groups: u32,
    splits: u32,
    per_channel: u32,
    chunk: u32,
    len: u32,
    stride: u32,
    tile: u32,
    block: u32,
    block_len: u32,
    step_n: u32,      // block / len
    step_s: u32,      // block % len
    padded: u32,      // C rounded up to 4: stride of per-channel vectors
    flags: u32,       // the kernel's own switches (constants from the host)
    count_index: u32, // stats.wgsl: index of num_batches_tracked in `running`
    runs: u32,        // 1: a channel unit's rows are consecutive invocations
    run: u32,         // quad walks: elements per run (S)
    rep: u32,         // row and packed walks: consecutive elements per channel (S)
    eps: f32,         // apply.wgsl from the running statistics: the layer's eps
    channels: u32,    // flat walks: C (the channel of run n is n % C)
}

// One invocation's place in the walk: its channel unit, row and split, the next unit
// j of the channel unit, at (n, s) = (j / len, j % len), and where its block ends.
struct Walk {
    group: u32,
    row: u32,
    split: u32,
    j: u32,
    end: u32,
    n: u32,
    s: u32,
}

// Start of invocation t of workgroup g. An invocation past the last channel unit
// (or in a workgroup past the last, padding a folded dispatch) gets an empty range;
// it still takes part in workgroup reductions, and writes nothing.
fn walk_begin(p: WalkParams, t: u32, g: u32) -> Walk {
    let rows = WG / p.tile;
    let in_tile = select(t % p.tile, t / rows, p.runs != 0u);
    let r = select(t / p.tile, t % rows, p.runs != 0u);
    let group = tile_start(p, g) + in_tile;
    let split = g % p.splits;
    let chunk_end = min((split + 1u) * p.chunk, p.per_channel);
    let start = min(split * p.chunk + r / p.block * p.block_len, chunk_end);
    let end = select(start, min(start + p.block_len, chunk_end), group < p.groups);
    let j = start + r % p.block;
    return Walk(group, r, split, j, end, j / p.len, j % p.len);
}

// The first channel unit of workgroup g's tile.
fn tile_start(p: WalkParams, g: u32) -> u32 {
    return g / p.splits * p.tile;
}

// The invocation `half` rows below invocation t, on the same channel unit.
fn walk_partner(p: WalkParams, t: u32, half: u32) -> u32 {
    return select(t + half * p.tile, t + half, p.runs != 0u);
}

// The channel unit whose per-channel values an invocation loads (clamped so that
// idle invocations read in bounds).
fn walk_group(p: WalkParams, w: Walk) -> u32 {
    return min(w.group, p.groups - 1u);
}

// Index of the walk's current unit.
fn walk_index(p: WalkParams, w: Walk) -> u32 {
    return w.n * p.stride + w.group * p.len + w.s;
}

// The rows view (a channels-first tensor with S % 4 != 0 read as rows of C * S
// elements, a channel every `rep` = S ≥ 2 elements): an invocation's elements lie
// in two channels at most (the host sees to it: four from a multiple of 4 always,
// ROW_UNIT (16, a host constant) where S ≥ 15), the channel of its first element
// and the next, whose per-channel values it loads once and picks per element by
// comparisons.
fn row_channel(p: WalkParams, e: u32) -> u32 {
    return e / p.rep;
}

// The channel after c, clamped in bounds (no element past the last channel picks it).
fn row_next(p: WalkParams, c: u32) -> u32 {
    return min(c + 1u, p.padded - 1u);
}

// Which of the elements e..e+3 are past channel c (in channel c + 1).
fn row_past(p: WalkParams, c: u32, e: u32) -> vec4<bool> {
    return vec4<u32>(e) + vec4<u32>(0u, 1u, 2u, 3u) >= vec4<u32>((c + 1u) * p.rep);
}

// Which of the ROW_UNIT (16) elements from e are past channel c, by vec4: the
// rows view's 16-element units, four vec4s each picked between c and c + 1.
struct RowPast16 {
    v0: vec4<bool>,
    v1: vec4<bool>,
    v2: vec4<bool>,
    v3: vec4<bool>,
}

fn row_past16(p: WalkParams, c: u32, e: u32) -> RowPast16 {
    return RowPast16(row_past(p, c, e), row_past(p, c, e + 4u), row_past(p, c, e + 8u),
                     row_past(p, c, e + 12u));
}

// Walks of rows (len == 1: channels-last, and the rows view): units an invocation
// steps from one of its rows to the next (`block` rows of `stride` units), so that a
// loop over rows advances its index by one addition.
fn row_step(p: WalkParams) -> u32 {
    return p.block * p.stride;
}

// Quad walks (channels-first with S % 4 != 0): a unit is up to four consecutive
// elements of a run (len = ceil(S / 4) units per run, `stride` in elements), read
// as f32 and handled as one vec4 (without branches, so that SIMD lanes stay together).
// Indices of the current quad's four elements; past the end of the run (the last
// quad of a run may be short) they repeat the last element, and quad_valid is false.
fn quad_indices(p: WalkParams, w: Walk) -> vec4<u32> {
    let i = w.n * p.stride + w.group * p.run + 4u * w.s;
    let last = min(4u, p.run - 4u * w.s) - 1u;
    return vec4<u32>(i) + min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last));
}

fn quad_valid(p: WalkParams, w: Walk) -> vec4<bool> {
    return vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.run - 4u * w.s);
}

// Steps `block` units forward.
fn walk_next(p: WalkParams, w: Walk) -> Walk {
    var r = w;
    r.j += p.block;
    r.s += p.step_s;
    r.n += p.step_n;
    if r.s >= p.len {
        r.s -= p.len;
        r.n += 1u;
    }
    return r;
}

// Four consecutive units of a walk from w (the reductions' four loads a step): their
// indices, the walk after them, and whether all four are in the walk.
struct Walk4 {
    i: vec4<u32>,
    next: Walk,
    full: bool,
}

fn walk_four(p: WalkParams, w: Walk) -> Walk4 {
    let w1 = walk_next(p, w);
    let w2 = walk_next(p, w1);
    let w3 = walk_next(p, w2);
    let i = vec4<u32>(walk_index(p, w), walk_index(p, w1), walk_index(p, w2), walk_index(p, w3));
    return Walk4(i, walk_next(p, w3), w3.j < w.end);
}

// Flat walks (the elementwise passes over channels-first tensors on CPU adapters):
// the tensor as one channel unit of N * C runs of S / 4 vec4s (stride = len), so
// that each SIMD batch streams through contiguous memory as the copy does. The
// channel of the current run is n % C. A kernel loops over its runs, loading each
// run's coefficients once, and inside over the run's units (flat_step while
// flat_in_run), rather than branching on a run's end in one loop (lavapipe would
// run that branch on every step). Each run is at least a block long, so stepping
// past a run's end lands in the next (flat_next_run), and the channel follows
// without dividing.
fn flat_channel(p: WalkParams, w: Walk) -> u32 {
    return w.n % p.channels;
}

fn flat_next_channel(p: WalkParams, c: u32) -> u32 {
    return select(c + 1u, 0u, c + 1u == p.channels);
}

// A step inside the current run (s may pass its end: by `block`, not `step_s`, which
// is block % len and so 0 when a run is exactly one block long).
fn flat_step(p: WalkParams, w: Walk) -> Walk {
    var r = w;
    r.j += p.block;
    r.s += p.block;
    return r;
}

// Whether the walk is still inside the run it stepped in (and inside its block).
fn flat_in_run(p: WalkParams, w: Walk) -> bool {
    return w.s < p.len && w.j < w.end;
}

// From past the end of a run into the next.
fn flat_next_run(p: WalkParams, w: Walk) -> Walk {
    var r = w;
    r.s -= p.len;
    r.n += 1u;
    return r;
}

// Four independent Welford streams (one per vec4 lane). `mean` is relative to the
// channel's pivot, so `m2` never sees the catastrophic cancellation of E[x^2]-E[x]^2.
struct Welford {
    n: vec4<f32>,
    mean: vec4<f32>,
    m2: vec4<f32>,
}

fn welford_empty() -> Welford {
    return Welford(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
}

// Adds one value (already shifted by the pivot) to each lane where `valid` holds.
fn welford_push_where(w: Welford, d: vec4<f32>, valid: vec4<bool>) -> Welford {
    let zero = vec4<f32>(0.0);
    let n = w.n + select(zero, vec4<f32>(1.0), valid);
    let delta = select(zero, d - w.mean, valid);
    let mean = w.mean + delta / max(n, vec4<f32>(1.0));
    return Welford(n, mean, w.m2 + delta * (d - mean));
}

// Chan's parallel merge, lane by lane; empty states (n = 0) merge as identities.
fn welford_merge(a: Welford, b: Welford) -> Welford {
    let n = a.n + b.n;
    let delta = b.mean - a.mean;
    let wb = select(vec4<f32>(0.0), b.n / n, n > vec4<f32>(0.0));
    return Welford(n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb);
}

// A partial (count, mean, M2, pivot) as a state in lane 0.
fn scalar_state(v: vec4<f32>) -> Welford {
    return Welford(vec4<f32>(v.x, 0.0, 0.0, 0.0), vec4<f32>(v.y, 0.0, 0.0, 0.0), vec4<f32>(v.z, 0.0, 0.0, 0.0));
}

// Merges the four lanes into lane 0 (lanes that hold the same channel).
fn welford_collapse(w: Welford) -> Welford {
    var acc = Welford(vec4<f32>(w.n.x, 0.0, 0.0, 0.0), vec4<f32>(w.mean.x, 0.0, 0.0, 0.0), vec4<f32>(w.m2.x, 0.0, 0.0, 0.0));
    for (var l = 1u; l < 4u; l++) {
        let one = Welford(vec4<f32>(w.n[l], 0.0, 0.0, 0.0), vec4<f32>(w.mean[l], 0.0, 0.0, 0.0), vec4<f32>(w.m2[l], 0.0, 0.0, 0.0));
        acc = welford_merge(acc, one);
    }
    return acc;
}

// Linear workgroup index of a dispatch that may be folded into two dimensions.
fn workgroup_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Linear invocation index of such a dispatch (the per-channel kernels' channel).
fn invocation_linear(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return workgroup_linear(wid, nwg) * WG + lid;
}

// The normalize coefficients of four lanes (one channel each, or one channel
// splatted): y = (x - hi) * scale + shift.
struct Norm {
    hi: vec4<f32>,
    scale: vec4<f32>,
    shift: vec4<f32>,
}

fn normalize(k: Norm, v: vec4<f32>) -> vec4<f32> {
    return (v - k.hi) * k.scale + k.shift;
}

// The activation fused after the normalization: ACT, the module's (a host constant,
// one of ACT_IDENTITY, ACT_RELU, ACT_RELU6). Its comparisons look at the bits, so
// that a NaN stays NaN (and passes the gradient) whatever a driver's float rules
// make of comparisons with NaN.
fn act4(v: vec4<f32>) -> vec4<f32> {
    if ACT == ACT_RELU {
        return select(v, vec4<f32>(0.0), below_zero4(v));
    }
    if ACT == ACT_RELU6 {
        return select(select(v, vec4<f32>(6.0), at_least_six4(v, false)), vec4<f32>(0.0),
                      below_zero4(v));
    }
    return v;
}

// Where the activation passes the gradient, from its output y (PyTorch's
// threshold_backward and hardtanh_backward: y <= 0, and y >= 6 for ReLU6, stop it;
// a NaN output passes it).
fn passes4(y: vec4<f32>) -> vec4<bool> {
    let zero = (bitcast<vec4<u32>>(y) & vec4<u32>(0x7fffffffu)) == vec4<u32>(0u);
    let stops = below_zero4(y) | zero;
    if ACT == ACT_RELU {
        return !stops;
    }
    if ACT == ACT_RELU6 {
        return !(stops | at_least_six4(y, true));
    }
    return vec4<bool>(true);
}

// v < 0 (-0 and NaN are not), from the bits.
fn below_zero4(v: vec4<f32>) -> vec4<bool> {
    let b = bitcast<vec4<u32>>(v);
    let magnitude = b & vec4<u32>(0x7fffffffu);
    return (b >= vec4<u32>(0x80000000u)) & (magnitude != vec4<u32>(0u))
         & (magnitude <= vec4<u32>(0x7f800000u));
}

// v > 6, or v >= 6 with `or_equal` (NaN is neither), from the bits: non-negative
// floats order as their bit patterns.
fn at_least_six4(v: vec4<f32>, or_equal: bool) -> vec4<bool> {
    let b = bitcast<vec4<u32>>(v);
    let six = vec4<u32>(0x40c00000u);
    let above = select(b > six, b >= six, or_equal);
    return above & (b <= vec4<u32>(0x7f800000u));
}

// How a channel's merged batch statistics become its saved statistics, coefficients
// and running statistics (finalize.wgsl, and stats.wgsl's fused forward).
struct FinalizeParams {
    channels: u32,
    splits: u32,
    padded: u32,
    flags: u32,       // FINALIZE_* bits (constants from the host)
    eps: f32,
    momentum: f32,    // weight of the batch statistic (when not cumulative)
    count: f32,       // m, elements per channel
    unbias: f32,      // m / (m - 1)
    count_index: u32, // index of num_batches_tracked in `running`
    unit_pairs: u32,  // 0, or S: partials per unit of 16 elements of the rows view
    _pad1: u32,
    _pad2: u32,
}

// A channel's statistics: mean = hi + lo, with hi = the pivot (a data value) and
// lo = the Welford mean of x - pivot, both exact to f32 (x - hi is exact for x near
// the mean, and lo is folded into the shift); the biased variance and invstd.
struct BatchStats {
    hi: f32,
    lo: f32,
    variance: f32,
    invstd: f32,
}

// 1 / sqrt(v), 0 where v == 0 (var + eps == 0); NaN stays NaN.
fn inv_sqrt_or_zero(v: f32) -> f32 {
    return select(1.0 / sqrt(v), 0.0, v == 0.0);
}

// Whether v is neither NaN nor ±inf, read from its bits (a comparison of v with
// itself may be folded away by a driver that assumes no NaN).
fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// A quiet NaN, made from the bits of any value at run time (a NaN constant is a
// shader-creation error in WGSL).
fn nan_from(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) | 0x7fc00000u);
}

// The statistics of a channel whose merged Welford state of x - pivot has mean `lo`
// and sum of squared deviations `m2`. A NaN or ±inf in the channel leaves the pivot
// or `lo` non-finite (inf - inf and 0 * inf give NaN on the way): then every
// statistic is NaN, wherever the value sat (docs/semantics.md).
fn batch_stats(fp: FinalizeParams, pivot: f32, lo: f32, m2: f32) -> BatchStats {
    if !(is_finite(pivot) && is_finite(lo)) {
        let nan = nan_from(lo);
        return BatchStats(nan, nan, nan, nan);
    }
    let v = max(m2 / fp.count, 0.0);
    return BatchStats(pivot, lo, v, inv_sqrt_or_zero(v + fp.eps));
}

// The statistics an eval-mode forward normalizes with: the running mean (exact, no
// low part) and the invstd of the running variance.
fn running_stats(eps: f32, mean: f32, variance: f32) -> BatchStats {
    return BatchStats(mean, 0.0, variance, inv_sqrt_or_zero(variance + eps));
}

// (hi, scale, shift) of y = (x - hi) * scale + shift.
fn coefficients(b: BatchStats, gamma: f32, beta: f32) -> vec3<f32> {
    let scale = gamma * b.invstd;
    return vec3<f32>(b.hi, scale, beta - b.lo * scale);
}

// Running mean and variance after this batch; `batches` is num_batches_tracked
// (already counting this batch), used by the cumulative average.
fn running_after(fp: FinalizeParams, mean: f32, variance: f32, b: BatchStats, batches: u32) -> vec2<f32> {
    var f = fp.momentum;
    if (fp.flags & FINALIZE_CUMULATIVE) != 0u {
        f = 1.0 / f32(batches);
    }
    var batch_var = b.variance;
    if (fp.flags & FINALIZE_UNBIASED) != 0u {
        batch_var = b.variance * fp.unbias;
    }
    return vec2<f32>((1.0 - f) * mean + f * (b.hi + b.lo), (1.0 - f) * variance + f * batch_var);
}

// How a channel's backward sums become dgamma, dbeta and the coefficients of dx
// (backward_finalize.wgsl, and backward_reduce.wgsl's fused backward).
struct BackwardFinalizeParams {
    channels: u32,
    splits: u32,   // 0 when the sums were not needed (running statistics, dx only)
    padded: u32,
    flags: u32,    // BACKWARD_* bits (constants from the host)
    count: f32,    // m
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// A channel's dgamma, dbeta and dx coefficients k = (k_dy, k_x, k_c) of
// dx = k_dy * dy + k_x * (x - hi) + k_c.
struct BackwardChannel {
    dgamma: f32,
    dbeta: f32,
    k: vec3<f32>,
}

// From sum = (sum dy, sum dy * (x - hi)), the channel's invstd, the low part `lo` of
// its mean and `gamma_or_any` (gamma; not read without BACKWARD_AFFINE). With
// xhat = (x - hi - lo) * invstd:
//   dbeta = sum dy, dgamma = invstd * (sum dy * (x - hi) - lo * sum dy);
//   batch statistics: dx = gamma * invstd / m * (m dy - dbeta - xhat dgamma);
//   running statistics: dx = gamma * invstd * dy.
fn backward_channel(bp: BackwardFinalizeParams, sum: vec2<f32>, invstd: f32, lo: f32,
                    gamma_or_any: f32) -> BackwardChannel {
    let sum_dy = sum.x;
    let sum_dyx = invstd * (sum.y - lo * sum_dy);
    let gamma = select(1.0, gamma_or_any, (bp.flags & BACKWARD_AFFINE) != 0u);
    let k_dy = gamma * invstd;
    var k_x = 0.0;
    var k_c = 0.0;
    if (bp.flags & BACKWARD_BATCH_STATS) != 0u {
        k_x = -k_dy * invstd * sum_dyx / bp.count;
        k_c = k_dy * (lo * invstd * sum_dyx - sum_dy) / bp.count;
    }
    return BackwardChannel(sum_dyx, sum_dy, vec3<f32>(k_dy, k_x, k_c));
}
