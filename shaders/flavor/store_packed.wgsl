// Single elements of the kernel's output tensor (y, or dx) where a walk writes
// them one by one (quads, scalars), for tensors packed two per u32: the two halves
// of a word may belong to different invocations, so each writes its half alone
// with two atomic operations (clearing, then setting its bits), and neither
// disturbs the other's. Binds the output's words at SCALAR_OUT_BINDING.

@group(0) @binding(SCALAR_OUT_BINDING) var<storage, read_write> dst1: array<atomic<u32>>;

fn put1(e: u32, v: f32) {
    let shift = 16u * (e % 2u);
    atomicAnd(&dst1[e / 2u], ~(0xffffu << shift));
    atomicOr(&dst1[e / 2u], bits16(v) << shift);
}
