//! Host side of `shaders/backward_reduce.wgsl`; its split is stats.rs' plan.

use super::stats::Variant;
use super::{Access, Kernel};

/// Bit of `ReduceParams::flags`: also sum dy * (x - mean).
pub(crate) const WITH_X: u32 = 1;

/// The four entry points of backward_reduce.wgsl.
pub(crate) struct BackwardReduceKernels {
    channels_first_vec4: Kernel,
    channels_first_scalar: Kernel,
    channels_last_vec4: Kernel,
    channels_last_scalar: Kernel,
}

/// params, x, dy, saved, partials.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
];

impl BackwardReduceKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        let k = |label, entry| Kernel::new(device, module, label, entry, BINDINGS);
        Self {
            channels_first_vec4: k(
                "bn.backward_reduce.channels_first_vec4",
                "channels_first_vec4",
            ),
            channels_first_scalar: k(
                "bn.backward_reduce.channels_first_scalar",
                "channels_first_scalar",
            ),
            channels_last_vec4: k(
                "bn.backward_reduce.channels_last_vec4",
                "channels_last_vec4",
            ),
            channels_last_scalar: k(
                "bn.backward_reduce.channels_last_scalar",
                "channels_last_scalar",
            ),
        }
    }

    pub(crate) fn get(&self, variant: Variant) -> &Kernel {
        match variant {
            Variant::ChannelsFirstVec4 => &self.channels_first_vec4,
            Variant::ChannelsFirstScalar => &self.channels_first_scalar,
            Variant::ChannelsLastVec4 => &self.channels_last_vec4,
            Variant::ChannelsLastScalar => &self.channels_last_scalar,
        }
    }
}
