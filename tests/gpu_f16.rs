//! 16-bit tensors on the GPU against the f64 CPU reference, on fresh random
//! inputs, in each of their storages: f16 as WGSL's `f16` (where the adapter has
//! `SHADER_F16`), f16 two per u32 (`Tuning::native_f16` false, every adapter) and
//! bf16 (two per u32, every adapter). Every layout, odd sizes, every test tuning,
//! the activations and the residual, eval with running and batch statistics, the
//! backward of both, every output mask, a large mean with a small spread, constant
//! channels, a NaN, and outputs past the type's range. Tests that loop over cases
//! give them the storages in turn; the others run each storage.
//!
//! Inputs (x, z, dy) are drawn, rounded to the element type, and the reference is
//! fed their exact f32 widening. Tolerances, the same for every storage:
//!
//! - y, dx, dz (16-bit outputs):
//!   `|out - round(ref)| <= max(ulp(round(ref)), 4e-5 * (1 + s))`, where `round`
//!   rounds the f64 reference to the type (to nearest even, from f64), `ulp(v)`
//!   is the type's spacing at `v` (f16: 2^-10 relative, 2^-24 below 2^-14; bf16:
//!   2^-7 relative, 2^-133 below 2^-126; an output past the range counts as the
//!   next power of two, ±65536 for f16 and ±2^128 for bf16, with the spacing of
//!   the largest binade, so ±inf is the step after ±MAX, as a plain f32 cast gives
//!   it), and `s` is `|ref|` for y and dz, and for dx, a difference of terms, the
//!   size of its terms
//!   `|gamma * invstd| * (|g| + sum|g| / m + |xhat| * sum|g * xhat| / m)`
//!   (`|gamma * invstd * g|` with running statistics; `g` is dy masked by the
//!   activation). A NaN reference needs a NaN output.
//!   Why: the kernels compute in f32 and round once. Their f32 value `f` is within
//!   the f32 tolerance `e = 1e-5 * (1 + s)` of `ref`. Where `e` is at most half the
//!   type's spacing, `round(f)` is `round(ref)` or a neighbour: one ulp, when `f`
//!   and `ref` fall on either side of a rounding boundary (a tie of two values).
//!   Near 0 (for f16 y, `|ref|` below about 2^-5) the spacing is finer than `e`;
//!   there `|round(f) - round(ref)|` is at most `e` plus half a spacing at `f` and
//!   at `ref`, less than `4e`: the floor. dz is moreover exactly dy masked by the
//!   activation at the GPU's own y. On top of that, at most a tenth of the y
//!   elements may differ from `round(ref)` at all (the f32 value rounds elsewhere
//!   only near a tie: about 1% do; truncating instead of rounding to nearest
//!   would leave about half off by one ulp, within the bound above).
//! - Statistics (saved mean and invstd, `mean + mean_lo`, running mean and var):
//!   `1e-5 * (1 + |ref|)`, as for f32, against the reference of the widened inputs
//!   (statistics stay f32).
//! - dgamma, dbeta (f32): `1e-5 * (1 + sum of |terms|)`, as for f32.

mod common;
mod gpu_support;

use common::{all_masks, assert_16_close, assert_close, assert_sums_close, assert_y_close};
use common::{
    assert_mostly_rounded, assert_nan_stays_in_channel, assert_presence, bits, narrow, rng, Float16,
};
use common::{combination, dbeta_scale, dgamma_scale, dx_scale, masked, normal, LAYOUTS};
use common::{random_signed_state, reference_stats, ACROSS_KINKS};
use gpu_support::{ctx, describe, f64s, pair_from_state, signed_pair, tunings, SPLIT_SHAPES};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::{widen, ReferenceBatchNorm, ReferenceGradients};
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    Activation, BatchNorm, BatchNormConfig, DType, GpuContext, GradMask, Gradients, Layout,
    SavedStatsHost, Shape, StatsSource, Tuning,
};

/// Statistics, dgamma and dbeta (as for f32).
const TOL: f64 = 1e-5;

/// Odd and even sizes of every rank, both layouts: element counts odd (561, 165,
/// 153, 135, 243, 2535: 16-bit tensors that end in half a word) and even; C = 1,
/// 3, 5, 17; N = 1 with spatial > 1.
const SHAPES: &[&[usize]] = &[
    &[33, 17],
    &[2, 1],
    &[5, 3, 11],
    &[1, 17, 9],
    &[4, 3, 7, 7],
    &[3, 5, 3, 3],
    &[2, 3, 3, 4, 5],
    &[3, 3, 3, 3, 3],
    &[5, 3, 13, 13],
];

