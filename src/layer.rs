//! The batch-norm layer: its state on the GPU and the calls that record its kernels.

use crate::context::GpuContext;
use crate::kernels::{
    apply, backward_dx, backward_finalize, binding, common, finalize, stats, whole, BindGroups,
    DispatchInfo, Flavor, Kernel, Kernels, Recipe, WORKGROUP_SIZE,
};
// The host types serve the blocking host calls, which the web does not have.
#[cfg_attr(target_arch = "wasm32", allow(unused_imports))]
use crate::{
    BatchNormConfig, BatchNormState, Convention, Element, Error, ForwardOutput, GradMask,
    Gradients, Result, SavedStatsHost, Shape, TensorBuffer, TrainOutput,
};
use std::sync::atomic::{AtomicBool, Ordering};

mod host_async;

/// Where the normalize pass takes its coefficients from.
#[derive(Clone, Copy)]
enum Coefficients {
    /// `coef`, as `finalize` (batch statistics) wrote it.
    Finalized,
    /// The running statistics and gamma/beta (the eval forward of a small tensor).
    Running,
}

/// Per-channel vectors are stored in segments of C rounded up to 4, so that
/// channels-last kernels can read four channels as one vec4.
fn padded(channels: usize) -> usize {
    channels.next_multiple_of(4)
}

/// Batch statistics of one forward pass, kept on the GPU for its backward
/// (PyTorch's `save_mean`/`save_invstd`).
///
/// The buffer holds four segments of [`SavedStats::stride`] f32 each:
/// `[mean | invstd | hi | lo]`: `mean` is the f32 nearest the batch mean (PyTorch's
/// `save_mean`), and `hi + lo` is the mean to about twice f32's precision (`hi` a
/// value of the batch, `lo` the mean of `x - hi`), which the backward uses. Create
/// one per forward whose backward you will run.
///
/// A backward refuses statistics that no training forward (or eval forward with
/// batch statistics) was recorded into and that were not loaded from the host
/// ([`Error::MissingSavedStats`]): fresh ones hold zeros, which would give wrong
/// gradients without a word.
pub struct SavedStats {
    buffer: wgpu::Buffer,
    channels: usize,
    filled: AtomicBool,
}

impl SavedStats {
    /// Zeroed statistics for `channels` channels (16 bytes each, which must fit in
    /// one storage binding on the device).
    pub fn new(ctx: &GpuContext, channels: usize) -> Result<Self> {
        let bytes = Self::checked_bytes(ctx, channels)?;
        Ok(Self {
            buffer: ctx.storage_buffer("bn.saved", bytes)?,
            channels,
            filled: AtomicBool::new(false),
        })
    }

    /// Uploads host statistics (e.g. PyTorch's `save_mean`/`save_invstd`, with zeros
    /// for `mean_lo`).
    pub fn from_host(ctx: &GpuContext, saved: &SavedStatsHost) -> Result<Self> {
        let c = saved.mean.len();
        for (name, v) in [("invstd", &saved.invstd), ("mean_lo", &saved.mean_lo)] {
            if v.len() != c {
                return Err(Error::LengthMismatch {
                    name,
                    expected: c,
                    got: v.len(),
                });
            }
        }
        Self::checked_bytes(ctx, c)?;
        let p = padded(c);
        let mut data = vec![0f32; 4 * p];
        data[..c].copy_from_slice(&saved.mean);
        data[p..p + c].copy_from_slice(&saved.invstd);
        data[2 * p..2 * p + c].copy_from_slice(&saved.mean);
        data[3 * p..3 * p + c].copy_from_slice(&saved.mean_lo);
        Ok(Self {
            buffer: ctx.upload("bn.saved", &data)?,
            channels: c,
            filled: AtomicBool::new(true),
        })
    }

    /// Bytes of the buffer for `channels` channels (four segments of the padded
    /// channel count), after checking that one storage binding can hold them.
    fn checked_bytes(ctx: &GpuContext, channels: usize) -> Result<u64> {
        let bytes = 16 * padded(channels) as u64;
        ctx.check_size("saved statistics", bytes)?;
        Ok(bytes)
    }

    /// The GPU buffer (`[mean | invstd | hi | lo]`, segments [`Self::stride`] apart).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Channel count.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Whether a forward was recorded into these statistics or they were loaded from
    /// the host (a backward needs one or the other).
    pub fn is_filled(&self) -> bool {
        self.filled.load(Ordering::Relaxed)
    }

    /// Marks the statistics as filled: for a buffer written by other means (e.g.
    /// copied from PyTorch's `save_mean`/`save_invstd` on the GPU, in the layout of
    /// [`Self::buffer`]).
    pub fn mark_filled(&self) {
        self.filled.store(true, Ordering::Relaxed);
    }

    /// Distance in f32 between the buffer's segments (channels rounded up to 4).
    pub fn stride(&self) -> usize {
        padded(self.channels)
    }

    /// The bytes its kernels bind: the whole buffer.
    fn range(&self) -> (&wgpu::Buffer, u64, u64) {
        (&self.buffer, 0, self.buffer.size())
    }

    /// Reads the statistics back to the host (submits and waits; on the web:
    /// [`Self::to_host_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn to_host(&self, ctx: &GpuContext) -> Result<SavedStatsHost> {
        pollster::block_on(self.to_host_async(ctx))
    }
}

/// Output buffers of a recorded backward pass; `None` skips that gradient and the
/// work only it needs.
///
/// ```no_run
/// # fn demo(dx: &wgpu::Buffer, dgamma: &wgpu::Buffer, dbeta: &wgpu::Buffer) {
/// use wgpu_batchnorm::GradBuffers;
/// let all = GradBuffers::new().dx(dx).dgamma(dgamma).dbeta(dbeta);
/// let params_only = GradBuffers::new().dgamma(dgamma).dbeta(dbeta).accumulate(true);
/// # }
/// ```
#[derive(Clone, Copy, Default)]
pub struct GradBuffers<'a> {
    /// Receives `dx` (same shape and layout as `x`).
    pub dx: Option<TensorBuffer<'a>>,
    /// Receives `dgamma` (C f32).
    pub dgamma: Option<TensorBuffer<'a>>,
    /// Receives `dbeta` (C f32).
    pub dbeta: Option<TensorBuffer<'a>>,
    /// Add `dgamma`/`dbeta` to the buffers' contents (as PyTorch accumulates into
    /// `.grad`) instead of overwriting them (the default, like the functional
    /// backward). `dx` is always overwritten.
    pub accumulate: bool,
    /// The forward's output `y` (read): the backward of a layer with an
    /// activation masks `dy` with it.
    pub output: Option<TensorBuffer<'a>>,
    /// Receives `dz`, the gradient of the residual of an `*_add` forward (x's shape):
    /// the backward of `act(bn(x) + z)`.
    pub dz: Option<TensorBuffer<'a>>,
}

impl<'a> GradBuffers<'a> {
    /// No outputs (then the backward records nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Computes `dx` into `dx` (a buffer, slice or binding).
    pub fn dx(self, dx: impl Into<TensorBuffer<'a>>) -> Self {
        Self {
            dx: Some(dx.into()),
            ..self
        }
    }

    /// Computes `dgamma` into `dgamma`.
    pub fn dgamma(self, dgamma: impl Into<TensorBuffer<'a>>) -> Self {
        Self {
            dgamma: Some(dgamma.into()),
            ..self
        }
    }

    /// Computes `dbeta` into `dbeta`.
    pub fn dbeta(self, dbeta: impl Into<TensorBuffer<'a>>) -> Self {
        Self {
            dbeta: Some(dbeta.into()),
            ..self
        }
    }

    /// Adds `dgamma`/`dbeta` to the buffers' contents instead of overwriting them.
    pub fn accumulate(self, accumulate: bool) -> Self {
        Self { accumulate, ..self }
    }

