//! Layer options (PyTorch's, with the Keras/ONNX convention as an opt-in) and the
//! layer's learnable and running state.

use crate::{Error, Result};

/// Which framework's running-statistics convention the layer follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Convention {
    /// `running = (1 - momentum) * running + momentum * batch`, running variance
    /// unbiased (`var * m / (m - 1)`).
    #[default]
    PyTorch,
    /// Keras/ONNX: `running = momentum * running + (1 - momentum) * batch`, running
    /// variance biased.
    Keras,
}

/// An activation applied to the normalized output, fused into the layer's kernels:
/// `y = act(bn(x))`, or with a residual `z` (the `*_add` calls) `y = act(bn(x) + z)`,
/// the block cuDNN calls `BN_ACTIVATION` / `BN_ADD_ACTIVATION` and ResNets use. The
/// backward passes through it from `y`, the forward's output: `dy` is masked where
/// the activation is flat (PyTorch's `threshold_backward` / `hardtanh_backward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// No activation (plain batch norm).
    #[default]
    Identity,
    /// `max(v, 0)`; backward passes `dy` where `y > 0`.
    Relu,
    /// `min(max(v, 0), 6)` (PyTorch's `ReLU6`, a clamp); backward passes `dy` where
    /// `0 < y < 6`.
    Relu6,
}

impl Activation {
    /// Every activation, in the order of their codes.
    pub const ALL: [Activation; 3] = [Activation::Identity, Activation::Relu, Activation::Relu6];

    /// The activation of one value (NaN stays NaN).
    pub fn apply(self, v: f32) -> f32 {
        match self {
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

    /// Whether the gradient passes at an output `y` (a NaN output passes it, as
    /// PyTorch's backward does).
    pub fn passes(self, y: f32) -> bool {
        match self {
            Activation::Identity => true,
            Activation::Relu => y > 0.0 || y.is_nan(),
            Activation::Relu6 => (y > 0.0 && y < 6.0) || y.is_nan(),
        }
    }

    /// Lower-case name (`identity`, `relu`, `relu6`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Relu => "relu",
            Activation::Relu6 => "relu6",
        }
    }
}

/// Options of a batch-norm layer, with PyTorch's names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Channel count `C`.
    pub num_features: usize,
    /// Added to the variance before the square root (default `1e-5`).
    pub eps: f32,
    /// Running-statistics momentum (default `Some(0.1)`); `None` keeps a cumulative
    /// moving average (`f = 1 / num_batches_tracked`).
    pub momentum: Option<f32>,
    /// Learnable per-channel `gamma` and `beta` (default `true`).
    pub affine: bool,
    /// Keep running statistics for eval mode (default `true`).
    pub track_running_stats: bool,
    /// How `momentum` is read and which variance is tracked (default PyTorch).
    pub convention: Convention,
    /// Activation fused after the normalization (default none).
    pub activation: Activation,
}

impl BatchNormConfig {
    /// PyTorch's defaults: `eps = 1e-5`, `momentum = Some(0.1)`, affine, tracking.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            convention: Convention::PyTorch,
            activation: Activation::Identity,
        }
    }

    /// Keras' defaults: `eps = 1e-3`, `momentum = 0.99` weighting the old value,
    /// biased running variance.
    pub fn keras(num_features: usize) -> Self {
        Self {
            eps: 1e-3,
            momentum: Some(0.99),
            convention: Convention::Keras,
            ..Self::new(num_features)
        }
    }

    /// ONNX `BatchNormalization`'s defaults: `epsilon = 1e-5`, `momentum = 0.9`
    /// weighting the old value (the Keras convention), biased running variance.
    ///
    /// ```
    /// use wgpu_batchnorm::{BatchNormConfig, Convention};
    /// let c = BatchNormConfig::onnx(8);
    /// assert_eq!((c.eps, c.momentum, c.convention), (1e-5, Some(0.9), Convention::Keras));
    /// ```
    pub fn onnx(num_features: usize) -> Self {
        Self {
            eps: 1e-5,
            momentum: Some(0.9),
            convention: Convention::Keras,
            ..Self::new(num_features)
        }
    }

    /// Sets `eps`.
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Sets `momentum`.
    pub fn momentum(mut self, momentum: Option<f32>) -> Self {
        self.momentum = momentum;
        self
    }

    /// Sets `affine`.
    pub fn affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }

    /// Sets `track_running_stats`.
    pub fn track_running_stats(mut self, track: bool) -> Self {
        self.track_running_stats = track;
        self
    }

    /// Sets the fused activation.
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.num_features == 0 {
            return Err(Error::ZeroFeatures);
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(Error::BadEps(self.eps));
        }
        if let Some(m) = self.momentum {
            if !m.is_finite() || !(0.0..=1.0).contains(&m) {
                return Err(Error::BadMomentum(m));
            }
        }
        Ok(())
    }

    /// Weight of the batch statistic in the running-average update, given the value
    /// of `num_batches_tracked` *after* its increment.
    pub fn update_factor(&self, num_batches_tracked: u64) -> f64 {
        match (self.momentum, self.convention) {
            (None, _) => 1.0 / num_batches_tracked.max(1) as f64,
            (Some(m), Convention::PyTorch) => m as f64,
            (Some(m), Convention::Keras) => 1.0 - m as f64,
        }
    }

    /// Whether the running variance tracks the unbiased batch variance.
    pub fn unbiased_running_var(&self) -> bool {
        self.convention == Convention::PyTorch
    }
}

