//! The f64 reference: the contract of `docs/semantics.md` written as plainly as possible.
//! Every other implementation (the GPU kernels, the fast CPU path) is tested
//! against it. Clarity over speed: two passes (mean, then variance), everything
//! accumulated in f64.
//!
//! The fused activation and residual of [`Activation`]: the forwards compute
//! `y = act(bn(x))`, the `*_add` forwards `y = act(bn(x) + z)`;
//! [`ReferenceBatchNorm::backward_fused`] is their backward.

use crate::{
    Activation, BatchNormConfig, BatchNormState, Element, Error, GradMask, Result, Shape,
    StatsSource,
};

/// A batch-norm layer evaluated in f64 on the CPU.
///
/// ```
/// use wgpu_batchnorm::{cpu::reference::ReferenceBatchNorm, BatchNormConfig, Shape};
/// let mut bn = ReferenceBatchNorm::new(BatchNormConfig::new(1)).unwrap();
/// let shape = Shape::channels_first(&[2, 1]).unwrap();
/// let out = bn.forward_train(&shape, &[1.0, 3.0]).unwrap();
/// assert_eq!(out.mean, vec![2.0]);
/// assert_eq!(out.var, vec![1.0]);
/// assert!((out.y[0] + 1.0).abs() < 1e-5 && (out.y[1] - 1.0).abs() < 1e-5);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceBatchNorm {
    /// The layer's options.
    pub config: BatchNormConfig,
    /// Parameters and running statistics (f32, as a checkpoint holds them).
    pub state: BatchNormState,
}

/// f64 results of a forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceForward {
    /// The output `act(bn(x))` (`act(bn(x) + z)` with a residual), same shape and
    /// layout as `x`.
    pub y: Vec<f64>,
    /// Per-channel mean used to normalize (batch or running).
    pub mean: Vec<f64>,
    /// Per-channel variance used to normalize: the biased batch variance, or the
    /// running variance.
    pub var: Vec<f64>,
    /// `1 / sqrt(var + eps)` (0 where `var + eps == 0`).
    pub invstd: Vec<f64>,
}

/// f64 gradients of a backward pass; `None` when not asked for (or, for
/// `dgamma`/`dbeta`, when the layer is not affine).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ReferenceGradients {
    /// Gradient with respect to the input.
    pub dx: Option<Vec<f64>>,
    /// Gradient with respect to `gamma`.
    pub dgamma: Option<Vec<f64>>,
    /// Gradient with respect to `beta`.
    pub dbeta: Option<Vec<f64>>,
    /// Gradient with respect to the residual `z` (only from
    /// [`ReferenceBatchNorm::backward_fused`] with `residual`).
    pub dz: Option<Vec<f64>>,
}

/// The values of channel `c`, in `(n, spatial)` order, whatever the layout.
pub fn channel_values<'a>(
    shape: &'a Shape,
    x: &'a [f32],
    c: usize,
) -> impl Iterator<Item = f32> + 'a {
    let s = shape.spatial_size();
    (0..shape.n()).flat_map(move |n| (0..s).map(move |i| x[shape.index(n, c, i)]))
}

/// The values of a host tensor of element type `T` as f32 (exactly: every f16 is
/// an f32). The reference takes tensors of any element type this way: its f64
/// results are then those of the exact inputs, and a comparison rounds them to
/// `T` itself (straight from f64, not through f32).
///
/// ```
/// use wgpu_batchnorm::{cpu::reference::widen, half::f16};
/// assert_eq!(widen(&[f16::from_f32(0.1), f16::MAX]), vec![0.0999755859375, 65504.0]);
/// ```
pub fn widen<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}

/// Per-channel batch mean and biased variance, two-pass in f64. A channel with a
/// NaN or ±inf gets NaN for both (an f64 sum of f32 values is non-finite exactly
/// then).
pub fn batch_stats(shape: &Shape, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let m = shape.per_channel() as f64;
    (0..shape.c())
        .map(|c| {
            let mean = channel_values(shape, x, c).map(f64::from).sum::<f64>() / m;
            if !mean.is_finite() {
                return (f64::NAN, f64::NAN);
            }
            let var = channel_values(shape, x, c)
                .map(|v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / m;
            (mean, var)
        })
        .unzip()
}

/// [`Activation::apply`] on an f64 value (NaN stays NaN). The thresholds 0 and 6
/// are exact in f32, so rounding to f32 before or after it gives the same value.
pub fn activate(act: Activation, v: f64) -> f64 {
    match act {
        Activation::Identity => v,
        Activation::Relu => {
            if v < 0.0 {
                0.0
            } else {
                v
            }
        }
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// `dy` where the activation passes the gradient at the output `y`
/// ([`Activation::passes`]: a NaN output passes it), 0 elsewhere: the gradient
/// with respect to the activation's input. Lengths are the caller's to check.
pub fn activation_grad(act: Activation, y: &[f32], dy: &[f32]) -> Vec<f32> {
    y.iter()
        .zip(dy)
        .map(|(&v, &g)| if act.passes(v) { g } else { 0.0 })
        .collect()
}

/// `1 / sqrt(var + eps)`, or 0 where `var + eps == 0` (never inf).
pub fn invstd(var: f64, eps: f32) -> f64 {
    let d = var + f64::from(eps);
    if d == 0.0 {
        0.0
    } else {
        1.0 / d.sqrt()
    }
}

/// Checks a call's inputs against the layer: options and state consistent, `x` has
/// `shape.numel()` elements, `shape.c() == num_features`, and (when `batch_stats`)
/// more than one value per channel. Shared with the fast CPU path.
pub(crate) fn check_input(
    config: &BatchNormConfig,
    state: &BatchNormState,
    shape: &Shape,
    name: &'static str,
    len: usize,
    batch_stats: bool,
) -> Result<()> {
    config.validate()?;
    state.validate(config)?;
    if shape.c() != config.num_features {
        return Err(Error::ChannelMismatch {
            expected: config.num_features,
            got: shape.c(),
        });
    }
    check_len(name, shape.numel(), len)?;
    if batch_stats && shape.per_channel() == 1 {
        return Err(Error::SingleValuePerChannel {
            dims: shape.dims().to_vec(),
        });
    }
    Ok(())
}

/// `Error::LengthMismatch` unless `got == expected`.
pub(crate) fn check_len(name: &'static str, expected: usize, got: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            name,
            expected,
            got,
        })
    }
}

