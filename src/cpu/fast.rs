//! The fast CPU path: multi-threaded (the rayon pool, the calling thread working
//! too), cache-friendly, f32 data with f64 per-channel bookkeeping. It is the
//! baseline the GPU kernels are benchmarked against, so it is written to be a real
//! competitor, and it meets the same tolerances as the GPU kernels against
//! [`super::reference`].
//!
//! Data flow, mirroring the kernels: a reduction pass (per-channel sums), a
//! per-channel finalize in f64 (statistics, folded coefficients), and an
//! elementwise pass (`y = act((x - hi) * scale + shift [+ z])`,
//! `dx = k1 * dy + k2 * (x - hi) + k3`). The activation and the residual add are part
//! of the elementwise forward; the fused backward first masks `dy` by the
//! activation ([`CpuBatchNorm::backward_fused`]), into `dz` when there is a residual.
//!
//! Numerics: the statistics are sums over blocks of up to `BLOCK` (256) values (or
//! rows) that stay in L1: a first look at a block gives a pivot close to its mean
//! (exactly its value when the block is constant), and the block's sums of
//! `d = x - pivot` and `d^2` run in f32, where `d` is exact on large-mean data. Each
//! block is then folded into f64 sums relative to a per-channel center. The work
//! is split into items that depend on the shape only and merged in index order, so
//! results do not depend on thread scheduling: the same input gives the same bits
//! on every run, whatever the thread count.

// Serial in a browser (no thread pool there): the same calls, one thread.
#[cfg(target_arch = "wasm32")]
use crate::serial_pool as rayon;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use super::reference::{check_input, check_len, invstd, update_running_stats, NO_RUNNING_STATS};
use crate::{
    Activation, BatchNormConfig, BatchNormState, Element, Error, ForwardOutput, GradMask,
    Gradients, Layout, Result, SavedStatsHost, Shape, TrainOutput,
};
use std::any::{Any, TypeId};
use std::borrow::Cow;

/// Values per f32 block before the block's sums are folded into f64 (channels-first
/// runs); in the row traversal, a block is at most this many rows.
const BLOCK: usize = 256;
/// Values per block in the row traversal, so that a block's columns stay in cache
/// between their two looks (rows per block within `[8, BLOCK / 2]`).
const ROW_BLOCK_VALUES: usize = 8192;
/// Independent f32 accumulators in a contiguous block (vectorizes, shortens chains).
const LANES: usize = 16;
const _: () = assert!(LANES == 16, "hsum is written for 16 lanes");
/// Elements per parallel work item.
const ITEM: usize = 1 << 16;
/// Channels-first tensors with at least this many spatial positions are reduced
/// plane by plane; smaller ones as rows of `C * spatial` columns (measured: the
/// per-run bookkeeping costs more than the strided rows below 64).
const PLANE_MIN_REDUCE: usize = 64;
/// The same for the elementwise passes, where a run costs next to nothing.
const PLANE_MIN_ELEMENTWISE: usize = 16;

/// A batch-norm layer evaluated on the CPU in f32 (with f64 per-channel statistics).
///
/// ```
/// use wgpu_batchnorm::{cpu::fast::CpuBatchNorm, BatchNormConfig, GradMask, Shape};
/// let mut bn = CpuBatchNorm::new(BatchNormConfig::new(2)).unwrap();
/// let shape = Shape::channels_last(&[2, 2]).unwrap();
/// let out = bn.forward_train(&shape, &[1.0, 10.0, 3.0, 30.0]).unwrap();
/// let saved = out.saved;
/// assert_eq!(saved.mean, vec![2.0, 20.0]);
/// assert_eq!(bn.state.num_batches_tracked, 1);
/// let grads = bn
///     .backward(&shape, &[1.0, 10.0, 3.0, 30.0], &[1.0; 4], Some(&saved), GradMask::default())
///     .unwrap();
/// assert_eq!(grads.dbeta.unwrap(), vec![2.0, 2.0]);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CpuBatchNorm {
    /// The layer's options.
    pub config: BatchNormConfig,
    /// Parameters and running statistics.
    pub state: BatchNormState,
}

impl CpuBatchNorm {
    /// A layer in its initial state.
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

    /// Training forward: batch statistics, output `y = act(bn(x))` with the
    /// configured activation, running statistics updated (with
    /// `track_running_stats`). `x` is f32 or `half::f16`: f16 values are widened to
    /// f32 (exactly), computed on as f32 and `y` is rounded to f16 (to nearest even);
    /// the statistics are f32 either way.
    pub fn forward_train<T: Element>(&mut self, shape: &Shape, x: &[T]) -> Result<TrainOutput<T>> {
        let x = widen(x);
        let mut y = vec![0.0; x.len()];
        let saved = self.forward_train_into(shape, &x, &mut y)?;
        Ok(TrainOutput {
            y: narrow(y),
            saved,
        })
    }

