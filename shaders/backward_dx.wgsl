// Backward, third stage: dx = k_dy * dy + k_x * (x - hi) + k_c, with per-channel
// coefficients from backward_finalize.wgsl (coef = [hi | k_dy | k_x | k_c]).
//
// Walks the tensor exactly as apply.wgsl does (same ApplyParams and entry points).
// With running statistics k_x = 0 and x is not read (flags & 1 == 0).
// Reads x, dy, coef; writes dx.

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> coef: array<f32>;
@group(0) @binding(4) var<storage, read> coef4: array<vec4<f32>>;

fn with_x() -> bool {
    return (p.flags & 1u) != 0u;
}

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    var u = first_unit(p, workgroup_linear(wid, nwg), t);
    for (var k = 0u; k < p.items && u.x < p.units; k++) {
        let c = u.y;
        var r = dy4[u.x] * coef[p.padded + c] + coef[3u * p.padded + c];
        if with_x() {
            r += (x4[u.x] - coef[c]) * coef[2u * p.padded + c];
        }
        dx4[u.x] = r;
        u = next_unit(p, u);
    }
}

@compute @workgroup_size(WG)
fn channels_last_vec4(@builtin(local_invocation_index) t: u32,
                      @builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let seg = p.padded / 4u;
    var u = first_unit(p, workgroup_linear(wid, nwg), t);
    for (var k = 0u; k < p.items && u.x < p.units; k++) {
        let c = u.y;
        var r = dy4[u.x] * coef4[seg + c] + coef4[3u * seg + c];
        if with_x() {
            r += (x4[u.x] - coef4[c]) * coef4[2u * seg + c];
        }
        dx4[u.x] = r;
        u = next_unit(p, u);
    }
}

@compute @workgroup_size(WG)
fn scalar(@builtin(local_invocation_index) t: u32,
          @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    var u = first_unit(p, workgroup_linear(wid, nwg), t);
    for (var k = 0u; k < p.items && u.x < p.units; k++) {
        let c = u.y;
        var r = dy[u.x] * coef[p.padded + c] + coef[3u * p.padded + c];
        if with_x() {
            r += (x[u.x] - coef[c]) * coef[2u * p.padded + c];
        }
        dx[u.x] = r;
        u = next_unit(p, u);
    }
}