/// How the GPU holds a 16-bit tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Storage {
    /// f16 as WGSL's `f16` (devices with `SHADER_F16`).
    NativeF16,
    /// f16 two per u32 (pack2x16float / unpack2x16float).
    PackedF16,
    /// bf16, always two per u32.
    Bf16,
}

impl Storage {
    /// `ctx` (keeping its launch geometry) set up for this storage.
    fn on(self, ctx: &GpuContext) -> GpuContext {
        let native_f16 = match self {
            Storage::NativeF16 => true,
            Storage::PackedF16 => false,
            Storage::Bf16 => ctx.tuning().native_f16,
        };
        ctx.with_tuning(Tuning {
            native_f16,
            ..ctx.tuning()
        })
    }

    /// The element type.
    fn dtype(self) -> DType {
        match self {
            Storage::NativeF16 | Storage::PackedF16 => DType::F16,
            Storage::Bf16 => DType::Bf16,
        }
    }
}

/// The storages of this adapter: native f16 only with `SHADER_F16` (else says
/// so), packed f16 and bf16 everywhere.
fn storages(test: &str) -> Vec<Storage> {
    let ctx = ctx();
    if ctx.optional_features().contains(wgpu::Features::SHADER_F16) {
        vec![Storage::NativeF16, Storage::PackedF16, Storage::Bf16]
    } else {
        println!(
            "{test}: no SHADER_F16 on this adapter ({}): native f16 not tested, \
             packed f16 and bf16 are",
            ctx.describe()
        );
        vec![Storage::PackedF16, Storage::Bf16]
    }
}

/// The storage of the `k`-th case of a loop that cycles through the six
/// [`combination`]s: each storage gets every combination over 6 * `n` cases.
fn storage_of(storages: &[Storage], k: usize) -> Storage {
    storages[(k + k / 6) % storages.len()]
}

/// Calls `f::<T>(args)` with `T` the element type of the storage `s`.
macro_rules! with_type {
    ($s:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $s.dtype() {
            DType::F16 => $f::<f16>($($a),*),
            DType::Bf16 => $f::<bf16>($($a),*),
            DType::F32 => unreachable!("16-bit storages only"),
        }
    };
}

/// `N(mean, std^2)` rounded to `T`.
fn normal16<T: Float16>(rng: &mut StdRng, shape: &Shape, mean: f32, std: f32) -> Vec<T> {
    narrow(&normal(rng, shape, mean, std))
}

/// Compares a GPU backward with the reference's, both from the output `y`
/// (16-bit on the GPU, its widening in the reference).
#[allow(clippy::too_many_arguments)]
fn compare_gradients<T: Float16>(
    g: &Gradients<T>,
    r: &ReferenceGradients,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    (x, y, dy): (&[T], &[T], &[T]),
    source: StatsSource,
    mask: GradMask,
    residual: bool,
    what: &str,
) -> f64 {
    assert_presence(what, g, mask, cpu.config.affine);
    assert_eq!(g.dz.is_some(), residual, "{what}: dz presence");
    let gm = masked(cpu.config.activation, y, dy);
    let mut worst = 0f64;
    if let (Some(dz), Some(rdz)) = (&g.dz, &r.dz) {
        assert_eq!(
            bits(dz),
            bits(&gm),
            "{what}: dz is dy masked by the activation"
        );
        worst = worst.max(assert_y_close(&format!("{what} dz"), dz, rdz));
    }
    let (x, gm) = (widen(x), widen(&gm));
    let stats = reference_stats(cpu, shape, &x, source);
    if let (Some(dx), Some(rdx)) = (&g.dx, &r.dx) {
        let batch = source == StatsSource::Batch;
        let gamma = cpu.state.gamma.as_slice();
        let scale = dx_scale(shape, &x, &gm, gamma, &stats.mean, &stats.invstd, batch);
        worst = worst.max(assert_16_close(&format!("{what} dx"), dx, rdx, |i| {
            scale[i]
        }));
    }
    if let (Some(dg), Some(rdg)) = (&g.dgamma, &r.dgamma) {
        let scale = dgamma_scale(shape, &x, &gm, &stats.mean, &stats.invstd);
        let e = assert_sums_close(&format!("{what} dgamma"), dg, rdg, &scale, TOL);
        worst = worst.max(e);
    }
    if let (Some(db), Some(rdb)) = (&g.dbeta, &r.dbeta) {
        let scale = dbeta_scale(shape, &gm);
        let e = assert_sums_close(&format!("{what} dbeta"), db, rdb, &scale, TOL);
        worst = worst.max(e);
    }
    worst
}

