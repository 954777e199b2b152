// The residual's gradient, dz = the gradient through the activation, written by the
// backward's sums where the forward had a residual (prepended to
// backward_reduce.wgsl; the dx pass then reads dz as its dy). Writes dz.

@group(0) @binding(RESIDUAL_GRAD_BINDING) var<storage, read_write> dz: array<elem1>;
@group(0) @binding(RESIDUAL_GRAD_BINDING) var<storage, read_write> dz4: array<elem4>;

fn store_dz4(i: u32, g: vec4<f32>) {
    dz4[i] = st4(g);
}

fn store_dz1(i: u32, g: f32) {
    dz[i] = st1(g);
}

// Past a run, a quad's indices repeat its last element: those write its same value.
fn store_dz_quad(i: vec4<u32>, g: vec4<f32>) {
    dz[i.x] = st1(g.x);
    dz[i.y] = st1(g.y);
    dz[i.z] = st1(g.z);
    dz[i.w] = st1(g.w);
}
