// The forward's epilogue without a residual: y = act(bn(x)) (prepended to
// stats.wgsl and apply.wgsl; with ACT_IDENTITY, plain batch norm).

fn epilogue4(v: vec4<f32>, i: u32) -> vec4<f32> {
    return act4(v);
}

fn epilogue1(v: f32, i: u32) -> f32 {
    return act4(vec4<f32>(v)).x;
}

fn epilogue_quad(v: vec4<f32>, i: vec4<u32>) -> vec4<f32> {
    return act4(v);
}
