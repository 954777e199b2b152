//! Host side of `shaders/stats.wgsl`: the first stage of the batch statistics, one
//! partial Welford state per channel and split of common.rs' walk.

use super::common::{Pass, WalkKernels};
use super::Access;

/// Bit of `WalkParams::flags`: count this batch in num_batches_tracked.
pub(crate) const COUNT_BATCH: u32 = 1;

/// params, x, partials, running (for num_batches_tracked).
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
];

/// The entry points of stats.wgsl.
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> WalkKernels {
    WalkKernels::new(device, module, "bn.stats", BINDINGS, Pass::Reduce)
}
