// Single elements of the kernel's output tensor (y, or dx) where a walk writes
// them one by one (quads, scalars), for tensors of a native float type: each is
// its own location. Binds the output's element view at SCALAR_OUT_BINDING (the
// kernel's own output binding).

@group(0) @binding(SCALAR_OUT_BINDING) var<storage, read_write> dst1: array<elem1>;

fn put1(e: u32, v: f32) {
    dst1[e] = st1(v);
}
