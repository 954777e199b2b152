//! Host side of `shaders/backward_reduce.wgsl`: per-channel partial sums of the
//! backward over common.rs' walk (split as the forward statistics are).

use super::common::{Pass, SwitchedWalkKernels, Variant, VariantKernels, WalkPlan};
use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// The `override` of backward_reduce.wgsl that builds the pipelines which also sum
/// dy * (x - mean).
const WITH_X: &str = "WITH_X";

/// params, x, dy, saved, partials.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
];

/// The fused backward's: params, x, dy, saved, dx, dgamma, dbeta, affine, and
/// backward_finalize's parameters.
const FUSED_BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
    Access::ReadWrite,
    Access::Read,
    Access::Uniform,
];

/// The walks the fused backward has (those of the fused forward).
const FUSED: &[(Variant, &str)] = &[
    (Variant::ChannelsFirstVec4, "fused_channels_first_vec4"),
    (Variant::ChannelsFirstQuad, "fused_channels_first_quad"),
    (Variant::ChannelsLastVec4, "fused_channels_last_vec4"),
    (Variant::Scalar, "fused_scalar"),
];

/// The pipelines of backward_reduce.wgsl.
pub(crate) struct BackwardReduceKernels {
    /// Its walks, twice: `get(&[true])` also sums dy * (x - mean), `get(&[false])`
    /// sums dy only and does not read x.
    pub sums: SwitchedWalkKernels,
    /// The fused backward (with batch statistics), one per walk it has.
    fused: VariantKernels,
}

impl BackwardReduceKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        Self {
            sums: SwitchedWalkKernels::new(
                module,
                "bn.backward_reduce",
                BINDINGS,
                Pass::Sums,
                &[WITH_X],
                &[&[false], &[true]],
            ),
            fused: VariantKernels::new(
                module,
                "bn.backward_reduce",
                FUSED,
                FUSED_BINDINGS,
                &[(WITH_X, 1.0)],
            ),
        }
    }

    /// The fused backward for `plan`, where its workgroups hold whole channels.
    pub(crate) fn fused(&self, plan: &WalkPlan) -> Option<&Kernel> {
        if plan.params.splits != 1 {
            return None;
        }
        self.fused.get(plan.variant)
    }
}
