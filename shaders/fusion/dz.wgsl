// The residual's gradient, dz = the gradient through the activation, written by the
// backward's sums where the forward had a residual (prepended to
// backward_reduce.wgsl; the dx pass then reads dz as its dy). Writes dz.

@group(0) @binding(RESIDUAL_GRAD_BINDING) var<storage, read_write> dz: array<f32>;
@group(0) @binding(RESIDUAL_GRAD_BINDING) var<storage, read_write> dz4: array<vec4<f32>>;

fn store_dz4(i: u32, g: vec4<f32>) {
    dz4[i] = g;
}

fn store_dz1(i: u32, g: f32) {
    dz[i] = g;
}

// Past a run, a quad's indices repeat its last element: those write its same value.
fn store_dz_quad(i: vec4<u32>, g: vec4<f32>) {
    dz[i.x] = g.x;
    dz[i.y] = g.y;
    dz[i.z] = g.z;
    dz[i.w] = g.w;
}
