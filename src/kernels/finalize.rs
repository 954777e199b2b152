//! Host side of `shaders/finalize.wgsl`.

use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// Mirrors `FinalizeParams` in common.wgsl (used by finalize.wgsl and the fused
/// forward of stats.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct FinalizeParams {
    pub channels: u32,
    pub splits: u32,
    pub padded: u32,
    pub flags: u32,
    pub eps: f32,
    pub momentum: f32,
    pub count: f32,
    pub unbias: f32,
    pub count_index: u32,
    pub unit_pairs: u32,
    pub _pad: [u32; 2],
}

/// `FinalizeParams::flags` bits (reach WGSL as `FINALIZE_*`, see `sources::FLAGS`).
pub(crate) const AFFINE: u32 = 1;
pub(crate) const UPDATE_RUNNING: u32 = 2;
pub(crate) const CUMULATIVE: u32 = 4;
pub(crate) const UNBIASED: u32 = 8;

/// The `train`, `train_units` and `eval` entry points.
pub(crate) struct FinalizeKernels {
    pub train: Kernel,
    pub train_units: Kernel,
    pub eval: Kernel,
}

/// params, partials, saved, coef, affine, running.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
    Access::Read,
    Access::ReadWrite,
];

impl FinalizeKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        Self {
            train: Kernel::new(module, "bn.finalize.train", "train", BINDINGS),
            train_units: Kernel::new(module, "bn.finalize.train_units", "train_units", BINDINGS),
            eval: Kernel::new(module, "bn.finalize.eval", "eval", BINDINGS),
        }
    }
}