/// The GPU backward of `y`: the plain call for a layer without activation or
/// residual, else the fused one.
#[allow(clippy::too_many_arguments)]
fn gpu_backward<T: Float16>(
    gpu: &mut BatchNorm,
    shape: &Shape,
    (x, y, dy): (&[T], &[T], &[T]),
    saved: Option<&SavedStatsHost>,
    mask: GradMask,
    residual: bool,
) -> Gradients<T> {
    if gpu.config().activation == Activation::Identity && !residual {
        gpu.backward_host(shape, x, dy, saved, mask)
            .expect("backward")
    } else {
        gpu.backward_fused_host(shape, x, Some(y), dy, saved, mask, residual)
            .expect("backward_fused")
    }
}

/// The GPU backward of `y` (of the batch statistics `saved`, else of the running
/// ones), with or without the residual, for each of `masks`, against the
/// reference's. Returns the largest error.
#[allow(clippy::too_many_arguments)]
fn check_backwards<T: Float16>(
    gpu: &mut BatchNorm,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    data: (&[T], &[T], &[T]),
    saved: Option<&SavedStatsHost>,
    masks: &[GradMask],
    residual: bool,
    what: &str,
) -> f64 {
    let (source, label) = match saved {
        Some(_) => (StatsSource::Batch, "batch"),
        None => (StatsSource::Running, "running"),
    };
    let (x, y, dy) = data;
    let (xw, yw, dyw) = (widen(x), widen(y), widen(dy));
    let mut worst = 0f64;
    for &mask in masks {
        let name = format!("{what} {mask:?} {label}");
        let g = gpu_backward(gpu, shape, data, saved, mask, residual);
        let rg = cpu
            .backward_fused(shape, &xw, &yw, &dyw, source, mask, residual)
            .expect("reference backward");
        let e = compare_gradients(&g, &rg, cpu, shape, data, source, mask, residual, &name);
        worst = worst.max(e);
    }
    worst
}

