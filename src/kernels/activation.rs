//! Host side of `shaders/activation.wgsl`: the elementwise steps (activation,
//! residual add, the activation's backward) of the sequence the fused batch norm
//! replaces, over common.rs' walk of one channel.

use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// params, a, b, out.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
];

/// The entry points of activation.wgsl (the activation is the module's).
pub(crate) struct ActivationKernels {
    pub act: Kernel,
    pub add: Kernel,
    pub backward: Kernel,
}

impl ActivationKernels {
    pub(crate) fn new(module: &Arc<Module>) -> Self {
        let kernel =
            |entry: &str| Kernel::new(module, format!("bn.activation.{entry}"), entry, BINDINGS);
        Self {
            act: kernel("act"),
            add: kernel("add"),
            backward: kernel("backward"),
        }
    }
}
