// The backward's gradient with no activation: dy itself (prepended to
// backward_reduce.wgsl and backward_dx.wgsl, which declare dy).

fn grad4(i: u32) -> vec4<f32> {
    return ld4(dy4[i]);
}

fn grad1(i: u32) -> f32 {
    return ld1(dy[word(i)], i);
}

fn grad_quad(i: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(ld1(dy[word(i.x)], i.x), ld1(dy[word(i.y)], i.y), ld1(dy[word(i.z)], i.z), ld1(dy[word(i.w)], i.w));
}