pub(crate) const NO_RUNNING_STATS: &str =
    "backward with running statistics needs track_running_stats = true \
     (pass the batch statistics of the forward instead)";

/// One training step of the running statistics, from the batch `mean` and biased
/// `var` over `m` values per channel: increments `num_batches_tracked` and blends,
/// in f64, the f32 running values with the batch values. Does nothing without
/// `track_running_stats` (PyTorch has no `num_batches_tracked` then).
pub fn update_running_stats(
    config: &BatchNormConfig,
    state: &mut BatchNormState,
    mean: &[f64],
    var: &[f64],
    m: usize,
) {
    if !config.track_running_stats {
        return;
    }
    state.num_batches_tracked += 1;
    let f = config.update_factor(state.num_batches_tracked);
    // m > 1 is checked before any training step.
    let bessel = if config.unbiased_running_var() {
        m as f64 / (m as f64 - 1.0)
    } else {
        1.0
    };
    for c in 0..config.num_features {
        let rm = f64::from(state.running_mean[c]);
        let rv = f64::from(state.running_var[c]);
        state.running_mean[c] = ((1.0 - f) * rm + f * mean[c]) as f32;
        state.running_var[c] = ((1.0 - f) * rv + f * var[c] * bessel) as f32;
    }
}

impl ReferenceBatchNorm {
    /// A layer in its initial state (`gamma = 1`, `beta = 0`, `running_mean = 0`,
    /// `running_var = 1`).
    pub fn new(config: BatchNormConfig) -> Result<Self> {
        let state = BatchNormState::new(&config);
        Self::with_state(config, state)
    }

    /// A layer with the given state (e.g. from a checkpoint).
    pub fn with_state(config: BatchNormConfig, state: BatchNormState) -> Result<Self> {
        config.validate()?;
        state.validate(&config)?;
        Ok(Self { config, state })
    }

    fn gamma(&self, c: usize) -> f64 {
        self.state.gamma.get(c).map_or(1.0, |&g| f64::from(g))
    }

    fn beta(&self, c: usize) -> f64 {
        self.state.beta.get(c).map_or(0.0, |&b| f64::from(b))
    }

    fn running(&self) -> (Vec<f64>, Vec<f64>) {
        let widen = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
        (
            widen(&self.state.running_mean),
            widen(&self.state.running_var),
        )
    }

