//! Folding an eval-mode batch norm into the layer before it (a Linear or a
//! convolution), as inference engines do, or into the one after it: the layer's
//! weight and bias absorb the per-channel affine map that batch norm with running
//! statistics is.

use crate::cpu::reference::{check_len, invstd};
use crate::{BatchNormConfig, BatchNormState, Error, Result};

const NO_RUNNING_STATS: &str =
    "folding batch norm needs its running statistics (track_running_stats = true); \
     without them eval normalizes with each batch's own statistics, which no fixed \
     per-channel scale and shift reproduce";

/// Where the output-channel axis of a weight tensor sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// PyTorch's `[out, in, *kernel]`, output channel first: `nn.Linear`
    /// `[out, in]`, `nn.Conv1d` `[out, in/groups, k]`, `nn.Conv2d`
    /// `[out, in/groups, kh, kw]`, `nn.Conv3d` `[out, in/groups, kd, kh, kw]`.
    OutInKernel,
    /// The channels-last / TensorFlow order `[*kernel, in, out]`, output channel
    /// last: Keras `Dense` `[in, out]`, `Conv1D` `[k, in, out]`, `Conv2D`
    /// `[kh, kw, in, out]`, `Conv3D` `[kd, kh, kw, in, out]` (and `DepthwiseConv2D`
    /// `[kh, kw, in, multiplier]`, whose last two axes together are the output
    /// channel).
    KernelInOut,
}

/// An eval-mode batch norm with running statistics as the per-channel affine map it
/// is: `y = x * scale + shift`, with
///
/// ```text
/// scale_c = gamma_c / sqrt(running_var_c + eps)      (0 where running_var_c + eps == 0)
/// shift_c = beta_c - running_mean_c * scale_c
/// ```
///
/// (`gamma = 1`, `beta = 0` without `affine`; a fused [`crate::Activation`] is not
/// part of the map: it stays, applied after the folded layer). This is the eval forward of
/// `docs/semantics.md` rewritten, so `x * scale + shift` equals the layer's eval
/// output up to the rounding of `scale` and `shift` to f32. Both are computed in f64
/// from the f32 state and rounded once.
///
/// [`FoldedBatchNorm::fold_into`] merges it into the weight and bias of the Linear
/// or convolution before the batch norm, so that the folded layer alone gives what
/// layer-then-batch-norm gave in eval mode. The fold is for inference only: the
/// folded layer no longer has the batch norm's statistics or parameters to train.
///
/// ```
/// use wgpu_batchnorm::{BatchNormConfig, BatchNormState, FoldedBatchNorm};
/// let config = BatchNormConfig::new(2).eps(1.0);
/// // gamma, beta, running_mean, running_var, num_batches_tracked
/// let state = BatchNormState::from_parts(
///     &config, vec![2.0, 1.0], vec![0.5, 0.0], vec![1.0, -2.0], vec![3.0, 0.0], 10,
/// )?;
/// let folded = FoldedBatchNorm::from_state(&config, &state)?;
/// assert_eq!(folded.scale, vec![1.0, 1.0]); // 2 / sqrt(3 + 1), 1 / sqrt(0 + 1)
/// assert_eq!(folded.shift, vec![-0.5, 2.0]); // 0.5 - 1 * 1, 0 - (-2) * 1
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct FoldedBatchNorm {
    /// Per-channel factor `gamma / sqrt(running_var + eps)`.
    pub scale: Vec<f32>,
    /// Per-channel offset `beta - running_mean * scale`.
    pub shift: Vec<f32>,
}

impl FoldedBatchNorm {
    /// The affine map of a layer's eval forward, from its options and state.
    ///
    /// Fails with the errors of [`BatchNormConfig::validate`] and
    /// [`BatchNormState::validate`], and with [`Error::MissingState`] when the layer
    /// has `track_running_stats = false`: its eval forward normalizes with batch
    /// statistics, so there is nothing to fold.
    pub fn from_state(config: &BatchNormConfig, state: &BatchNormState) -> Result<Self> {
        config.validate()?;
        state.validate(config)?;
        if !config.track_running_stats {
            return Err(Error::MissingState(NO_RUNNING_STATS));
        }
        let c = config.num_features;
        let mut scale = Vec::with_capacity(c);
        let mut shift = Vec::with_capacity(c);
        for ch in 0..c {
            let gamma = state.gamma.get(ch).map_or(1.0, |&g| f64::from(g));
            let beta = state.beta.get(ch).map_or(0.0, |&b| f64::from(b));
            let s = gamma * invstd(f64::from(state.running_var[ch]), config.eps);
            scale.push(s as f32);
            shift.push((beta - f64::from(state.running_mean[ch]) * s) as f32);
        }
        Ok(Self { scale, shift })
    }

