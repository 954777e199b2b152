//! Batch normalization as WGSL compute kernels on [`wgpu`].
mod config;
mod error;
mod outputs;
mod shape;
mod tuning;

pub mod cpu;

pub use config::{BatchNormConfig, BatchNormState, Convention, GradMask, StatsSource};
pub use error::{Error, Result};
pub use outputs::{ForwardOutput, Gradients, SavedStatsHost};
pub use shape::{Layout, Shape, MAX_ELEMENTS};
pub use tuning::{Cut, Tuning};
mod context;
mod kernels;
mod layer;

pub use context::{storage_usages, GpuContext, OPTIONAL_FEATURES};
pub use kernels::sources as shader_sources;
pub use layer::{BatchNorm, GradBuffers, SavedStats};