    /// `y = act(bn(x) + z)` (no `+ z` without a residual).
    fn normalize(
        &self,
        shape: &Shape,
        x: &[f32],
        z: Option<&[f32]>,
        mean: Vec<f64>,
        var: Vec<f64>,
    ) -> ReferenceForward {
        let invstd: Vec<f64> = var.iter().map(|&v| invstd(v, self.config.eps)).collect();
        let act = self.config.activation;
        let y = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = shape.channel_of(i);
                let bn = (f64::from(v) - mean[c]) * invstd[c] * self.gamma(c) + self.beta(c);
                let residual = z.map_or(0.0, |z| f64::from(z[i]));
                activate(act, bn + residual)
            })
            .collect();
        ReferenceForward {
            y,
            mean,
            var,
            invstd,
        }
    }

    /// Training forward: normalizes with the batch statistics and applies the
    /// configured activation (`y = act(bn(x))`), then updates the running statistics
    /// and `num_batches_tracked` (with `track_running_stats`).
    pub fn forward_train(&mut self, shape: &Shape, x: &[f32]) -> Result<ReferenceForward> {
        self.train(shape, x, None)
    }

    /// [`Self::forward_train`] with a residual `z` of `x`'s shape and layout:
    /// `y = act(bn(x) + z)`. The statistics are those of `x` alone.
    pub fn forward_train_add(
        &mut self,
        shape: &Shape,
        x: &[f32],
        z: &[f32],
    ) -> Result<ReferenceForward> {
        self.train(shape, x, Some(z))
    }

    /// Eval forward: normalizes with the running statistics when the layer tracks
    /// them (`mean = running_mean`, `var = running_var`), otherwise with the batch
    /// statistics, and applies the configured activation. Updates nothing.
    pub fn forward_eval(&self, shape: &Shape, x: &[f32]) -> Result<ReferenceForward> {
        self.eval(shape, x, None)
    }

    /// [`Self::forward_eval`] with a residual `z` of `x`'s shape and layout:
    /// `y = act(bn(x) + z)`.
    pub fn forward_eval_add(
        &self,
        shape: &Shape,
        x: &[f32],
        z: &[f32],
    ) -> Result<ReferenceForward> {
        self.eval(shape, x, Some(z))
    }

    fn train(&mut self, shape: &Shape, x: &[f32], z: Option<&[f32]>) -> Result<ReferenceForward> {
        check_input(&self.config, &self.state, shape, "x", x.len(), true)?;
        if let Some(z) = z {
            check_len("z", shape.numel(), z.len())?;
        }
        let (mean, var) = batch_stats(shape, x);
        update_running_stats(
            &self.config,
            &mut self.state,
            &mean,
            &var,
            shape.per_channel(),
        );
        Ok(self.normalize(shape, x, z, mean, var))
    }

    fn eval(&self, shape: &Shape, x: &[f32], z: Option<&[f32]>) -> Result<ReferenceForward> {
        let track = self.config.track_running_stats;
        check_input(&self.config, &self.state, shape, "x", x.len(), !track)?;
        if let Some(z) = z {
            check_len("z", shape.numel(), z.len())?;
        }
        let (mean, var) = if track {
            self.running()
        } else {
            batch_stats(shape, x)
        };
        Ok(self.normalize(shape, x, z, mean, var))
    }

    /// Backward of plain batch norm (no activation, no residual): `dy` is the
    /// gradient of `bn(x)`. For a layer with an activation, or a forward with a
    /// residual, call [`Self::backward_fused`]. With [`StatsSource::Batch`] the statistics are recomputed from `x`
    /// and `dx` has the training form; with [`StatsSource::Running`] the running
    /// statistics are constants (eval form). `mask` says which gradients to compute.
    pub fn backward(
        &self,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        source: StatsSource,
        mask: GradMask,
    ) -> Result<ReferenceGradients> {
        let batch = source == StatsSource::Batch;
        check_input(&self.config, &self.state, shape, "x", x.len(), batch)?;
        check_len("dy", shape.numel(), dy.len())?;
        if !batch && !self.config.track_running_stats {
            return Err(Error::MissingSavedStats(NO_RUNNING_STATS));
        }
        let (mean, var) = if batch {
            batch_stats(shape, x)
        } else {
            self.running()
        };
        let invstd: Vec<f64> = var.iter().map(|&v| invstd(v, self.config.eps)).collect();
        let xhat = |i: usize| {
            let c = shape.channel_of(i);
            (f64::from(x[i]) - mean[c]) * invstd[c]
        };

        let (cc, m) = (shape.c(), shape.per_channel() as f64);
        let mut dbeta = vec![0.0; cc];
        let mut dgamma = vec![0.0; cc];
        for (i, &g) in dy.iter().enumerate() {
            let c = shape.channel_of(i);
            dbeta[c] += f64::from(g);
            dgamma[c] += f64::from(g) * xhat(i);
        }
        let dx = mask.dx.then(|| {
            dy.iter()
                .enumerate()
                .map(|(i, &g)| {
                    let c = shape.channel_of(i);
                    let k = self.gamma(c) * invstd[c];
                    if batch {
                        k / m * (m * f64::from(g) - dbeta[c] - xhat(i) * dgamma[c])
                    } else {
                        k * f64::from(g)
                    }
                })
                .collect()
        });
        let affine = self.config.affine;
        Ok(ReferenceGradients {
            dx,
            dgamma: (affine && mask.dgamma).then_some(dgamma),
            dbeta: (affine && mask.dbeta).then_some(dbeta),
            dz: None,
        })
    }

    /// Backward through the configured activation and, with `residual`, the
    /// residual add (`y = act(bn(x) [+ z])`). `y` is the forward's output: the
    /// gradient `g = dy` where [`Activation::passes`] at `y`, 0 elsewhere, goes into
    /// [`Self::backward`] in place of `dy` (`source` and `mask` as there), and with
    /// `residual`, `dz = g` (whatever `mask` says).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_fused(
        &self,
        shape: &Shape,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        source: StatsSource,
        mask: GradMask,
        residual: bool,
    ) -> Result<ReferenceGradients> {
        let batch = source == StatsSource::Batch;
        check_input(&self.config, &self.state, shape, "x", x.len(), batch)?;
        check_len("y", shape.numel(), y.len())?;
        check_len("dy", shape.numel(), dy.len())?;
        let g = activation_grad(self.config.activation, y, dy);
        let mut grads = self.backward(shape, x, &g, source, mask)?;
        grads.dz = residual.then(|| g.iter().map(|&v| f64::from(v)).collect());
        Ok(grads)
    }
}
