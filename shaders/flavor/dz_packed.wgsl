// The residual's gradient, dz = the gradient through the activation, written by the
// backward's sums where the forward had a residual, for tensors packed two per u32
// (prepended to backward_reduce.wgsl; the dx pass then reads dz as its dy). Single
// elements are written half a word at a time with atomics (see store_packed.wgsl).
// Writes dz.

@group(0) @binding(RESIDUAL_GRAD_BINDING) var<storage, read_write> dz1: array<atomic<u32>>;
@group(0) @binding(RESIDUAL_GRAD_BINDING) var<storage, read_write> dz4: array<vec2<u32>>;

fn store_dz4(i: u32, g: vec4<f32>) {
    dz4[i] = st4(g);
}

fn put_dz1(e: u32, v: f32) {
    let shift = 16u * (e % 2u);
    atomicAnd(&dz1[e / 2u], ~(0xffffu << shift));
    atomicOr(&dz1[e / 2u], bits16(v) << shift);
}

fn store_dz1(i: u32, g: f32) {
    put_dz1(i, g);
}

// Past a run, a quad's indices repeat its last element: those write its same value.
fn store_dz_quad(i: vec4<u32>, g: vec4<f32>) {
    put_dz1(i.x, g.x);
    put_dz1(i.y, g.y);
    put_dz1(i.z, g.z);
    put_dz1(i.w, g.w);
}
