// The backward's gradient with no activation: dy itself (prepended to
// backward_reduce.wgsl and backward_dx.wgsl, which declare dy).

fn grad4(i: u32) -> vec4<f32> {
    return ld4(dy4[i]);
}

fn grad1(i: u32) -> f32 {
    return ld1(dy[i]);
}

fn grad_quad(i: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(ld1(dy[i.x]), ld1(dy[i.y]), ld1(dy[i.z]), ld1(dy[i.w]));
}
