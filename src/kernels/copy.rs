//! Host side of `shaders/copy.wgsl`, the bandwidth yardstick: a copy over
//! common.rs' walk of one channel.

use super::Module;
use super::{Access, Kernel};
use std::sync::Arc;

/// params, src, dst.
const BINDINGS: &[Access] = &[Access::Uniform, Access::Read, Access::ReadWrite];

/// The single entry point of copy.wgsl.
pub(crate) fn kernel(module: &Arc<Module>) -> Kernel {
    Kernel::new(module, "bn.copy", "main", BINDINGS)
}
