// The backward's gradient through the activation, from the forward's output y:
// dy where the activation passes it (`passes4`), else 0 (prepended to
// backward_reduce.wgsl and backward_dx.wgsl, which declare dy). Reads y.

@group(0) @binding(OUTPUT_BINDING) var<storage, read> out: array<elem1>;
@group(0) @binding(OUTPUT_BINDING) var<storage, read> out4: array<elem4>;

// The gradient at vec4 i.
fn grad4(i: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), ld4(dy4[i]), passes4(ld4(out4[i])));
}

// The gradient at element i.
fn grad1(i: u32) -> f32 {
    return select(0.0, ld1(dy[word(i)], i), passes4(vec4<f32>(ld1(out[word(i)], i))).x);
}

// The gradients at elements i.x..i.w.
fn grad_quad(i: vec4<u32>) -> vec4<f32> {
    let g = vec4<f32>(ld1(dy[word(i.x)], i.x), ld1(dy[word(i.y)], i.y), ld1(dy[word(i.z)], i.z), ld1(dy[word(i.w)], i.w));
    return select(vec4<f32>(0.0), g, passes4(vec4<f32>(ld1(out[word(i.x)], i.x), ld1(out[word(i.y)], i.y), ld1(out[word(i.z)], i.z), ld1(out[word(i.w)], i.w))));
}
