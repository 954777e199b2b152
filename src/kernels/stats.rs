//! Host side of `shaders/stats.wgsl`: the first stage of the batch statistics, one
//! partial Welford state per channel and split of common.rs' walk; and the fused
//! training forward (statistics, finalize and normalize in one dispatch) and the
//! finalized statistics (statistics and finalize in one, writing the coefficients)
//! for walks whose workgroups hold whole channels.

use super::common::{Pass, Variant, WalkKernels, WalkPlan};
use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// Bit of `WalkParams::flags`: count this batch in num_batches_tracked
/// (`STATS_COUNT_BATCH` in WGSL, see `sources::FLAGS`).
pub(crate) const COUNT_BATCH: u32 = 1;

/// params, x, partials, running (for num_batches_tracked).
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
];

/// The fused forward: params, x, y, running, saved, affine, finalize params (the
/// finalized statistics: coef in place of y).
const FUSED_BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
    Access::ReadWrite,
    Access::Read,
    Access::Uniform,
];

/// The entry points of stats.wgsl.
pub(crate) struct StatsKernels {
    /// Partial statistics, one entry point per walk variant.
    pub partial: WalkKernels,
    fused: Vec<(Variant, Kernel)>,
    finalized: Vec<(Variant, Kernel)>,
}

impl StatsKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        // The entry points `{prefix}_{suffix}` for the variants of `lists`.
        let kernels = |prefix: &str, lists: &[&[(Variant, &str)]]| {
            lists
                .iter()
                .flat_map(|list| list.iter())
                .map(|&(variant, suffix)| {
                    let entry = format!("{prefix}_{suffix}");
                    let label = format!("bn.stats.{entry}");
                    let kernel = Kernel::new(module, label, &entry, FUSED_BINDINGS);
                    (variant, kernel)
                })
                .collect()
        };
        Self {
            partial: WalkKernels::new(module, "bn.stats", BINDINGS, Pass::Statistics),
            fused: kernels("fused", &[WHOLE_CHANNELS]),
            finalized: kernels("finalized", &[WHOLE_CHANNELS, FINALIZED_ONLY]),
        }
    }

    /// The fused forward for `plan`, when it has one: every workgroup holds whole
    /// channels (no splits), read in a variant the fused kernel has.
    pub(crate) fn fused(&self, plan: &WalkPlan) -> Option<&Kernel> {
        whole_channels(&self.fused, plan)
    }

    /// The finalized statistics for `plan`, on the same terms as [`Self::fused`].
    pub(crate) fn finalized(&self, plan: &WalkPlan) -> Option<&Kernel> {
        whole_channels(&self.finalized, plan)
    }
}

/// The variants that the fused forward and the finalized statistics have, with the
/// suffix of their entry points.
const WHOLE_CHANNELS: &[(Variant, &str)] = &[
    (Variant::ChannelsFirstVec4, "channels_first_vec4"),
    (Variant::ChannelsFirstQuad, "channels_first_quad"),
    (Variant::ChannelsLastVec4, "channels_last_vec4"),
    (Variant::Scalar, "scalar"),
];

/// The variants that only the finalized statistics have (the fused forward never
/// walks in them: `plan` does not give them to it).
const FINALIZED_ONLY: &[(Variant, &str)] = &[(Variant::ChannelsLastVec16, "channels_last_vec16")];

/// The kernel of `kernels` for `plan`, when every workgroup holds whole channels (no
/// splits) and `kernels` has one for its variant.
fn whole_channels<'a>(kernels: &'a [(Variant, Kernel)], plan: &WalkPlan) -> Option<&'a Kernel> {
    if plan.params.splits != 1 {
        return None;
    }
    kernels
        .iter()
        .find(|(v, _)| *v == plan.variant)
        .map(|(_, kernel)| kernel)
}
