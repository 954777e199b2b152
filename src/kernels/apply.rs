//! Host side of `shaders/apply.wgsl`: normalize + scale/shift over common.rs' walk.

use super::common::{Pass, WalkKernels};
use super::Access;

/// params, x, y, coef.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
];

/// The entry points of apply.wgsl.
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> WalkKernels {
    WalkKernels::new(device, module, "bn.apply", BINDINGS, Pass::Elementwise)
}
