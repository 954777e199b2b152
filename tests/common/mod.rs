//! Test utilities shared by the CPU and GPU test files: seeded random inputs, the
//! data classes of `docs/semantics.md` (well-conditioned, large mean, constant channels,
//! wide magnitudes), layout permutation, and comparisons with the f64 reference that
//! return the measured error so tests can print it.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_batchnorm::Shape;

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
