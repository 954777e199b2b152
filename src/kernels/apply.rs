//! Host side of `shaders/apply.wgsl` (and of backward_dx.wgsl, which walks the
//! tensor the same way).

use super::{Access, Kernel, WORKGROUP_SIZE};
use crate::{Layout, Shape};

/// Units (vec4 or f32) each invocation handles.
const ITEMS_PER_INVOCATION: u32 = 4;

/// Mirrors `ElementwiseParams` in common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ElementwiseParams {
    pub units: u32,
    pub len: u32,
    pub channels: u32,
    pub padded: u32,
    pub step_c: u32,
    pub step_s: u32,
    pub items: u32,
    pub flags: u32,
}

/// Which entry point walks the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    ChannelsFirstVec4,
    ChannelsLastVec4,
    Scalar,
}

/// An elementwise pass's launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ElementwisePlan {
    pub params: ElementwiseParams,
    pub variant: Variant,
    pub workgroups: u32,
}

/// Picks vec4 access where the layout allows (a channel's runs are whole vec4s).
pub(crate) fn plan(shape: &Shape, padded: u32) -> ElementwisePlan {
    let (c, s, numel) = (
        shape.c() as u32,
        shape.spatial_size() as u32,
        shape.numel() as u32,
    );
    let channels_last = shape.layout() == Layout::ChannelsLast || s == 1;
    let (variant, units, len, channels) = if !channels_last && s % 4 == 0 {
        (Variant::ChannelsFirstVec4, numel / 4, s / 4, c)
    } else if channels_last && c % 4 == 0 {
        (Variant::ChannelsLastVec4, numel / 4, 1, c / 4)
    } else if channels_last {
        (Variant::Scalar, numel, 1, c)
    } else {
        (Variant::Scalar, numel, s, c)
    };
    plan_units(variant, units, len, channels, padded)
}

/// The launch of `units` units in runs of `len`, channel index wrapping at `channels`.
pub(crate) fn plan_units(
    variant: Variant,
    units: u32,
    len: u32,
    channels: u32,
    padded: u32,
) -> ElementwisePlan {
    let wg = WORKGROUP_SIZE;
    let items = ITEMS_PER_INVOCATION;
    ElementwisePlan {
        params: ElementwiseParams {
            units,
            len,
            channels,
            padded,
            step_c: (wg / len) % channels,
            step_s: wg % len,
            items,
            flags: 0,
        },
        variant,
        workgroups: units.div_ceil(wg * items),
    }
}

/// The three entry points of apply.wgsl.
pub(crate) struct ApplyKernels {
    channels_first_vec4: Kernel,
    channels_last_vec4: Kernel,
    scalar: Kernel,
}

/// params, x, y, coef.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
];

impl ApplyKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        let k = |label, entry| Kernel::new(device, module, label, entry, BINDINGS);
        Self {
            channels_first_vec4: k("bn.apply.channels_first_vec4", "channels_first_vec4"),
            channels_last_vec4: k("bn.apply.channels_last_vec4", "channels_last_vec4"),
            scalar: k("bn.apply.scalar", "scalar"),
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
