//! Test utilities shared by the CPU and GPU test files: seeded random inputs, the
//! data classes of `docs/semantics.md` (well-conditioned, large mean, constant channels,
//! wide magnitudes), layout permutation, and comparisons with the f64 reference that
//! return the measured error so tests can print it.
#![allow(dead_code)]

use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_batchnorm::cpu::reference::{ReferenceBatchNorm, ReferenceForward};
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    Activation, BatchNormConfig, BatchNormState, Element, GradMask, Gradients, Shape, StatsSource,
};

/// A generator seeded from `BN_TEST_SEED` when set, otherwise from the clock. The
/// seed is printed so a failure can be replayed with `BN_TEST_SEED=<seed>`.
pub fn rng(test_name: &str) -> StdRng {
    let seed = match std::env::var("BN_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("BN_TEST_SEED={s:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    println!("{test_name}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// One standard normal sample (Box-Muller).
pub fn std_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `shape.numel()` values from `N(mean, std^2)`.
pub fn normal(rng: &mut StdRng, shape: &Shape, mean: f32, std: f32) -> Vec<f32> {
    (0..shape.numel())
        .map(|_| (f64::from(mean) + f64::from(std) * std_normal(rng)) as f32)
        .collect()
}

/// Channel `c` drawn from `N(means[c], stds[c]^2)`, whatever the layout.
pub fn per_channel_normal(
    rng: &mut StdRng,
    shape: &Shape,
    means: &[f32],
    stds: &[f32],
) -> Vec<f32> {
    (0..shape.numel())
        .map(|i| {
            let c = shape.channel_of(i);
            (f64::from(means[c]) + f64::from(stds[c]) * std_normal(rng)) as f32
        })
        .collect()
}

/// Per-channel means in `[-5, 5)` and standard deviations in `[0.5, 3)`, and data
/// drawn from them: the well-conditioned class.
pub fn well_conditioned(rng: &mut StdRng, shape: &Shape) -> Vec<f32> {
    let c = shape.c();
    let means: Vec<f32> = (0..c).map(|_| rng.random_range(-5.0..5.0)).collect();
    let stds: Vec<f32> = (0..c).map(|_| rng.random_range(0.5..3.0)).collect();
    per_channel_normal(rng, shape, &means, &stds)
}

/// `1e4 + 1e-3 * N(0, 1)`: a large mean with a tiny spread (plain f32 batch norm
/// loses most of the signal here).
pub fn large_mean(rng: &mut StdRng, shape: &Shape) -> Vec<f32> {
    (0..shape.numel())
        .map(|_| (1e4 + 1e-3 * std_normal(rng)) as f32)
        .collect()
}

/// Channel `c` is the constant `values[c]` (zero variance).
pub fn constant_channels(shape: &Shape, values: &[f32]) -> Vec<f32> {
    (0..shape.numel())
        .map(|i| values[shape.channel_of(i)])
        .collect()
}

/// `sign * 10^U(-3, 3)`: magnitudes over six decades.
pub fn wide_magnitudes(rng: &mut StdRng, shape: &Shape) -> Vec<f32> {
    (0..shape.numel())
        .map(|_| {
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            (sign * 10f64.powf(rng.random_range(-3.0..3.0))) as f32
        })
        .collect()
}

/// `x` (laid out as `from`) rewritten in the layout of `to` (same logical dims).
pub fn permute(x: &[f32], from: &Shape, to: &Shape) -> Vec<f32> {
    assert_eq!(
        from.dims(),
        to.dims(),
        "permute needs the same logical dims"
    );
    let mut out = vec![0.0; x.len()];
    for n in 0..from.n() {
        for c in 0..from.c() {
            for s in 0..from.spatial_size() {
                out[to.index(n, c, s)] = x[from.index(n, c, s)];
            }
        }
    }
    out
}

/// f32 values as f64.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

/// Error of one element: `|out - ref| / (1 + |ref|)`. NaN-aware: a NaN (or infinite)
/// reference must be matched exactly, otherwise the error is infinite.
pub fn rel_err(out: f64, reference: f64) -> f64 {
    if reference.is_nan() || out.is_nan() {
        return if reference.is_nan() && out.is_nan() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    if reference.is_infinite() || out.is_infinite() {
        return if out == reference { 0.0 } else { f64::INFINITY };
    }
    (out - reference).abs() / (1.0 + reference.abs())
}

/// Index and error of the worst element.
fn worst(out: &[f32], reference: &[f64], scale: impl Fn(usize) -> f64) -> (usize, f64) {
    assert_eq!(
        out.len(),
        reference.len(),
        "length of output and reference differ"
    );
    let mut w = (0, 0.0);
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let e = if r.is_finite() && o.is_finite() {
            (f64::from(o) - r).abs() / (1.0 + scale(i))
        } else {
            rel_err(f64::from(o), r)
        };
        if e > w.1 {
            w = (i, e);
        }
    }
    w
}

/// `max |out - ref| / (1 + |ref|)` (NaN-aware, see [`rel_err`]).
pub fn max_rel_err(out: &[f32], reference: &[f64]) -> f64 {
    worst(out, reference, |i| reference[i].abs()).1
}

/// Asserts `max_rel_err(out, reference) <= tol`; panics naming the worst element.
/// Returns the measured error.
pub fn assert_close(name: &str, out: &[f32], reference: &[f64], tol: f64) -> f64 {
    let (i, e) = worst(out, reference, |i| reference[i].abs());
    assert!(
        e <= tol,
        "{name}: error {e:.3e} > {tol:.1e} at index {i} of {}: got {}, expected {}",
        out.len(),
        out[i],
        reference[i]
    );
    e
}

/// Asserts `|out - ref| / (1 + scale) <= tol` elementwise, where `scale[i]` is the
/// sum of the absolute terms that make up `reference[i]` (see [`dgamma_scale`],
/// [`dbeta_scale`], [`dx_scale`]). Returns the measured error.
pub fn assert_sums_close(
    name: &str,
    out: &[f32],
    reference: &[f64],
    scale: &[f64],
    tol: f64,
) -> f64 {
    assert_eq!(out.len(), scale.len(), "{name}: scale has the wrong length");
    let (i, e) = worst(out, reference, |i| scale[i]);
    assert!(
        e <= tol,
        "{name}: error {e:.3e} > {tol:.1e} at index {i}: got {}, expected {} (sum |term| = {})",
        out[i],
        reference[i],
        scale[i]
    );
    e
}

/// `sum |dy * xhat|` per channel, `xhat = (x - mean) * invstd`: the scale of `dgamma`.
pub fn dgamma_scale(
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
    mean: &[f64],
    invstd: &[f64],
) -> Vec<f64> {
    let mut s = vec![0.0; shape.c()];
    for (i, (&v, &g)) in x.iter().zip(dy).enumerate() {
        let c = shape.channel_of(i);
        s[c] += (f64::from(g) * (f64::from(v) - mean[c]) * invstd[c]).abs();
    }
    s
}

/// `sum |dy|` per channel: the scale of `dbeta`.
pub fn dbeta_scale(shape: &Shape, dy: &[f32]) -> Vec<f64> {
    let mut s = vec![0.0; shape.c()];
    for (i, &g) in dy.iter().enumerate() {
        s[shape.channel_of(i)] += f64::from(g).abs();
    }
    s
}

/// The size of the terms of each `dx`: `|gamma * invstd| * (|dy| + sum|dy| / m +
/// |xhat| * sum|dy * xhat| / m)` with batch statistics, `|gamma * invstd * dy|` with
/// running ones. On ill-conditioned data `dx` is a small difference of large terms
/// (`invstd` is large), and an f32 result can only be as exact as its terms.
pub fn dx_scale(
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: &[f64],
    invstd: &[f64],
    batch_stats: bool,
) -> Vec<f64> {
    let m = shape.per_channel() as f64;
    let g_of = |c: usize| gamma.get(c).map_or(1.0, |&g| f64::from(g));
    let (dbeta, dgamma) = (
        dbeta_scale(shape, dy),
        dgamma_scale(shape, x, dy, mean, invstd),
    );
    (0..x.len())
        .map(|i| {
            let c = shape.channel_of(i);
            let k = (g_of(c) * invstd[c]).abs();
            let g = f64::from(dy[i]).abs();
            if batch_stats {
                let xhat = ((f64::from(x[i]) - mean[c]) * invstd[c]).abs();
                k * (g + dbeta[c] / m + xhat * dgamma[c] / m)
            } else {
                k * g
            }
        })
        .collect()
}

/// Every subset of `{dx, dgamma, dbeta}`.
pub fn all_masks() -> Vec<wgpu_batchnorm::GradMask> {
    (0..8)
        .map(|b| wgpu_batchnorm::GradMask {
            dx: b & 1 != 0,
            dgamma: b & 2 != 0,
            dbeta: b & 4 != 0,
        })
        .collect()
}

/// Both memory layouts.
pub const LAYOUTS: [wgpu_batchnorm::Layout; 2] = [
    wgpu_batchnorm::Layout::ChannelsFirst,
    wgpu_batchnorm::Layout::ChannelsLast,
];

/// Activation and residual of the `k`-th case of a loop that gives each of the
/// six combinations in turn.
pub fn combination(k: usize) -> (Activation, bool) {
    (Activation::ALL[k % 3], (k / 3) % 2 == 1)
}

/// The ranges a random state is drawn from: gamma of both signs with its size in
/// `gamma`, running var in `[0.5, 2)`, and, when `batches_tracked`, a count of
/// batches tracked in `0..5` for a config that tracks running statistics.
pub struct StateRanges {
    pub gamma: Range<f32>,
    pub beta: Range<f32>,
    pub running_mean: Range<f32>,
    pub batches_tracked: bool,
}

/// Gamma of both signs and up to 4 in size, beta in [-1, 2): outputs that cross
/// both kinks of every activation (0 and 6).
pub const ACROSS_KINKS: StateRanges = StateRanges {
    gamma: 0.5..4.0,
    beta: -1.0..2.0,
    running_mean: -1.0..1.0,
    batches_tracked: true,
};

/// A random but valid state for `config` drawn from `ranges`.
pub fn random_signed_state(
    rng: &mut StdRng,
    config: &BatchNormConfig,
    ranges: &StateRanges,
) -> BatchNormState {
    let mut s = BatchNormState::new(config);
    for g in &mut s.gamma {
        *g = rng.random_range(ranges.gamma.clone()) * if rng.random::<bool>() { 1.0 } else { -1.0 };
    }
    for b in &mut s.beta {
        *b = rng.random_range(ranges.beta.clone());
    }
    for m in &mut s.running_mean {
        *m = rng.random_range(ranges.running_mean.clone());
    }
    for v in &mut s.running_var {
        *v = rng.random_range(0.5f32..2.0);
    }
    if ranges.batches_tracked && config.track_running_stats {
        s.num_batches_tracked = rng.random_range(0..5);
    }
    s
}

/// A residual whose spread moves outputs across the kinks.
pub fn residual(rng: &mut StdRng, shape: &Shape) -> Vec<f32> {
    normal(rng, shape, 0.5, 3.0)
}

/// The gradient with respect to the activation's input: `dy` where the activation
/// passes it at `y`, else 0.
pub fn masked<T: Element + Default>(act: Activation, y: &[T], dy: &[T]) -> Vec<T> {
    y.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            if act.passes(v.to_f32()) {
                g
            } else {
                T::default()
            }
        })
        .collect()
}

/// Values whose bit patterns tests compare.
pub trait Bits: Copy {
    type Pattern: PartialEq + std::fmt::Debug;
    fn pattern(self) -> Self::Pattern;
}

impl Bits for f32 {
    type Pattern = u32;
    fn pattern(self) -> u32 {
        self.to_bits()
    }
}

impl Bits for f16 {
    type Pattern = u16;
    fn pattern(self) -> u16 {
        self.to_bits()
    }
}

impl Bits for bf16 {
    type Pattern = u16;
    fn pattern(self) -> u16 {
        self.to_bits()
    }
}

/// Bit patterns, so that `-0.0` and `0.0` differ and NaNs of one pattern compare
/// equal.
pub fn bits<T: Bits>(v: &[T]) -> Vec<T::Pattern> {
    v.iter().map(|&f| f.pattern()).collect()
}

/// The reference's statistics for a backward of `source` (batch statistics from a
/// copy, so that `reference` keeps its running statistics).
pub fn reference_stats(
    reference: &ReferenceBatchNorm,
    shape: &Shape,
    x: &[f32],
    source: StatsSource,
) -> ReferenceForward {
    match source {
        StatsSource::Batch => reference
            .clone()
            .forward_train(shape, x)
            .expect("reference"),
        StatsSource::Running => reference.forward_eval(shape, x).expect("reference"),
    }
}

/// Asserts that `g` holds exactly the gradients `mask` asks for (dgamma and dbeta
/// only for an `affine` layer).
pub fn assert_presence<T>(what: &str, g: &Gradients<T>, mask: GradMask, affine: bool) {
    assert_eq!(g.dx.is_some(), mask.dx, "{what}: dx presence");
    assert_eq!(
        g.dgamma.is_some(),
        mask.dgamma && affine,
        "{what}: dgamma presence"
    );
    assert_eq!(
        g.dbeta.is_some(),
        mask.dbeta && affine,
        "{what}: dbeta presence"
    );
}

/// The checks of a NaN at `at` (in channel 1 of 3) of `x`, or of `z` when
/// `nan_in_z`: a NaN in x spoils its channel's statistics, so its channel's y and
/// dx; one in z only its own output. dgamma of channels 0 and 2 and every dbeta
/// stay finite.
pub fn assert_nan_stays_in_channel<T: Element + std::fmt::Display>(
    what: &str,
    shape: &Shape,
    (at, nan_in_z): (usize, bool),
    y: &[T],
    g: &Gradients<T>,
) {
    for (i, &v) in y.iter().enumerate() {
        let spoiled = if nan_in_z {
            i == at
        } else {
            shape.channel_of(i) == 1
        };
        assert_eq!(v.to_f32().is_nan(), spoiled, "{what}: y[{i}] = {v}");
    }
    for (i, &v) in g.dx.as_ref().expect("dx").iter().enumerate() {
        let spoiled = !nan_in_z && shape.channel_of(i) == 1;
        assert_eq!(v.to_f32().is_nan(), spoiled, "{what}: dx[{i}] = {v}");
    }
    let (dg, db) = (
        g.dgamma.as_ref().expect("dgamma"),
        g.dbeta.as_ref().expect("dbeta"),
    );
    assert!(
        dg[0].is_finite() && dg[2].is_finite(),
        "{what}: dgamma {dg:?}"
    );
    assert!(db.iter().all(|v| v.is_finite()), "{what}: dbeta {db:?}");
}

/// A 16-bit float element type of the tests (f16, bf16): its name, range,
/// rounding and spacing, so that one test body covers both.
pub trait Float16: Element + Bits + Default + std::fmt::Display {
    /// The type's name in messages.
    const NAME: &'static str;
    /// The largest finite value.
    const MAX: Self;
    /// `v` rounded to this type, to nearest even, from f64 (`from_f64`).
    fn from_f64(v: f64) -> Self;
    /// The spacing at `self`: of the subnormals below the smallest normal, and
    /// for ±inf that of the binade of [`Float16::MAX`].
    fn ulp(self) -> f64;
    /// `self` as f64.
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    /// `self` as f64, ±inf as the power of two after the largest binade (`MAX`
    /// plus one spacing: ±65536 for f16, ±2^128 for bf16), the step after ±MAX.
    fn extended(self) -> f64 {
        let v = self.to_f64();
        if v.is_infinite() {
            (Self::MAX.to_f64() + Self::MAX.ulp()).copysign(v)
        } else {
            v
        }
    }
}

impl Float16 for f16 {
    const NAME: &'static str = "f16";
    const MAX: Self = f16::MAX;
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    /// 2^-24 for subnormals, 32 for ±inf; 11 significant bits.
    fn ulp(self) -> f64 {
        match (self.to_bits() >> 10) & 0x1f {
            0 => 2f64.powi(-24),
            31 => 32.0,
            e => 2f64.powi(i32::from(e) - 25),
        }
    }
}

impl Float16 for bf16 {
    const NAME: &'static str = "bf16";
    const MAX: Self = bf16::MAX;
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    /// 2^-133 for subnormals, 2^120 for ±inf; 8 significant bits (2^-7 relative).
    fn ulp(self) -> f64 {
        match (self.to_bits() >> 7) & 0xff {
            0 => 2f64.powi(-133),
            255 => 2f64.powi(120),
            e => 2f64.powi(i32::from(e) - 134),
        }
    }
}

/// f32 values rounded to `T` (to nearest even).
pub fn narrow<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&a| T::from_f32(a)).collect()
}

