//! Host side of `shaders/backward_dx.wgsl`: dx over common.rs' walk.

use super::common::{Pass, SwitchedWalkKernels};
use super::Access;

/// The `override` of backward_dx.wgsl that builds the pipelines with the x term
/// (batch statistics).
const WITH_X: &str = "WITH_X";

/// params, x, dy, dx, coef.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::Read,
];

/// The entry points of backward_dx.wgsl, twice: `get(true)` with the x term,
/// `get(false)` without it (running statistics: x is not read).
pub(crate) fn kernels(device: &wgpu::Device, module: &wgpu::ShaderModule) -> SwitchedWalkKernels {
    SwitchedWalkKernels::new(
        device,
        module,
        "bn.backward_dx",
        BINDINGS,
        Pass::Elementwise,
        WITH_X,
    )
}
