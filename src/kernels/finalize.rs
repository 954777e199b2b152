//! Host side of `shaders/finalize.wgsl`.

use super::common::MERGE_LANES;
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
    /// `train` with [`MERGE_LANES`] invocations per channel (GPUs).
    pub train: Kernel,
    /// `train` with one (CPU adapters).
    pub train_serial: Kernel,
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

/// `entry` built with `lanes` merge lanes per channel.
fn merge_kernel(module: &Arc<Module>, entry: &str, lanes: u32) -> Kernel {
    let label = format!("bn.finalize.{entry}.lanes{lanes}");
    Kernel::with_overrides(
        module,
        label,
        entry,
        BINDINGS,
        &[("MERGE_LANES", f64::from(lanes))],
    )
}

impl FinalizeKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        Self {
            train: merge_kernel(module, "train", MERGE_LANES),
            train_serial: merge_kernel(module, "train", 1),
            train_units: Kernel::new(module, "bn.finalize.train_units", "train_units", BINDINGS),
            eval: Kernel::new(module, "bn.finalize.eval", "eval", BINDINGS),
        }
    }
}