/// A layer's learnable parameters and running statistics on the host, e.g. for a
/// checkpoint. Vectors a configuration does not have (`gamma`/`beta` without
/// `affine`, running statistics without `track_running_stats`) are empty.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormState {
    /// Per-channel scale (PyTorch's `weight`).
    pub gamma: Vec<f32>,
    /// Per-channel shift (PyTorch's `bias`).
    pub beta: Vec<f32>,
    /// Running mean.
    pub running_mean: Vec<f32>,
    /// Running variance.
    pub running_var: Vec<f32>,
    /// Training forwards seen so far.
    pub num_batches_tracked: u64,
}

impl BatchNormState {
    /// Initial state: `gamma = 1`, `beta = 0`, `running_mean = 0`, `running_var = 1`.
    pub fn new(config: &BatchNormConfig) -> Self {
        let c = config.num_features;
        let (p, r) = (config.affine, config.track_running_stats);
        Self {
            gamma: if p { vec![1.0; c] } else { vec![] },
            beta: if p { vec![0.0; c] } else { vec![] },
            running_mean: if r { vec![0.0; c] } else { vec![] },
            running_var: if r { vec![1.0; c] } else { vec![] },
            num_batches_tracked: 0,
        }
    }

    /// A state from its parts (e.g. a checkpoint's tensors), checked against
    /// `config`: every vector of the length it asks for (empty where it has no such
    /// state), else [`Error::LengthMismatch`] naming the vector.
    ///
    /// ```
    /// use wgpu_batchnorm::{BatchNormConfig, BatchNormState};
    /// let config = BatchNormConfig::new(2);
    /// let s = BatchNormState::from_parts(
    ///     &config, vec![1.0, 2.0], vec![0.0, 0.5], vec![0.1, 0.2], vec![1.0, 3.0], 7,
    /// )?;
    /// assert_eq!(s.num_batches_tracked, 7);
    /// assert!(BatchNormState::from_parts(&config, vec![1.0], vec![], vec![], vec![], 0).is_err());
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    pub fn from_parts(
        config: &BatchNormConfig,
        gamma: Vec<f32>,
        beta: Vec<f32>,
        running_mean: Vec<f32>,
        running_var: Vec<f32>,
        num_batches_tracked: u64,
    ) -> Result<Self> {
        let state = Self {
            gamma,
            beta,
            running_mean,
            running_var,
            num_batches_tracked,
        };
        state.validate(config)?;
        Ok(state)
    }

    /// Checks that every vector has the length `config` asks for.
    pub fn validate(&self, config: &BatchNormConfig) -> Result<()> {
        let expect = Self::new(config);
        for (name, have, want) in [
            ("gamma", self.gamma.len(), expect.gamma.len()),
            ("beta", self.beta.len(), expect.beta.len()),
            (
                "running_mean",
                self.running_mean.len(),
                expect.running_mean.len(),
            ),
            (
                "running_var",
                self.running_var.len(),
                expect.running_var.len(),
            ),
        ] {
            if have != want {
                return Err(Error::LengthMismatch {
                    name,
                    expected: want,
                    got: have,
                });
            }
        }
        Ok(())
    }
}

/// Which gradients a backward pass computes (PyTorch's `output_mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GradMask {
    /// Input gradient.
    pub dx: bool,
    /// Gradient of `gamma` (only with `affine`).
    pub dgamma: bool,
    /// Gradient of `beta` (only with `affine`).
    pub dbeta: bool,
}

impl Default for GradMask {
    fn default() -> Self {
        Self {
            dx: true,
            dgamma: true,
            dbeta: true,
        }
    }
}

/// Where the statistics of a forward pass came from, which decides its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatsSource {
    /// Batch statistics (training, or eval without running stats): the statistics
    /// depend on `x`, and `dx` has the full training-mode form.
    Batch,
    /// Running statistics (eval with `track_running_stats`): constants.
    Running,
}
