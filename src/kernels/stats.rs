//! Host side of `shaders/stats.wgsl`: the first stage of the batch statistics, one
//! partial Welford state per channel and split of common.rs' walk; and the fused
//! training forward (statistics, finalize and normalize in one dispatch) for walks
//! whose workgroups hold whole channels.

use super::common::{Pass, Variant, WalkKernels, WalkPlan};
use super::{Access, Kernel};

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

/// The fused forward: params, x, y, running, saved, affine, finalize params.
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
    fused: [Kernel; 4],
}

impl StatsKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        let fused = |entry: &str| {
            let entry = format!("fused_{entry}");
            Kernel::new(
                device,
                module,
                format!("bn.stats.{entry}"),
                &entry,
                FUSED_BINDINGS,
            )
        };
        Self {
            partial: WalkKernels::new(device, module, "bn.stats", BINDINGS, Pass::Statistics),
            fused: [
                fused("channels_first_vec4"),
                fused("channels_first_quad"),
                fused("channels_last_vec4"),
                fused("scalar"),
            ],
        }
    }

    /// The fused forward for `plan`, when it has one: every workgroup holds whole
    /// channels (no splits), read in a variant the fused kernel has.
    pub(crate) fn fused(&self, plan: &WalkPlan) -> Option<&Kernel> {
        if plan.params.splits != 1 {
            return None;
        }
        match plan.variant {
            Variant::ChannelsFirstVec4 => Some(&self.fused[0]),
            Variant::ChannelsFirstQuad => Some(&self.fused[1]),
            Variant::ChannelsLastVec4 => Some(&self.fused[2]),
            Variant::Scalar => Some(&self.fused[3]),
            _ => None,
        }
    }
}
