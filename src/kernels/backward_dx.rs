//! Host side of `shaders/backward_dx.wgsl`; its walk is apply.rs' plan.

use super::apply::Variant;
use super::{Access, Kernel};

/// Bit of `ElementwiseParams::flags`: the x term is used (batch statistics).
pub(crate) const WITH_X: u32 = 1;

/// The three entry points of backward_dx.wgsl.
pub(crate) struct BackwardDxKernels {
    channels_first_vec4: Kernel,
    channels_last_vec4: Kernel,
    scalar: Kernel,
}

/// params, x, dy, dx, coef.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
];

impl BackwardDxKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        let k = |label, entry| Kernel::new(device, module, label, entry, BINDINGS);
        Self {
            channels_first_vec4: k("bn.backward_dx.channels_first_vec4", "channels_first_vec4"),
            channels_last_vec4: k("bn.backward_dx.channels_last_vec4", "channels_last_vec4"),
            scalar: k("bn.backward_dx.scalar", "scalar"),
        }
    }

    pub(crate) fn get(&self, variant: Variant) -> &Kernel {
        match variant {
            Variant::ChannelsFirstVec4 => &self.channels_first_vec4,
            Variant::ChannelsLastVec4 => &self.channels_last_vec4,
            Variant::Scalar => &self.scalar,
        }
    }
}