    /// The channel count (the output channels of the layer folded into).
    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// Folds the batch norm into the weight and bias of the layer after it, when
    /// nothing (no activation) stands between them, as in Keras' `Dense, ReLU,
    /// BatchNormalization, Dense`: the next layer computes `W (x * scale + shift) +
    /// b`, so every weight of input channel `i` is multiplied by `scale[i]` (in
    /// place) and the returned new bias is `b[o] + sum over i and the kernel of
    /// W[o, i, k] * shift[i]` (with the weights as they were; f64, rounded once).
    ///
    /// `weight` is the whole weight of a Linear or an ungrouped convolution with
    /// `out_channels` outputs and `self.channels()` inputs, in `layout` (PyTorch's
    /// `[out, in, *kernel]` or the channels-last `[*kernel, in, out]`). For a
    /// convolution the fold is exact only without zero padding: a padded border
    /// sees zeros where the unfolded layer saw `shift`.
    ///
    /// Fails, with nothing modified, with [`Error::ZeroFeatures`] when `scale` or
    /// `out_channels` is zero, and with [`Error::LengthMismatch`] when `shift` is not
    /// as long as `scale`, when `weight` is not a non-zero multiple of
    /// `out_channels * self.channels()` long, or when `bias` is not `out_channels`
    /// long.
    ///
    /// ```
    /// use wgpu_batchnorm::{FoldedBatchNorm, WeightLayout};
    /// let folded = FoldedBatchNorm { scale: vec![2.0, 0.5], shift: vec![1.0, -1.0] };
    /// // Dense(2 -> 1) after the batch norm, Keras layout [in, out].
    /// let mut weight = vec![3.0f32, 4.0];
    /// let bias = folded.fold_into_next(&mut weight, Some(&[0.5]), 1, WeightLayout::KernelInOut)?;
    /// assert_eq!(weight, vec![6.0, 2.0]);
    /// assert_eq!(bias, vec![0.5 + 3.0 * 1.0 + 4.0 * -1.0]);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    pub fn fold_into_next(
        &self,
        weight: &mut [f32],
        bias: Option<&[f32]>,
        out_channels: usize,
        layout: WeightLayout,
    ) -> Result<Vec<f32>> {
        let inputs = self.scale.len();
        if inputs == 0 || out_channels == 0 {
            return Err(Error::ZeroFeatures);
        }
        check_len("shift", inputs, self.shift.len())?;
        let pair = inputs * out_channels;
        if weight.is_empty() || !weight.len().is_multiple_of(pair) {
            return Err(Error::LengthMismatch {
                name: "weight",
                expected: weight.len().div_ceil(pair).max(1) * pair,
                got: weight.len(),
            });
        }
        if let Some(b) = bias {
            check_len("bias", out_channels, b.len())?;
        }
        let kernel = weight.len() / pair;
        // (output, input) of each weight, in memory order.
        let index = |n: usize| match layout {
            WeightLayout::OutInKernel => (n / (inputs * kernel), n / kernel % inputs),
            WeightLayout::KernelInOut => (n % out_channels, n / out_channels % inputs),
        };
        let mut new_bias: Vec<f64> = (0..out_channels)
            .map(|o| bias.map_or(0.0, |b| f64::from(b[o])))
            .collect();
        for (n, w) in weight.iter_mut().enumerate() {
            let (o, i) = index(n);
            new_bias[o] += f64::from(*w) * f64::from(self.shift[i]);
            *w = (f64::from(*w) * f64::from(self.scale[i])) as f32;
        }
        Ok(new_bias.into_iter().map(|b| b as f32).collect())
    }

    /// Folds the batch norm into the weight and bias of the layer before it: for
    /// each output channel `o`, every weight of `o` is multiplied by `scale[o]` (in
    /// place), and the returned new bias is `bias[o] * scale[o] + shift[o]` (computed
    /// in f64, rounded once). A layer without bias (`None`) counts as a zero bias,
    /// so its new bias is `shift`.
    ///
    /// `weight` is the whole weight tensor, contiguous, in `layout`; its output
    /// channel count is `self.channels()`, and the other axes (inputs, kernel,
    /// groups) need not be given, as every weight of one output channel gets the
    /// same factor. Grouped and depthwise convolutions fold the same way.
    /// Transposed convolutions, whose PyTorch weight is `[in, out/groups, *kernel]`,
    /// have neither layout.
    ///
    /// Fails, with nothing modified, with [`Error::ZeroFeatures`] when `scale` is
    /// empty, and with [`Error::LengthMismatch`] when `shift` is not as long as
    /// `scale`, when `weight` is not a non-zero multiple of the channel count long
    /// (`expected` is then the next such multiple), or when `bias` is not one value
    /// per channel.
    pub fn fold_into(
        &self,
        weight: &mut [f32],
        bias: Option<&[f32]>,
        layout: WeightLayout,
    ) -> Result<Vec<f32>> {
        let out = self.scale.len();
        if out == 0 {
            return Err(Error::ZeroFeatures);
        }
        check_len("shift", out, self.shift.len())?;
        if weight.is_empty() || !weight.len().is_multiple_of(out) {
            return Err(Error::LengthMismatch {
                name: "weight",
                expected: weight.len().div_ceil(out).max(1) * out,
                got: weight.len(),
            });
        }
        if let Some(b) = bias {
            check_len("bias", out, b.len())?;
        }

        // The product of two f32 is exact in f64, so this rounds once.
        let times = |w: &mut f32, s: f32| *w = (f64::from(*w) * f64::from(s)) as f32;
        match layout {
            WeightLayout::OutInKernel => {
                let per_channel = weight.len() / out;
                for (row, &s) in weight.chunks_exact_mut(per_channel).zip(&self.scale) {
                    row.iter_mut().for_each(|w| times(w, s));
                }
            }
            WeightLayout::KernelInOut => {
                for row in weight.chunks_exact_mut(out) {
                    row.iter_mut()
                        .zip(&self.scale)
                        .for_each(|(w, &s)| times(w, s));
                }
            }
        }
        Ok((0..out)
            .map(|o| {
                let b = bias.map_or(0.0, |b| f64::from(b[o]));
                (b * f64::from(self.scale[o]) + f64::from(self.shift[o])) as f32
            })
            .collect())
    }
}
