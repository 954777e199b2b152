//! Host side of `shaders/apply.wgsl`: normalize + scale/shift over common.rs' walk.

use super::common::{Pass, SwitchedWalkKernels};
use super::Access;

/// `WalkParams::flags` bit (reaches WGSL as `APPLY_AFFINE`, see `sources::FLAGS`) of
/// the pipelines from the running statistics: gamma and beta are bound as `affine`.
pub(crate) const AFFINE: u32 = 1;

/// The `override` of apply.wgsl that builds the pipelines computing their
/// coefficients from the running statistics.
const FROM_RUNNING: &str = "FROM_RUNNING";

/// params, x, y, coef (or the running statistics), affine.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
    Access::Read,
];

/// The entry points of apply.wgsl, twice: `get(false)` with the coefficients
/// finalize.wgsl wrote, `get(true)` computing them from the running statistics
/// (one-dispatch eval).
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> SwitchedWalkKernels {
    SwitchedWalkKernels::new(
        device,
        module,
        "bn.apply",
        BINDINGS,
        Pass::Elementwise,
        FROM_RUNNING,
    )
}
