//! The fast CPU path: multi-threaded (rayon), cache-friendly, f32 data with f64
//! per-channel bookkeeping. It is the baseline the GPU kernels are benchmarked
//! against, so it is written to be a real competitor, and it meets the same
//! tolerances as the GPU kernels against [`super::reference`].
//!
//! Data flow, mirroring the kernels: a reduction pass (per-channel sums), a
//! per-channel finalize in f64 (statistics, folded coefficients), and an
//! elementwise pass (`y = (x - hi) * scale + shift`, `dx = k1 * dy + k2 * (x - hi) + k3`).
//!
//! Numerics: the statistics are sums over blocks of up to [`BLOCK`] values (or
//! rows) that stay in L1: a first look at a block gives a pivot close to its mean
//! (exactly its value when the block is constant), and the block's sums of
//! `d = x - pivot` and `d^2` run in f32, where `d` is exact on large-mean data. Each
//! block is then folded into f64 sums relative to a per-channel center. The work
//! is split into items that depend on the shape only and merged in index order, so
//! results do not depend on thread scheduling: the same input gives the same bits
//! on every run, whatever the thread count.

use rayon::prelude::*;

use super::reference::{check_input, check_len, invstd, update_running_stats, NO_RUNNING_STATS};
use crate::{
    BatchNormConfig, BatchNormState, Error, ForwardOutput, GradMask, Gradients, Layout, Result,
    SavedStatsHost, Shape,
};

/// Values per f32 block before the block's sums are folded into f64 (channels-first
/// runs); in the row traversal, a block is at most this many rows.
const BLOCK: usize = 256;
/// Values per block in the row traversal, so that a block stays in L1 between its
/// two looks (rows per block within `[8, BLOCK / 2]`).
const ROW_BLOCK_VALUES: usize = 8192;
/// Independent f32 accumulators in a contiguous block (vectorizes, shortens chains).
const LANES: usize = 16;
/// Elements per parallel work item.
const ITEM: usize = 1 << 16;
/// Channels-first tensors with at least this many spatial positions are traversed
/// plane by plane; smaller ones as rows of `C * spatial` columns.
const PLANE_MIN: usize = 64;

