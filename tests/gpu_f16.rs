//! f16 tensors on the GPU against the f64 CPU reference, on fresh random inputs:
//! every layout, odd sizes, every test tuning, the activations and the residual,
//! eval with running and batch statistics, the backward of both, every output mask,
//! a large mean with a small spread, constant channels, a NaN, and outputs past
//! the f16 range. On an adapter without `SHADER_F16` every test instead checks
//! that the f16 calls fail with `Error::UnsupportedDType` and change nothing.
//!
//! Inputs (x, z, dy) are drawn, rounded to f16, and the reference is fed their
//! exact f32 widening. Tolerances:
//!
//! - y, dx, dz (f16 outputs):
//!   `|out - round16(ref)| <= max(ulp16(round16(ref)), 4e-5 * (1 + s))`, where
//!   `round16` rounds the f64 reference to f16 (to nearest even, straight from f64),
//!   `ulp16(v)` is the f16 spacing at `v` (2^-24 below 2^-14; an output past the
//!   f16 range counts as ±65536 with a spacing of 32, so ±inf is the step after
//!   ±65504, as a plain f32 to f16 cast gives it), and `s` is `|ref|` for y and dz,
//!   and for dx, a difference of terms, the size of its terms
//!   `|gamma * invstd| * (|g| + sum|g| / m + |xhat| * sum|g * xhat| / m)`
//!   (`|gamma * invstd * g|` with running statistics; `g` is dy masked by the
//!   activation). A NaN reference needs a NaN output.
//!   Why: the kernels compute in f32 and round once. Their f32 value `f` is within
//!   the f32 tolerance `e = 1e-5 * (1 + s)` of `ref`. Where `e` is at most half the
//!   f16 spacing, `round16(f)` is `round16(ref)` or a neighbour: one ulp, when `f`
//!   and `ref` fall on either side of a rounding boundary (a tie of two f16
//!   values). Near 0 (for y, `|ref|` below about 2^-5) the f16 spacing is finer
//!   than `e`; there `|round16(f) - round16(ref)|` is at most `e` plus half a
//!   spacing at `f` and at `ref`, less than `4e`: the floor. dz is moreover exactly
//!   dy masked by the activation at the GPU's own y.
//! - Statistics (saved mean and invstd, `mean + mean_lo`, running mean and var):
//!   `1e-5 * (1 + |ref|)`, as for f32, against the reference of the widened inputs
//!   (statistics stay f32).
//! - dgamma, dbeta (f32): `1e-5 * (1 + sum of |terms|)`, as for f32.

mod common;
mod gpu_support;

use common::{all_masks, assert_close, assert_f16_close, assert_sums_close, assert_y_close};
use common::{assert_nan_stays_in_channel, assert_presence, reference_stats, rng, to_f16, LAYOUTS};
use common::{bits, combination, dbeta_scale, dgamma_scale, dx_scale, masked, normal};
use common::{random_signed_state, ACROSS_KINKS};
use gpu_support::{ctx, describe, f64s, pair_from_state, signed_pair, tunings, SPLIT_SHAPES};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::{widen, ReferenceBatchNorm, ReferenceGradients};
use wgpu_batchnorm::half::f16;
use wgpu_batchnorm::{
    Activation, BatchNorm, BatchNormConfig, BatchNormState, Error, GpuContext, GradMask, Gradients,
    Layout, SavedStatsHost, Shape, StatsSource,
};

/// Statistics, dgamma and dbeta (as for f32).
const TOL: f64 = 1e-5;

/// Odd and even sizes of every rank, both layouts: element counts odd (561, 165,
/// 153, 135, 243, 2535: f16 tensors that end in half a word) and even; C = 1, 3,
/// 5, 17; N = 1 with spatial > 1.
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

/// `N(mean, std^2)` rounded to f16.
fn normal16(rng: &mut StdRng, shape: &Shape, mean: f32, std: f32) -> Vec<f16> {
    to_f16(&normal(rng, shape, mean, std))
}

