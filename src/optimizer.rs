//! Training the learnable parameters: host access to gamma and beta, and an
//! optimizer step (PyTorch's SGD or Adam) recorded on the GPU, so that a training
//! loop — forward, backward, update — stays in one command encoder.

use crate::kernels::{optimizer as kernel, whole, WORKGROUP_SIZE};
use crate::{BatchNorm, Error, GpuContext, Result, TensorBuffer};

impl BatchNorm {
    /// Reads `(gamma, beta)` back (submits and waits).
    ///
    /// Fails with [`Error::MissingState`] when the layer has `affine = false`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        pollster::block_on(self.affine_async())
    }

    /// Overwrites gamma and beta (through the queue, as [`Self::set_state`] does: it
    /// takes effect before the next submission's commands). The running statistics
    /// are left as they are.
    ///
    /// Fails with [`Error::LengthMismatch`] unless both slices hold `num_features`
    /// values, and with [`Error::MissingState`] when the layer has `affine = false`.
    pub fn set_affine(&mut self, gamma: &[f32], beta: &[f32]) -> Result<()> {
        require_affine(self)?;
        let c = self.config().num_features;
        for (name, v) in [("gamma", gamma), ("beta", beta)] {
            if v.len() != c {
                return Err(Error::LengthMismatch {
                    name,
                    expected: c,
                    got: v.len(),
                });
            }
        }
        // The whole buffer, as the layer writes it: the padding of each segment zero.
        let p = self.stride();
        let mut affine = vec![0f32; 2 * p];
        affine[..c].copy_from_slice(gamma);
        affine[p..p + c].copy_from_slice(beta);
        self.context()
            .write(self.affine_buffer(), bytemuck::cast_slice(&affine))
    }
}

pub(crate) fn require_affine(layer: &BatchNorm) -> Result<()> {
    if layer.config().affine {
        Ok(())
    } else {
        Err(Error::MissingState(
            "gamma and beta asked for, but the layer has affine = false",
        ))
    }
}

/// A hyper-parameter outside its range: `name` must satisfy `requirement`.
fn bad_hyper_parameter(name: &'static str, value: f32, requirement: &'static str) -> Error {
    Error::BadHyperParameter {
        name,
        value,
        requirement,
    }
}

/// The layer is on another context than the optimizer.
fn other_context() -> Error {
    Error::ContextMismatch("the layer")
}