/// One layer pair through a training forward (with the residual `z` when given),
/// the backward of its batch statistics from the GPU's own y (for each of
/// `masks`), an eval forward and, with running statistics, the eval backward.
/// Returns the largest error (16-bit outputs: as a fraction of their allowance).
#[allow(clippy::too_many_arguments)]
fn check_step<T: Float16>(
    gpu: &mut BatchNorm,
    cpu: &mut ReferenceBatchNorm,
    shape: &Shape,
    x: &[T],
    z: Option<&[T]>,
    dy: &[T],
    masks: &[GradMask],
    what: &str,
) -> f64 {
    let residual = z.is_some();
    let (xw, zw) = (widen(x), z.map(widen));
    let mut worst = 0f64;
    let (out, r) = match (z, &zw) {
        (Some(z), Some(zw)) => (
            gpu.forward_train_add_host(shape, x, z)
                .expect("forward_train_add"),
            cpu.forward_train_add(shape, &xw, zw).expect("reference"),
        ),
        _ => (
            gpu.forward_train_host(shape, x).expect("forward_train"),
            cpu.forward_train(shape, &xw).expect("reference"),
        ),
    };
    worst = worst.max(assert_y_close(&format!("{what} y"), &out.y, &r.y));
    assert_mostly_rounded(&format!("{what} y"), &out.y, &r.y);
    let s = &out.saved;
    worst = worst.max(assert_close(&format!("{what} mean"), &s.mean, &r.mean, TOL));
    worst = worst.max(assert_close(
        &format!("{what} invstd"),
        &s.invstd,
        &r.invstd,
        TOL,
    ));
    let exact_mean: Vec<f32> = s.mean.iter().zip(&s.mean_lo).map(|(h, l)| h + l).collect();
    assert_close(&format!("{what} mean+mean_lo"), &exact_mean, &r.mean, TOL);
    let state = gpu.state().expect("state");
    assert_eq!(
        state.num_batches_tracked, cpu.state.num_batches_tracked,
        "{what}"
    );
    let (rm, rv) = (f64s(&cpu.state.running_mean), f64s(&cpu.state.running_var));
    let name = format!("{what} running_mean");
    worst = worst.max(assert_close(&name, &state.running_mean, &rm, TOL));
    let name = format!("{what} running_var");
    worst = worst.max(assert_close(&name, &state.running_var, &rv, TOL));
    // From here on both use the GPU's f32 running statistics.
    cpu.state = state;

    let data = (x, &out.y[..], dy);
    let e = check_backwards(
        gpu,
        cpu,
        shape,
        data,
        Some(&out.saved),
        masks,
        residual,
        what,
    );
    worst = worst.max(e);

    let (ev, r) = match (z, &zw) {
        (Some(z), Some(zw)) => (
            gpu.forward_eval_add_host(shape, x, z)
                .expect("forward_eval_add"),
            cpu.forward_eval_add(shape, &xw, zw).expect("reference"),
        ),
        _ => (
            gpu.forward_eval_host(shape, x).expect("forward_eval"),
            cpu.forward_eval(shape, &xw).expect("reference"),
        ),
    };
    worst = worst.max(assert_y_close(&format!("{what} eval y"), &ev.y, &r.y));
    assert_mostly_rounded(&format!("{what} eval y"), &ev.y, &r.y);
    let track = cpu.config.track_running_stats;
    assert_eq!(
        ev.saved.is_some(),
        !track,
        "{what}: eval saves batch stats only without running stats"
    );
    if let Some(s) = &ev.saved {
        worst = worst.max(assert_close(
            &format!("{what} eval mean"),
            &s.mean,
            &r.mean,
            TOL,
        ));
        let name = format!("{what} eval invstd");
        worst = worst.max(assert_close(&name, &s.invstd, &r.invstd, TOL));
    }
    if track {
        let data = (x, &ev.y[..], dy);
        let e = check_backwards(gpu, cpu, shape, data, None, masks, residual, what);
        worst = worst.max(e);
    }
    worst
}

/// [`check_step`] on a fresh pair with random `x` (and `z`) and `dy` of type `T`.
fn check_random<T: Float16>(
    ctx: &GpuContext,
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    with_z: bool,
    masks: &[GradMask],
    what: &str,
) -> f64 {
    let (mut gpu, mut cpu) = signed_pair(ctx, rng, config);
    let mean = rng.random_range(-3.0..3.0);
    let x: Vec<T> = normal16(rng, shape, mean, 2.0);
    let z: Option<Vec<T>> = with_z.then(|| normal16(rng, shape, 0.5, 3.0));
    let dy: Vec<T> = normal16(rng, shape, 0.1, 1.0);
    check_step(
        &mut gpu,
        &mut cpu,
        shape,
        &x,
        z.as_deref(),
        &dy,
        masks,
        what,
    )
}

/// The largest error per storage, printed at the end of a test.
#[derive(Default)]
struct Worst(Vec<(Storage, f64)>);

impl Worst {
    fn add(&mut self, storage: Storage, e: f64) {
        match self.0.iter_mut().find(|(s, _)| *s == storage) {
            Some((_, w)) => *w = w.max(e),
            None => self.0.push((storage, e)),
        }
    }

    fn print(&self, what: &str) {
        for (s, w) in &self.0 {
            println!("{what}, {s:?}: largest error (fraction of the allowance) {w:.3}");
        }
    }
}

#[test]
fn every_layout_activation_residual_and_option() {
    let test = "16-bit every_layout_activation_residual_and_option";
    let (mut rng, storages) = (rng(test), storages(test));
    let mut worst = Worst::default();
    let mut k = 0;
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let c = shape.c();
            let configs = [
                BatchNormConfig::new(c),
                BatchNormConfig::new(c).affine(false),
                BatchNormConfig::new(c).track_running_stats(false),
                BatchNormConfig::keras(c),
            ];
            for _ in 0..6 {
                let (act, with_z) = combination(k);
                let storage = storage_of(&storages, k);
                let config = configs[k % 4].clone().activation(act);
                k += 1;
                let what = format!(
                    "{storage:?} {dims:?} {layout:?} {act:?} residual {with_z} {}",
                    describe(&config)
                );
                let (ctx, masks) = (storage.on(ctx()), [GradMask::default()]);
                let e = with_type!(
                    storage,
                    check_random(&ctx, &mut rng, &shape, &config, with_z, &masks, &what)
                );
                worst.add(storage, e);
            }
        }
    }
    worst.print("every layout");
}

