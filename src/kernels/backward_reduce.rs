//! Host side of `shaders/backward_reduce.wgsl`: per-channel partial sums of the
//! backward over common.rs' walk (split as the forward statistics are).

use super::common::{Pass, SwitchedWalkKernels};
use super::Access;
use super::Module;
use std::sync::Arc;

/// The `override` of backward_reduce.wgsl that builds the pipelines which also sum
/// dy * (x - mean).
const WITH_X: &str = "WITH_X";

/// params, x, dy, saved, partials.
const BINDINGS: &[Access] = &[
    Access::Uniform,
    Access::Read,
    Access::Read,
    Access::Read,
    Access::ReadWrite,
];

/// The entry points of backward_reduce.wgsl, twice: `get(&[true])` also sums
/// dy * (x - mean), `get(&[false])` sums dy only and does not read x.
pub(crate) fn kernels(module: &Arc<Module>) -> SwitchedWalkKernels {
    SwitchedWalkKernels::new(
        module,
        "bn.backward_reduce",
        BINDINGS,
        Pass::Sums,
        &[WITH_X],
        &[&[false], &[true]],
    )
}
