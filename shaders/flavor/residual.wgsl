// The forward's epilogue with a residual: y = act(bn(x) + z), z a tensor of x's
// shape and layout (prepended to stats.wgsl and apply.wgsl for the `*_add`
// forwards). Reads z.

@group(0) @binding(RESIDUAL_BINDING) var<storage, read> z: array<elem1>;
@group(0) @binding(RESIDUAL_BINDING) var<storage, read> z4: array<elem4>;

// The output of vec4 i from its normalized value v.
fn epilogue4(v: vec4<f32>, i: u32) -> vec4<f32> {
    return act4(v + ld4(z4[i]));
}

// The output of element i.
fn epilogue1(v: f32, i: u32) -> f32 {
    return act4(vec4<f32>(v + ld1(z[word(i)], i))).x;
}

// The outputs of elements i.x..i.w (a quad walk's).
fn epilogue_quad(v: vec4<f32>, i: vec4<u32>) -> vec4<f32> {
    return act4(v + vec4<f32>(ld1(z[word(i.x)], i.x), ld1(z[word(i.y)], i.y), ld1(z[word(i.z)], i.z), ld1(z[word(i.w)], i.w)));
}
