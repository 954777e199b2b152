//! Host side of `shaders/apply.wgsl`: normalize + scale/shift over common.rs' walk.

use super::common::{Pass, WalkKernels};
use super::Access;

/// `WalkParams::flags` bits (reach WGSL as `APPLY_*`, see `sources::FLAGS`): the
/// coefficients from the running statistics (bound as coef) and `eps`, with gamma
/// and beta when `AFFINE`, instead of finalize.wgsl's.
pub(crate) const FROM_RUNNING: u32 = 1;
pub(crate) const AFFINE: u32 = 2;

/// params, x, y, coef, affine.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
    Access::Read,
];

/// The entry points of apply.wgsl.
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> WalkKernels {
    WalkKernels::new(device, module, "bn.apply", BINDINGS, Pass::Elementwise)
}