#[test]
fn every_tuning_matches_reference() {
    let test = "16-bit every_tuning_matches_reference";
    let (mut rng, storages) = (rng(test), storages(test));
    let mut worst = Worst::default();
    for (t, (name, ctx)) in tunings().into_iter().enumerate() {
        let mut k = 0;
        for dims in SPLIT_SHAPES.iter().chain(&SHAPES[..4]) {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                // The largest shape is there for its channels-last rows.
                if shape.numel() > 500_000 && layout == Layout::ChannelsFirst {
                    continue;
                }
                let (act, with_z) = combination(k);
                // Each tuning starts the cycle of storages at another one.
                let storage = storage_of(&storages, k + 7 * t);
                k += 1;
                let config = BatchNormConfig::new(shape.c()).activation(act);
                let what = format!(
                    "tuning {name} {storage:?} {dims:?} {layout:?} {act:?} residual {with_z}"
                );
                let (ctx, masks) = (storage.on(&ctx), [GradMask::default()]);
                let e = with_type!(
                    storage,
                    check_random(&ctx, &mut rng, &shape, &config, with_z, &masks, &what)
                );
                worst.add(storage, e);
            }
        }
    }
    worst.print("every tuning");
}

#[test]
fn every_output_mask() {
    let test = "16-bit every_output_mask";
    let (mut rng, storages) = (rng(test), storages(test));
    let masks = all_masks();
    let mut k = 0;
    for layout in LAYOUTS {
        for (dims, act, with_z) in [
            (&[3usize, 5, 3, 3][..], Activation::Relu, true),
            (&[3, 5, 3, 3][..], Activation::Relu, false),
            (&[41, 6][..], Activation::Identity, false),
        ] {
            let shape = Shape::new(dims, layout).unwrap();
            for config in [
                BatchNormConfig::new(shape.c()),
                BatchNormConfig::new(shape.c()).track_running_stats(false),
            ] {
                let storage = storages[k % storages.len()];
                k += 1;
                let config = config.activation(act);
                let what = format!(
                    "{storage:?} {dims:?} {layout:?} {act:?} residual {with_z} {}",
                    describe(&config)
                );
                let ctx = storage.on(ctx());
                with_type!(
                    storage,
                    check_random(&ctx, &mut rng, &shape, &config, with_z, &masks, &what)
                );
            }
        }
    }
}

/// The standard deviation of the large-mean data around 100 for `T`: about 1.6
/// of its spacings there.
fn large_mean_std<T: Float16>() -> f32 {
    match T::DTYPE {
        DType::Bf16 => 0.8,
        _ => 0.1,
    }
}

/// One case of [`large_mean_small_spread`].
fn large_mean_case<T: Float16>(
    ctx: &GpuContext,
    rng: &mut StdRng,
    shape: &Shape,
    act: Activation,
    with_z: bool,
    what: &str,
) -> f64 {
    let config = BatchNormConfig::new(shape.c()).activation(act);
    let (mut gpu, mut cpu) = signed_pair(ctx, rng, &config);
    let x: Vec<T> = normal16(rng, shape, 100.0, large_mean_std::<T>());
    let distinct: std::collections::BTreeSet<u32> =
        x.iter().map(|v| v.to_f32().to_bits()).collect();
    assert!(
        distinct.len() > 3,
        "{what}: the data must not be (nearly) constant: {distinct:?}"
    );
    let z: Option<Vec<T>> = with_z.then(|| normal16(rng, shape, 0.5, 3.0));
    let dy: Vec<T> = normal16(rng, shape, 0.0, 1.0);
    let masks = [GradMask::default()];
    check_step(
        &mut gpu,
        &mut cpu,
        shape,
        &x,
        z.as_deref(),
        &dy,
        &masks,
        what,
    )
}