/// Whether the adapter runs f16 kernels. Without `SHADER_F16`, checks that the
/// f16 calls fail with `Error::UnsupportedDType`, change nothing and leave the
/// layer working in f32, says so, and returns false.
fn has_f16(test: &str) -> bool {
    let ctx = ctx();
    if ctx.optional_features().contains(wgpu::Features::SHADER_F16) {
        return true;
    }
    let unsupported = |what: &str, e: Error| {
        assert!(
            matches!(e, Error::UnsupportedDType { dtype: "f16", .. }),
            "{test}: {what} without SHADER_F16: expected Error::UnsupportedDType, got {e:?}"
        );
    };
    let shape = Shape::channels_last(&[4, 3, 5]).unwrap();
    let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32 - 3.0).collect();
    let x16 = to_f16(&x);
    let saved = SavedStatsHost {
        mean: vec![0.0; 3],
        invstd: vec![1.0; 3],
        mean_lo: vec![0.0; 3],
    };
    let all = GradMask::default();
    for act in [Activation::Identity, Activation::Relu] {
        let config = BatchNormConfig::new(3).activation(act);
        let state = BatchNormState::new(&config);
        let (mut gpu, cpu) = pair_from_state(ctx, &config, state.clone());
        let (x, x16) = (&x[..], &x16[..]);
        unsupported(
            "forward_train_host",
            gpu.forward_train_host(&shape, x16).unwrap_err(),
        );
        let e = gpu.forward_train_add_host(&shape, x16, x16).unwrap_err();
        unsupported("forward_train_add_host", e);
        unsupported(
            "forward_eval_host",
            gpu.forward_eval_host(&shape, x16).unwrap_err(),
        );
        let e = gpu.forward_eval_add_host(&shape, x16, x16).unwrap_err();
        unsupported("forward_eval_add_host", e);
        if act == Activation::Identity {
            let e = gpu
                .backward_host(&shape, x16, x16, Some(&saved), all)
                .unwrap_err();
            unsupported("backward_host", e);
        }
        for s in [Some(&saved), None] {
            let e = gpu
                .backward_fused_host(&shape, x16, Some(x16), x16, s, all, true)
                .unwrap_err();
            unsupported("backward_fused_host", e);
        }
        assert_eq!(
            gpu.state().unwrap(),
            state,
            "{test}: a failed f16 call changed the state"
        );
        let y = gpu
            .forward_eval_host(&shape, x)
            .expect("f32 after the f16 errors")
            .y;
        let r = cpu.forward_eval(&shape, x).unwrap();
        assert_close(
            &format!("{test}: f32 eval after the f16 errors"),
            &y,
            &r.y,
            TOL,
        );
    }
    println!(
        "{test}: f16 is not available on this adapter ({}): every f16 call returned \
         Error::UnsupportedDType",
        ctx.describe()
    );
    false
}

/// The generator of an f16 test, or `None` (after [`has_f16`]'s checks) where
/// the adapter has no f16 kernels.
fn f16_rng(test: &str) -> Option<StdRng> {
    has_f16(test).then(|| rng(test))
}