    /// The forward's output `y`, which the backward of a layer with an activation
    /// needs ([`crate::Activation`]).
    pub fn output(self, y: impl Into<TensorBuffer<'a>>) -> Self {
        Self {
            output: Some(y.into()),
            ..self
        }
    }

    /// Computes the residual's gradient `dz` into `dz`: the backward of an `*_add`
    /// forward (`act(bn(x) + z)`).
    pub fn dz(self, dz: impl Into<TensorBuffer<'a>>) -> Self {
        Self {
            dz: Some(dz.into()),
            ..self
        }
    }
}

/// A batch-normalization layer on the GPU: PyTorch's `BatchNorm{1,2,3}d` with its
/// options, for every layout of [`Shape`].
///
/// The learnable parameters and running statistics live in GPU buffers owned by
/// the layer ([`Self::affine_buffer`], [`Self::running_buffer`]); read and write
/// them with [`Self::state`] / [`Self::set_state`].
///
/// Two ways to call it:
/// - record into your own command encoder (`forward_train`, `forward_eval`,
///   `backward`) or compute pass (`*_in_pass`) on your buffers: nothing is
///   submitted or read back;
/// - host slices in, host vectors out (`*_host`): uploads, submits, waits, reads back.
///
/// ```no_run
/// use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, Shape};
/// let ctx = GpuContext::from_env()?;
/// let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3))?;
/// let shape = Shape::channels_first(&[2, 3, 4, 4])?;
/// let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32).collect();
/// let out = bn.forward_train_host(&shape, &x)?;
/// assert_eq!(out.y.len(), x.len());
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
pub struct BatchNorm {
    ctx: GpuContext,
    config: BatchNormConfig,
    affine: wgpu::Buffer,
    running: wgpu::Buffer,
    coef: wgpu::Buffer,
    scratch_saved: SavedStats,
    scratch_grads: [wgpu::Buffer; 2],
    partials: wgpu::Buffer,
    bind_groups: BindGroups,
}

impl BatchNorm {
    /// A layer with PyTorch's initial state (`gamma = 1`, `beta = 0`,
    /// `running_mean = 0`, `running_var = 1`).
    pub fn new(ctx: &GpuContext, config: BatchNormConfig) -> Result<Self> {
        let state = BatchNormState::new(&config);
        Self::with_state(ctx, config, &state)
    }

    /// A layer starting from `state` (e.g. a checkpoint; its `num_batches_tracked`
    /// must fit the GPU's 32-bit counter).
    pub fn with_state(
        ctx: &GpuContext,
        config: BatchNormConfig,
        state: &BatchNormState,
    ) -> Result<Self> {
        config.validate()?;
        Self::check_state(&config, state)?;
        let c = config.num_features;
        let p = padded(c) as u64;
        // The largest of the per-channel buffers (coef, saved, partials) holds 16
        // bytes a channel.
        ctx.check_size("per-channel state", 16 * p)?;
        let layer = Self {
            affine: ctx.storage_buffer("bn.affine", 2 * p * 4)?,
            running: ctx.storage_buffer("bn.running", (2 * p + 1) * 4)?,
            coef: ctx.coefficient_buffer("bn.coef", 4 * p * 4)?,
            scratch_saved: SavedStats::new(ctx, c)?,
            scratch_grads: [
                ctx.storage_buffer("bn.scratch_dgamma", p * 4)?,
                ctx.storage_buffer("bn.scratch_dbeta", p * 4)?,
            ],
            partials: ctx.storage_buffer("bn.partials", 16 * p)?,
            bind_groups: BindGroups::default(),
            ctx: ctx.clone(),
            config,
        };
        layer.write_state(state)?;
        Ok(layer)
    }

    /// Lets the layer keep up to `capacity` of the bind groups its dispatches use
    /// (0, the default: none, each recorded dispatch makes its own). Recording an
    /// operation then makes a bind group only where the layer has none for the
    /// same pipeline and buffer ranges, so a training loop's later steps on the
    /// same tensors make none (a training step binds four or five dispatches:
    /// forward, backward, eval); past `capacity` the layer starts over. Each kept
    /// bind group holds its buffers alive: for tensors that live through the
    /// loop, not for a loop that allocates new ones every step (its old tensors
    /// would stay alive until the layer starts over or
    /// [`Self::clear_bind_groups`]).
    pub fn keep_bind_groups(&self, capacity: usize) {
        self.bind_groups.set_capacity(capacity);
    }

    /// Bind groups the layer keeps ([`Self::keep_bind_groups`]).
    pub fn cached_bind_groups(&self) -> usize {
        self.bind_groups.len()
    }

    /// Drops the layer's cached bind groups, and with them its hold on the
    /// buffers they bind (e.g. after dropping tensors it was used on).
    pub fn clear_bind_groups(&self) {
        self.bind_groups.clear();
    }

    /// The layer's options.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The context the layer runs on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// `[gamma | beta]`, two segments of [`Self::stride`] f32 (unused without `affine`).
    pub fn affine_buffer(&self) -> &wgpu::Buffer {
        &self.affine
    }

    /// `[running_mean | running_var | num_batches_tracked]`: two segments of
    /// [`Self::stride`] f32, then the counter as one u32 (it stops at 2^32 - 1).
    pub fn running_buffer(&self) -> &wgpu::Buffer {
        &self.running
    }

    /// Distance in f32 between the segments of the layer's buffers (C rounded up to 4).
    pub fn stride(&self) -> usize {
        padded(self.config.num_features)
    }