    /// [`Self::forward_train`] with a residual `z` of `x`'s shape and layout:
    /// `y = act(bn(x) + z)` (the statistics are those of `x` alone).
    pub fn forward_train_add<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: &[T],
    ) -> Result<TrainOutput<T>> {
        let (x, z) = (widen(x), widen(z));
        let mut y = vec![0.0; x.len()];
        let saved = self.forward_train_add_into(shape, &x, &z, &mut y)?;
        Ok(TrainOutput {
            y: narrow(y),
            saved,
        })
    }

    /// Eval forward: running statistics when tracked (`saved = None`), otherwise
    /// batch statistics (`saved = Some`); output `y = act(bn(x))`. Updates nothing.
    /// Element types as in [`Self::forward_train`].
    pub fn forward_eval<T: Element>(&mut self, shape: &Shape, x: &[T]) -> Result<ForwardOutput<T>> {
        let x = widen(x);
        let mut y = vec![0.0; x.len()];
        let saved = self.forward_eval_into(shape, &x, &mut y)?;
        Ok(ForwardOutput {
            y: narrow(y),
            saved,
        })
    }

    /// [`Self::forward_eval`] with a residual `z` of `x`'s shape and layout:
    /// `y = act(bn(x) + z)`.
    pub fn forward_eval_add<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: &[T],
    ) -> Result<ForwardOutput<T>> {
        let (x, z) = (widen(x), widen(z));
        let mut y = vec![0.0; x.len()];
        let saved = self.forward_eval_add_into(shape, &x, &z, &mut y)?;
        Ok(ForwardOutput {
            y: narrow(y),
            saved,
        })
    }

    /// Backward of plain batch norm (no activation, no residual): `dy` is the
    /// gradient of `bn(x)`; for a layer with an activation, or a forward with a
    /// residual, call [`Self::backward_fused`]. `saved`: the batch statistics of the forward (training form), or
    /// `None` for the running statistics (eval form; needs `track_running_stats`).
    /// `dgamma`/`dbeta` are `None` when not asked for or when the layer is not affine.
    /// `x` and `dy` are f32 or `half::f16` (widened to f32 exactly); `dx` is
    /// computed in f32 and rounded to their type, `dgamma`/`dbeta` are f32.
    pub fn backward<T: Element>(
        &self,
        shape: &Shape,
        x: &[T],
        dy: &[T],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
    ) -> Result<Gradients<T>> {
        let grads = self.backward_f32(shape, &widen(x), &widen(dy), saved, mask)?;
        Ok(Gradients {
            dx: grads.dx.map(narrow),
            dgamma: grads.dgamma,
            dbeta: grads.dbeta,
            dz: None,
        })
    }

    /// [`Self::backward`] on f32 data.
    fn backward_f32(
        &self,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
    ) -> Result<Gradients> {
        let c = shape.c();
        let affine = self.config.affine;
        let mut dx = mask.dx.then(|| vec![0.0; x.len()]);
        let mut dgamma = (affine && mask.dgamma).then(|| vec![0.0; c]);
        let mut dbeta = (affine && mask.dbeta).then(|| vec![0.0; c]);
        self.backward_into(
            shape,
            x,
            dy,
            saved,
            dx.as_deref_mut(),
            dgamma.as_deref_mut(),
            dbeta.as_deref_mut(),
        )?;
        Ok(Gradients {
            dx,
            dgamma,
            dbeta,
            dz: None,
        })
    }

    /// Backward through the configured activation and, with `residual`, the
    /// residual add (`y = act(bn(x) [+ z])`). `y` is the forward's output: `g = dy`
    /// where [`Activation::passes`] at `y`, 0 elsewhere, takes the place of `dy` in
    /// [`Self::backward`] (`saved`, `mask` and element types as there); with
    /// `residual`, `dz = g` (whatever `mask` says).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_fused<T: Element>(
        &self,
        shape: &Shape,
        x: &[T],
        y: &[T],
        dy: &[T],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
        residual: bool,
    ) -> Result<Gradients<T>> {
        check_input(
            &self.config,
            &self.state,
            shape,
            "x",
            x.len(),
            saved.is_some(),
        )?;
        check_len("y", shape.numel(), y.len())?;
        check_len("dy", shape.numel(), dy.len())?;
        let (x, y, dy) = (widen(x), widen(y), widen(dy));
        let act = self.config.activation;
        // The masked gradient, computed once: it is dz itself with a residual; with
        // neither activation nor residual it is dy.
        let g: Option<Vec<f32>> = (residual || act != Activation::Identity).then(|| {
            let mut g = vec![0.0; dy.len()];
            mask_gradient(act, &y, &dy, &mut g);
            g
        });
        let grads = self.backward_f32(shape, &x, g.as_deref().unwrap_or(&dy), saved, mask)?;
        Ok(Gradients {
            dx: grads.dx.map(narrow),
            dgamma: grads.dgamma,
            dbeta: grads.dbeta,
            // Exact for any T: g holds values of dy and zeros.
            dz: if residual { g.map(narrow) } else { None },
        })
    }

    /// [`Self::forward_train`] writing `y` into the caller's slice.
    pub fn forward_train_into(
        &mut self,
        shape: &Shape,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<SavedStatsHost> {
        self.train(shape, x, None, y)
    }

    /// [`Self::forward_eval`] writing `y` into the caller's slice.
    pub fn forward_eval_into(
        &mut self,
        shape: &Shape,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<Option<SavedStatsHost>> {
        self.eval(shape, x, None, y)
    }

    /// [`Self::forward_train_add`] writing `y` into the caller's slice.
    pub fn forward_train_add_into(
        &mut self,
        shape: &Shape,
        x: &[f32],
        z: &[f32],
        y: &mut [f32],
    ) -> Result<SavedStatsHost> {
        self.train(shape, x, Some(z), y)
    }

    /// [`Self::forward_eval_add`] writing `y` into the caller's slice.
    pub fn forward_eval_add_into(
        &mut self,
        shape: &Shape,
        x: &[f32],
        z: &[f32],
        y: &mut [f32],
    ) -> Result<Option<SavedStatsHost>> {
        self.eval(shape, x, Some(z), y)
    }

    /// The training forward, with the residual `z` when given.
    fn train(
        &mut self,
        shape: &Shape,
        x: &[f32],
        z: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<SavedStatsHost> {
        check_input(&self.config, &self.state, shape, "x", x.len(), true)?;
        if let Some(z) = z {
            check_len("z", shape.numel(), z.len())?;
        }
        check_len("y", shape.numel(), y.len())?;
        let (mean, var) = batch_stats(shape, x);
        let saved = self.normalize_batch(shape, x, z, y, &mean, &var);
        update_running_stats(
            &self.config,
            &mut self.state,
            &mean,
            &var,
            shape.per_channel(),
        );
        Ok(saved)
    }

    /// The eval forward, with the residual `z` when given.
    fn eval(
        &self,
        shape: &Shape,
        x: &[f32],
        z: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<Option<SavedStatsHost>> {
        let track = self.config.track_running_stats;
        check_input(&self.config, &self.state, shape, "x", x.len(), !track)?;
        if let Some(z) = z {
            check_len("z", shape.numel(), z.len())?;
        }
        check_len("y", shape.numel(), y.len())?;
        if !track {
            let (mean, var) = batch_stats(shape, x);
            return Ok(Some(self.normalize_batch(shape, x, z, y, &mean, &var)));
        }
        let c = shape.c();
        let (mut scale, mut shift) = (vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let rv = f64::from(self.state.running_var[ch]);
            scale[ch] = (self.gamma(ch) * invstd(rv, self.config.eps)) as f32;
            shift[ch] = self.beta(ch) as f32;
        }
        let act = self.config.activation;
        normalize(
            act,
            shape,
            y,
            x,
            z,
            [&self.state.running_mean, &scale, &shift],
        );
        Ok(None)
    }

    /// Backward into the caller's slices; each of `dx`, `dgamma`, `dbeta` is computed
    /// only when given (`dgamma`/`dbeta` are overwritten, not accumulated, and need
    /// `affine`). `saved` as in [`Self::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into(
        &self,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        saved: Option<&SavedStatsHost>,
        dx: Option<&mut [f32]>,
        dgamma: Option<&mut [f32]>,
        dbeta: Option<&mut [f32]>,
    ) -> Result<()> {
        check_input(
            &self.config,
            &self.state,
            shape,
            "x",
            x.len(),
            saved.is_some(),
        )?;
        let (numel, c) = (shape.numel(), shape.c());
        check_len("dy", numel, dy.len())?;
        if let Some(dx) = &dx {
            check_len("dx", numel, dx.len())?;
        }
        for (name, out) in [("dgamma", &dgamma), ("dbeta", &dbeta)] {
            if let Some(out) = out {
                if !self.config.affine {
                    return Err(Error::MissingState(
                        "dgamma and dbeta exist only with affine = true",
                    ));
                }
                check_len(name, c, out.len())?;
            }
        }
        if let Some(s) = saved {
            check_len("saved.mean", c, s.mean.len())?;
            check_len("saved.invstd", c, s.invstd.len())?;
            check_len("saved.mean_lo", c, s.mean_lo.len())?;
        } else if !self.config.track_running_stats {
            return Err(Error::MissingSavedStats(NO_RUNNING_STATS));
        }

        let m = shape.per_channel() as f64;
        let (hi, lo, inv): (&[f32], Vec<f64>, Vec<f64>) = match saved {
            Some(s) => (
                &s.mean,
                s.mean_lo.iter().map(|&v| f64::from(v)).collect(),
                s.invstd.iter().map(|&v| f64::from(v)).collect(),
            ),
            None => (
                &self.state.running_mean,
                vec![0.0; c],
                self.state
                    .running_var
                    .iter()
                    .map(|&v| invstd(f64::from(v), self.config.eps))
                    .collect(),
            ),
        };
        // The sums are needed for dgamma/dbeta, and for dx in the training form.
        let need_sums = dgamma.is_some() || dbeta.is_some() || (saved.is_some() && dx.is_some());
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
        if need_sums {
            for (ch, [b, a]) in reduce(shape, x, Sums::Grad(dy), hi).into_iter().enumerate() {
                sum_dy[ch] = b;
                // sum dy * ((x - hi) - lo) * invstd
                sum_dy_xhat[ch] = inv[ch] * (a - lo[ch] * b);
            }
        }
        if let Some(out) = dbeta {
            for (o, &v) in out.iter_mut().zip(&sum_dy) {
                *o = v as f32;
            }
        }
        if let Some(out) = dgamma {
            for (o, &v) in out.iter_mut().zip(&sum_dy_xhat) {
                *o = v as f32;
            }
        }
        let Some(dx) = dx else { return Ok(()) };
        let k1: Vec<f64> = (0..c).map(|ch| self.gamma(ch) * inv[ch]).collect();
        let narrow = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        if saved.is_none() {
            let k1 = narrow(k1);
            elementwise(shape, dx, dy, dy, [&k1, &k1, &k1, &k1], |g, _, [k, ..]| {
                g * k
            });
            return Ok(());
        }
        // dx = k1 / m * (m * dy - sum_dy - xhat * sum_dy_xhat)
        //    = k1 * dy + k2 * (x - hi) + k3,  with xhat = ((x - hi) - lo) * invstd.
        let k2: Vec<f64> = (0..c)
            .map(|ch| -k1[ch] * sum_dy_xhat[ch] * inv[ch] / m)
            .collect();
        let k3: Vec<f64> = (0..c)
            .map(|ch| -k1[ch] * sum_dy[ch] / m - k2[ch] * lo[ch])
            .collect();
        let (k1, k2, k3) = (narrow(k1), narrow(k2), narrow(k3));
        elementwise(
            shape,
            dx,
            x,
            dy,
            [hi, &k1, &k2, &k3],
            |x, g, [h, a, b, d]| a * g + b * (x - h) + d,
        );
        Ok(())
    }

    fn gamma(&self, c: usize) -> f64 {
        self.state.gamma.get(c).map_or(1.0, |&g| f64::from(g))
    }

    fn beta(&self, c: usize) -> f64 {
        self.state.beta.get(c).map_or(0.0, |&b| f64::from(b))
    }

    /// Normalizes with batch statistics: `y = act((x - hi) * scale + shift [+ z])`,
    /// where the mean is split into `hi + lo` and `lo` is folded into `shift`.
    fn normalize_batch(
        &self,
        shape: &Shape,
        x: &[f32],
        z: Option<&[f32]>,
        y: &mut [f32],
        mean: &[f64],
        var: &[f64],
    ) -> SavedStatsHost {
        let c = shape.c();
        let mut saved = SavedStatsHost {
            mean: vec![0.0; c],
            invstd: vec![0.0; c],
            mean_lo: vec![0.0; c],
        };
        let (mut scale, mut shift) = (vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let hi = mean[ch] as f32;
            let lo = mean[ch] - f64::from(hi);
            let inv = invstd(var[ch], self.config.eps);
            let s = self.gamma(ch) * inv;
            saved.mean[ch] = hi;
            saved.mean_lo[ch] = lo as f32;
            saved.invstd[ch] = inv as f32;
            scale[ch] = s as f32;
            shift[ch] = (self.beta(ch) - lo * s) as f32;
        }
        let act = self.config.activation;
        normalize(act, shape, y, x, z, [&saved.mean, &scale, &shift]);
        saved
    }
}

/// A host tensor as f32: the slice itself when `T` is f32, otherwise its values
/// widened (exactly) into a new vector.
fn widen<T: Element>(x: &[T]) -> Cow<'_, [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // T is f32: the cast is the identity.
        Cow::Borrowed(bytemuck::cast_slice(x))
    } else {
        Cow::Owned(x.iter().map(|&v| v.to_f32()).collect())
    }
}

