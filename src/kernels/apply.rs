//! Host side of `shaders/apply.wgsl`: normalize + scale/shift over common.rs' walk.

use super::common::{Pass, SwitchedWalkKernels, Variant, VariantKernels};
use super::Access;
use super::Module;
use std::sync::Arc;

/// `WalkParams::flags` bit (reaches WGSL as `APPLY_AFFINE`, see `sources::FLAGS`) of
/// the pipelines from the running statistics: gamma and beta are bound as `affine`.
pub(crate) const AFFINE: u32 = 1;

/// The `override` of apply.wgsl that builds the pipelines computing their
/// coefficients from the running statistics.
const FROM_RUNNING: &str = "FROM_RUNNING";

/// The `override` of apply.wgsl that builds the pipelines reading the coefficients
/// through the uniform window (`coef_window`) instead of `coef`.
const UNIFORM_COEF: &str = "UNIFORM_COEF";

/// Per-channel segments of the coefficients apply.wgsl reads: hi, scale, shift.
pub(crate) const SEGMENTS: u32 = 3;

/// params, x, y, coef (or the running statistics), affine, coef_window.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
    Access::Read,
    Access::Uniform,
];

/// The entry points of apply.wgsl, three times (`get(&[from_running, uniform])`):
/// with the coefficients finalize.wgsl wrote, read from `coef` (`[false, false]`) or
/// from the uniform window (`[false, true]`), and computing them from the running
/// statistics (`[true, false]`, one-dispatch eval).
pub(crate) fn kernels(module: &Arc<Module>) -> SwitchedWalkKernels {
    SwitchedWalkKernels::new(
        module,
        "bn.apply",
        BINDINGS,
        Pass::Elementwise,
        &[FROM_RUNNING, UNIFORM_COEF],
        &[&[false, false], &[false, true], &[true, false]],
    )
}

/// The merged normalize's: params, x, y, partials, affine, FinalizeParams, saved,
/// running.
const MERGED_BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
    Access::Read,
    Access::Uniform,
    Access::ReadWrite,
    Access::ReadWrite,
];

/// apply.wgsl's `merged_*` entry points: the statistics' partials merged in the
/// normalize.
pub(crate) fn merged(module: &Arc<Module>) -> VariantKernels {
    VariantKernels::new(
        module,
        "bn.apply",
        MERGED,
        MERGED_BINDINGS,
        &[(FROM_RUNNING, 0.0), (UNIFORM_COEF, 0.0)],
    )
}

/// The walks that have a merged normalize (and merged dx, backward_dx.wgsl):
/// channels-first with one channel per unit, and the channels-last walks of
/// common.rs' `plan_merged_rows`.
pub(crate) const MERGED: &[(Variant, &str)] = &[
    (Variant::ChannelsFirstVec4, "merged_channels_first_vec4"),
    (Variant::ChannelsFirstQuad, "merged_channels_first_quad"),
    (Variant::ChannelsLastVec4, "merged_channels_last_vec4"),
    (Variant::Scalar, "merged_scalar"),
];