/// The floor of the 16-bit outputs' bound, per unit of `1 + s` (tests/gpu_f16.rs).
pub const FLOOR16: f64 = 4e-5;

/// Asserts `|out - round(ref)| <= max(ulp(round(ref)), FLOOR16 * (1 + s))`,
/// `round` to `T`, `s = scale(i)`, ±inf as [`Float16::extended`], NaN for NaN
/// (the 16-bit bound of tests/gpu_f16.rs); panics naming the element. Returns the
/// largest error as a fraction of its allowance.
pub fn assert_16_close<T: Float16>(
    name: &str,
    out: &[T],
    reference: &[f64],
    scale: impl Fn(usize) -> f64,
) -> f64 {
    assert_eq!(out.len(), reference.len(), "{name}: lengths differ");
    let mut worst = 0f64;
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        if r.is_nan() || o.to_f32().is_nan() {
            assert!(
                r.is_nan() && o.to_f32().is_nan(),
                "{name}[{i}]: got {o}, expected {r}"
            );
            continue;
        }
        if r.is_infinite() {
            assert_eq!(o.to_f64(), r, "{name}[{i}]");
            continue;
        }
        let rounded = T::from_f64(r);
        let allowed = rounded.ulp().max(FLOOR16 * (1.0 + scale(i)));
        let err = (o.extended() - rounded.extended()).abs();
        assert!(
            err <= allowed,
            "{name}[{i}] of {} ({}): got {o}, expected {r} (rounded {rounded}); error {err:.3e} > {allowed:.3e}",
            out.len(),
            T::NAME
        );
        worst = worst.max(err / allowed);
    }
    worst
}

/// [`assert_16_close`] with `s = |ref|` (y, dz).
pub fn assert_y_close<T: Float16>(name: &str, out: &[T], reference: &[f64]) -> f64 {
    assert_16_close(name, out, reference, |i| reference[i].abs())
}

/// Asserts that at most a tenth of the elements of `out` (of those with a finite
/// reference) differ from `round(ref)`: an f32 value within the f32 error of
/// `ref` rounds elsewhere only near a tie, and truncation instead of rounding to
/// nearest would miss about half. Needs 20 such elements to judge, else passes.
/// Returns the fraction that differ.
pub fn assert_mostly_rounded<T: Float16>(name: &str, out: &[T], reference: &[f64]) -> f64 {
    let (mut n, mut off) = (0usize, 0usize);
    for (&o, &r) in out.iter().zip(reference) {
        if r.is_finite() {
            n += 1;
            off += usize::from(o.to_f32().to_bits() != T::from_f64(r).to_f32().to_bits());
        }
    }
    let fraction = off as f64 / n.max(1) as f64;
    assert!(
        n < 20 || fraction <= 0.1,
        "{name}: {off} of {n} {} outputs are not the reference rounded to nearest",
        T::NAME
    );
    fraction
}
