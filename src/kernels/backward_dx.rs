//! Host side of `shaders/backward_dx.wgsl`: dx over common.rs' walk.

use super::common::{Pass, WalkKernels};
use super::Access;

/// Bit of `WalkParams::flags`: the x term is used (batch statistics).
pub(crate) const WITH_X: u32 = 1;

/// params, x, dy, dx, coef.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
];

/// The entry points of backward_dx.wgsl.
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> WalkKernels {
    WalkKernels::new(
        device,
        module,
        "bn.backward_dx",
        BINDINGS,
        Pass::Elementwise,
    )
}
