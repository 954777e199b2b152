//! Host side of `shaders/stats.wgsl`: how a tensor is split into partials.

use super::{Access, Kernel, WORKGROUP_SIZE};
use crate::{Layout, Shape};

/// Aim for at least this many workgroups, so that every shape fills a large GPU.
pub(crate) const TARGET_WORKGROUPS: u32 = 2048;
/// Each invocation should see at least this many units before a split is made.
const MIN_UNITS_PER_INVOCATION: u32 = 8;

/// Mirrors `ReduceParams` in common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ReduceParams {
    pub channels: u32,
    pub splits: u32,
    pub per_channel: u32,
    pub chunk: u32,
    pub len: u32,
    pub stride: u32,
    pub tile: u32,
    pub flags: u32,
    pub step_n: u32,
    pub step_s: u32,
    pub count_index: u32,
    pub units: u32,
    pub padded: u32,
    pub _pad: [u32; 3],
}

/// Which entry point reads the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    ChannelsFirstVec4,
    ChannelsFirstScalar,
    ChannelsLastVec4,
    ChannelsLastScalar,
}

/// A per-channel reduction's launch: the parameters, entry point and workgroups.
/// Shared by the forward statistics and the backward sums (backward_reduce.wgsl),
/// which split the tensor the same way.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReducePlan {
    pub params: ReduceParams,
    pub variant: Variant,
    pub workgroups: u32,
}

impl ReducePlan {
    /// Partials written: `C * splits`.
    pub fn partial_count(&self) -> u64 {
        self.params.channels as u64 * self.params.splits as u64
    }
}

/// Splits each channel of `shape` so that the launch has about
/// [`TARGET_WORKGROUPS`] workgroups without making any invocation's share tiny.
/// A channels-first tensor without spatial dims is the same memory as a
/// channels-last one, and is reduced as such (coalesced rows).
pub(crate) fn plan(shape: &Shape) -> ReducePlan {
    let (n, c, s) = (
        shape.n() as u32,
        shape.c() as u32,
        shape.spatial_size() as u32,
    );
    let wg = WORKGROUP_SIZE;
    let channels_last = shape.layout() == Layout::ChannelsLast || s == 1;
    if !channels_last {
        let vec4 = s % 4 == 0;
        let len = if vec4 { s / 4 } else { s };
        let per_channel = n * len;
        let max_splits = per_channel.div_ceil(wg * MIN_UNITS_PER_INVOCATION).max(1);
        let splits = TARGET_WORKGROUPS.div_ceil(c).clamp(1, max_splits);
        let chunk = per_channel.div_ceil(splits);
        let splits = per_channel.div_ceil(chunk);
        ReducePlan {
            params: ReduceParams {
                channels: c,
                splits,
                per_channel,
                chunk,
                len,
                stride: c * len,
                tile: 1,
                flags: 0,
                step_n: wg / len,
                step_s: wg % len,
                count_index: 0,
                units: len,
                padded: 0,
                _pad: [0; 3],
            },
            variant: if vec4 {
                Variant::ChannelsFirstVec4
            } else {
                Variant::ChannelsFirstScalar
            },
            workgroups: c * splits,
        }
    } else {
        let rows = n * s;
        let vec4 = c % 4 == 0;
        let units = if vec4 { c / 4 } else { c };
        let tile = units.next_power_of_two().min(if vec4 { 64 } else { wg });
        let column_tiles = units.div_ceil(tile);
        let rows_per_step = wg / tile;
        let max_splits = rows
            .div_ceil(rows_per_step * MIN_UNITS_PER_INVOCATION)
            .max(1);
        let splits = TARGET_WORKGROUPS
            .div_ceil(column_tiles)
            .clamp(1, max_splits);
        let chunk = rows.div_ceil(splits);
        let splits = rows.div_ceil(chunk);
        ReducePlan {
            params: ReduceParams {
                channels: c,
                splits,
                per_channel: rows,
                chunk,
                len: 1,
                stride: units,
                tile,
                flags: 0,
                step_n: 0,
                step_s: 0,
                count_index: 0,
                units,
                padded: 0,
                _pad: [0; 3],
            },
            variant: if vec4 {
                Variant::ChannelsLastVec4
            } else {
                Variant::ChannelsLastScalar
            },
            workgroups: column_tiles * splits,
        }
    }
}

/// The four entry points of stats.wgsl.
pub(crate) struct StatsKernels {
    channels_first_vec4: Kernel,
    channels_first_scalar: Kernel,
    channels_last_vec4: Kernel,
    channels_last_scalar: Kernel,
}

/// params, x, partials, running (for num_batches_tracked).
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
];

impl StatsKernels {
    pub(crate) fn new(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Self {
        let k = |label, entry| Kernel::new(device, module, label, entry, BINDINGS);
        Self {
            channels_first_vec4: k("bn.stats.channels_first_vec4", "channels_first_vec4"),
            channels_first_scalar: k("bn.stats.channels_first_scalar", "channels_first_scalar"),
            channels_last_vec4: k("bn.stats.channels_last_vec4", "channels_last_vec4"),
            channels_last_scalar: k("bn.stats.channels_last_scalar", "channels_last_scalar"),
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