/// f32 results as a tensor of `T`: the vector itself when `T` is f32, otherwise
/// its values rounded to `T` (to nearest even).
fn narrow<T: Element>(v: Vec<f32>) -> Vec<T> {
    let mut slot = Some(v);
    if let Some(same) = (&mut slot as &mut dyn Any).downcast_mut::<Option<Vec<T>>>() {
        return same.take().expect("the slot holds the vector");
    }
    let v = slot.expect("the slot holds the vector");
    v.into_iter().map(T::from_f32).collect()
}

/// Codes of the activations as const parameters ([`act`], [`passes`]).
const IDENTITY: u8 = 0;
const RELU: u8 = 1;
const RELU6: u8 = 2;

/// [`Activation::apply`] with the activation a constant, so that it compiles to a
/// compare and select in the vectorized loops (NaN stays NaN).
#[inline(always)]
fn act<const A: u8>(v: f32) -> f32 {
    match A {
        RELU => {
            if v < 0.0 {
                0.0
            } else {
                v
            }
        }
        RELU6 => v.clamp(0.0, 6.0),
        _ => v,
    }
}

/// [`Activation::passes`] with the activation a constant (a NaN `y` passes).
#[inline(always)]
fn passes<const A: u8>(y: f32) -> bool {
    match A {
        RELU => y > 0.0 || y.is_nan(),
        RELU6 => (y > 0.0 && y < 6.0) || y.is_nan(),
        _ => true,
    }
}

