// Backward, first stage: per-channel partial sums of dy and dy * (x - mean).
//
// The tensor is split exactly as in stats.wgsl (same ReduceParams, same walk); one
// workgroup writes one partial per channel: (sum dy, sum dy * (x - hi), 0, 0), where
// hi is the high part of the saved mean pair (x - hi is exact near the mean; the low
// part is applied by backward_finalize.wgsl). Sums run in a fixed order: deterministic.
// When `flags & 1 == 0` only sum dy is needed and x is not read.
//
// Reads x, dy, saved = [mean | invstd | hi | lo]; writes partials[channel * splits + split].

@group(0) @binding(0) var<uniform> p: ReduceParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> saved: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> sh_dy: array<vec4<f32>, WG>;
var<workgroup> sh_dyx: array<vec4<f32>, WG>;

// Sums of one invocation, lane by lane.
struct Sums {
    dy: vec4<f32>,
    dyx: vec4<f32>,
}

fn wants_x() -> bool {
    return (p.flags & 1u) != 0u;
}

fn accumulate(acc: Sums, g: vec4<f32>, xv: vec4<f32>, hi: vec4<f32>) -> Sums {
    var r = acc;
    r.dy += g;
    if wants_x() {
        r.dyx += g * (xv - hi);
    }
    return r;
}

// Tree-sums invocations that share `t % cols`, in a fixed order; the result is in
// the first `cols` invocations.
fn reduce_rows(t: u32, cols: u32, s: Sums) -> Sums {
    sh_dy[t] = s.dy;
    sh_dyx[t] = s.dyx;
    workgroupBarrier();
    for (var stride = WG / 2u; stride >= cols; stride /= 2u) {
        if t < stride {
            sh_dy[t] += sh_dy[t + stride];
            sh_dyx[t] += sh_dyx[t + stride];
        }
        workgroupBarrier();
        if stride == 1u {
            break;
        }
    }
    return Sums(sh_dy[t], sh_dyx[t]);
}

fn lane_sum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn write_partial(c: u32, split: u32, sdy: f32, sdyx: f32) {
    partials[c * p.splits + split] = vec4<f32>(sdy, sdyx, 0.0, 0.0);
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let c = g / p.splits;
    let split = g % p.splits;
    if c >= p.channels {
        return;
    }
    let base = c * p.len;
    let hi = vec4<f32>(saved[2u * p.padded + c]);
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    var cur = cursor_at(start + t, p.len);
    for (var j = start + t; j < end; j += WG) {
        let i = cur.n * p.stride + base + cur.s;
        var xv = hi;
        if wants_x() {
            xv = x4[i];
        }
        acc = accumulate(acc, dy4[i], xv, hi);
        cur = cursor_advance(cur, p.len, p.step_n, p.step_s);
    }
    let one = Sums(vec4<f32>(lane_sum(acc.dy), 0.0, 0.0, 0.0), vec4<f32>(lane_sum(acc.dyx), 0.0, 0.0, 0.0));
    let r = reduce_rows(t, 1u, one);
    if t == 0u {
        write_partial(c, split, r.dy.x, r.dyx.x);
    }
}

@compute @workgroup_size(WG)
fn channels_first_scalar(@builtin(local_invocation_index) t: u32,
                         @builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let c = g / p.splits;
    let split = g % p.splits;
    if c >= p.channels {
        return;
    }
    let base = c * p.len;
    let hi = vec4<f32>(saved[2u * p.padded + c]);
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    var cur = cursor_at(start + t, p.len);
    for (var j = start + t; j < end; j += WG) {
        let i = cur.n * p.stride + base + cur.s;
        var xv = hi;
        if wants_x() {
            xv = vec4<f32>(x[i], hi.yzw);
        }
        acc = accumulate(acc, vec4<f32>(dy[i], 0.0, 0.0, 0.0), xv, hi);
        cur = cursor_advance(cur, p.len, p.step_n, p.step_s);
    }
    let r = reduce_rows(t, 1u, acc);
    if t == 0u {
        write_partial(c, split, r.dy.x, r.dyx.x);
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let column_tiles = (p.units + p.tile - 1u) / p.tile;
    let ct = g / p.splits;
    let split = g % p.splits;
    if ct >= column_tiles {
        return;
    }
    let u = ct * p.tile + t % p.tile;
    let in_range = u < p.units;
    let c0 = 2u * p.padded + 4u * min(u, p.units - 1u);
    let hi = vec4<f32>(saved[c0], saved[c0 + 1u], saved[c0 + 2u], saved[c0 + 3u]);
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    if in_range {
        for (var r = start + t / p.tile; r < end; r += WG / p.tile) {
            let i = r * p.stride + u;
            var xv = hi;
            if wants_x() {
                xv = x4[i];
            }
            acc = accumulate(acc, dy4[i], xv, hi);
        }
    }
    let r = reduce_rows(t, p.tile, acc);
    if t < p.tile && in_range {
        for (var lane = 0u; lane < 4u; lane++) {
            write_partial(4u * u + lane, split, r.dy[lane], r.dyx[lane]);
        }
    }
}

@compute @workgroup_size(WG)
fn channels_last_scalar(@builtin(local_invocation_index) t: u32,
                        @builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = workgroup_linear(wid, nwg);
    let column_tiles = (p.units + p.tile - 1u) / p.tile;
    let ct = g / p.splits;
    let split = g % p.splits;
    if ct >= column_tiles {
        return;
    }
    let u = ct * p.tile + t % p.tile;
    let in_range = u < p.units;
    let hi = vec4<f32>(saved[2u * p.padded + min(u, p.units - 1u)]);
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    if in_range {
        for (var r = start + t / p.tile; r < end; r += WG / p.tile) {
            let i = r * p.stride + u;
            var xv = hi;
            if wants_x() {
                xv = vec4<f32>(x[i], hi.yzw);
            }
            acc = accumulate(acc, vec4<f32>(dy[i], 0.0, 0.0, 0.0), xv, hi);
        }
    }
    let r = reduce_rows(t, p.tile, acc);
    if t < p.tile && in_range {
        write_partial(u, split, r.dy.x, r.dyx.x);
    }
}