#[test]
fn large_mean_small_spread() {
    // x = 100 + std * N(0, 1), std a little over one and a half spacings of the
    // type near 100, so the data is not constant: f16 carries 11 significant bits,
    // its spacing near 100 is 2^-4 and std 0.1, a mean 1000 times the spread (1000
    // +- 0.01 would round every value to 1000, a constant channel); bf16 carries 8,
    // its spacing near 100 is 2^-1 and std 0.8, a mean 125 times the spread (the
    // most bf16 data can hold: 1000 +- 0.8 rounds nearly every value to 1000, its
    // spacing there being 4). The statistics must still come out to 1e-5 (a
    // one-pass f32 variance would lose several percent on the f16 data) and dx to
    // the size of its terms (gamma * invstd ~ 40 for f16, ~ 5 for bf16).
    let test = "16-bit large_mean_small_spread";
    let (mut rng, storages) = (rng(test), storages(test));
    let mut k = 0;
    for (dims, layout) in [
        (&[16usize, 8, 12, 12][..], Layout::ChannelsFirst),
        (&[16, 8, 12, 12][..], Layout::ChannelsLast),
        (&[301, 5][..], Layout::ChannelsFirst),
        (&[5, 8, 7, 7][..], Layout::ChannelsFirst),
        (&[3, 6, 5, 5][..], Layout::ChannelsLast),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        for _ in 0..2 {
            let (act, with_z) = combination(k);
            let storage = storage_of(&storages, k);
            k += 1;
            let what =
                format!("large mean {storage:?} {dims:?} {layout:?} {act:?} residual {with_z}");
            let ctx = storage.on(ctx());
            let e = with_type!(
                storage,
                large_mean_case(&ctx, &mut rng, &shape, act, with_z, &what)
            );
            println!("{what}: largest error {e:.3}");
        }
    }
}

/// One case of [`constant_channels`].
fn constant_case<T: Float16>(
    ctx: &GpuContext,
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    with_z: bool,
    what: &str,
) {
    let state = random_signed_state(rng, config, &ACROSS_KINKS);
    let mut probe = BatchNorm::with_state(ctx, config.clone(), &state).unwrap();
    let (mut gpu, mut cpu) = pair_from_state(ctx, config, state);
    let mut x: Vec<T> = normal16(rng, shape, 1.0, 2.0);
    for (i, v) in x.iter_mut().enumerate() {
        match shape.channel_of(i) {
            0 => *v = T::from_f32(-1.5),
            1 => *v = T::from_f32(1000.0),
            _ => {}
        }
    }
    let z: Option<Vec<T>> = with_z.then(|| normal16(rng, shape, 0.5, 3.0));
    let dy: Vec<T> = normal16(rng, shape, 0.0, 1.0);
    let out = probe.forward_train_host(shape, &x).unwrap();
    assert_eq!(
        &out.saved.mean[..2],
        &[-1.5, 1000.0],
        "{what}: mean of the constant channels"
    );
    let masks = [GradMask::default()];
    check_step(
        &mut gpu,
        &mut cpu,
        shape,
        &x,
        z.as_deref(),
        &dy,
        &masks,
        what,
    );
}

#[test]
fn constant_channels() {
    // Channel 0 constant (zero variance: y = beta [+ z], dx from the eps-only
    // invstd), channel 1 constant at a large value (1000, exact in f16 and bf16),
    // the others random.
    let test = "16-bit constant_channels";
    let (mut rng, storages) = (rng(test), storages(test));
    let mut k = 0;
    for layout in LAYOUTS {
        for (dims, act, with_z) in [
            (&[6usize, 4, 5, 5][..], Activation::Relu, true),
            (&[37, 3][..], Activation::Identity, false),
            (&[3, 5, 2, 3, 3][..], Activation::Relu6, false),
        ] {
            let shape = Shape::new(dims, layout).unwrap();
            for config in [
                BatchNormConfig::new(shape.c()),
                BatchNormConfig::keras(shape.c()),
            ] {
                let storage = storages[k % storages.len()];
                k += 1;
                let config = config.activation(act);
                let what = format!(
                    "constant {storage:?} {dims:?} {layout:?} {act:?} residual {with_z} {}",
                    describe(&config)
                );
                let ctx = storage.on(ctx());
                with_type!(
                    storage,
                    constant_case(&ctx, &mut rng, &shape, &config, with_z, &what)
                );
            }
        }
    }
}