/// `y = act((x - hi) * scale + shift [+ z])`, `coef = [hi, scale, shift]` per channel.
fn normalize(
    activation: Activation,
    shape: &Shape,
    y: &mut [f32],
    x: &[f32],
    z: Option<&[f32]>,
    coef: [&[f32]; 3],
) {
    match activation {
        Activation::Identity => normalize_act::<IDENTITY>(shape, y, x, z, coef),
        Activation::Relu => normalize_act::<RELU>(shape, y, x, z, coef),
        Activation::Relu6 => normalize_act::<RELU6>(shape, y, x, z, coef),
    }
}

fn normalize_act<const A: u8>(
    shape: &Shape,
    y: &mut [f32],
    x: &[f32],
    z: Option<&[f32]>,
    [hi, scale, shift]: [&[f32]; 3],
) {
    let coef = [hi, scale, shift, shift];
    match z {
        Some(z) => elementwise(shape, y, x, z, coef, |x, z, [h, s, t, _]| {
            act::<A>((x - h) * s + t + z)
        }),
        None => elementwise(shape, y, x, x, coef, |x, _, [h, s, t, _]| {
            act::<A>((x - h) * s + t)
        }),
    }
}

/// `g = dy` where the activation passes the gradient at `y`, else 0, in parallel
/// over fixed chunks (any layout: the mask is elementwise and channel-free).
fn mask_gradient(activation: Activation, y: &[f32], dy: &[f32], g: &mut [f32]) {
    match activation {
        Activation::Identity => mask_gradient_act::<IDENTITY>(y, dy, g),
        Activation::Relu => mask_gradient_act::<RELU>(y, dy, g),
        Activation::Relu6 => mask_gradient_act::<RELU6>(y, dy, g),
    }
}

