// Normalize + scale/shift: y = (x - hi) * scale + shift with per-channel coefficients
// from finalize.wgsl (coef = [hi | scale | shift], segments `padded` apart).
//
// The walk over the tensor is ElementwiseParams' (common.wgsl):
//   channels_first_vec4: units are vec4 inside one channel (S % 4 == 0), len = S / 4.
//   channels_last_vec4:  units are 4 consecutive channels (C % 4 == 0), len = 1,
//                        `channels` = C / 4.
//   scalar:              units are f32, len = S (channels-first) or 1 (channels-last).
// Reads x and coef; writes y.

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> coef: array<f32>;
@group(0) @binding(3) var<storage, read> coef4: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn channels_first_vec4(@builtin(local_invocation_index) t: u32,
                       @builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    var u = first_unit(p, workgroup_linear(wid, nwg), t);
    for (var k = 0u; k < p.items && u.x < p.units; k++) {
        let c = u.y;
        y4[u.x] = (x4[u.x] - coef[c]) * coef[p.padded + c] + coef[2u * p.padded + c];
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
        y4[u.x] = (x4[u.x] - coef4[c]) * coef4[seg + c] + coef4[2u * seg + c];
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
        y[u.x] = (x[u.x] - coef[c]) * coef[p.padded + c] + coef[2u * p.padded + c];
        u = next_unit(p, u);
    }
}
