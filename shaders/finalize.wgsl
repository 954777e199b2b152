// Per-channel batch statistics, second stage, and the per-channel coefficients the
// normalize pass (apply.wgsl) uses: y = (x - hi) * scale + shift.
//
// `train`: merges the channel's partials from stats.wgsl (Chan's formula; a group
//   of MERGE_LANES invocations per channel, in a fixed order), writes the saved
//   statistics, the coefficients, and, when asked, the running statistics;
//   `train_units` the same, one invocation per channel, for the rows view in
//   16-element units. The mean is kept as the pair hi + lo with hi = the pivot (a
//   data value) and lo = the Welford mean of x - pivot, both exact to f32: x - hi is
//   exact for x near the mean, and lo is folded into `shift`. (A TwoSum split of
//   the rounded mean would not survive: without NoContraction, drivers may
//   simplify it algebraically to lo = 0.)
// `eval` (one invocation per channel): folds the running statistics and gamma/beta
//   into the coefficients, and writes the running statistics in the saved layout
//   (for an eval-mode backward).
//
// Buffers hold per-channel vectors as segments `padded` (C rounded up to 4) apart:
//   saved   = [mean | invstd | hi | lo]      coef = [hi | scale | shift]
// (saved mean = hi + lo rounded to f32, PyTorch's save_mean.)
//   affine  = [gamma | beta]                 running = [mean | var | num_batches_tracked]
// `running` is read as u32 so the counter's bits never pass through float registers.

@group(0) @binding(0) var<uniform> p: FinalizeParams;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> saved: array<f32>;
@group(0) @binding(3) var<storage, read_write> coef: array<f32>;
@group(0) @binding(4) var<storage, read> affine: array<f32>;
@group(0) @binding(5) var<storage, read_write> running: array<u32>;

fn write_coef(c: u32, b: BatchStats) {
    var gamma = 1.0;
    var beta = 0.0;
    if (p.flags & FINALIZE_AFFINE) != 0u {
        gamma = affine[c];
        beta = affine[p.padded + c];
    }
    let k = coefficients(b, gamma, beta);
    coef[c] = k.x;
    coef[p.padded + c] = k.y;
    coef[2u * p.padded + c] = k.z;
}

// A channel's batch statistics from its merged state: saved statistics,
// coefficients and, when asked, running statistics.
fn finish_train(c: u32, pivot: f32, mean: f32, m2: f32) {
    let b = batch_stats(p, pivot, mean, m2);
    saved[c] = b.hi + b.lo;
    saved[p.padded + c] = b.invstd;
    saved[2u * p.padded + c] = b.hi;
    saved[3u * p.padded + c] = b.lo;
    write_coef(c, b);

    if (p.flags & FINALIZE_UPDATE_RUNNING) != 0u {
        let r = running_after(p, bitcast<f32>(running[c]), bitcast<f32>(running[p.padded + c]), b,
                              running[p.count_index]);
        running[c] = bitcast<u32>(r.x);
        running[p.padded + c] = bitcast<u32>(r.y);
    }
}

var<workgroup> sh_state: array<vec4<f32>, WG>;

// Invocations per channel of `train` (set by the host per pipeline: 32 on GPUs, 1
// on CPU adapters, where barriers cost more than a serial walk of a few partials).
override MERGE_LANES: u32;

// MERGE_LANES invocations per channel (WG / MERGE_LANES channels per workgroup): a
// channel's `splits` partials (partials[c * splits + s], the same pivot) are
// consecutive, lane l merges those at s = l, l + MERGE_LANES, ... in order, and the
// lanes' states are tree-merged in a fixed order (the same bits on every run).
@compute @workgroup_size(WG)
fn train(@builtin(local_invocation_index) lid: u32,
         @builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = workgroup_linear(wid, nwg) * (WG / MERGE_LANES) + lid / MERGE_LANES;
    let lane = lid % MERGE_LANES;
    var acc = welford_empty();
    var pivot = 0.0;
    if c < p.channels {
        let at = c * p.splits;
        pivot = partials[at].w;
        for (var s = lane; s < p.splits; s += MERGE_LANES) {
            acc = welford_merge(acc, scalar_state(partials[at + s]));
        }
    }
    sh_state[lid] = vec4<f32>(acc.n.x, acc.mean.x, acc.m2.x, 0.0);
    workgroupBarrier();
    for (var half = MERGE_LANES / 2u; half > 0u; half /= 2u) {
        if lane < half {
            let r = welford_merge(scalar_state(sh_state[lid]), scalar_state(sh_state[lid + half]));
            sh_state[lid] = vec4<f32>(r.n.x, r.mean.x, r.m2.x, 0.0);
        }
        workgroupBarrier();
    }
    if lane == 0u && c < p.channels {
        let r = sh_state[lid];
        finish_train(c, pivot, r.y, r.z);
    }
}

// The statistics' rows view in 16-element units (CPU adapters): one invocation
// per channel finds its partials by unit. With unit_pairs (a channel every S =
// unit_pairs elements) `splits` partials from each unit u that holds some of its
// elements, at partials[(2u + k) * splits], k = 1 where u begins in the channel
// before.
@compute @workgroup_size(WG)
fn train_units(@builtin(local_invocation_index) lid: u32,
               @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = invocation_linear(lid, wid, nwg);
    if c >= p.channels {
        return;
    }
    let begin = c * p.unit_pairs;
    let units = vec2<u32>(begin / ROW_UNIT, (begin + p.unit_pairs - 1u) / ROW_UNIT);
    var acc = welford_empty();
    var pivot = 0.0;
    for (var u = units.x; u <= units.y; u++) {
        let at = (2u * u + u32(ROW_UNIT * u < begin)) * p.splits;
        if u == units.x {
            pivot = partials[at].w;
        }
        for (var s = 0u; s < p.splits; s++) {
            acc = welford_merge(acc, scalar_state(partials[at + s]));
        }
    }
    finish_train(c, pivot, acc.mean.x, acc.m2.x);
}

@compute @workgroup_size(WG)
fn eval(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = invocation_linear(lid, wid, nwg);
    if c >= p.channels {
        return;
    }
    let b = running_stats(p.eps, bitcast<f32>(running[c]), bitcast<f32>(running[p.padded + c]));
    saved[c] = b.hi;
    saved[p.padded + c] = b.invstd;
    saved[2u * p.padded + c] = b.hi;
    saved[3u * p.padded + c] = 0.0;
    write_coef(c, b);
}