fn mask_gradient_act<const A: u8>(y: &[f32], dy: &[f32], g: &mut [f32]) {
    chunk_items(g, ITEM, |k, gi| {
        let base = k * ITEM;
        let (yi, di) = (&y[base..base + gi.len()], &dy[base..base + gi.len()]);
        for q in (0..gi.len()).step_by(BLOCK * 4) {
            let e = (q + BLOCK * 4).min(gi.len());
            prefetch::<false>(yi, q + PREFETCH, e - q);
            prefetch::<false>(di, q + PREFETCH, e - q);
            for ((o, &v), &d) in gi[q..e].iter_mut().zip(&yi[q..e]).zip(&di[q..e]) {
                *o = if passes::<A>(v) { d } else { 0.0 };
            }
        }
    });
}

/// Per-channel batch mean and biased variance (f64), in one pass over memory.
pub fn batch_stats(shape: &Shape, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    // Per-channel center of the f64 sums: the channel's first value. Any value of
    // the channel will do: blocks are folded in f64, where the cancellation in
    // `s2 - s1^2 / m` costs nothing measurable.
    let center: Vec<f32> = (0..shape.c()).map(|ch| x[shape.index(0, ch, 0)]).collect();
    let m = shape.per_channel() as f64;
    reduce(shape, x, Sums::Moments, &center)
        .into_iter()
        .zip(&center)
        .map(|([s1, s2], &p)| {
            // A NaN or ±inf in the channel (and only that: f64 sums of f32 values
            // cannot overflow) makes the whole channel's statistics NaN.
            if !(s1.is_finite() && p.is_finite()) {
                return (f64::NAN, f64::NAN);
            }
            let m2 = s2 - s1 * s1 / m;
            // Keeps NaN (f64::max would not).
            let var = if m2 < 0.0 { 0.0 } else { m2 / m };
            (f64::from(p) + s1 / m, var)
        })
        .unzip()
}

/// What a reduction sums per channel, relative to a per-channel `center`.
#[derive(Clone, Copy)]
enum Sums<'a> {
    /// `[sum d, sum d^2]` with `d = x - center`.
    Moments,
    /// `[sum dy, sum dy * (x - center)]`.
    Grad(&'a [f32]),
}

/// How a tensor is walked.
enum Traversal {
    /// Channels-first with large planes: memory is runs of `s` values, the run of
    /// plane `p` belonging to channel `p % c`.
    Planes { c: usize, s: usize },
    /// Rows of `width` columns; column `j` belongs to channel `j / rep`
    /// (channels-last: rows are `(n, s)`, `rep = 1`; small channels-first planes:
    /// rows are `n`, `rep = s`).
    Rows { width: usize, rep: usize },
}

fn traversal(shape: &Shape, plane_min: usize) -> Traversal {
    let (c, s) = (shape.c(), shape.spatial_size());
    match shape.layout() {
        Layout::ChannelsFirst if s >= plane_min => Traversal::Planes { c, s },
        Layout::ChannelsFirst => Traversal::Rows {
            width: c * s,
            rep: s,
        },
        Layout::ChannelsLast => Traversal::Rows { width: c, rep: 1 },
    }
}

/// The plane runs of the values `start..start + len` of a channels-first tensor
/// with planes of `s` values and `c` channels: `(offset from start, length,
/// channel)`, in memory order.
fn plane_runs(
    start: usize,
    len: usize,
    s: usize,
    c: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let (mut i, mut in_plane, mut ch) = (0, start % s, (start / s) % c);
    std::iter::from_fn(move || {
        if i >= len {
            return None;
        }
        let run = (i, (s - in_plane).min(len - i), ch);
        i += run.1;
        in_plane = 0;
        ch = if ch + 1 == c { 0 } else { ch + 1 };
        Some(run)
    })
}

/// Per-channel f64 sums (see [`Sums`]), merged in a fixed order.
fn reduce(shape: &Shape, x: &[f32], sums: Sums, center: &[f32]) -> Vec<[f64; 2]> {
    match traversal(shape, PLANE_MIN_REDUCE) {
        Traversal::Planes { c, s } => reduce_planes(x, sums, center, c, s),
        Traversal::Rows { width, rep } => reduce_rows(x, sums, center, shape.c(), width, rep),
    }
}

fn add2(a: [f64; 2], b: [f64; 2]) -> [f64; 2] {
    [a[0] + b[0], a[1] + b[1]]
}