/// An optimizer for gamma and beta, with PyTorch's semantics and hyper-parameters.
///
/// Build one with [`Optimizer::sgd`] or [`Optimizer::adam`] (PyTorch's defaults) and
/// the setters, then hand it to [`AffineOptimizer::new`].
///
/// ```
/// use wgpu_batchnorm::Optimizer;
/// let sgd = Optimizer::sgd(0.1).momentum(0.9).nesterov(true).weight_decay(1e-4);
/// let adam = Optimizer::adam(1e-3).betas(0.9, 0.99);
/// assert!(sgd.validate().is_ok() && adam.validate().is_ok());
/// assert!(Optimizer::sgd(0.1).nesterov(true).validate().is_err()); // needs momentum
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD`: `g = grad + weight_decay * w`; with momentum, the buffer
    /// `b = g` on the first step, then `b = momentum * b + (1 - dampening) * g`, and
    /// `g = g + momentum * b` (Nesterov) or `g = b`; `w = w - lr * g`.
    Sgd {
        /// Learning rate (finite, >= 0).
        lr: f32,
        /// Momentum factor (in [0, 1]; 0 keeps no momentum buffer).
        momentum: f32,
        /// Dampening of the momentum (finite; 0 with Nesterov).
        dampening: f32,
        /// L2 penalty added to the gradient (finite, >= 0).
        weight_decay: f32,
        /// Nesterov momentum (needs momentum > 0 and dampening = 0).
        nesterov: bool,
    },
    /// `torch.optim.Adam` (without amsgrad): `g = grad + weight_decay * w`,
    /// `m = beta1 * m + (1 - beta1) * g`, `v = beta2 * v + (1 - beta2) * g^2`,
    /// `w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)` at
    /// step `t` (from 1).
    Adam {
        /// Learning rate (finite, >= 0).
        lr: f32,
        /// Decay of the first moment (in [0, 1)).
        beta1: f32,
        /// Decay of the second moment (in [0, 1)).
        beta2: f32,
        /// Added to the denominator (finite, >= 0).
        eps: f32,
        /// L2 penalty added to the gradient (finite, >= 0).
        weight_decay: f32,
    },
}

impl Optimizer {
    /// Plain SGD with PyTorch's defaults: no momentum, dampening or weight decay.
    pub fn sgd(lr: f32) -> Self {
        Self::Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    /// Adam with PyTorch's defaults: `betas = (0.9, 0.999)`, `eps = 1e-8`, no weight
    /// decay.
    pub fn adam(lr: f32) -> Self {
        Self::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } => lr,
        }
    }

    /// Sets the learning rate.
    pub fn with_lr(mut self, value: f32) -> Self {
        match &mut self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } => *lr = value,
        }
        self
    }

    /// Sets the weight decay (an L2 penalty added to the gradient).
    pub fn weight_decay(mut self, value: f32) -> Self {
        match &mut self {
            Self::Sgd { weight_decay, .. } | Self::Adam { weight_decay, .. } => {
                *weight_decay = value
            }
        }
        self
    }

    /// Sets SGD's momentum (leaves Adam unchanged).
    pub fn momentum(mut self, value: f32) -> Self {
        if let Self::Sgd { momentum, .. } = &mut self {
            *momentum = value;
        }
        self
    }

    /// Sets SGD's dampening (leaves Adam unchanged).
    pub fn dampening(mut self, value: f32) -> Self {
        if let Self::Sgd { dampening, .. } = &mut self {
            *dampening = value;
        }
        self
    }

    /// Turns SGD's Nesterov momentum on or off (leaves Adam unchanged).
    pub fn nesterov(mut self, value: bool) -> Self {
        if let Self::Sgd { nesterov, .. } = &mut self {
            *nesterov = value;
        }
        self
    }

    /// Sets Adam's `betas` (leaves SGD unchanged).
    pub fn betas(mut self, b1: f32, b2: f32) -> Self {
        if let Self::Adam { beta1, beta2, .. } = &mut self {
            (*beta1, *beta2) = (b1, b2);
        }
        self
    }

    /// Sets Adam's `eps` (leaves SGD unchanged).
    pub fn eps(mut self, value: f32) -> Self {
        if let Self::Adam { eps, .. } = &mut self {
            *eps = value;
        }
        self
    }

    /// Checks the hyper-parameters against the ranges PyTorch accepts (SGD's
    /// momentum is further kept in [0, 1]).
    pub fn validate(&self) -> Result<()> {
        let lr = self.lr();
        if !lr.is_finite() || lr < 0.0 {
            return Err(bad_hyper_parameter(
                "lr",
                lr,
                "the optimizer's lr must be finite and >= 0",
            ));
        }
        let weight_decay = match *self {
            Self::Sgd { weight_decay, .. } | Self::Adam { weight_decay, .. } => weight_decay,
        };
        if !weight_decay.is_finite() || weight_decay < 0.0 {
            return Err(bad_hyper_parameter(
                "weight_decay",
                weight_decay,
                "the optimizer's weight_decay must be finite and >= 0",
            ));
        }
        match *self {
            Self::Sgd {
                momentum,
                dampening,
                nesterov,
                ..
            } => {
                if !momentum.is_finite() || !(0.0..=1.0).contains(&momentum) {
                    return Err(Error::BadMomentum(momentum));
                }
                if !dampening.is_finite() {
                    return Err(bad_hyper_parameter(
                        "dampening",
                        dampening,
                        "SGD's dampening must be finite",
                    ));
                }
                if nesterov && (momentum == 0.0 || dampening != 0.0) {
                    return Err(bad_hyper_parameter(
                        "nesterov",
                        momentum,
                        "SGD's Nesterov momentum requires a momentum > 0 and zero dampening",
                    ));
                }
            }
            Self::Adam {
                beta1, beta2, eps, ..
            } => {
                for (name, beta, requirement) in [
                    ("beta1", beta1, "Adam's beta1 must be in [0, 1)"),
                    ("beta2", beta2, "Adam's beta2 must be in [0, 1)"),
                ] {
                    if !(0.0..1.0).contains(&beta) {
                        return Err(bad_hyper_parameter(name, beta, requirement));
                    }
                }
                if !eps.is_finite() || eps < 0.0 {
                    return Err(Error::BadEps(eps));
                }
            }
        }
        Ok(())
    }

    /// Per-channel state segments: SGD's momentum buffers, Adam's two moments, each
    /// for gamma and beta.
    fn state_segments(&self) -> usize {
        match *self {
            Self::Sgd { momentum, .. } => {
                if momentum == 0.0 {
                    0
                } else {
                    2
                }
            }
            Self::Adam { .. } => 4,
        }
    }

    /// The kernel's parameters for step `t` (from 1); the bias corrections are
    /// computed here in f64.
    fn params(&self, channels: usize, padded: usize, t: u64) -> kernel::OptimizerParams {
        let mut p = kernel::OptimizerParams {
            channels: channels as u32,
            padded: padded as u32,
            flags: 0,
            _pad0: 0,
            step_size: 0.0,
            weight_decay: 0.0,
            momentum: 0.0,
            new_weight: 0.0,
            beta2: 0.0,
            new_weight2: 0.0,
            correction2_sqrt: 1.0,
            eps: 0.0,
        };
        match *self {
            Self::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                for (on, bit) in [
                    (weight_decay != 0.0, kernel::WEIGHT_DECAY),
                    (momentum != 0.0, kernel::MOMENTUM),
                    (t == 1, kernel::FIRST_STEP),
                    (nesterov, kernel::NESTEROV),
                ] {
                    if on {
                        p.flags |= bit;
                    }
                }
                p.step_size = lr;
                p.weight_decay = weight_decay;
                p.momentum = momentum;
                p.new_weight = (1.0 - f64::from(dampening)) as f32;
            }
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                if weight_decay != 0.0 {
                    p.flags |= kernel::WEIGHT_DECAY;
                }
                let (b1, b2) = (f64::from(beta1), f64::from(beta2));
                let t = t as f64;
                p.step_size = (f64::from(lr) / (1.0 - b1.powf(t))) as f32;
                p.correction2_sqrt = (1.0 - b2.powf(t)).sqrt() as f32;
                p.weight_decay = weight_decay;
                p.momentum = beta1;
                p.new_weight = (1.0 - b1) as f32;
                p.beta2 = beta2;
                p.new_weight2 = (1.0 - b2) as f32;
                p.eps = eps;
            }
        }
        p
    }
}

/// Updates a layer's gamma and beta from the gradients a backward wrote, on the GPU:
/// [`Self::step`] records one optimizer step into your encoder, after the backward
/// that wrote `dgamma`/`dbeta`, so a training loop needs no readback.
///
/// It holds the optimizer's state for one layer: SGD's momentum buffers or Adam's
/// moments, in a GPU buffer ([`Self::state_buffer`]), and the step count. Build one
/// per layer; it accepts any layer of the same channel count and the same
/// [`GpuContext`] (or a clone of it), but its state belongs to the parameters it has
/// stepped.
///
/// ```no_run
/// use wgpu_batchnorm::{AffineOptimizer, BatchNorm, BatchNormConfig, GpuContext, Optimizer};
/// # fn demo(ctx: &GpuContext, dgamma: &wgpu::Buffer, dbeta: &wgpu::Buffer) -> wgpu_batchnorm::Result<()> {
/// let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(64))?;
/// let mut opt = AffineOptimizer::new(&bn, Optimizer::adam(1e-3))?;
/// let mut encoder = ctx.device().create_command_encoder(&Default::default());
/// // ... bn.forward_train(..) and bn.backward(..) writing dgamma and dbeta ...
/// opt.step(&mut encoder, &mut bn, dgamma, dbeta)?;
/// ctx.queue().submit([encoder.finish()]);
/// # Ok(()) }
/// ```
pub struct AffineOptimizer {
    ctx: GpuContext,
    optimizer: Optimizer,
    channels: usize,
    stride: usize,
    state: wgpu::Buffer,
    steps: u64,
}