/// A batch-norm layer evaluated on the CPU in f32 (with f64 per-channel statistics).
///
/// ```
/// use wgpu_batchnorm::{cpu::fast::CpuBatchNorm, BatchNormConfig, GradMask, Shape};
/// let mut bn = CpuBatchNorm::new(BatchNormConfig::new(2)).unwrap();
/// let shape = Shape::channels_last(&[2, 2]).unwrap();
/// let out = bn.forward_train(&shape, &[1.0, 10.0, 3.0, 30.0]).unwrap();
/// let saved = out.saved.unwrap();
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
        config.validate()?;
        let state = BatchNormState::new(&config);
        Ok(Self { config, state })
    }

    /// A layer with the given state (e.g. from a checkpoint).
    pub fn with_state(config: BatchNormConfig, state: BatchNormState) -> Result<Self> {
        config.validate()?;
        state.validate(&config)?;
        Ok(Self { config, state })
    }

    /// Training forward: batch statistics, normalized output, running statistics
    /// updated (with `track_running_stats`). `saved` is always `Some`.
    pub fn forward_train(&mut self, shape: &Shape, x: &[f32]) -> Result<ForwardOutput> {
        let mut y = vec![0.0; x.len()];
        let saved = self.forward_train_into(shape, x, &mut y)?;
        Ok(ForwardOutput {
            y,
            saved: Some(saved),
        })
    }

    /// Eval forward: running statistics when tracked (`saved = None`), otherwise
    /// batch statistics (`saved = Some`). Updates nothing.
    pub fn forward_eval(&mut self, shape: &Shape, x: &[f32]) -> Result<ForwardOutput> {
        let mut y = vec![0.0; x.len()];
        let saved = self.forward_eval_into(shape, x, &mut y)?;
        Ok(ForwardOutput { y, saved })
    }

    /// Backward. `saved`: the batch statistics of the forward (training form), or
    /// `None` for the running statistics (eval form; needs `track_running_stats`).
    /// `dgamma`/`dbeta` are `None` when not asked for or when the layer is not affine.
    pub fn backward(
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
        Ok(Gradients { dx, dgamma, dbeta })
    }

    /// [`Self::forward_train`] writing `y` into the caller's slice.
    pub fn forward_train_into(
        &mut self,
        shape: &Shape,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<SavedStatsHost> {
        check_input(&self.config, &self.state, shape, "x", x.len(), true)?;
        check_len("y", shape.numel(), y.len())?;
        let (mean, var) = batch_stats(shape, x);
        let saved = self.normalize_batch(shape, x, y, &mean, &var);
        update_running_stats(
            &self.config,
            &mut self.state,
            &mean,
            &var,
            shape.per_channel(),
        );
        Ok(saved)
    }

    /// [`Self::forward_eval`] writing `y` into the caller's slice.
    pub fn forward_eval_into(
        &mut self,
        shape: &Shape,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<Option<SavedStatsHost>> {
        let track = self.config.track_running_stats;
        check_input(&self.config, &self.state, shape, "x", x.len(), !track)?;
        check_len("y", shape.numel(), y.len())?;
        if !track {
            let (mean, var) = batch_stats(shape, x);
            return Ok(Some(self.normalize_batch(shape, x, y, &mean, &var)));
        }
        let c = shape.c();
        let (mut scale, mut shift) = (vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let rv = f64::from(self.state.running_var[ch]);
            scale[ch] = (self.gamma(ch) * invstd(rv, self.config.eps)) as f32;
            shift[ch] = self.beta(ch) as f32;
        }
        let hi = &self.state.running_mean;
        elementwise(
            shape,
            y,
            x,
            x,
            [hi, &scale, &shift, &shift],
            |x, _, [h, s, t, _]| (x - h) * s + t,
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

    /// Normalizes with batch statistics: `y = (x - hi) * scale + shift`, where the
    /// mean is split into `hi + lo` and `lo` is folded into `shift`.
    fn normalize_batch(
        &self,
        shape: &Shape,
        x: &[f32],
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
        elementwise(
            shape,
            y,
            x,
            x,
            [&saved.mean, &scale, &shift, &shift],
            |x, _, [h, s, t, _]| (x - h) * s + t,
        );
        saved
    }
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

fn traversal(shape: &Shape) -> Traversal {
    let (c, s) = (shape.c(), shape.spatial_size());
    match shape.layout() {
        Layout::ChannelsFirst if s >= PLANE_MIN => Traversal::Planes { c, s },
        Layout::ChannelsFirst => Traversal::Rows {
            width: c * s,
            rep: s,
        },
        Layout::ChannelsLast => Traversal::Rows { width: c, rep: 1 },
    }
}

/// Per-channel f64 sums (see [`Sums`]), merged in a fixed order.
fn reduce(shape: &Shape, x: &[f32], sums: Sums, center: &[f32]) -> Vec<[f64; 2]> {
    match traversal(shape) {
        Traversal::Planes { c, s } => reduce_planes(x, sums, center, c, s),
        Traversal::Rows { width, rep } => reduce_rows(x, sums, center, shape.c(), width, rep),
    }
}

fn add2(a: [f64; 2], b: [f64; 2]) -> [f64; 2] {
    [a[0] + b[0], a[1] + b[1]]
}

/// Folds the f32 sums `a` of a block of `n` values, taken relative to the block's
/// pivot, into f64 sums relative to the channel's center; `delta = pivot - center`.
#[inline]
fn fold(acc: &mut [f64; 2], sums: Sums, a: [f32; 2], n: usize, delta: f64) {
    let (a0, a1, n) = (f64::from(a[0]), f64::from(a[1]), n as f64);
    match sums {
        Sums::Moments => {
            acc[0] += a0 + n * delta;
            acc[1] += a1 + delta * (2.0 * a0 + n * delta);
        }
        Sums::Grad(_) => {
            acc[0] += a0;
            acc[1] += a1 + delta * a0;
        }
    }
}

/// Values ahead of the current position whose cache lines a streaming loop requests
/// early (8 KiB; measured: the hardware prefetcher alone leaves the reductions at
/// about half the memory bandwidth).
const PREFETCH: usize = 2048;

/// Requests the cache lines of `s[from..from + len]` (clipped to `s`).
#[inline(always)]
fn prefetch(s: &[f32], from: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = from.saturating_add(len).min(s.len());
        let mut i = from;
        while i < end {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is only a
            // hint: it reads nothing and never faults (the address is in `s` anyway).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().wrapping_add(i).cast()) };
            i += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, from, len);
}

/// Fixed-order tree sum of the lanes.
#[inline]
fn hsum(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for k in 0..w {
            a[k] += a[k + w];
        }
        w /= 2;
    }
    a[0]
}

/// `sum f(v)` over a contiguous block, in [`LANES`] independent f32 accumulators.
#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut s = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for v in &mut chunks {
        for k in 0..LANES {
            s[k] += f(v[k]);
        }
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        s[k] += f(v);
    }
    hsum(s)
}

/// A contiguous block's pivot `p` (about its mean; exactly its value when the block
/// is constant) and `[sum d, sum d^2]`, `d = x - p`. Two looks at a block that is
/// in L1: the first finds `p`, the second sums.
#[inline]
fn block_moments(x: &[f32]) -> (f32, [f32; 2]) {
    let x0 = x[0];
    let p = x0 + lanes_sum(x, |v| v - x0) / x.len() as f32;
    let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut chunks = x.chunks_exact(LANES);
    for v in &mut chunks {
        for k in 0..LANES {
            let d = v[k] - p;
            s1[k] += d;
            s2[k] += d * d;
        }
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        let d = v - p;
        s1[k] += d;
        s2[k] += d * d;
    }
    (p, [hsum(s1), hsum(s2)])
}

/// `[sum g, sum g * (x - p)]` over a contiguous block.
#[inline]
fn block_grad(x: &[f32], dy: &[f32], p: f32) -> [f32; 2] {
    let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut xs = x.chunks_exact(LANES);
    let mut gs = dy.chunks_exact(LANES);
    for (v, g) in (&mut xs).zip(&mut gs) {
        for k in 0..LANES {
            s1[k] += g[k];
            s2[k] += g[k] * (v[k] - p);
        }
    }
    for (k, (&v, &g)) in xs.remainder().iter().zip(gs.remainder()).enumerate() {
        s1[k] += g;
        s2[k] += g * (v - p);
    }
    [hsum(s1), hsum(s2)]
}

/// Channels-first, large planes: work items are fixed ranges of [`ITEM`] values in
/// memory order; each returns the sums of every plane run it covers, tagged with the
/// run's channel, and the runs are merged per channel in memory order.
fn reduce_planes(x: &[f32], sums: Sums, center: &[f32], c: usize, s: usize) -> Vec<[f64; 2]> {
    let parts: Vec<Vec<(usize, [f64; 2])>> = x
        .par_chunks(ITEM)
        .enumerate()
        .map(|(k, xi)| {
            let base = k * ITEM;
            let gi = match sums {
                Sums::Grad(dy) => &dy[base..base + xi.len()],
                Sums::Moments => &[][..],
            };
            let mut runs = Vec::with_capacity(xi.len() / s + 2);
            let mut i = 0;
            while i < xi.len() {
                let plane = (base + i) / s;
                let len = ((plane + 1) * s - (base + i)).min(xi.len() - i);
                let ch = plane % c;
                let mut acc = [0.0f64; 2];
                for b in (i..i + len).step_by(BLOCK) {
                    let e = (b + BLOCK).min(i + len);
                    prefetch(xi, b + PREFETCH, BLOCK);
                    match sums {
                        Sums::Moments => {
                            let (p, a) = block_moments(&xi[b..e]);
                            let delta = f64::from(p) - f64::from(center[ch]);
                            fold(&mut acc, sums, a, e - b, delta);
                        }
                        Sums::Grad(_) => {
                            prefetch(gi, b + PREFETCH, BLOCK);
                            let a = block_grad(&xi[b..e], &gi[b..e], center[ch]);
                            fold(&mut acc, sums, a, e - b, 0.0);
                        }
                    }
                }
                runs.push((ch, acc));
                i += len;
            }
            runs
        })
        .collect();
    let mut total = vec![[0.0; 2]; c];
    for &(ch, a) in parts.iter().flatten() {
        total[ch] = add2(total[ch], a);
    }
    total
}

/// Per-thread buffers of the row traversal (one entry per column).
struct RowScratch {
    pivot: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
    acc: Vec<[f64; 2]>,
}

/// Rows: work items are fixed ranges of rows; each keeps per-column f32 sums over
/// blocks of rows that fit in L1, folds them into per-column f64 sums, and finally
/// folds its columns into per-channel sums. Items are merged in index order.
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
    // Prefetch whole rows, at least PREFETCH values ahead.
    let ahead = PREFETCH.div_ceil(width) * width;
    let center_col: Vec<f32> = (0..width).map(|j| center[j / rep]).collect();
    let parts: Vec<Vec<[f64; 2]>> = x
        .par_chunks(item_len)
        .enumerate()
        .map_init(
            || RowScratch {
                pivot: vec![0.0; width],
                s1: vec![0.0; width],
                s2: vec![0.0; width],
                acc: vec![[0.0; 2]; width],
            },
            |sc, (k, xi)| {
                let gi = match sums {
                    Sums::Grad(dy) => &dy[k * item_len..k * item_len + xi.len()],
                    Sums::Moments => &[][..],
                };
                sc.acc.fill([0.0; 2]);
                for b in (0..xi.len()).step_by(block_len) {
                    let xb = &xi[b..(b + block_len).min(xi.len())];
                    let rows = xb.len() / width;
                    sc.s1.fill(0.0);
                    sc.s2.fill(0.0);
                    match sums {
                        Sums::Moments => {
                            // First look: pivot = first row + mean offset from it.
                            sc.pivot.copy_from_slice(&xb[..width]);
                            for (r, row) in xb.chunks_exact(width).enumerate() {
                                prefetch(xi, b + r * width + ahead, width);
                                rows_offset(row, &sc.pivot, &mut sc.s1);
                            }
                            let inv = 1.0 / rows as f32;
                            for (p, t) in sc.pivot.iter_mut().zip(&mut sc.s1) {
                                *p += *t * inv;
                                *t = 0.0;
                            }
                            for row in xb.chunks_exact(width) {
                                rows_moments(row, &sc.pivot, &mut sc.s1, &mut sc.s2);
                            }
                        }
                        Sums::Grad(_) => {
                            let gb = &gi[b..b + xb.len()];
                            let rows_iter = xb.chunks_exact(width).zip(gb.chunks_exact(width));
                            for (r, (row, g)) in rows_iter.enumerate() {
                                prefetch(xi, b + r * width + ahead, width);
                                prefetch(gi, b + r * width + ahead, width);
                                rows_grad(row, g, &center_col, &mut sc.s1, &mut sc.s2);
                            }
                        }
                    }
                    for j in 0..width {
                        let delta = match sums {
                            Sums::Moments => f64::from(sc.pivot[j]) - f64::from(center_col[j]),
                            Sums::Grad(_) => 0.0,
                        };
                        fold(&mut sc.acc[j], sums, [sc.s1[j], sc.s2[j]], rows, delta);
                    }
                }
                let mut out = vec![[0.0; 2]; c];
                for (j, &a) in sc.acc.iter().enumerate() {
                    out[j / rep] = add2(out[j / rep], a);
                }
                out
            },
        )
        .collect();
    let mut total = vec![[0.0; 2]; c];
    for part in &parts {
        for (t, &p) in total.iter_mut().zip(part) {
            *t = add2(*t, p);
        }
    }
    total
}