/// Compares a GPU backward with the reference's, both from the output `y`
/// (f16 on the GPU, its widening in the reference).
#[allow(clippy::too_many_arguments)]
fn compare_gradients(
    g: &Gradients<f16>,
    r: &ReferenceGradients,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    (x, y, dy): (&[f16], &[f16], &[f16]),
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
        worst = worst.max(assert_f16_close(&format!("{what} dx"), dx, rdx, |i| {
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
fn gpu_backward(
    gpu: &mut BatchNorm,
    shape: &Shape,
    (x, y, dy): (&[f16], &[f16], &[f16]),
    saved: Option<&SavedStatsHost>,
    mask: GradMask,
    residual: bool,
) -> Gradients<f16> {
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
fn check_backwards(
    gpu: &mut BatchNorm,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    data: (&[f16], &[f16], &[f16]),
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
/// Returns the largest error (f16 outputs: as a fraction of their allowance).
#[allow(clippy::too_many_arguments)]
fn check_step(
    gpu: &mut BatchNorm,
    cpu: &mut ReferenceBatchNorm,
    shape: &Shape,
    x: &[f16],
    z: Option<&[f16]>,
    dy: &[f16],
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

/// [`check_step`] on a fresh pair with random f16 `x` (and `z`) and `dy`.
fn check_random(
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
    let x = normal16(rng, shape, mean, 2.0);
    let z = with_z.then(|| normal16(rng, shape, 0.5, 3.0));
    let dy = normal16(rng, shape, 0.1, 1.0);
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

#[test]
fn every_layout_activation_residual_and_option() {
    let Some(mut rng) = f16_rng("f16 every_layout_activation_residual_and_option") else {
        return;
    };
    let mut worst = 0f64;
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
                let config = configs[k % 4].clone().activation(act);
                k += 1;
                let what = format!(
                    "{dims:?} {layout:?} {act:?} residual {with_z} {}",
                    describe(&config)
                );
                let masks = [GradMask::default()];
                let e = check_random(ctx(), &mut rng, &shape, &config, with_z, &masks, &what);
                worst = worst.max(e);
            }
        }
    }
    println!("largest error (f16 outputs: fraction of the allowance): {worst:.3}");
}

#[test]
fn every_tuning_matches_reference() {
    let Some(mut rng) = f16_rng("f16 every_tuning_matches_reference") else {
        return;
    };
    let mut worst = 0f64;
    for (name, ctx) in tunings() {
        let mut k = 0;
        for dims in SPLIT_SHAPES.iter().chain(&SHAPES[..4]) {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                // The largest shape is there for its channels-last rows.
                if shape.numel() > 500_000 && layout == Layout::ChannelsFirst {
                    continue;
                }
                let (act, with_z) = combination(k);
                k += 1;
                let config = BatchNormConfig::new(shape.c()).activation(act);
                let what = format!("tuning {name} {dims:?} {layout:?} {act:?} residual {with_z}");
                let masks = [GradMask::default()];
                let e = check_random(&ctx, &mut rng, &shape, &config, with_z, &masks, &what);
                worst = worst.max(e);
            }
        }
    }
    println!(
        "largest error over every tuning (f16 outputs: fraction of the allowance): {worst:.3}"
    );
}

#[test]
fn every_output_mask() {
    let Some(mut rng) = f16_rng("f16 every_output_mask") else {
        return;
    };
    let masks = all_masks();
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
                let config = config.activation(act);
                let what = format!(
                    "{dims:?} {layout:?} {act:?} residual {with_z} {}",
                    describe(&config)
                );
                check_random(ctx(), &mut rng, &shape, &config, with_z, &masks, &what);
            }
        }
    }
}

#[test]
fn large_mean_small_spread() {
    // x = 100 + 0.1 * N(0, 1) in f16. f16 carries 11 significant bits: near 100 its
    // spacing is 2^-4, so this spread covers a few spacings each side and the data
    // is not constant; a mean 1000 times the spread is about the most f16 data can
    // hold (1000 +- 0.01 rounds every value to 1000, a constant channel). The
    // statistics must still come out to 1e-5 (a one-pass f32 variance would lose
    // several percent here) and dx to the size of its terms (gamma * invstd ~ 40).
    let Some(mut rng) = f16_rng("f16 large_mean_small_spread") else {
        return;
    };
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
            k += 1;
            let config = BatchNormConfig::new(shape.c()).activation(act);
            let (mut gpu, mut cpu) = signed_pair(ctx(), &mut rng, &config);
            let x = normal16(&mut rng, &shape, 100.0, 0.1);
            let distinct: std::collections::BTreeSet<u16> = x.iter().map(|v| v.to_bits()).collect();
            assert!(
                distinct.len() > 3,
                "the data must not be (nearly) constant: {distinct:?}"
            );
            let z = with_z.then(|| normal16(&mut rng, &shape, 0.5, 3.0));
            let dy = normal16(&mut rng, &shape, 0.0, 1.0);
            let what = format!("large mean {dims:?} {layout:?} {act:?} residual {with_z}");
            let masks = [GradMask::default()];
            let e = check_step(
                &mut gpu,
                &mut cpu,
                &shape,
                &x,
                z.as_deref(),
                &dy,
                &masks,
                &what,
            );
            println!("{what}: largest error {e:.3}");
        }
    }
}

