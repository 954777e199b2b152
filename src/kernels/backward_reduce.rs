//! Host side of `shaders/backward_reduce.wgsl`: per-channel partial sums of the
//! backward over common.rs' walk (split as the forward statistics are).

use super::common::{Pass, WalkKernels};
use super::Access;

/// Bit of `WalkParams::flags`: also sum dy * (x - mean).
pub(crate) const WITH_X: u32 = 1;

/// params, x, dy, saved, partials.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
];

/// The entry points of backward_reduce.wgsl.
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> WalkKernels {
    WalkKernels::new(device, module, "bn.backward_reduce", BINDINGS, Pass::Sums)
}