/// [`nan_stays_in_its_channel`] in one storage.
fn nan_cases<T: Float16>(ctx: &GpuContext, rng: &mut StdRng, storage: Storage) {
    for layout in LAYOUTS {
        let shape = Shape::new(&[4, 3, 3, 3], layout).unwrap();
        for (act, nan_in_z) in [(Activation::Relu, false), (Activation::Identity, true)] {
            let config = BatchNormConfig::new(3).activation(act);
            let (mut gpu, mut cpu) = signed_pair(ctx, rng, &config);
            let mut x: Vec<T> = normal16(rng, &shape, 0.5, 2.0);
            let mut z: Vec<T> = normal16(rng, &shape, 0.5, 3.0);
            let at = shape.index(1, 1, 4);
            if nan_in_z {
                z[at] = T::from_f32(f32::NAN);
            } else {
                x[at] = T::from_f32(f32::NAN);
            }
            let what = format!("{storage:?} {layout:?} {act:?} NaN in z {nan_in_z}");
            let out = gpu.forward_train_add_host(&shape, &x, &z).unwrap();
            let r = cpu
                .forward_train_add(&shape, &widen(&x), &widen(&z))
                .unwrap();
            assert_y_close(&format!("{what} y"), &out.y, &r.y);
            let dy: Vec<T> = normal16(rng, &shape, 0.0, 1.0);
            let all = GradMask::default();
            let g = gpu
                .backward_fused_host(&shape, &x, Some(&out.y), &dy, Some(&out.saved), all, true)
                .unwrap();
            assert_nan_stays_in_channel(&what, &shape, (at, nan_in_z), &out.y, &g);
            let dz = g.dz.unwrap();
            assert_eq!(bits(&dz), bits(&masked(act, &out.y, &dy)), "{what}: dz");
        }
    }
}

#[test]
fn nan_stays_in_its_channel() {
    let test = "16-bit nan_stays_in_its_channel";
    let (mut rng, storages) = (rng(test), storages(test));
    for storage in storages {
        let ctx = storage.on(ctx());
        with_type!(storage, nan_cases(&ctx, &mut rng, storage));
    }
}

