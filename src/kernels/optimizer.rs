//! Host side of `shaders/optimizer.wgsl`: one optimizer step (SGD or Adam) on a
//! layer's gamma and beta.

use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// Mirrors `OptimizerParams` in optimizer.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct OptimizerParams {
    pub channels: u32,
    pub padded: u32,
    pub flags: u32,
    pub _pad0: u32,
    /// SGD: the learning rate. Adam: `lr / (1 - beta1^t)`.
    pub step_size: f32,
    pub weight_decay: f32,
    /// SGD: the momentum. Adam: beta1.
    pub momentum: f32,
    /// SGD: `1 - dampening`. Adam: `1 - beta1`.
    pub new_weight: f32,
    /// Adam: beta2.
    pub beta2: f32,
    /// Adam: `1 - beta2`.
    pub new_weight2: f32,
    /// Adam: `sqrt(1 - beta2^t)`.
    pub correction2_sqrt: f32,
    /// Adam: eps.
    pub eps: f32,
}

/// `OptimizerParams::flags` bits (reach WGSL as `OPTIMIZER_*`, see `sources::FLAGS`).
/// Add `weight_decay * param` to the gradient.
pub(crate) const WEIGHT_DECAY: u32 = 1;
/// SGD with a momentum buffer.
pub(crate) const MOMENTUM: u32 = 2;
/// SGD: the first step, which sets the momentum buffer to the gradient.
pub(crate) const FIRST_STEP: u32 = 4;
/// SGD: Nesterov momentum.
pub(crate) const NESTEROV: u32 = 8;

/// The `sgd` and `adam` entry points.
pub(crate) struct OptimizerKernels {
    pub sgd: Kernel,
    pub adam: Kernel,
}

/// params, dgamma, dbeta, affine, state.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
    Access::ReadWrite,
];

impl OptimizerKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        Self {
            sgd: Kernel::new(module, "bn.optimizer.sgd", "sgd", BINDINGS),
            adam: Kernel::new(module, "bn.optimizer.adam", "adam", BINDINGS),
        }
    }
}
