//! Host side of `shaders/copy.wgsl`, the bandwidth yardstick.

use super::apply::ElementwisePlan;
use super::{Access, Kernel};

/// The single entry point.
pub(crate) struct CopyKernels {
    pub main: Kernel,
}

/// params, src, dst.
const BINDINGS: &[Access] = &[Access::Uniform, Access::Read, Access::ReadWrite];

impl CopyKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        Self {
            main: Kernel::new(device, module, "bn.copy", "main", BINDINGS),
        }
    }
}

/// The copy's walk for `vec4s` vec4 units: that of an apply pass with one channel.
pub(crate) fn plan(vec4s: u32) -> ElementwisePlan {
    super::apply::plan_units(super::apply::Variant::ChannelsLastVec4, vec4s, 1, 1, 4)
}