#[inline]
fn rows_offset(row: &[f32], pivot: &[f32], t: &mut [f32]) {
    let n = row.len();
    let (pivot, t) = (&pivot[..n], &mut t[..n]);
    for j in 0..n {
        t[j] += row[j] - pivot[j];
    }
}

#[inline]
fn rows_moments(row: &[f32], pivot: &[f32], s1: &mut [f32], s2: &mut [f32]) {
    let n = row.len();
    let (pivot, s1, s2) = (&pivot[..n], &mut s1[..n], &mut s2[..n]);
    for j in 0..n {
        let d = row[j] - pivot[j];
        s1[j] += d;
        s2[j] += d * d;
    }
}

#[inline]
fn rows_grad(row: &[f32], g: &[f32], center: &[f32], s1: &mut [f32], s2: &mut [f32]) {
    let n = row.len();
    let (g, center, s1, s2) = (&g[..n], &center[..n], &mut s1[..n], &mut s2[..n]);
    for j in 0..n {
        s1[j] += g[j];
        s2[j] += g[j] * (row[j] - center[j]);
    }
}

/// `out[i] = f(a[i], b[i], k)` with `k` the four per-channel coefficients of `i`'s
/// channel, in parallel over fixed chunks.
fn elementwise<F>(shape: &Shape, out: &mut [f32], a: &[f32], b: &[f32], coef: [&[f32]; 4], f: F)
where
    F: Fn(f32, f32, [f32; 4]) -> f32 + Sync,
{
    let k_of = |ch: usize| [coef[0][ch], coef[1][ch], coef[2][ch], coef[3][ch]];
    match traversal(shape) {
        Traversal::Planes { c, s } => {
            out.par_chunks_mut(ITEM).enumerate().for_each(|(k, oi)| {
                // Runs of one plane (one channel) inside the item.
                let mut i = 0;
                while i < oi.len() {
                    let g = k * ITEM + i;
                    let plane = g / s;
                    let len = ((plane + 1) * s - g).min(oi.len() - i);
                    let kk = k_of(plane % c);
                    let (ar, br) = (&a[g..g + len], &b[g..g + len]);
                    for ((o, &u), &v) in oi[i..i + len].iter_mut().zip(ar).zip(br) {
                        *o = f(u, v, kk);
                    }
                    i += len;
                }
            });
        }
        Traversal::Rows { width, rep } => {
            let cols: [Vec<f32>; 4] =
                std::array::from_fn(|t| (0..width).map(|j| coef[t][j / rep]).collect());
            let item_len = ITEM.div_ceil(width) * width;
            out.par_chunks_mut(item_len)
                .enumerate()
                .for_each(|(k, oi)| {
                    let base = k * item_len;
                    for (r, row) in oi.chunks_mut(width).enumerate() {
                        let start = base + r * width;
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
