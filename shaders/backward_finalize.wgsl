// Backward, second stage: per-channel dgamma, dbeta and the coefficients of the dx
// pass (backward_dx.wgsl): dx = k_dy * dy + k_x * (x - hi) + k_c.
//
// MERGE_LANES invocations per channel add the channel's partials from
// backward_reduce.wgsl in a fixed order; then, with xhat = (x - hi - lo) * invstd:
//   dbeta  = sum dy
//   dgamma = sum dy * xhat = invstd * (sum dy * (x - hi) - lo * sum dy)
// Batch statistics (BACKWARD_BATCH_STATS):
//   dx = gamma * invstd / m * (m dy - dbeta - xhat dgamma).
// Running statistics: dx = gamma * invstd * dy.
// dgamma/dbeta are written when asked (BACKWARD_WANT_DGAMMA, _DBETA), added to
// the buffer's contents when accumulating (BACKWARD_ACCUMULATE).
//
// Reads partials, saved = [mean | invstd | hi | lo], affine = [gamma | beta];
// writes coef = [hi | k_dy | k_x | k_c] (segments `padded` apart), dgamma, dbeta.

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

@group(0) @binding(0) var<uniform> p: BackwardFinalizeParams;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> saved: array<f32>;
@group(0) @binding(3) var<storage, read> affine: array<f32>;
@group(0) @binding(4) var<storage, read_write> coef: array<f32>;
@group(0) @binding(5) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(6) var<storage, read_write> dbeta: array<f32>;

fn store(c: u32, v: f32, which: u32) {
    let acc = (p.flags & BACKWARD_ACCUMULATE) != 0u;
    if which == BACKWARD_WANT_DGAMMA {
        dgamma[c] = select(v, dgamma[c] + v, acc);
    } else {
        dbeta[c] = select(v, dbeta[c] + v, acc);
    }
}

var<workgroup> sh_sum: array<vec2<f32>, WG>;

// MERGE_LANES invocations per channel (WG / MERGE_LANES channels per workgroup):
// lane l sums the channel's partials s = l, l + MERGE_LANES, ... (consecutive in
// memory) in order, then the lanes' sums are added in a fixed tree.
@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = workgroup_linear(wid, nwg) * (WG / MERGE_LANES) + lid / MERGE_LANES;
    let lane = lid % MERGE_LANES;
    var sum = vec2<f32>(0.0);
    if c < p.channels {
        for (var s = lane; s < p.splits; s += MERGE_LANES) {
            sum += partials[c * p.splits + s].xy;
        }
    }
    sh_sum[lid] = sum;
    workgroupBarrier();
    for (var half = MERGE_LANES / 2u; half > 0u; half /= 2u) {
        if lane < half {
            sh_sum[lid] += sh_sum[lid + half];
        }
        workgroupBarrier();
    }
    if lane == 0u && c < p.channels {
        finish(c, sh_sum[lid]);
    }
}

// dgamma, dbeta and the dx coefficients of channel c from its sums
// (sum dy, sum dy * (x - hi)).
fn finish(c: u32, sum: vec2<f32>) {
    let invstd = saved[p.padded + c];
    let hi = saved[2u * p.padded + c];
    let lo = saved[3u * p.padded + c];
    let sum_dy = sum.x;
    let sum_dyx = invstd * (sum.y - lo * sum_dy);

    if (p.flags & BACKWARD_WANT_DGAMMA) != 0u {
        store(c, sum_dyx, BACKWARD_WANT_DGAMMA);
    }
    if (p.flags & BACKWARD_WANT_DBETA) != 0u {
        store(c, sum_dy, BACKWARD_WANT_DBETA);
    }

    var gamma = 1.0;
    if (p.flags & BACKWARD_AFFINE) != 0u {
        gamma = affine[c];
    }
    let k_dy = gamma * invstd;
    var k_x = 0.0;
    var k_c = 0.0;
    if (p.flags & BACKWARD_BATCH_STATS) != 0u {
        k_x = -k_dy * invstd * sum_dyx / p.count;
        k_c = k_dy * (lo * invstd * sum_dyx - sum_dy) / p.count;
    }
    coef[c] = hi;
    coef[p.padded + c] = k_dy;
    coef[2u * p.padded + c] = k_x;
    coef[3u * p.padded + c] = k_c;
}
