// Per-channel batch statistics, first stage: partial Welford states.
//
// One workgroup reduces one split of one channel group and writes one partial per
// channel: (count, mean - pivot, M2, pivot). The pivot is the channel's first element;
// shifting by it keeps the mean of data such as 1e4 + 1e-3 * noise exact to f32.
// Splits are fixed by the host and merged by finalize.wgsl in index order, so the
// result is the same bits on every run.
//
// Channels-first: the workgroup walks elements [split * chunk, (split+1) * chunk) of
// its channel (runs of `len` contiguous units, `stride` apart between batch items).
// Channels-last: the workgroup is `tile` columns (channel units) wide and
// WG / tile rows tall, and walks rows [split * chunk, ...) of the (rows, C) matrix.
// Units are vec4 in the `_vec4` entry points and f32 in the `_scalar` ones.
//
// Reads x; writes partials[channel * splits + split]; when `flags & 1`, one
// invocation also adds 1 to num_batches_tracked (running[count_index]).


@group(0) @binding(0) var<uniform> p: ReduceParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> running: array<u32>;

var<workgroup> sh_n: array<vec4<f32>, WG>;
var<workgroup> sh_mean: array<vec4<f32>, WG>;
var<workgroup> sh_m2: array<vec4<f32>, WG>;

// Tree-merges the states of invocations that share `t % cols`; the result is in the
// first `cols` invocations. The order is fixed, so the result is deterministic.
fn reduce_rows(t: u32, cols: u32, w: Welford) -> Welford {
    sh_n[t] = w.n;
    sh_mean[t] = w.mean;
    sh_m2[t] = w.m2;
    workgroupBarrier();
    for (var stride = WG / 2u; stride >= cols; stride /= 2u) {
        if t < stride {
            let a = Welford(sh_n[t], sh_mean[t], sh_m2[t]);
            let b = Welford(sh_n[t + stride], sh_mean[t + stride], sh_m2[t + stride]);
            let r = welford_merge(a, b);
            sh_n[t] = r.n;
            sh_mean[t] = r.mean;
            sh_m2[t] = r.m2;
        }
        workgroupBarrier();
        if stride == 1u {
            break;
        }
    }
    return Welford(sh_n[t], sh_mean[t], sh_m2[t]);
}

fn count_batch(first: bool) {
    if first && (p.flags & 1u) != 0u {
        running[p.count_index] += 1u;
    }
}

fn write_partial(c: u32, split: u32, w: Welford, lane: u32, pivot: f32) {
    partials[c * p.splits + split] = vec4<f32>(w.n[lane], w.mean[lane], w.m2[lane], pivot);
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
    count_batch(g == 0u && t == 0u);
    let base = c * p.len;
    let pivot = x4[base].x;
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var w = welford_empty();
    var cur = cursor_at(start + t, p.len);
    for (var j = start + t; j < end; j += WG) {
        w = welford_push(w, x4[cur.n * p.stride + base + cur.s] - pivot);
        cur = cursor_advance(cur, p.len, p.step_n, p.step_s);
    }
    let r = reduce_rows(t, 1u, welford_collapse(w));
    if t == 0u {
        write_partial(c, split, r, 0u, pivot);
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
    count_batch(g == 0u && t == 0u);
    let base = c * p.len;
    let pivot = x[base];
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var w = welford_empty();
    var cur = cursor_at(start + t, p.len);
    for (var j = start + t; j < end; j += WG) {
        w = welford_push1(w, x[cur.n * p.stride + base + cur.s] - pivot);
        cur = cursor_advance(cur, p.len, p.step_n, p.step_s);
    }
    let r = reduce_rows(t, 1u, w);
    if t == 0u {
        write_partial(c, split, r, 0u, pivot);
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
    count_batch(g == 0u && t == 0u);
    let tx = t % p.tile;
    let u = ct * p.tile + tx;
    let in_range = u < p.units;
    let pivot = select(vec4<f32>(0.0), x4[min(u, p.units - 1u)], in_range);
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var w = welford_empty();
    if in_range {
        for (var r = start + t / p.tile; r < end; r += WG / p.tile) {
            w = welford_push(w, x4[r * p.stride + u] - pivot);
        }
    }
    let r = reduce_rows(t, p.tile, w);
    if t < p.tile && in_range {
        for (var lane = 0u; lane < 4u; lane++) {
            write_partial(4u * u + lane, split, r, lane, pivot[lane]);
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
    count_batch(g == 0u && t == 0u);
    let tx = t % p.tile;
    let u = ct * p.tile + tx;
    let in_range = u < p.units;
    let pivot = select(0.0, x[min(u, p.units - 1u)], in_range);
    let start = split * p.chunk;
    let end = min(start + p.chunk, p.per_channel);
    var w = welford_empty();
    if in_range {
        for (var r = start + t / p.tile; r < end; r += WG / p.tile) {
            w = welford_push1(w, x[r * p.stride + u] - pivot);
        }
    }
    let r = reduce_rows(t, p.tile, w);
    if t < p.tile && in_range {
        write_partial(u, split, r, 0u, pivot);
    }
}