/// Folds the f32 moments `[sum d, sum d^2]` of a block of `n` values, taken
/// relative to the block's pivot, into f64 sums relative to the channel's center;
/// `delta = pivot - center`.
#[inline]
fn fold_moments(acc: &mut [f64; 2], a: [f32; 2], n: usize, delta: f64) {
    let (a0, a1, n) = (f64::from(a[0]), f64::from(a[1]), n as f64);
    acc[0] += a0 + n * delta;
    acc[1] += a1 + delta * (2.0 * a0 + n * delta);
}

/// Adds f32 block sums to f64 ones.
#[inline]
fn fold_sums(acc: &mut [f64; 2], a: [f32; 2]) {
    *acc = add2(*acc, a.map(f64::from));
}

/// Values ahead of the current position whose cache lines a streaming loop requests
/// early (8 KiB). Measured on a 2-core Xeon: without it the reductions run about a
/// third slower, waiting on memory.
const PREFETCH: usize = 2048;

/// Requests the cache lines of `s[from..from + len]` (clipped to `s`), into L1
/// (`L2 = false`) or only into L2.
#[inline(always)]
fn prefetch<const L2: bool>(s: &[f32], from: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let end = from.saturating_add(len).min(s.len());
        let mut i = from;
        while i < end {
            let p = s.as_ptr().wrapping_add(i).cast();
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is only a
            // hint: it reads nothing and never faults (the address is in `s` anyway).
            unsafe {
                if L2 {
                    _mm_prefetch::<_MM_HINT_T1>(p)
                } else {
                    _mm_prefetch::<_MM_HINT_T0>(p)
                }
            };
            i += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, from, len);
}

