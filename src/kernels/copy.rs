//! Host side of `shaders/copy.wgsl`, the bandwidth yardstick: a copy over
//! common.rs' walk of one channel.

use super::{Access, Kernel};

/// params, src, dst.
const BINDINGS: &[Access] = &[Access::Uniform, Access::Read, Access::ReadWrite];

/// The single entry point of copy.wgsl.
pub(crate) fn kernel(device: &wgpu::Device, module: &wgpu::ShaderModule) -> Kernel {
    Kernel::new(device, module, "bn.copy", "main", BINDINGS)
}