    /// Reads parameters and running statistics back (submits and waits; on the web:
    /// [`Self::state_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn state(&self) -> Result<BatchNormState> {
        pollster::block_on(self.state_async())
    }

    /// Overwrites parameters and running statistics (through the queue: it takes
    /// effect before the next submission's commands). `num_batches_tracked` must
    /// fit the GPU's 32-bit counter.
    pub fn set_state(&mut self, state: &BatchNormState) -> Result<()> {
        Self::check_state(&self.config, state)?;
        self.write_state(state)
    }

    fn check_state(config: &BatchNormConfig, state: &BatchNormState) -> Result<()> {
        state.validate(config)?;
        if state.num_batches_tracked > u64::from(u32::MAX) {
            return Err(Error::BatchCountTooLarge(state.num_batches_tracked));
        }
        Ok(())
    }

    fn write_state(&self, state: &BatchNormState) -> Result<()> {
        let (c, p) = (self.config.num_features, self.stride());
        let mut affine = vec![0f32; 2 * p];
        if self.config.affine {
            affine[..c].copy_from_slice(&state.gamma);
            affine[p..p + c].copy_from_slice(&state.beta);
        }
        let mut running = vec![0u32; 2 * p + 1];
        if self.config.track_running_stats {
            for i in 0..c {
                running[i] = state.running_mean[i].to_bits();
                running[p + i] = state.running_var[i].to_bits();
            }
            running[2 * p] = state.num_batches_tracked as u32;
        }
        self.ctx
            .write(&self.affine, bytemuck::cast_slice(&affine))?;
        self.ctx
            .write(&self.running, bytemuck::cast_slice(&running))
    }

    // ----- validation -------------------------------------------------------------

    fn check_shape(&self, shape: &Shape, batch_stats: bool) -> Result<()> {
        if shape.c() != self.config.num_features {
            return Err(Error::ChannelMismatch {
                expected: self.config.num_features,
                got: shape.c(),
            });
        }
        if batch_stats && shape.per_channel() <= 1 {
            return Err(Error::SingleValuePerChannel {
                dims: shape.dims().to_vec(),
            });
        }
        Ok(())
    }

    fn check_saved(&self, saved: &SavedStats) -> Result<()> {
        if saved.channels != self.config.num_features {
            return Err(Error::SavedStatsMismatch {
                expected: self.config.num_features,
                got: saved.channels,
            });
        }
        Ok(())
    }

    /// Fails unless the partial results of the reduction `pass` over `shape` fit in
    /// one storage binding (they are at most a few per element position).
    fn check_partials(&self, shape: &Shape, pass: common::Pass) -> Result<()> {
        self.ctx
            .check_size("partial results", self.partial_bytes(shape, pass))
    }

    /// Bytes of the partials a reduction `pass` over `shape` writes, in whichever
    /// walk it takes (its own, or where the tuning merges partials the merged one's).
    fn partial_bytes(&self, shape: &Shape, pass: common::Pass) -> u64 {
        let c = self.config.num_features;
        let mut count = self.reduce_walk(shape, pass).partial_count(c);
        if self.merges_partials() {
            count = count.max(self.merged_walks(shape, pass).0.partial_count(c));
        }
        count.max(1) * 16
    }

    /// Grows the partials buffer to what the reduction `pass` over `shape` needs
    /// (after the checks, before anything is recorded).
    fn reserve_partials(&mut self, shape: &Shape, pass: common::Pass) -> Result<()> {
        let bytes = self.partial_bytes(shape, pass);
        if self.partials.size() < bytes {
            self.partials = self.ctx.storage_buffer("bn.partials", bytes)?;
            // No cached bind group keeps the old buffer alive.
            self.bind_groups.clear();
        }
        Ok(())
    }

    /// Fails if a buffer that is written appears twice among a call's tensors, or
    /// any of them is one of the layer's own buffers (which its kernels bind too).
    /// Each entry: a tensor's name, its bytes (buffer, offset, length) and whether
    /// the call writes it. wgpu refuses a buffer bound writable and otherwise in one
    /// dispatch, but not twice writable: written tensors may share a buffer where
    /// their ranges do not overlap (every dispatch binds those writable).
    fn check_aliasing(&self, buffers: &[TensorUse<'_>]) -> Result<()> {
        let own = [
            ("the layer's gamma/beta (affine_buffer)", &self.affine),
            (
                "the layer's running statistics (running_buffer)",
                &self.running,
            ),
            ("the layer's coefficients", &self.coef),
            ("the layer's partial results", &self.partials),
            ("the layer's scratch statistics", &self.scratch_saved.buffer),
            ("the layer's scratch dgamma", &self.scratch_grads[0]),
            ("the layer's scratch dbeta", &self.scratch_grads[1]),
        ];
        for (a, range, _) in buffers {
            if let Some((buffer, _, _)) = range {
                if let Some((b, _)) = own.iter().find(|(_, o)| *o == *buffer) {
                    return Err(Error::AliasedBuffers { a, b });
                }
            }
        }
        for (i, (a, ra, wa)) in buffers.iter().enumerate() {
            for (b, rb, wb) in &buffers[i + 1..] {
                let (Some((ba, oa, na)), Some((bb, ob, nb))) = (ra, rb) else {
                    continue;
                };
                let overlap = oa < &(ob + nb) && ob < &(oa + na);
                let conflict = match (wa, wb) {
                    (true, true) => overlap,
                    (false, false) => false,
                    _ => true,
                };
                if ba == bb && conflict {
                    return Err(Error::AliasedBuffers { a, b });
                }
            }
        }
        Ok(())
    }

    /// Checks a forward's arguments; `saved` is used (checked when given), written,
    /// and so must not alias x or y, only when batch statistics are used.
    fn check_forward(
        &self,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        saved: Option<&SavedStats>,
        batch_stats: bool,
    ) -> Result<()> {
        self.ctx.check_device()?;
        self.check_shape(shape, batch_stats)?;
        self.ctx.check_tensor("x", x, shape.bytes())?;
        if let Some(z) = z {
            self.ctx.check_tensor("z", z, shape.bytes())?;
        }
        self.ctx.check_tensor("y", y, shape.bytes())?;
        let saved = saved.filter(|_| batch_stats);
        if let Some(s) = saved {
            self.check_saved(s)?;
        }
        if batch_stats {
            self.check_partials(shape, common::Pass::Statistics)?;
        }
        let bytes = shape.bytes();
        self.check_aliasing(&[
            ("x", Some(range(x, bytes)), false),
            ("z", z.map(|z| range(z, bytes)), false),
            ("y", Some(range(y, bytes)), true),
            ("saved", saved.map(SavedStats::range), true),
        ])?;
        self.fused_kernels(shape, z.is_some()).map(|_| ())
    }

    /// The pipelines of this layer's activation, with or without a residual (plain
    /// batch norm's for neither).
    fn fused_kernels(&self, shape: &Shape, residual: bool) -> Result<&Kernels> {
        let flavor = Flavor {
            elem: self.ctx.elem(shape.dtype()),
            act: self.config.activation,
            residual,
            subgroups: self.subgroups(),
        };
        self.ctx.kernels().fused(self.ctx.device(), flavor)
    }

    /// Whether the reductions merge within subgroups (the tuning asks for it and
    /// the device has them).
    fn subgroups(&self) -> bool {
        self.ctx.tuning().subgroups
            && self
                .ctx
                .device()
                .features()
                .contains(wgpu::Features::SUBGROUP)
    }

    /// Plain batch norm's pipelines for the shape's element type (the kernels that
    /// read a tensor but write no output of the activation: the statistics, and
    /// the dx pass after a residual's sums).
    fn plain_kernels(&self, shape: &Shape) -> Result<&Kernels> {
        let flavor = Flavor {
            elem: self.ctx.elem(shape.dtype()),
            subgroups: self.subgroups(),
            ..Flavor::NONE
        };
        self.ctx.kernels().fused(self.ctx.device(), flavor)
    }

    // ----- forward ----------------------------------------------------------------

    /// Records a training-mode forward into `encoder`: batch statistics, `y`, the
    /// saved statistics into `saved`, and (with `track_running_stats`) the running
    /// statistics and `num_batches_tracked`. `x` and `y` are f32 tensors of `shape`
    /// in STORAGE buffers (whole buffers, slices or bindings: [`TensorBuffer`]); `y`
    /// must not share a buffer with `x`, `saved` or the layer's own buffers.
    pub fn forward_train<'a>(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: &SavedStats,
    ) -> Result<()> {
        self.plan_forward_train(shape, x, y, saved)?
            .record_into(encoder);
        Ok(())
    }

    /// The dispatches of [`Self::forward_train`], checked and with their pipelines
    /// built, to inspect ([`Plan::dispatches`]) or record ([`Plan::record`], one
    /// dispatch at a time with [`Plan::record_dispatch`]).
    pub fn plan_forward_train<'p, 'a>(
        &'p mut self,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: &'p SavedStats,
    ) -> Result<Plan<'p>> {
        self.plan_train(shape, x.into(), None, y.into(), saved)
    }

    /// A training forward with a residual: `y = act(bn(x) + z)` (the layer's
    /// activation, [`crate::Activation`]), `z` a tensor of x's shape and layout,
    /// added in the normalize pass (cuDNN's `BN_ADD_ACTIVATION`, a ResNet block's
    /// `relu(bn(conv(x)) + identity)`). Otherwise as [`Self::forward_train`]; its
    /// backward passes a [`GradBuffers::dz`].
    pub fn forward_train_add<'a>(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        z: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: &SavedStats,
    ) -> Result<()> {
        self.plan_forward_train_add(shape, x, z, y, saved)?
            .record_into(encoder);
        Ok(())
    }

    /// The dispatches of [`Self::forward_train_add`].
    pub fn plan_forward_train_add<'p, 'a>(
        &'p mut self,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        z: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: &'p SavedStats,
    ) -> Result<Plan<'p>> {
        self.plan_train(shape, x.into(), Some(z.into()), y.into(), saved)
    }

    fn plan_train<'p>(
        &'p mut self,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        saved: &'p SavedStats,
    ) -> Result<Plan<'p>> {
        self.prepare_forward(shape, x, z, y, Some(saved), true)?;
        self.plan("bn.forward_train", Some(saved), |this, rec| {
            let update = this.config.track_running_stats;
            this.record_batch_forward(rec, shape, x, z, y, &saved.buffer, update)
        })
    }

    /// [`Self::forward_train`] recorded into a compute pass the caller has begun
    /// (e.g. one with timestamp writes).
    pub fn forward_train_in_pass<'a>(
        &mut self,
        pass: &mut wgpu::ComputePass<'_>,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: &SavedStats,
    ) -> Result<()> {
        self.plan_forward_train(shape, x, y, saved)?.record(pass);
        Ok(())
    }

    /// Records an eval-mode forward: with `track_running_stats` it normalizes with
    /// the running statistics (and `saved` is ignored); without, it uses batch
    /// statistics, written to `saved` when given, and updates nothing.
    pub fn forward_eval<'a>(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: Option<&SavedStats>,
    ) -> Result<()> {
        self.plan_forward_eval(shape, x, y, saved)?
            .record_into(encoder);
        Ok(())
    }

    /// The dispatches of [`Self::forward_eval`] (see [`Self::plan_forward_train`]).
    pub fn plan_forward_eval<'p, 'a>(
        &'p mut self,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: Option<&'p SavedStats>,
    ) -> Result<Plan<'p>> {
        self.plan_eval(shape, x.into(), None, y.into(), saved)
    }

    /// An eval forward with a residual: `y = act(bn(x) + z)` (see
    /// [`Self::forward_train_add`]); otherwise as [`Self::forward_eval`].
    pub fn forward_eval_add<'a>(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        z: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: Option<&SavedStats>,
    ) -> Result<()> {
        self.plan_forward_eval_add(shape, x, z, y, saved)?
            .record_into(encoder);
        Ok(())
    }

    /// The dispatches of [`Self::forward_eval_add`].
    pub fn plan_forward_eval_add<'p, 'a>(
        &'p mut self,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        z: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: Option<&'p SavedStats>,
    ) -> Result<Plan<'p>> {
        self.plan_eval(shape, x.into(), Some(z.into()), y.into(), saved)
    }

    fn plan_eval<'p>(
        &'p mut self,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        saved: Option<&'p SavedStats>,
    ) -> Result<Plan<'p>> {
        let batch_stats = !self.config.track_running_stats;
        self.prepare_forward(shape, x, z, y, saved, batch_stats)?;
        let filled = saved.filter(|_| batch_stats);
        self.plan("bn.forward_eval", filled, |this, rec| {
            this.record_forward_eval(rec, shape, x, z, y, saved)
        })
    }

    /// [`Self::forward_eval`] recorded into a compute pass the caller has begun.
    pub fn forward_eval_in_pass<'a>(
        &mut self,
        pass: &mut wgpu::ComputePass<'_>,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        y: impl Into<TensorBuffer<'a>>,
        saved: Option<&SavedStats>,
    ) -> Result<()> {
        self.plan_forward_eval(shape, x, y, saved)?.record(pass);
        Ok(())
    }

    /// Builds the plan of an operation: its dispatches (from `record`), then every
    /// pipeline they need (a typed error, before anything is recorded, if one cannot
    /// be built on this device).
    /// `fills`: saved statistics the operation writes, marked filled once it is
    /// recorded.
    fn plan<'s>(
        &'s self,
        label: &'static str,
        fills: Option<&'s SavedStats>,
        record: impl FnOnce(&'s Self, &mut Recipe<'s>) -> Result<()>,
    ) -> Result<Plan<'s>> {
        let mut recipe = Recipe::new();
        record(self, &mut recipe)?;
        recipe.build(self.ctx.device())?;
        Ok(Plan {
            recipe,
            device: self.ctx.device(),
            bind_groups: &self.bind_groups,
            label,
            fills,
        })
    }

    /// Checks a forward's arguments, then makes room for its partial results.
    fn prepare_forward(
        &mut self,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        saved: Option<&SavedStats>,
        batch_stats: bool,
    ) -> Result<()> {
        self.check_forward(shape, x, z, y, saved, batch_stats)?;
        if batch_stats {
            self.reserve_partials(shape, common::Pass::Statistics)?;
        }
        Ok(())
    }

    fn record_forward_eval<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        saved: Option<&SavedStats>,
    ) -> Result<()> {
        if self.config.track_running_stats {
            // Small tensors in one dispatch (see `Tuning::fused_eval_max_elements`),
            // and any tensor on a device that cannot bind finalize's buffers.
            let fold_fits = self.ctx.kernels().finalize.eval.fits(self.ctx.device());
            if shape.numel() as u64 <= self.ctx.tuning().fused_eval_max_elements || !fold_fits {
                self.record_apply(pass, shape, x, z, y, Coefficients::Running)
            } else {
                self.record_fold_running(pass);
                self.record_apply(pass, shape, x, z, y, Coefficients::Finalized)
            }
        } else {
            let target = saved.unwrap_or(&self.scratch_saved).buffer.clone();
            self.record_batch_forward(pass, shape, x, z, y, &target, false)
        }
    }

    /// A forward with batch statistics: in one dispatch where the tuning asks for
    /// it (`fused_forward_max_elements`) and the fused kernel serves the walk (every
    /// workgroup holds whole channels, and the running statistics, if updated, are
    /// not a cumulative average, which reads the batch count); else statistics
    /// and finalize (one dispatch where the finalized statistics serve the walk, on
    /// the same terms), then normalize.
    #[allow(clippy::too_many_arguments)]
    fn record_batch_forward<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        saved: &wgpu::Buffer,
        update_running: bool,
    ) -> Result<()> {
        let fusable = self.finalizes_in_place(update_running)
            && shape.numel() as u64 <= self.ctx.tuning().fused_forward_max_elements;
        let device = self.ctx.device();
        // The kernels that write y: those of the layer's activation and residual.
        let out = self.fused_kernels(shape, z.is_some())?;
        let residual = z;
        let z = z.map(|z| z.binding(shape.bytes()));
        let fused = fusable
            .then(|| self.stats_walk(shape, update_running, common::Pass::FusedForward))
            .and_then(|plan| Some((plan, out.stats.fused(&plan)?)))
            .filter(|(_, kernel)| kernel.fits(device));
        if let Some((plan, fused)) = fused {
            let y = y.binding(shape.bytes());
            self.record_whole_channels(
                pass,
                fused,
                &plan,
                shape,
                x,
                y,
                saved,
                update_running,
                z.as_slice(),
            );
        } else if let Some((plan, ep, merged)) = self.merged_forward(out, shape, update_running) {
            let partials = self.record_stats_partials(pass, shape, x, &plan)?;
            let fp = self.finalize_params(
                plan.partials_per_channel(),
                shape.per_channel(),
                update_running,
            );
            let kernels = self.ctx.kernels();
            let (params, fparams) = (
                kernels.uniform(device, &ep.params),
                kernels.uniform(device, &fp),
            );
            let resources = [
                whole(&params),
                x.binding(shape.bytes()),
                y.binding(shape.bytes()),
                partials,
                whole(&self.affine),
                whole(&fparams),
                whole(saved),
                whole(&self.running),
            ];
            merged.dispatch_merging(
                pass,
                &[&resources[..], z.as_slice()].concat(),
                ep.workgroups(),
                self.rereads(&plan, &ep),
            );
        } else {
            self.record_batch_stats(pass, shape, x, saved, update_running)?;
            self.record_apply(pass, shape, x, residual, y, Coefficients::Finalized)?;
        }
        Ok(())
    }

    /// Where a forward with batch statistics takes two dispatches on a GPU cut
    /// although its statistics split: the statistics' walk and its partials (the
    /// statistics not finalized in place, nor in 16-element units), the
    /// elementwise walk, and the merged normalize for it (channels-first with one
    /// channel per unit, or [`Self::merged_walks`]' channels-last walks) that the
    /// device can bind.
    fn merged_forward<'k>(
        &self,
        out: &'k Kernels,
        shape: &Shape,
        update_running: bool,
    ) -> Option<(common::WalkPlan, common::WalkPlan, &'k Kernel)> {
        let kernels = self.ctx.kernels();
        let own = self.stats_walk(shape, update_running, common::Pass::Statistics);
        let in_place =
            self.finalizes_in_place(update_running) && kernels.stats.finalized(&own).is_some();
        let (plan, ep) = self.merged_walks(shape, common::Pass::Statistics);
        let plan = self.counting(plan, update_running);
        if in_place || plan.unit_pairs() != 0 {
            return None;
        }
        let merged = self.merged_kernel(&out.apply_merged, &ep)?;
        Some((plan, ep, merged))
    }

    /// The merged kernel of `set` (apply's normalize or backward_dx's dx) for the
    /// elementwise walk `ep`, where the tuning merges partials on a GPU cut, the
    /// kernel has that walk, its tile's channels fit a workgroup and the device can
    /// bind it.
    fn merged_kernel<'k>(
        &self,
        set: &'k common::VariantKernels,
        ep: &common::WalkPlan,
    ) -> Option<&'k Kernel> {
        if !self.merges_partials() {
            return None;
        }
        let merged = set.get(ep.variant)?;
        let fits = merged.fits(self.ctx.device()) && common::merged_channels(ep) <= WORKGROUP_SIZE;
        fits.then_some(merged)
    }

    /// Whether elementwise passes may merge their reduction's partials: the tuning
    /// asks for it, on a GPU's elementwise cut.
    fn merges_partials(&self) -> bool {
        let tuning = self.ctx.tuning();
        tuning.merge_partials && tuning.elementwise.lane_block == 0
    }

    /// The walks of an operation whose elementwise pass merges the partials of its
    /// reduction (`pass`): channels-last on a GPU cut, common.rs'
    /// `plan_merged_rows` (tiles of 16 channels in both, splits that bound the
    /// partials re-read); else the reduction's and the elementwise pass's own.
    fn merged_walks(
        &self,
        shape: &Shape,
        pass: common::Pass,
    ) -> (common::WalkPlan, common::WalkPlan) {
        let t = self.ctx.tuning();
        common::plan_merged_rows(shape, self.stride() as u32, t.reduce, t.elementwise)
            .unwrap_or_else(|| (self.reduce_walk(shape, pass), self.elementwise_walk(shape)))
    }

    /// Bytes of partials that the workgroups of a merged elementwise walk `ep` read
    /// again (beyond one read of each): every workgroup of a tile reads its
    /// channels' partials from the reduction `plan`.
    fn rereads(&self, plan: &common::WalkPlan, ep: &common::WalkPlan) -> u64 {
        u64::from(ep.params.splits - 1)
            * self.config.num_features as u64
            * u64::from(plan.partials_per_channel())
            * 16
    }

    fn finalize_params(
        &self,
        splits: u32,
        m: usize,
        update_running: bool,
    ) -> finalize::FinalizeParams {
        let cfg = &self.config;
        let mut flags = 0;
        if update_running {
            flags |= finalize::UPDATE_RUNNING;
        }
        if cfg.affine {
            flags |= finalize::AFFINE;
        }
        if cfg.momentum.is_none() {
            flags |= finalize::CUMULATIVE;
        }
        if cfg.unbiased_running_var() {
            flags |= finalize::UNBIASED;
        }
        let momentum = match (cfg.momentum, cfg.convention) {
            (None, _) => 0.0,
            (Some(v), Convention::PyTorch) => v,
            (Some(v), Convention::Keras) => (1.0 - v as f64) as f32,
        };
        let m = m as f64;
        finalize::FinalizeParams {
            channels: cfg.num_features as u32,
            splits,
            padded: self.stride() as u32,
            flags,
            eps: cfg.eps,
            momentum,
            count: m as f32,
            unbias: if m > 1.0 { (m / (m - 1.0)) as f32 } else { 1.0 },
            count_index: 2 * self.stride() as u32,
            unit_pairs: 0,
            _pad: [0; 2],
        }
    }

    /// How a reduction (`pass`: the statistics or the backward sums) walks `shape`
    /// on this device.
    fn reduce_walk(&self, shape: &Shape, pass: common::Pass) -> common::WalkPlan {
        common::plan(shape, self.stride() as u32, self.ctx.tuning().reduce, pass)
    }

    /// How an elementwise pass walks `shape` on this device.
    fn elementwise_walk(&self, shape: &Shape) -> common::WalkPlan {
        common::plan(
            shape,
            self.stride() as u32,
            self.ctx.tuning().elementwise,
            common::Pass::Elementwise,
        )
    }

    /// The statistics pass's walk of `shape` (`pass`: `Statistics`, or `FusedForward`
    /// for the fused kernel), counting the batch when the running statistics are
    /// updated.
    fn stats_walk(
        &self,
        shape: &Shape,
        update_running: bool,
        pass: common::Pass,
    ) -> common::WalkPlan {
        self.counting(self.reduce_walk(shape, pass), update_running)
    }

    /// The statistics walk `plan`, counting the batch when the running statistics
    /// are updated.
    fn counting(&self, mut plan: common::WalkPlan, update_running: bool) -> common::WalkPlan {
        if update_running {
            plan.params.flags = stats::COUNT_BATCH;
        }
        plan.params.count_index = 2 * self.stride() as u32;
        plan
    }

    fn channel_workgroups(&self) -> u32 {
        (self.config.num_features as u32).div_ceil(WORKGROUP_SIZE)
    }

    /// Invocations per channel of the merges of partials on this tuning.
    fn merge_lanes(&self) -> u32 {
        common::merge_lanes(self.ctx.tuning().reduce)
    }

    /// Workgroups of a merge of partials.
    fn merge_workgroups(&self) -> u32 {
        let per_workgroup = WORKGROUP_SIZE / self.merge_lanes();
        (self.config.num_features as u32).div_ceil(per_workgroup)
    }

    /// The coefficients' bytes in their buffer (which is at least as long as the
    /// uniform window).
    fn coef_binding(&self) -> wgpu::BufferBinding<'_> {
        binding(&self.coef, 16 * self.stride() as u64)
    }

    /// The partials buffer, which [`Self::reserve_partials`] made large enough for
    /// `count` vec4.
    fn partials(&self, count: u64) -> wgpu::Buffer {
        debug_assert!(self.partials.size() >= count.max(1) * 16);
        self.partials.clone()
    }

    /// Records a kernel of stats.wgsl whose workgroups hold whole channels (the fused
    /// forward, or the finalized statistics), writing `out` at binding 2 (y, or the
    /// coefficients).
    #[allow(clippy::too_many_arguments)]
    fn record_whole_channels<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        kernel: &'s Kernel,
        plan: &common::WalkPlan,
        shape: &Shape,
        x: TensorBuffer<'_>,
        out: wgpu::BufferBinding<'_>,
        saved: &wgpu::Buffer,
        update_running: bool,
        fused: &[wgpu::BufferBinding<'_>],
    ) {
        let kernels = self.ctx.kernels();
        let device = self.ctx.device();
        let fp = self.finalize_params(1, shape.per_channel(), update_running);
        let (params, fparams) = (
            kernels.uniform(device, &plan.params),
            kernels.uniform(device, &fp),
        );
        let resources = [
            whole(&params),
            x.binding(shape.bytes()),
            out,
            whole(&self.running),
            whole(saved),
            whole(&self.affine),
            whole(&fparams),
        ];
        kernel.dispatch(pass, &[&resources[..], fused].concat(), plan.workgroups());
    }

    /// Whether the statistics pass may finalize its channels itself (the fused
    /// forward, the finalized statistics): not when it updates the running
    /// statistics as a cumulative average, which reads the batch count that the
    /// same dispatch increments.
    fn finalizes_in_place(&self, update_running: bool) -> bool {
        !(update_running && self.config.momentum.is_none())
    }

    /// The batch statistics into `saved`, the coefficients and (when asked) the
    /// running statistics: the statistics pass and `finalize`, or, where
    /// [`Self::finalizes_in_place`] and every workgroup of the walk holds whole
    /// channels, the finalized statistics in one dispatch.
    fn record_batch_stats<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        shape: &Shape,
        x: TensorBuffer<'_>,
        saved: &wgpu::Buffer,
        update_running: bool,
    ) -> Result<()> {
        let plan = self.stats_walk(shape, update_running, common::Pass::Statistics);
        if self.finalizes_in_place(update_running) {
            if let Some(finalized) = self.plain_kernels(shape)?.stats.finalized(&plan) {
                let coef = self.coef_binding();
                self.record_whole_channels(
                    pass,
                    finalized,
                    &plan,
                    shape,
                    x,
                    coef,
                    saved,
                    update_running,
                    &[],
                );
                return Ok(());
            }
        }
        let partials = self.record_stats_partials(pass, shape, x, &plan)?;
        let kernels = self.ctx.kernels();
        let device = self.ctx.device();
        let fp = finalize::FinalizeParams {
            unit_pairs: plan.unit_pairs(),
            ..self.finalize_params(
                plan.partials_per_channel(),
                shape.per_channel(),
                update_running,
            )
        };
        let fparams = kernels.uniform(device, &fp);
        // The rows view in 16-element units finds a channel's partials by unit.
        let (merge, groups) = if plan.unit_pairs() != 0 {
            (&kernels.finalize.train_units, self.channel_workgroups())
        } else if self.merge_lanes() == 1 {
            (&kernels.finalize.train_serial, self.merge_workgroups())
        } else {
            (&kernels.finalize.train, self.merge_workgroups())
        };
        merge.dispatch(
            pass,
            &[
                whole(&fparams),
                partials,
                whole(saved),
                self.coef_binding(),
                whole(&self.affine),
                whole(&self.running),
            ],
            groups,
        );
        Ok(())
    }

    /// The statistics' walk of `plan` writing its partials; returns their binding.
    fn record_stats_partials<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        shape: &Shape,
        x: TensorBuffer<'_>,
        plan: &common::WalkPlan,
    ) -> Result<wgpu::BufferBinding<'s>> {
        let count = plan.partial_count(self.config.num_features);
        let partials = binding(&self.partials, count.max(1) * 16);
        let kernels = self.plain_kernels(shape)?;
        let params = kernels.uniform(self.ctx.device(), &plan.params);
        kernels.stats.partial.get(plan.variant).dispatch(
            pass,
            &[
                whole(&params),
                x.binding(shape.bytes()),
                partials.clone(),
                whole(&self.running),
            ],
            plan.workgroups(),
        );
        Ok(partials)
    }

    /// Running statistics into the coefficients and the scratch saved statistics
    /// (the eval forward of a large tensor, and the eval-form backward).
    fn record_fold_running<'s>(&'s self, pass: &mut Recipe<'s>) {
        let kernels = self.ctx.kernels();
        let device = self.ctx.device();
        let fparams = kernels.uniform(device, &self.finalize_params(0, 2, false));
        kernels.finalize.eval.dispatch(
            pass,
            &[
                whole(&fparams),
                binding(&self.partials, 16),
                whole(&self.scratch_saved.buffer),
                self.coef_binding(),
                whole(&self.affine),
                whole(&self.running),
            ],
            self.channel_workgroups(),
        );
    }

    /// The normalize pass, with the coefficients `finalize` wrote or, in one dispatch
    /// with no finalize before it, those of the running statistics.
    fn record_apply<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        shape: &Shape,
        x: TensorBuffer<'_>,
        z: Option<TensorBuffer<'_>>,
        y: TensorBuffer<'_>,
        from: Coefficients,
    ) -> Result<()> {
        let mut plan = self.elementwise_walk(shape);
        let kernels = self.fused_kernels(shape, z.is_some())?;
        let (pipelines, coef) = match from {
            Coefficients::Finalized => {
                let uniform = kernels.coefficients_fit(apply::SEGMENTS, self.stride() as u32);
                (kernels.apply.get(&[false, uniform]), &self.coef)
            }
            Coefficients::Running => {
                if self.config.affine {
                    plan.params.flags = apply::AFFINE;
                }
                plan.params.eps = self.config.eps;
                (kernels.apply.get(&[true, false]), &self.running)
            }
        };
        let device = self.ctx.device();
        let params = kernels.uniform(device, &plan.params);
        let resources = [
            whole(&params),
            x.binding(shape.bytes()),
            y.binding(shape.bytes()),
            whole(coef),
            whole(&self.affine),
            binding(&self.coef, kernels.coef_window_bytes()),
        ];
        let z = z.map(|z| z.binding(shape.bytes()));
        pipelines.get(plan.variant).dispatch(
            pass,
            &[&resources[..], z.as_slice()].concat(),
            plan.workgroups(),
        );
        Ok(())
    }

    // ----- backward ---------------------------------------------------------------

    /// Records the backward pass into `encoder`.
    ///
    /// `saved`: the statistics of the training forward (batch statistics: `dx` has
    /// the full training form), or `None` for the running statistics of an eval
    /// forward (constants). The outputs not given in `grads` are not computed.
    pub fn backward<'a>(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        dy: impl Into<TensorBuffer<'a>>,
        saved: Option<&SavedStats>,
        grads: GradBuffers<'_>,
    ) -> Result<()> {
        self.plan_backward(shape, x, dy, saved, grads)?
            .record_into(encoder);
        Ok(())
    }

    /// The dispatches of [`Self::backward`] (see [`Self::plan_forward_train`]).
    pub fn plan_backward<'a>(
        &mut self,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        dy: impl Into<TensorBuffer<'a>>,
        saved: Option<&SavedStats>,
        grads: GradBuffers<'_>,
    ) -> Result<Plan<'_>> {
        let (x, dy) = (x.into(), dy.into());
        self.prepare_backward(shape, x, dy, saved, &grads)?;
        self.plan("bn.backward", None, |this, rec| {
            this.record_backward(rec, shape, x, dy, saved, &grads)
        })
    }

    /// [`Self::backward`] recorded into a compute pass the caller has begun.
    pub fn backward_in_pass<'a>(
        &mut self,
        pass: &mut wgpu::ComputePass<'_>,
        shape: &Shape,
        x: impl Into<TensorBuffer<'a>>,
        dy: impl Into<TensorBuffer<'a>>,
        saved: Option<&SavedStats>,
        grads: GradBuffers<'_>,
    ) -> Result<()> {
        self.plan_backward(shape, x, dy, saved, grads)?.record(pass);
        Ok(())
    }

    /// Checks a backward's arguments, then makes room for its partial results.
    fn prepare_backward(
        &mut self,
        shape: &Shape,
        x: TensorBuffer<'_>,
        dy: TensorBuffer<'_>,
        saved: Option<&SavedStats>,
        grads: &GradBuffers<'_>,
    ) -> Result<()> {
        self.check_backward(shape, x, dy, saved, grads)?;
        self.reserve_partials(shape, common::Pass::Sums)
    }

    fn check_backward(
        &self,
        shape: &Shape,
        x: TensorBuffer<'_>,
        dy: TensorBuffer<'_>,
        saved: Option<&SavedStats>,
        grads: &GradBuffers<'_>,
    ) -> Result<()> {
        self.ctx.check_device()?;
        self.check_shape(shape, saved.is_some())?;
        match saved {
            Some(s) if !s.is_filled() => {
                return Err(Error::MissingSavedStats(
                    "the saved statistics were never written: record a training forward \
                     into them (or load them with SavedStats::from_host) before the backward",
                ))
            }
            Some(s) => self.check_saved(s)?,
            None if !self.config.track_running_stats => {
                return Err(Error::MissingSavedStats(
                    "backward without saved statistics uses the running statistics, \
                     but the layer has track_running_stats = false: pass the SavedStats \
                     of the forward",
                ))
            }
            None => {}
        }
        if !self.config.affine && (grads.dgamma.is_some() || grads.dbeta.is_some()) {
            return Err(Error::MissingState(
                "dgamma/dbeta asked for, but the layer has affine = false",
            ));
        }
        let act = self.config.activation;
        if act != crate::Activation::Identity && grads.output.is_none() {
            return Err(Error::MissingOutput(act.name()));
        }
        let bytes = shape.bytes();
        self.ctx.check_tensor("x", x, bytes)?;
        self.ctx.check_tensor("dy", dy, bytes)?;
        self.check_partials(shape, common::Pass::Sums)?;
        let c_bytes = self.config.num_features as u64 * 4;
        if let Some(b) = grads.dx {
            self.ctx.check_tensor("dx", b, bytes)?;
        }
        if let Some(b) = grads.dgamma {
            self.ctx.check_tensor("dgamma", b, c_bytes)?;
        }
        if let Some(b) = grads.dbeta {
            self.ctx.check_tensor("dbeta", b, c_bytes)?;
        }
        // y is read only by the activation's mask.
        let output = grads.output.filter(|_| act != crate::Activation::Identity);
        if let Some(b) = output {
            self.ctx.check_tensor("y", b, bytes)?;
        }
        if let Some(b) = grads.dz {
            self.ctx.check_tensor("dz", b, bytes)?;
        }
        self.check_aliasing(&[
            ("x", Some(range(x, bytes)), false),
            ("dy", Some(range(dy, bytes)), false),
            ("saved", saved.map(SavedStats::range), false),
            ("y", output.map(|t| range(t, bytes)), false),
            ("dx", grads.dx.map(|t| range(t, bytes)), true),
            ("dgamma", grads.dgamma.map(|t| range(t, c_bytes)), true),
            ("dbeta", grads.dbeta.map(|t| range(t, c_bytes)), true),
            ("dz", grads.dz.map(|t| range(t, bytes)), true),
        ])?;
        self.fused_kernels(shape, grads.dz.is_some()).map(|_| ())
    }

    fn record_backward<'s>(
        &'s self,
        pass: &mut Recipe<'s>,
        shape: &Shape,
        x: TensorBuffer<'_>,
        dy: TensorBuffer<'_>,
        saved: Option<&SavedStats>,
        grads: &GradBuffers<'_>,
    ) -> Result<()> {
        let batch = saved.is_some();
        if !batch {
            self.record_fold_running(pass);
        }
        let stats_buffer = saved.unwrap_or(&self.scratch_saved).buffer.clone();
        let (want_dgamma, want_dbeta) = (grads.dgamma.is_some(), grads.dbeta.is_some());
        // The sums' pass writes dz (the gradient through the activation), which
        // the dx pass then reads as its dy.
        let residual = grads.dz.is_some();
        let need_sums = batch && grads.dx.is_some() || want_dgamma || want_dbeta || residual;
        if !need_sums && grads.dx.is_none() {
            return Ok(());
        }
        let bytes = shape.bytes();
        // The pipelines of the layer's activation (and residual), with their extra
        // bindings: y for the mask, then dz.
        let fused = self.fused_kernels(shape, residual)?;
        let masks = self.config.activation != crate::Activation::Identity;
        let output = grads.output.filter(|_| masks).map(|t| t.binding(bytes));
        let dz = grads.dz.map(|t| t.binding(bytes));
        let sums_extra: Vec<wgpu::BufferBinding<'_>> =
            output.iter().chain(dz.iter()).cloned().collect();
        // The dx pass: after a residual's sums, plain dx over dz; else the
        // activation's dx (masking dy with y).
        let (dx_kernels, dx_dy, dx_extra) = match grads.dz {
            Some(dz) => (self.plain_kernels(shape)?, dz, Vec::new()),
            None => (fused, dy, output.iter().cloned().collect::<Vec<_>>()),
        };
        let stride = self.stride() as u32;
        let device = self.ctx.device();
        // With batch statistics and dx wanted, one dispatch where the walk gives
        // every workgroup whole channels and the tensor is small enough (the same
        // bound as the fused forward's); else on GPUs two, dx merging the sums'
        // partials (in the merged walks); else three.
        let own = self.reduce_walk(shape, common::Pass::Sums);
        let fusable = batch && shape.numel() as u64 <= self.ctx.tuning().fused_forward_max_elements;
        let one_pass = grads
            .dx
            .filter(|_| fusable)
            .and_then(|dx| Some((dx, fused.backward_reduce.fused(&own)?)))
            .filter(|(_, kernel)| kernel.fits(device));
        let merged = grads
            .dx
            .filter(|_| batch && one_pass.is_none())
            .and_then(|dx| {
                let (plan, ep) = self.merged_walks(shape, common::Pass::Sums);
                let kernel = self.merged_kernel(&dx_kernels.backward_dx_merged, &ep)?;
                Some((dx, kernel, plan, ep))
            });
        let plan = merged.as_ref().map_or(own, |m| m.2);
        let with_x = batch || want_dgamma;
        let partial_bytes = plan.partial_count(self.config.num_features).max(1) * 16;
        let partials = self.partials(plan.partial_count(self.config.num_features));
        let mut flags = 0;
        for (on, bit) in [
            (self.config.affine, backward_finalize::AFFINE),
            (want_dgamma, backward_finalize::WANT_DGAMMA),
            (want_dbeta, backward_finalize::WANT_DBETA),
            (batch, backward_finalize::BATCH_STATS),
            (grads.accumulate, backward_finalize::ACCUMULATE),
        ] {
            if on {
                flags |= bit;
            }
        }
        let fp = backward_finalize::BackwardFinalizeParams {
            channels: self.config.num_features as u32,
            splits: if need_sums {
                plan.partials_per_channel()
            } else {
                0
            },
            padded: stride,
            flags,
            count: shape.per_channel() as f32,
            _pad: [0; 3],
        };
        let kernels = self.ctx.kernels();
        let c_bytes = self.config.num_features as u64 * 4;
        let dgamma = grads.dgamma.unwrap_or((&self.scratch_grads[0]).into());
        let dbeta = grads.dbeta.unwrap_or((&self.scratch_grads[1]).into());
        if let Some((dx, kernel)) = one_pass {
            let params = kernels.uniform(device, &plan.params);
            let fparams = kernels.uniform(device, &fp);
            let resources = [
                whole(&params),
                x.binding(bytes),
                dy.binding(bytes),
                whole(&stats_buffer),
                dx.binding(bytes),
                dgamma.binding(c_bytes),
                dbeta.binding(c_bytes),
                whole(&self.affine),
                whole(&fparams),
            ];
            kernel.dispatch(
                pass,
                &[&resources[..], &sums_extra].concat(),
                plan.workgroups(),
            );
            return Ok(());
        }
        if need_sums {
            let params = kernels.uniform(device, &plan.params);
            let sums = fused.backward_reduce.sums.get(&[with_x]).get(plan.variant);
            let resources = [
                whole(&params),
                x.binding(bytes),
                dy.binding(bytes),
                whole(&stats_buffer),
                binding(&partials, partial_bytes),
            ];
            sums.dispatch(
                pass,
                &[&resources[..], &sums_extra].concat(),
                plan.workgroups(),
            );
        }
        let fparams = kernels.uniform(device, &fp);
        if let Some((dx, kernel, plan, ep)) = merged {
            let params = kernels.uniform(device, &ep.params);
            let resources = [
                whole(&params),
                x.binding(bytes),
                dx_dy.binding(bytes),
                dx.binding(bytes),
                binding(&partials, partial_bytes),
                whole(&fparams),
                whole(&stats_buffer),
                whole(&self.affine),
                dgamma.binding(c_bytes),
                dbeta.binding(c_bytes),
            ];
            kernel.dispatch_merging(
                pass,
                &[&resources[..], &dx_extra].concat(),
                ep.workgroups(),
                self.rereads(&plan, &ep),
            );
            return Ok(());
        }
        let merge = if self.merge_lanes() == 1 {
            &kernels.backward_finalize.main_serial
        } else {
            &kernels.backward_finalize.main
        };
        merge.dispatch(
            pass,
            &[
                whole(&fparams),
                binding(&partials, partial_bytes),
                whole(&stats_buffer),
                whole(&self.affine),
                self.coef_binding(),
                dgamma.binding(c_bytes),
                dbeta.binding(c_bytes),
            ],
            self.merge_workgroups(),
        );
        if let Some(dx) = grads.dx {
            let ep = self.elementwise_walk(shape);
            let params = kernels.uniform(device, &ep.params);
            let uniform = kernels.coefficients_fit(backward_dx::SEGMENTS, self.stride() as u32);
            let resources = [
                whole(&params),
                x.binding(bytes),
                dx_dy.binding(bytes),
                dx.binding(bytes),
                self.coef_binding(),
                binding(&self.coef, kernels.coef_window_bytes()),
            ];
            dx_kernels
                .backward_dx
                .get(&[batch, uniform])
                .get(ep.variant)
                .dispatch(pass, &[&resources[..], &dx_extra].concat(), ep.workgroups());
        }
        Ok(())
    }

    // ----- host convenience ---------------------------------------------------------

    fn check_len<T>(name: &'static str, shape: &Shape, v: &[T]) -> Result<()> {
        crate::cpu::reference::check_len(name, shape.numel(), v.len())
    }

    /// Training forward on host data: uploads `x`, runs, reads back `y` and the
    /// saved statistics. Running statistics are updated on the GPU. The tensors'
    /// element type is the slices' (`f32`, `half::f16` or `half::bf16`), whatever
    /// `shape` says.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_train_host<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
    ) -> Result<TrainOutput<T>> {
        pollster::block_on(self.train_host_async(shape, x, None))
    }

    /// [`Self::forward_train_add`] on host data: `y = act(bn(x) + z)`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_train_add_host<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: &[T],
    ) -> Result<TrainOutput<T>> {
        pollster::block_on(self.train_host_async(shape, x, Some(z)))
    }

    /// Checks and uploads a host forward's x and residual z (`batch`: whether it
    /// uses batch statistics).
    fn upload_inputs<T: Element>(
        &self,
        shape: &Shape,
        x: &[T],
        z: Option<&[T]>,
        batch: bool,
    ) -> Result<(wgpu::Buffer, Option<wgpu::Buffer>)> {
        Self::check_len("x", shape, x)?;
        if let Some(z) = z {
            Self::check_len("z", shape, z)?;
        }
        self.check_shape(shape, batch)?;
        self.ctx.check_size("x", shape.bytes())?;
        let xb = self.ctx.upload("bn.x", x)?;
        let zb = z.map(|z| self.ctx.upload("bn.z", z)).transpose()?;
        Ok((xb, zb))
    }

    /// Eval forward on host data. `saved` in the output holds the batch statistics
    /// when the layer has no running statistics, else `None`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_eval_host<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
    ) -> Result<ForwardOutput<T>> {
        pollster::block_on(self.eval_host_async(shape, x, None))
    }

    /// [`Self::forward_eval_add`] on host data: `y = act(bn(x) + z)`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_eval_add_host<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: &[T],
    ) -> Result<ForwardOutput<T>> {
        pollster::block_on(self.eval_host_async(shape, x, Some(z)))
    }

    /// Backward on host data. `saved`: the statistics from the forward's output
    /// (batch statistics), or `None` for the running statistics. Gradients not in
    /// `mask` (and `dgamma`/`dbeta` without `affine`) come back as `None`. A layer
    /// with an activation needs the forward's output: [`Self::backward_fused_host`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward_host<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        dy: &[T],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
    ) -> Result<Gradients<T>> {
        self.backward_fused_host(shape, x, None, dy, saved, mask, false)
    }

    /// The backward of the fused forward on host data: `y` is the forward's output
    /// (needed with an activation, else may be `None`), and with `residual` (the
    /// backward of an `*_add` forward) `dz` comes back too.
    #[cfg(not(target_arch = "wasm32"))]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_fused_host<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        y: Option<&[T]>,
        dy: &[T],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
        residual: bool,
    ) -> Result<Gradients<T>> {
        pollster::block_on(self.backward_fused_host_async(shape, x, y, dy, saved, mask, residual))
    }
}