#[test]
fn constant_channels() {
    // Channel 0 constant (zero variance: y = beta [+ z], dx from the eps-only
    // invstd), channel 1 constant at a large value, the others random.
    let Some(mut rng) = f16_rng("f16 constant_channels") else {
        return;
    };
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
                let config = config.activation(act);
                let state = random_signed_state(&mut rng, &config, &ACROSS_KINKS);
                let mut probe = BatchNorm::with_state(ctx(), config.clone(), &state).unwrap();
                let (mut gpu, mut cpu) = pair_from_state(ctx(), &config, state);
                let mut x = normal16(&mut rng, &shape, 1.0, 2.0);
                for (i, v) in x.iter_mut().enumerate() {
                    match shape.channel_of(i) {
                        0 => *v = f16::from_f32(-1.5),
                        1 => *v = f16::from_f32(1000.0),
                        _ => {}
                    }
                }
                let z = with_z.then(|| normal16(&mut rng, &shape, 0.5, 3.0));
                let dy = normal16(&mut rng, &shape, 0.0, 1.0);
                let what = format!(
                    "constant {dims:?} {layout:?} {act:?} residual {with_z} {}",
                    describe(&config)
                );
                let out = probe.forward_train_host(&shape, &x).unwrap();
                assert_eq!(
                    &out.saved.mean[..2],
                    &[-1.5, 1000.0],
                    "{what}: mean of the constant channels"
                );
                let masks = [GradMask::default()];
                check_step(
                    &mut gpu,
                    &mut cpu,
                    &shape,
                    &x,
                    z.as_deref(),
                    &dy,
                    &masks,
                    &what,
                );
            }
        }
    }
}

#[test]
fn nan_stays_in_its_channel() {
    let Some(mut rng) = f16_rng("f16 nan_stays_in_its_channel") else {
        return;
    };
    for layout in LAYOUTS {
        let shape = Shape::new(&[4, 3, 3, 3], layout).unwrap();
        for (act, nan_in_z) in [(Activation::Relu, false), (Activation::Identity, true)] {
            let config = BatchNormConfig::new(3).activation(act);
            let (mut gpu, mut cpu) = signed_pair(ctx(), &mut rng, &config);
            let mut x = normal16(&mut rng, &shape, 0.5, 2.0);
            let mut z = normal16(&mut rng, &shape, 0.5, 3.0);
            let at = shape.index(1, 1, 4);
            if nan_in_z {
                z[at] = f16::NAN;
            } else {
                x[at] = f16::NAN;
            }
            let what = format!("{layout:?} {act:?} NaN in z {nan_in_z}");
            let out = gpu.forward_train_add_host(&shape, &x, &z).unwrap();
            let r = cpu
                .forward_train_add(&shape, &widen(&x), &widen(&z))
                .unwrap();
            assert_y_close(&format!("{what} y"), &out.y, &r.y);
            let dy = normal16(&mut rng, &shape, 0.0, 1.0);
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
fn outputs_past_the_f16_range_are_inf() {
    // Channel 0: y = 65300 + 100 * xhat, past 65504 from xhat ~ 2.2, rounds to +inf
    // as a plain f32 to f16 cast does (from 65520 on); channel 1 the same negative
    // (Relu clamps it to 0 before the rounding). dy of spread 1000 takes dx past
    // the range too (gamma * invstd = 200). The statistics and dgamma/dbeta (f32)
    // stay finite.
    let Some(mut rng) = f16_rng("f16 outputs_past_the_f16_range_are_inf") else {
        return;
    };
    for layout in LAYOUTS {
        let shape = Shape::new(&[64, 3, 5, 5], layout).unwrap();
        for (act, with_z) in [(Activation::Identity, false), (Activation::Relu, true)] {
            let config = BatchNormConfig::new(3).activation(act);
            let mut state = random_signed_state(&mut rng, &config, &ACROSS_KINKS);
            state.gamma[..2].copy_from_slice(&[100.0, 100.0]);
            state.beta[..2].copy_from_slice(&[65300.0, -65300.0]);
            let (mut gpu, mut cpu) = pair_from_state(ctx(), &config, state);
            let x = normal16(&mut rng, &shape, 1.0, 0.5);
            let z = with_z.then(|| normal16(&mut rng, &shape, 0.0, 1.0));
            let dy = normal16(&mut rng, &shape, 0.0, 1000.0);
            let what = format!("{layout:?} {act:?} residual {with_z}");
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
                // Clear of the rounding threshold 65520 by more than the f32 error.
                if v.abs() > 65520.0 * (1.0 + 1e-4) {
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
                } else if v.abs() < 65520.0 * (1.0 - 1e-4) {
                    assert!(o.is_finite(), "{what}: y[{i}] = {o} (ref {v})");
                }
            }
            assert!(pos > 0, "{what}: no output overflowed");
            if act == Activation::Identity {
                assert!(neg > 0, "{what}: no output overflowed below");
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
            assert!(
                g.dx.unwrap().iter().any(|v| v.is_infinite()),
                "{what}: no dx overflowed"
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
