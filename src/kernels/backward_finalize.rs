//! Host side of `shaders/backward_finalize.wgsl`.

use super::common::MERGE_LANES;
use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// Mirrors `BackwardFinalizeParams` in backward_finalize.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct BackwardFinalizeParams {
    pub channels: u32,
    pub splits: u32,
    pub padded: u32,
    pub flags: u32,
    pub count: f32,
    pub _pad: [u32; 3],
}

/// `BackwardFinalizeParams::flags` bits (reach WGSL as `BACKWARD_*`, see
/// `sources::FLAGS`).
pub(crate) const AFFINE: u32 = 1;
pub(crate) const WANT_DGAMMA: u32 = 2;
pub(crate) const WANT_DBETA: u32 = 4;
pub(crate) const BATCH_STATS: u32 = 8;
pub(crate) const ACCUMULATE: u32 = 16;

/// The single entry point.
pub(crate) struct BackwardFinalizeKernels {
    /// With [`MERGE_LANES`] invocations per channel (GPUs).
    pub main: Kernel,
    /// With one (CPU adapters).
    pub main_serial: Kernel,
}

/// params, partials, saved, affine, coef, dgamma, dbeta.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
    Access::ReadWrite,
];

/// `main` built with `lanes` merge lanes per channel.
fn merge_kernel(module: &Arc<Module>, lanes: u32) -> Kernel {
    let label = format!("bn.backward_finalize.lanes{lanes}");
    Kernel::with_overrides(
        module,
        label,
        "main",
        BINDINGS,
        &[("MERGE_LANES", f64::from(lanes))],
    )
}

impl BackwardFinalizeKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        Self {
            main: merge_kernel(module, MERGE_LANES),
            main_serial: merge_kernel(module, 1),
        }
    }
}
