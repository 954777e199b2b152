//! Batch normalization — forward (training and eval), running statistics and
//! backward — as WGSL compute kernels on [`wgpu`], with PyTorch's semantics
//! (`nn.BatchNorm{1,2,3}d`) and the Keras/ONNX convention as an option.
//!
//! ```
//! use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
//! use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, GradMask, Shape, StatsSource};
//!
//! let ctx = GpuContext::from_env()?; // WGPU_BACKEND / WGPU_ADAPTER_NAME honoured
//! let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3))?;
//! let shape = Shape::channels_first(&[2, 3, 4, 4])?; // (N, C, H, W), NCHW memory
//! let x: Vec<f32> = (0..shape.numel()).map(|i| (i as f32 * 0.37).sin() * 2.0 + 1.0).collect();
//! let dy: Vec<f32> = (0..shape.numel()).map(|i| (i as f32 * 0.11).cos()).collect();
//!
//! // Training forward: y, the saved batch statistics, running statistics updated.
//! let out = bn.forward_train_host(&shape, &x)?;
//! // Eval forward: normalizes with the running statistics.
//! let eval = bn.forward_eval_host(&shape, &x)?;
//! // Backward of the training forward: dx, dgamma, dbeta.
//! let grads = bn.backward_host(&shape, &x, &dy, Some(&out.saved), GradMask::default())?;
//!
//! // The same steps on the f64 CPU reference.
//! let mut reference = ReferenceBatchNorm::new(BatchNormConfig::new(3))?;
//! let ref_train = reference.forward_train(&shape, &x)?;
//! let ref_eval = reference.forward_eval(&shape, &x)?;
//! let ref_grads =
//!     reference.backward(&shape, &x, &dy, StatsSource::Batch, GradMask::default())?;
//!
//! // Largest error, relative to 1 + |reference|.
//! let err = |gpu: &[f32], cpu: &[f64]| {
//!     assert_eq!(gpu.len(), cpu.len());
//!     gpu.iter()
//!         .zip(cpu)
//!         .map(|(&g, &c)| (f64::from(g) - c).abs() / (1.0 + c.abs()))
//!         .fold(0.0, f64::max)
//! };
//! let worst = [
//!     err(&out.y, &ref_train.y),
//!     err(&eval.y, &ref_eval.y),
//!     err(grads.dx.as_deref().unwrap(), ref_grads.dx.as_deref().unwrap()),
//!     err(grads.dgamma.as_deref().unwrap(), ref_grads.dgamma.as_deref().unwrap()),
//!     err(grads.dbeta.as_deref().unwrap(), ref_grads.dbeta.as_deref().unwrap()),
//! ]
//! .into_iter()
//! .fold(0.0, f64::max);
//! assert!(worst < 1e-5, "max error {worst:e}");
//! assert_eq!(bn.state()?.num_batches_tracked, 1);
//! # Ok::<(), wgpu_batchnorm::Error>(())
//! ```
//!
//! # Two ways to call it
//!
//! - **Inside your own GPU pipeline.** [`GpuContext::from_device`] wraps the
//!   `wgpu::Device` and `wgpu::Queue` your application already has (or
//!   [`GpuContext::from_env`] picks an adapter); pipelines are built on first use.
//!   [`BatchNorm::forward_train`], [`BatchNorm::forward_eval`] and
//!   [`BatchNorm::backward`] record into your `wgpu::CommandEncoder`, reading and
//!   writing your buffers (they need `STORAGE` usage, see [`storage_usages`]), or
//!   ranges of them ([`TensorBuffer`]); nothing is submitted or read back. The `*_in_pass` variants record into a
//!   `wgpu::ComputePass` you began. The batch statistics a training forward saves for
//!   its backward live in a [`SavedStats`] buffer; [`GradBuffers`] names the
//!   gradient outputs (a `None` skips that gradient and the work only it needs).
//! - **Host slices in, vectors out.** [`BatchNorm::forward_train_host`],
//!   [`BatchNorm::forward_eval_host`] and [`BatchNorm::backward_host`] upload, run,
//!   wait and read back ([`TrainOutput`], [`ForwardOutput`], [`SavedStatsHost`],
//!   [`Gradients`]), as in the example above.
//!
//! A tensor is described by a [`Shape`]: `(N, C, *spatial)` with 0 to 3 spatial
//! dims, channels-first (NCHW) or channels-last (NHWC) in memory ([`Layout`]). A
//! layer's options are a [`BatchNormConfig`] (PyTorch's names and defaults;
//! [`BatchNormConfig::keras`] for the Keras convention), its parameters and running
//! statistics a [`BatchNormState`] ([`BatchNorm::state`], [`BatchNorm::set_state`]).
//! Every call checks its arguments first and returns a typed [`Error`] before
//! anything is recorded. [`Tuning`] holds the kernels' launch geometry, chosen per
//! adapter.
//!
//! # CPU implementations
//!
//! The [`cpu`] module holds [`cpu::reference`], an f64 implementation written as
//! plainly as possible that every GPU result is tested against, and [`cpu::fast`], a
//! multi-threaded f32 path (f64 per-channel bookkeeping) with the same host API,
//! the baseline of the benchmarks.
//!
//! # Semantics
//!
//! `docs/semantics.md` in the repository is the written contract that all three
//! implementations follow: the formulas of every pass, the running-statistics
//! conventions, the numerics (pivot-shifted sums, Chan merges, the mean kept as a
//! hi/lo pair, a fixed reduction order, so one input gives the same bits on every
//! run on one device), what NaN and ±inf inputs give, and the tolerances the tests
//! assert.
mod config;
mod error;
mod fold;
mod outputs;
mod shape;
mod tensor;
mod tuning;

pub mod cpu;

pub use config::{Activation, BatchNormConfig, BatchNormState, Convention, GradMask, StatsSource};
pub use error::{Error, Result};
pub use fold::{FoldedBatchNorm, WeightLayout};
/// Half precision (`half::f16`), the crate's f16 host element type.
pub use half;
pub use outputs::{Element, ForwardOutput, Gradients, SavedStatsHost, TrainOutput};
pub use shape::{DType, Layout, Shape, MAX_ELEMENTS};
pub use tensor::TensorBuffer;
pub use tuning::{Cut, Tuning};
mod context;
mod context_async;
mod kernels;
mod layer;
mod optimizer;
mod scopes;
#[cfg(target_arch = "wasm32")]
mod serial_pool;

pub use context::{storage_usages, Elementwise, GpuContext, OPTIONAL_FEATURES};
pub use kernels::sources as shader_sources;
pub use kernels::DispatchInfo;
pub use layer::{BatchNorm, GradBuffers, Plan, SavedStats};
pub use optimizer::{AffineOptimizer, Optimizer};

// The Rust code blocks of README.md, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
