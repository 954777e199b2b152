// Shared by the kernels (prepended to each kernel's source by the host): the
// workgroup size, Welford states merged with Chan's formula, and a cursor that walks
// the elements of one channel of a channels-first tensor without a division per step.

// Invocations per workgroup; set by the host through pipeline constants.
override WG: u32;

// Split of a per-channel reduction (stats.wgsl, backward_reduce.wgsl); see stats.wgsl.
struct ReduceParams {
    channels: u32,    // C, in channels (not units)
    splits: u32,      // partials per channel
    per_channel: u32, // channels-first: elements per channel in units; channels-last: rows
    chunk: u32,       // units (channels-first) or rows (channels-last) per split
    len: u32,         // channels-first: contiguous run in units (S or S/4)
    stride: u32,      // units between consecutive runs/rows (C*S or C, over 4 for vec4)
    tile: u32,        // channels-last: channel units per workgroup (a power of two)
    flags: u32,       // stats: 1 = count this batch; backward_reduce: 1 = sum dy * (x - mean) too
    step_n: u32,      // channels-first: WG / len
    step_s: u32,      // channels-first: WG % len
    count_index: u32, // index of num_batches_tracked in `running`
    units: u32,       // channels-last: channel units per row
    padded: u32,      // C rounded up to 4: stride of per-channel vectors
    _pad2: u32,
    _pad0: u32,
    _pad1: u32,
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

// Adds one value (already shifted by the pivot) to each lane.
fn welford_push(w: Welford, d: vec4<f32>) -> Welford {
    let n = w.n + 1.0;
    let delta = d - w.mean;
    let mean = w.mean + delta / n;
    return Welford(n, mean, w.m2 + delta * (d - mean));
}

// Adds a value to lane 0 only (scalar loads).
fn welford_push1(w: Welford, d: f32) -> Welford {
    let n = w.n.x + 1.0;
    let delta = d - w.mean.x;
    let mean = w.mean.x + delta / n;
    var r = w;
    r.n.x = n;
    r.mean.x = mean;
    r.m2.x = w.m2.x + delta * (d - mean);
    return r;
}

// Chan's parallel merge, lane by lane; empty states (n = 0) merge as identities.
fn welford_merge(a: Welford, b: Welford) -> Welford {
    let n = a.n + b.n;
    let delta = b.mean - a.mean;
    let wb = select(vec4<f32>(0.0), b.n / n, n > vec4<f32>(0.0));
    return Welford(n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb);
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

// Position (batch index n, offset s inside the channel's contiguous run of length
// `len`) of the j-th element of a channel in a channels-first tensor.
struct Cursor {
    n: u32,
    s: u32,
}

fn cursor_at(j: u32, len: u32) -> Cursor {
    return Cursor(j / len, j % len);
}

// Moves the cursor forward by `step_n * len + step_s` elements (step_s < len).
fn cursor_advance(c: Cursor, len: u32, step_n: u32, step_s: u32) -> Cursor {
    var s = c.s + step_s;
    var n = c.n + step_n;
    if s >= len {
        s -= len;
        n += 1u;
    }
    return Cursor(n, s);
}

// Linear workgroup index of a dispatch that may be folded into two dimensions.
fn workgroup_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Walk of an elementwise pass (apply.wgsl, backward_dx.wgsl, copy.wgsl): invocation t
// of workgroup g handles `items` units (vec4 or f32) WG apart, so each step of a
// workgroup touches one contiguous block. The channel of unit q is
// (q / len) % channels, tracked incrementally with no division per step.
struct ElementwiseParams {
    units: u32,    // total units
    len: u32,      // units per channel run (S or S/4 channels-first, 1 channels-last)
    channels: u32, // channel (or 4-channel group) count the run index wraps at
    padded: u32,   // C rounded up to 4: stride of per-channel vectors
    step_c: u32,   // (WG / len) % channels
    step_s: u32,   // WG % len
    items: u32,    // units per invocation
    flags: u32,    // backward_dx.wgsl: 1 = the x term is used
}

// (unit, channel, offset in run) of invocation t's first unit.
fn first_unit(p: ElementwiseParams, g: u32, t: u32) -> vec3<u32> {
    let q = g * WG * p.items + t;
    return vec3<u32>(q, (q / p.len) % p.channels, q % p.len);
}

// Advances (unit, channel, offset) by WG units.
fn next_unit(p: ElementwiseParams, u: vec3<u32>) -> vec3<u32> {
    var s = u.z + p.step_s;
    var c = u.y + p.step_c;
    if s >= p.len {
        s -= p.len;
        c += 1u;
    }
    if c >= p.channels {
        c -= p.channels;
    }
    return vec3<u32>(u.x + WG, c, s);
}
