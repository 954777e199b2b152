//! Host side of `shaders/apply.wgsl`: normalize + scale/shift over common.rs' walk.

use super::common::{Pass, WalkKernels};
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

/// The entry points of apply.wgsl, twice.
pub(crate) struct ApplyKernels {
    /// With the coefficients finalize.wgsl wrote.
    pub finalized: WalkKernels,
    /// With coefficients computed from the running statistics (one-dispatch eval).
    pub running: WalkKernels,
}

impl ApplyKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        let with = |name: &str, from_running: bool| {
            let overrides = [(FROM_RUNNING, f64::from(u8::from(from_running)))];
            WalkKernels::with_overrides(
                device,
                module,
                name,
                BINDINGS,
                Pass::Elementwise,
                &overrides,
            )
        };
        Self {
            finalized: with("bn.apply", false),
            running: with("bn.apply.running", true),
        }
    }
}
