//! Host side of `shaders/backward_dx.wgsl`: dx over common.rs' walk.

use super::common::{Pass, SwitchedWalkKernels, VariantKernels};
use super::Access;
use super::Module;
use std::sync::Arc;

/// The `override` of backward_dx.wgsl that builds the pipelines with the x term
/// (batch statistics).
const WITH_X: &str = "WITH_X";

/// The `override` of backward_dx.wgsl that builds the pipelines reading the
/// coefficients through the uniform window (`coef_window`) instead of `coef`.
const UNIFORM_COEF: &str = "UNIFORM_COEF";

/// Per-channel segments of the coefficients backward_dx.wgsl reads: hi, k_dy, k_x,
/// k_c.
pub(crate) const SEGMENTS: u32 = 4;

/// params, x, dy, dx, coef, coef_window.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
    Access::Uniform,
];

/// The entry points of backward_dx.wgsl, four times (`get(&[with_x, uniform])`):
/// with the x term (batch statistics) or without it (running statistics: x is not
/// read), each with the coefficients read from `coef` or from the uniform window.
pub(crate) fn kernels(module: &Arc<Module>) -> SwitchedWalkKernels {
    SwitchedWalkKernels::new(
        module,
        "bn.backward_dx",
        BINDINGS,
        Pass::Elementwise,
        &[WITH_X, UNIFORM_COEF],
        &[
            &[false, false],
            &[false, true],
            &[true, false],
            &[true, true],
        ],
    )
}

/// The merged dx's: params, x, dy, dx, partials, backward_finalize's parameters,
/// saved, affine, dgamma, dbeta.
const MERGED_BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
];

/// backward_dx.wgsl's `merged_*` entry points (batch statistics: WITH_X): the
/// backward sums' partials merged in the dx pass, for the walks of apply's merged
/// normalize.
pub(crate) fn merged(module: &Arc<Module>) -> VariantKernels {
    VariantKernels::new(
        module,
        "bn.backward_dx",
        super::apply::MERGED,
        MERGED_BINDINGS,
        &[(WITH_X, 1.0), (UNIFORM_COEF, 0.0)],
    )
}
