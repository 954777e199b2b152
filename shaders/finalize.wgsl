// Per-channel batch statistics, second stage, and the per-channel coefficients the
// normalize pass (apply.wgsl) uses: y = (x - hi) * scale + shift.
//
// One invocation per channel.
// `train`: merges the channel's partials from stats.wgsl in index order (Chan's
//   formula), writes the saved statistics, the coefficients, and, when asked, the
//   running statistics. The mean is kept as the pair hi + lo with hi = the pivot (a
//   data value) and lo = the Welford mean of x - pivot, both exact to f32: x - hi is
//   exact for x near the mean, and lo is folded into `shift`. (A TwoSum split of
//   the rounded mean would not survive: without NoContraction, drivers may
//   simplify it algebraically to lo = 0.)
// `eval`: folds the running statistics and gamma/beta into the coefficients, and
//   writes the running statistics in the saved layout (for an eval-mode backward).
//
// Buffers hold per-channel vectors as segments `padded` (C rounded up to 4) apart:
//   saved   = [mean | invstd | hi | lo]      coef = [hi | scale | shift]
// (saved mean = hi + lo rounded to f32, PyTorch's save_mean.)
//   affine  = [gamma | beta]                 running = [mean | var | num_batches_tracked]
// `running` is read as u32 so the counter's bits never pass through float registers.

struct FinalizeParams {
    channels: u32,
    splits: u32,
    padded: u32,
    flags: u32,       // 1: affine, 2: update running stats, 4: cumulative average, 8: unbiased running var
    eps: f32,
    momentum: f32,    // weight of the batch statistic (when not cumulative)
    count: f32,       // m, elements per channel
    unbias: f32,      // m / (m - 1)
    count_index: u32, // index of num_batches_tracked in `running`
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: FinalizeParams;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> saved: array<f32>;
@group(0) @binding(3) var<storage, read_write> coef: array<f32>;
@group(0) @binding(4) var<storage, read> affine: array<f32>;
@group(0) @binding(5) var<storage, read_write> running: array<u32>;

const AFFINE: u32 = 1u;
const UPDATE_RUNNING: u32 = 2u;
const CUMULATIVE: u32 = 4u;
const UNBIASED: u32 = 8u;

fn inv_sqrt_or_zero(v: f32) -> f32 {
    return select(0.0, 1.0 / sqrt(v), v > 0.0);
}

fn write_coef(c: u32, hi: f32, invstd: f32, lo: f32) {
    var gamma = 1.0;
    var beta = 0.0;
    if (p.flags & AFFINE) != 0u {
        gamma = affine[c];
        beta = affine[p.padded + c];
    }
    let scale = gamma * invstd;
    coef[c] = hi;
    coef[p.padded + c] = scale;
    coef[2u * p.padded + c] = beta - lo * scale;
}

fn scalar_state(v: vec4<f32>) -> Welford {
    return Welford(vec4<f32>(v.x, 0.0, 0.0, 0.0), vec4<f32>(v.y, 0.0, 0.0, 0.0), vec4<f32>(v.z, 0.0, 0.0, 0.0));
}

@compute @workgroup_size(WG)
fn train(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if c >= p.channels {
        return;
    }
    let first = partials[c * p.splits];
    let pivot = first.w;
    var acc = scalar_state(first);
    for (var s = 1u; s < p.splits; s++) {
        acc = welford_merge(acc, scalar_state(partials[c * p.splits + s]));
    }
    let hi = pivot;
    let lo = acc.mean.x;
    let v = max(acc.m2.x / p.count, 0.0);
    let invstd = inv_sqrt_or_zero(v + p.eps);

    saved[c] = hi + lo;
    saved[p.padded + c] = invstd;
    saved[2u * p.padded + c] = hi;
    saved[3u * p.padded + c] = lo;
    write_coef(c, hi, invstd, lo);

    if (p.flags & UPDATE_RUNNING) != 0u {
        var f = p.momentum;
        if (p.flags & CUMULATIVE) != 0u {
            f = 1.0 / f32(running[p.count_index]);
        }
        var batch_var = v;
        if (p.flags & UNBIASED) != 0u {
            batch_var = v * p.unbias;
        }
        let rm = bitcast<f32>(running[c]);
        let rv = bitcast<f32>(running[p.padded + c]);
        running[c] = bitcast<u32>((1.0 - f) * rm + f * (hi + lo));
        running[p.padded + c] = bitcast<u32>((1.0 - f) * rv + f * batch_var);
    }
}

@compute @workgroup_size(WG)
fn eval(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if c >= p.channels {
        return;
    }
    let rm = bitcast<f32>(running[c]);
    let invstd = inv_sqrt_or_zero(bitcast<f32>(running[p.padded + c]) + p.eps);
    saved[c] = rm;
    saved[p.padded + c] = invstd;
    saved[2u * p.padded + c] = rm;
    saved[3u * p.padded + c] = 0.0;
    write_coef(c, rm, invstd, 0.0);
}
