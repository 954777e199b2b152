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

@group(0) @binding(0) var<uniform> p: BackwardFinalizeParams;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> saved: array<f32>;
@group(0) @binding(3) var<storage, read> affine: array<f32>;
@group(0) @binding(4) var<storage, read_write> coef: array<f32>;
@group(0) @binding(5) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(6) var<storage, read_write> dbeta: array<f32>;

var<workgroup> sh_sum: array<vec2<f32>, WG>;

// Invocations per channel (set by the host per pipeline, as finalize.wgsl's).
override MERGE_LANES: u32;

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
    let b = backward_channel(p, sum, saved[p.padded + c], saved[3u * p.padded + c], affine[c]);
    write_grads(c, b);
    coef[c] = saved[2u * p.padded + c];
    coef[p.padded + c] = b.k.x;
    coef[2u * p.padded + c] = b.k.y;
    coef[3u * p.padded + c] = b.k.z;
}

// dgamma and dbeta where asked, added to the buffers' contents when accumulating.
fn write_grads(c: u32, b: BackwardChannel) {
    let acc = (p.flags & BACKWARD_ACCUMULATE) != 0u;
    if (p.flags & BACKWARD_WANT_DGAMMA) != 0u {
        dgamma[c] = select(b.dgamma, dgamma[c] + b.dgamma, acc);
    }
    if (p.flags & BACKWARD_WANT_DBETA) != 0u {
        dbeta[c] = select(b.dbeta, dbeta[c] + b.dbeta, acc);
    }
}
