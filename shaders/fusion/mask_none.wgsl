// The backward's gradient with no activation: dy itself (prepended to
// backward_reduce.wgsl and backward_dx.wgsl, which declare dy).

fn grad4(i: u32) -> vec4<f32> {
    return dy4[i];
}

fn grad1(i: u32) -> f32 {
    return dy[i];
}

fn grad_quad(i: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(dy[i.x], dy[i.y], dy[i.z], dy[i.w]);
}
