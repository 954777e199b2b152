// No residual: the backward's sums write no dz (prepended to backward_reduce.wgsl).

fn store_dz4(i: u32, g: vec4<f32>) {}

fn store_dz1(i: u32, g: f32) {}

fn store_dz_quad(i: vec4<u32>, g: vec4<f32>) {}