/// Fixed-order tree sum of the lanes. Kept out of line: inlined, it leads the
/// vectorizer to shuffle the accumulators of the loops around it (measured 2x slower).
#[inline(never)]
fn hsum(a: &[f32; LANES]) -> f32 {
    let mut h = [0.0f32; LANES / 2];
    for k in 0..LANES / 2 {
        h[k] = a[k] + a[k + LANES / 2];
    }
    let mut q = [0.0f32; LANES / 4];
    for k in 0..LANES / 4 {
        q[k] = h[k] + h[k + LANES / 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `T` consecutive values starting at `at`, as an array (so that loops over it keep
/// their accumulators in registers).
#[inline(always)]
fn lanes<const T: usize>(x: &[f32], at: usize) -> &[f32; T] {
    x[at..at + T]
        .try_into()
        .expect("a slice of T values converts to [f32; T]")
}

/// A contiguous block's pivot `p` (about its mean; exactly its value when the block
/// is constant) and `[sum d, sum d^2]`, `d = x - p`. Two looks at a block that is
/// in L1: the first finds `p`, the second sums.
#[inline]
fn block_moments(x: &[f32]) -> (f32, [f32; 2]) {
    let full = x.len() / LANES * LANES;
    let x0 = x[0];
    let mut t = [0.0f32; LANES];
    for c in (0..full).step_by(LANES) {
        let v = lanes::<LANES>(x, c);
        for k in 0..LANES {
            t[k] += v[k] - x0;
        }
    }
    let tail: f32 = x[full..].iter().map(|&v| v - x0).sum();
    let p = x0 + (hsum(&t) + tail) / x.len() as f32;
    let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
    for c in (0..full).step_by(LANES) {
        let v = lanes::<LANES>(x, c);
        for k in 0..LANES {
            let d = v[k] - p;
            s1[k] += d;
            s2[k] += d * d;
        }
    }
    let (mut r1, mut r2) = (0.0f32, 0.0f32);
    for &v in &x[full..] {
        let d = v - p;
        r1 += d;
        r2 += d * d;
    }
    (p, [hsum(&s1) + r1, hsum(&s2) + r2])
}

/// `[sum g, sum g * (x - p)]` over a contiguous block.
#[inline]
fn block_grad(x: &[f32], dy: &[f32], p: f32) -> [f32; 2] {
    let full = x.len() / LANES * LANES;
    let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
    for c in (0..full).step_by(LANES) {
        let (v, g) = (lanes::<LANES>(x, c), lanes::<LANES>(dy, c));
        for k in 0..LANES {
            s1[k] += g[k];
            s2[k] += g[k] * (v[k] - p);
        }
    }
    let (mut r1, mut r2) = (0.0f32, 0.0f32);
    for (&v, &g) in x[full..].iter().zip(&dy[full..]) {
        r1 += g;
        r2 += g * (v - p);
    }
    [hsum(&s1) + r1, hsum(&s2) + r2]
}

/// Channels-first, large planes: work items are fixed ranges of [`ITEM`] values in
/// memory order; each returns the sums of every plane run it covers, tagged with the
/// run's channel, and the runs are merged per channel in memory order.
fn reduce_planes(x: &[f32], sums: Sums, center: &[f32], c: usize, s: usize) -> Vec<[f64; 2]> {
    let parts: Vec<Vec<(usize, [f64; 2])>> = chunk_results(x, ITEM, |k, xi| {
        let base = k * ITEM;
        let gi = match sums {
            Sums::Grad(dy) => &dy[base..base + xi.len()],
            Sums::Moments => &[][..],
        };
        let mut runs = Vec::with_capacity(xi.len() / s + 2);
        for (i, len, ch) in plane_runs(base, xi.len(), s, c) {
            let mut acc = [0.0f64; 2];
            for b in (i..i + len).step_by(BLOCK) {
                let e = (b + BLOCK).min(i + len);
                prefetch::<false>(xi, b + PREFETCH, BLOCK);
                match sums {
                    Sums::Moments => {
                        let (p, a) = block_moments(&xi[b..e]);
                        let delta = f64::from(p) - f64::from(center[ch]);
                        fold_moments(&mut acc, a, e - b, delta);
                    }
                    Sums::Grad(_) => {
                        prefetch::<false>(gi, b + PREFETCH, BLOCK);
                        let a = block_grad(&xi[b..e], &gi[b..e], center[ch]);
                        fold_sums(&mut acc, a);
                    }
                }
            }
            runs.push((ch, acc));
        }
        runs
    });
    let mut total = vec![[0.0; 2]; c];
    for &(ch, a) in parts.iter().flatten() {
        total[ch] = add2(total[ch], a);
    }
    total
}

/// Rows: work items are fixed ranges of rows, cut into blocks of about
/// [`ROW_BLOCK_VALUES`] values (8 to 128 rows); each block's f32 sums are folded into
/// per-column f64 sums, and an item finally folds its columns into per-channel sums.
/// Items are merged in index order.
fn reduce_rows(
    x: &[f32],
    sums: Sums,
    center: &[f32],
    c: usize,
    width: usize,
    rep: usize,
) -> Vec<[f64; 2]> {
    let block_rows = (ROW_BLOCK_VALUES / width).clamp(8, BLOCK / 2);
    let block_len = block_rows * width;
    let item_len = ITEM.div_ceil(block_len) * block_len;
    let center_col: Vec<f32> = (0..width).map(|j| center[j / rep]).collect();
    let parts: Vec<Vec<[f64; 2]>> = chunk_results(x, item_len, |k, xi| {
        let gi = match sums {
            Sums::Grad(dy) => &dy[k * item_len..k * item_len + xi.len()],
            Sums::Moments => &[][..],
        };
        let mut acc = vec![[0.0f64; 2]; width];
        let mut scratch = [vec![0.0f32; width], vec![0.0f32; width]];
        for b in (0..xi.len()).step_by(block_len) {
            let e = (b + block_len).min(xi.len());
            let next = e..(e + block_len).min(xi.len());
            let block = RowBlock {
                x: &xi[b..e],
                next_x: &xi[next.clone()],
                width,
                center: &center_col,
            };
            match sums {
                Sums::Moments => {
                    let mut j0 = 0;
                    while j0 < width {
                        j0 += match width - j0 {
                            16.. => block.moments::<16>(j0, &mut acc),
                            4.. => block.moments::<4>(j0, &mut acc),
                            _ => block.moments::<1>(j0, &mut acc),
                        };
                    }
                }
                Sums::Grad(_) => {
                    block.grad(&gi[b..e], &gi[next], &mut scratch, &mut acc);
                }
            }
        }
        let mut out = vec![[0.0; 2]; c];
        for (j, &a) in acc.iter().enumerate() {
            out[j / rep] = add2(out[j / rep], a);
        }
        out
    });
    let mut total = vec![[0.0; 2]; c];
    for part in &parts {
        for (t, &p) in total.iter_mut().zip(part) {
            *t = add2(*t, p);
        }
    }
    total
}

/// A block of whole rows (and the next block, to prefetch).
struct RowBlock<'a> {
    x: &'a [f32],
    next_x: &'a [f32],
    width: usize,
    /// Per-column center of the f64 sums.
    center: &'a [f32],
}

impl RowBlock<'_> {
    /// Moments of columns `j0..j0 + T` over the block's rows, with f32 sums held in
    /// registers, folded into `acc`; returns `T`. Two looks at the block (pivot, then
    /// sums). While it walks the rows it prefetches the same columns of the next
    /// block, so the whole next block is requested by the time it is needed.
    #[inline(always)]
    fn moments<const T: usize>(&self, j0: usize, acc: &mut [[f64; 2]]) -> usize {
        let w = self.width;
        let rows = self.x.len() / w;
        let x0 = *lanes::<T>(self.x, j0);
        let mut t = [0.0f32; T];
        for r in 0..rows {
            prefetch::<true>(self.next_x, r * w + j0, T);
            let v = lanes::<T>(self.x, r * w + j0);
            for k in 0..T {
                t[k] += v[k] - x0[k];
            }
        }
        let inv = 1.0 / rows as f32;
        let mut p = [0.0f32; T];
        for k in 0..T {
            p[k] = x0[k] + t[k] * inv;
        }
        let (mut s1, mut s2) = ([0.0f32; T], [0.0f32; T]);
        for r in 0..rows {
            let v = lanes::<T>(self.x, r * w + j0);
            for k in 0..T {
                let d = v[k] - p[k];
                s1[k] += d;
                s2[k] += d * d;
            }
        }
        for k in 0..T {
            let delta = f64::from(p[k]) - f64::from(self.center[j0 + k]);
            fold_moments(&mut acc[j0 + k], [s1[k], s2[k]], rows, delta);
        }
        T
    }

    /// Gradient sums of every column over the block's rows (`dy` is the block's
    /// gradient), streamed row by row into per-column f32 sums in `scratch` (`[sum
    /// dy, sum dy * (x - center)]`, two arrays so that the loop vectorizes; faster
    /// here than register tiles: two inputs), folded into `acc`.
    fn grad(&self, dy: &[f32], next_dy: &[f32], scratch: &mut [Vec<f32>; 2], acc: &mut [[f64; 2]]) {
        let w = self.width;
        let rows = self.x.len() / w;
        let [s0, s1] = scratch;
        let (s0, s1, center) = (&mut s0[..w], &mut s1[..w], &self.center[..w]);
        s0.fill(0.0);
        s1.fill(0.0);
        for r in 0..rows {
            prefetch::<true>(self.next_x, r * w, w);
            prefetch::<true>(next_dy, r * w, w);
            let (v, g) = (&self.x[r * w..(r + 1) * w], &dy[r * w..(r + 1) * w]);
            for j in 0..w {
                s0[j] += g[j];
                s1[j] += g[j] * (v[j] - center[j]);
            }
        }
        for (j, a) in acc.iter_mut().enumerate() {
            fold_sums(a, [s0[j], s1[j]]);
        }
    }
}

/// `out[i] = f(a[i], b[i], k)` with `k` the four per-channel coefficients of `i`'s
/// channel, in parallel over fixed chunks.
fn elementwise<F>(shape: &Shape, out: &mut [f32], a: &[f32], b: &[f32], coef: [&[f32]; 4], f: F)
where
    F: Fn(f32, f32, [f32; 4]) -> f32 + Sync,
{
    let k_of = |ch: usize| [coef[0][ch], coef[1][ch], coef[2][ch], coef[3][ch]];
    // `b` may be `a` again when `f` reads one input only.
    let two_inputs = a.as_ptr() != b.as_ptr();
    let ahead = |at: usize, len: usize| {
        prefetch::<false>(a, at + PREFETCH, len);
        if two_inputs {
            prefetch::<false>(b, at + PREFETCH, len);
        }
    };
    match traversal(shape, PLANE_MIN_ELEMENTWISE) {
        Traversal::Planes { c, s } => {
            chunk_items(out, ITEM, |k, oi| {
                let base = k * ITEM;
                for (i, len, ch) in plane_runs(base, oi.len(), s, c) {
                    let kk = k_of(ch);
                    for q in (base + i..base + i + len).step_by(BLOCK) {
                        let e = (q + BLOCK).min(base + i + len);
                        ahead(q, e - q);
                        let o = &mut oi[q - base..e - base];
                        for ((o, &u), &v) in o.iter_mut().zip(&a[q..e]).zip(&b[q..e]) {
                            *o = f(u, v, kk);
                        }
                    }
                }
            });
        }
        Traversal::Rows { width, rep } => {
            let cols: [Vec<f32>; 4] =
                std::array::from_fn(|t| (0..width).map(|j| coef[t][j / rep]).collect());
            let item_len = ITEM.div_ceil(width) * width;
            chunk_items(out, item_len, |k, oi| {
                let base = k * item_len;
                for (r, row) in oi.chunks_mut(width).enumerate() {
                    let start = base + r * width;
                    ahead(start, width);
                    let (ar, br) = (&a[start..start + width], &b[start..start + width]);
                    let (k0, k1, k2, k3) = (
                        &cols[0][..width],
                        &cols[1][..width],
                        &cols[2][..width],
                        &cols[3][..width],
                    );
                    let row = &mut row[..width];
                    for j in 0..width {
                        row[j] = f(ar[j], br[j], [k0[j], k1[j], k2[j], k3[j]]);
                    }
                }
            });
        }
    }
}

/// `work(k)` for every `k` in `0..n`, in parallel: the calling thread and the
/// pool's other threads each take the next unclaimed index until none is left.
/// Returns the results in index order.
///
/// The caller works from the start instead of handing the whole job to the pool
/// and sleeping until it is done, so a small tensor does not wait on a thread
/// wake-up before any work begins (and workers that wake late take fewer items).
fn items<T: Send>(n: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = rayon::current_num_threads().min(n);
    if threads <= 1 {
        return (0..n).map(work).collect();
    }
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let run = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= n {
            break;
        }
        let v = work(k);
        *slots[k].lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
    };
    rayon::in_place_scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| run());
        }
        run();
    });
    slots
        .into_iter()
        .map(|slot| {
            let v = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
            v.expect("every item ran before the scope ended")
        })
        .collect()
}

/// `work(k, chunk)` for the chunks of `len` values of `x`, in parallel as [`items`];
/// returns the results in chunk order.
fn chunk_results<T: Send>(
    x: &[f32],
    len: usize,
    work: impl Fn(usize, &[f32]) -> T + Sync,
) -> Vec<T> {
    let chunks: Vec<&[f32]> = x.chunks(len).collect();
    items(chunks.len(), |k| work(k, chunks[k]))
}

/// `work(k, chunk)` for the chunks of `len` values of `out`, in parallel as [`items`].
fn chunk_items(out: &mut [f32], len: usize, work: impl Fn(usize, &mut [f32]) + Sync) {
    let chunks: Vec<Mutex<&mut [f32]>> = out.chunks_mut(len).map(Mutex::new).collect();
    items(chunks.len(), |k| {
        let mut chunk = chunks[k].lock().unwrap_or_else(PoisonError::into_inner);
        work(k, &mut chunk);
    });
}