/// The dispatches of one operation of a [`BatchNorm`], checked, with their pipelines
/// built: what it will launch and bind ([`Self::dispatches`]), recorded whole
/// ([`Self::record`]) or one dispatch at a time ([`Self::record_dispatch`], e.g.
/// each in a compute pass of its own with timestamp writes). The `record*` calls
/// of the layer are a plan recorded at once.
pub struct Plan<'a> {
    recipe: Recipe<'a>,
    device: &'a wgpu::Device,
    bind_groups: &'a BindGroups,
    label: &'static str,
    /// Saved statistics the plan writes: marked filled when it is recorded.
    fills: Option<&'a SavedStats>,
}

impl Plan<'_> {
    /// Each dispatch: pipeline label, workgroups, bytes of the storage ranges bound.
    pub fn dispatches(&self) -> Vec<DispatchInfo> {
        self.recipe.info()
    }

    /// Number of dispatches.
    pub fn len(&self) -> usize {
        self.recipe.len()
    }

    /// Whether the plan dispatches nothing (a backward asked for no output).
    pub fn is_empty(&self) -> bool {
        self.recipe.len() == 0
    }

    /// Records every dispatch into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.recipe.record(self.device, pass, self.bind_groups);
        self.filled();
    }

    fn filled(&self) {
        if let Some(saved) = self.fills {
            saved.mark_filled();
        }
    }

    /// Records dispatch `i` (of [`Self::len`]) into `pass`. The dispatches depend on
    /// each other in order: record each once, in order, in passes of one encoder
    /// (or of encoders submitted in order).
    pub fn record_dispatch(&self, i: usize, pass: &mut wgpu::ComputePass<'_>) {
        if i < self.recipe.len() {
            self.recipe
                .record_step(i, self.device, pass, self.bind_groups);
            self.filled();
        }
    }

    /// Records every dispatch into a compute pass of its own in `encoder`.
    pub fn record_into(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = begin(encoder, self.label);
        self.record(&mut pass);
    }
}

/// A tensor of a call for the aliasing check: its name, its bytes (buffer, offset,
/// length) if given, and whether the call writes it.
type TensorUse<'a> = (&'static str, Option<(&'a wgpu::Buffer, u64, u64)>, bool);

/// The first `bytes` bytes of `tensor` as (buffer, offset, length).
fn range<'t>(tensor: TensorBuffer<'t>, bytes: u64) -> (&'t wgpu::Buffer, u64, u64) {
    (tensor.buffer(), tensor.offset(), bytes)
}

fn begin<'e>(encoder: &'e mut wgpu::CommandEncoder, label: &str) -> wgpu::ComputePass<'e> {
    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    })
}