/// Outputs past the range of `T`: channel 0 gets `y = beta + gamma * xhat` from
/// `x = N(1, 0.5^2)`, channel 1 the same negative (Relu clamps it to 0 before the
/// rounding), `dy` has the spread `dy_std`. Every y whose reference is past the
/// type's rounding threshold (MAX plus half a spacing: 65520 for f16, (2 - 2^-8) *
/// 2^127 for bf16) by more than the f32 error is ±inf, every one short of it
/// finite; some overflow exactly when `overflows`, and some dx exactly when
/// `dx_overflows`. The statistics and dgamma/dbeta (f32) stay finite. Then
/// [`check_step`] compares everything.
fn past_the_range<T: Float16>(
    ctx: &GpuContext,
    rng: &mut StdRng,
    (gamma, beta, dy_std): (f32, f32, f32),
    (overflows, dx_overflows): (bool, bool),
    name: &str,
) {
    let threshold = T::MAX.to_f64() + T::MAX.ulp() / 2.0;
    for layout in LAYOUTS {
        let shape = Shape::new(&[64, 3, 5, 5], layout).unwrap();
        for (act, with_z) in [(Activation::Identity, false), (Activation::Relu, true)] {
            let config = BatchNormConfig::new(3).activation(act);
            let mut state = random_signed_state(rng, &config, &ACROSS_KINKS);
            state.gamma[..2].copy_from_slice(&[gamma, gamma]);
            state.beta[..2].copy_from_slice(&[beta, -beta]);
            let (mut gpu, mut cpu) = pair_from_state(ctx, &config, state);
            let x: Vec<T> = normal16(rng, &shape, 1.0, 0.5);
            let z: Option<Vec<T>> = with_z.then(|| normal16(rng, &shape, 0.0, 1.0));
            let dy: Vec<T> = normal16(rng, &shape, 0.0, dy_std);
            let what = format!("{name} {layout:?} {act:?} residual {with_z}");
            let (out, r) = match &z {
                Some(z) => (
                    gpu.forward_train_add_host(&shape, &x, z).unwrap(),
                    cpu.forward_train_add(&shape, &widen(&x), &widen(z))
                        .unwrap(),
                ),
                None => (
                    gpu.forward_train_host(&shape, &x).unwrap(),
                    cpu.forward_train(&shape, &widen(&x)).unwrap(),
                ),
            };
            let (mut pos, mut neg) = (0, 0);
            for (i, (&o, &v)) in out.y.iter().zip(&r.y).enumerate() {
                // Clear of the rounding threshold by more than the f32 error.
                if v.abs() > threshold * (1.0 + 1e-4) {
                    assert_eq!(
                        o.to_f64(),
                        f64::INFINITY.copysign(v),
                        "{what}: y[{i}] (ref {v})"
                    );
                    if v > 0.0 {
                        pos += 1;
                    } else {
                        neg += 1;
                    }
                } else if v.abs() < threshold * (1.0 - 1e-4) {
                    assert!(o.to_f32().is_finite(), "{what}: y[{i}] = {o} (ref {v})");
                }
            }
            assert!(
                r.y.iter().any(|v| v.abs() > 65520.0),
                "{what}: no output past the f16 range"
            );
            assert_eq!(pos > 0, overflows, "{what}: {pos} outputs overflowed");
            if act == Activation::Identity {
                assert_eq!(neg > 0, overflows, "{what}: {neg} overflowed below");
            } else {
                assert!(
                    out.y.iter().all(|v| v.to_f32() >= 0.0),
                    "{what}: Relu output below 0"
                );
            }
            assert_y_close(&format!("{what} y"), &out.y, &r.y);
            assert!(
                out.saved.invstd.iter().all(|v| v.is_finite()),
                "{what}: invstd"
            );
            let all = GradMask::default();
            let g = gpu_backward(
                &mut gpu,
                &shape,
                (&x, &out.y, &dy),
                Some(&out.saved),
                all,
                with_z,
            );
            let dx = g.dx.unwrap();
            assert!(
                dx.iter().all(|v| !v.to_f32().is_nan()),
                "{what}: dx has a NaN"
            );
            assert_eq!(
                dx.iter().any(|v| v.to_f32().is_infinite()),
                dx_overflows,
                "{what}: dx overflowed"
            );
            let (dg, db) = (g.dgamma.unwrap(), g.dbeta.unwrap());
            assert!(
                dg.iter().chain(&db).all(|v| v.is_finite()),
                "{what}: dgamma {dg:?} dbeta {db:?}"
            );
            // Both go on from the GPU's state; check_step compares everything.
            cpu.state = gpu.state().expect("state");
            check_step(
                &mut gpu,
                &mut cpu,
                &shape,
                &x,
                z.as_deref(),
                &dy,
                &[all],
                &what,
            );
        }
    }
}

#[test]
fn outputs_past_the_range_are_inf() {
    // y = 65300 + 100 * xhat passes 65504 from xhat ~ 2.2 and rounds to ±inf in
    // f16, as a plain f32 to f16 cast does (from 65520 on); dy of spread 1000
    // takes dx past the f16 range too (gamma * invstd = 200). bf16 has f32's
    // range: there the same outputs stay finite, and y = 3.3935e38 + 1.5e35 * xhat
    // passes its threshold ((2 - 2^-8) * 2^127, about 3.39617e38) from xhat ~ 1.8,
    // the f32 value rounding to inf, yet stays below f32::MAX (3.40282e38) up to
    // xhat ~ 6, as do the f32 terms y is made of (the shift beta - (mean - pivot)
    // * gamma * invstd, the pivot being a data value); dx (gamma * invstd ~ 3e35,
    // dy of spread 1) stays finite.
    let test = "16-bit outputs_past_the_range_are_inf";
    let (mut rng, storages) = (rng(test), storages(test));
    let past_f16 = (100.0, 65300.0, 1000.0);
    for storage in storages {
        let ctx = storage.on(ctx());
        let name = format!("{storage:?}");
        match storage.dtype() {
            DType::Bf16 => {
                let flags = (false, false);
                past_the_range::<bf16>(&ctx, &mut rng, past_f16, flags, &name);
                let near_max = (1.5e35, 3.3935e38, 1.0);
                let name = format!("{name} near f32::MAX");
                past_the_range::<bf16>(&ctx, &mut rng, near_max, (true, false), &name);
            }
            _ => past_the_range::<f16>(&ctx, &mut rng, past_f16, (true, true), &name),
        }
    }
}