impl AffineOptimizer {
    /// An optimizer for `layer`'s gamma and beta, with zeroed state and no steps.
    ///
    /// Fails when a hyper-parameter is out of range (see [`Optimizer::validate`]),
    /// or with [`Error::MissingState`] when the layer has `affine = false`.
    pub fn new(layer: &BatchNorm, optimizer: Optimizer) -> Result<Self> {
        optimizer.validate()?;
        require_affine(layer)?;
        let ctx = layer.context().clone();
        let (channels, stride) = (layer.config().num_features, layer.stride());
        let segments = optimizer.state_segments();
        let bytes = (segments * stride * std::mem::size_of::<f32>()) as u64;
        ctx.check_size("optimizer state", bytes)?;
        let label = match optimizer {
            Optimizer::Sgd { .. } if segments == 0 => "bn.optimizer.unused",
            Optimizer::Sgd { .. } => "bn.optimizer.momentum",
            Optimizer::Adam { .. } => "bn.optimizer.moments",
        };
        let state = ctx.storage_buffer(label, bytes)?;
        Ok(Self {
            ctx,
            optimizer,
            channels,
            stride,
            state,
            steps: 0,
        })
    }

    /// The optimizer and its hyper-parameters.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Changes the learning rate for the steps recorded from now on (a schedule);
    /// the state is kept. Fails, changing nothing, when `lr` is out of range.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        let optimizer = self.optimizer.with_lr(lr);
        optimizer.validate()?;
        self.optimizer = optimizer;
        Ok(())
    }

    /// Steps recorded so far (Adam's `t` of the last one).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The optimizer's state, segments of the layer's [`BatchNorm::stride`] f32:
    /// SGD with momentum `[buf_gamma | buf_beta]`; Adam `[exp_avg_gamma |
    /// exp_avg_beta | exp_avg_sq_gamma | exp_avg_sq_beta]`; plain SGD keeps none
    /// (a 4-byte placeholder).
    pub fn state_buffer(&self) -> &wgpu::Buffer {
        &self.state
    }

    /// Records one step into `encoder`: gamma and beta of `layer` are updated from
    /// `dgamma` and `dbeta` (C f32 each in STORAGE buffers — whole buffers, slices or
    /// bindings, see [`TensorBuffer`] — e.g. the ones a [`BatchNorm::backward`]
    /// recorded before in the same encoder wrote). The step count advances when the
    /// step is recorded, so steps recorded one after another into one encoder each
    /// use their own count.
    ///
    /// Fails, recording nothing and leaving the step count as it is, when the layer
    /// has `affine = false` or belongs to another [`GpuContext`]
    /// ([`Error::MissingState`]), has another channel count than the optimizer was
    /// built for ([`Error::ChannelMismatch`]), when a gradient is too small, not
    /// aligned or not in a STORAGE buffer, when `dgamma` and `dbeta` overlap, or when
    /// either is in the layer's [`BatchNorm::affine_buffer`] or the optimizer's
    /// [`Self::state_buffer`] ([`Error::AliasedBuffers`]).
    pub fn step<'a>(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        layer: &mut BatchNorm,
        dgamma: impl Into<TensorBuffer<'a>>,
        dbeta: impl Into<TensorBuffer<'a>>,
    ) -> Result<()> {
        let (dgamma, dbeta) = (dgamma.into(), dbeta.into());
        self.check(layer, dgamma, dbeta)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("bn.optimizer"),
            timestamp_writes: None,
        });
        self.record(&mut pass, layer, dgamma, dbeta);
        Ok(())
    }

    /// [`Self::step`] recorded into a compute pass the caller has begun.
    pub fn step_in_pass<'a>(
        &mut self,
        pass: &mut wgpu::ComputePass<'_>,
        layer: &mut BatchNorm,
        dgamma: impl Into<TensorBuffer<'a>>,
        dbeta: impl Into<TensorBuffer<'a>>,
    ) -> Result<()> {
        let (dgamma, dbeta) = (dgamma.into(), dbeta.into());
        self.check(layer, dgamma, dbeta)?;
        self.record(pass, layer, dgamma, dbeta);
        Ok(())
    }

    fn check(
        &self,
        layer: &BatchNorm,
        dgamma: TensorBuffer<'_>,
        dbeta: TensorBuffer<'_>,
    ) -> Result<()> {
        self.ctx.check_device()?;
        require_affine(layer)?;
        let c = layer.config().num_features;
        if c != self.channels {
            return Err(Error::ChannelMismatch {
                expected: c,
                got: self.channels,
            });
        }
        // The same context (its clones share the pipelines): wgpu's handle equality
        // cannot tell devices of two instances apart.
        if !std::ptr::eq(layer.context().kernels(), self.ctx.kernels()) {
            return Err(other_context());
        }
        let bytes = (c * std::mem::size_of::<f32>()) as u64;
        self.ctx.check_tensor("dgamma", dgamma, bytes)?;
        self.ctx.check_tensor("dbeta", dbeta, bytes)?;
        // Both gradients are only read, so they may share a buffer, but not bytes.
        let range = |t: TensorBuffer<'_>| t.offset()..t.offset() + bytes;
        let (rg, rb) = (range(dgamma), range(dbeta));
        if dgamma.buffer() == dbeta.buffer() && rg.start < rb.end && rb.start < rg.end {
            return Err(Error::AliasedBuffers {
                a: "dgamma",
                b: "dbeta",
            });
        }
        for (a, tensor) in [("dgamma", dgamma), ("dbeta", dbeta)] {
            if tensor.buffer() == layer.affine_buffer() {
                return Err(Error::AliasedBuffers {
                    a,
                    b: "the layer's gamma/beta (affine_buffer)",
                });
            }
            if tensor.buffer() == &self.state {
                return Err(Error::AliasedBuffers {
                    a,
                    b: "the optimizer's state (state_buffer)",
                });
            }
        }
        let kernels = self.ctx.kernels();
        match self.optimizer {
            Optimizer::Sgd { .. } => kernels.optimizer.sgd.build(self.ctx.device()),
            Optimizer::Adam { .. } => kernels.optimizer.adam.build(self.ctx.device()),
        }
    }

    fn record(
        &mut self,
        pass: &mut wgpu::ComputePass<'_>,
        layer: &BatchNorm,
        dgamma: TensorBuffer<'_>,
        dbeta: TensorBuffer<'_>,
    ) {
        let t = self.steps + 1;
        let params = self.optimizer.params(self.channels, self.stride, t);
        let kernels = self.ctx.kernels();
        let device = self.ctx.device();
        let uniform = kernels.uniform(device, &params);
        let k = match self.optimizer {
            Optimizer::Sgd { .. } => &kernels.optimizer.sgd,
            Optimizer::Adam { .. } => &kernels.optimizer.adam,
        };
        let bytes = (self.channels * std::mem::size_of::<f32>()) as u64;
        k.record(
            device,
            pass,
            &[
                whole(&uniform),
                dgamma.binding(bytes),
                dbeta.binding(bytes),
                whole(layer.affine_buffer()),
                whole(&self.state),
            ],
            (self.channels as u32).div_ceil(WORKGROUP_SIZE),
            None,
        );
        self.steps = t;
    }
}
