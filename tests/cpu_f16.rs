//! The fast CPU path's f16 and bf16 entry points: against the f64 reference of the
//! widened inputs, rounded to the type, with the tolerances of tests/gpu_f16.rs (y,
//! dx, dz within one ulp of the type of the rounded reference, with a floor of
//! `4e-5 * (1 + s)` near 0; statistics, dgamma and dbeta as for f32); exactly the
//! f32 computation on the widened inputs, rounded once; and f32 through the generic
//! entry points bit for bit what the f32 `*_into` calls give.

mod common;

use common::{
    assert_16_close, assert_close, assert_sums_close, bits, dbeta_scale, dgamma_scale, dx_scale,
    masked, narrow, normal, random_signed_state, reference_stats, rng, Float16, ACROSS_KINKS,
    LAYOUTS,
};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::cpu::reference::{widen, ReferenceBatchNorm, ReferenceGradients};
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    Activation, BatchNormConfig, DType, GradMask, Gradients, SavedStatsHost, Shape, StatsSource,
};

/// Statistics, dgamma and dbeta (as for f32).
const TOL: f64 = 1e-5;

/// Every rank and both traversals of the fast path (planes of 64 or more, rows),
/// odd element counts (16-bit tensors of odd length), C = 1, 3, 17.
const SHAPES: &[&[usize]] = &[
    &[33, 17],
    &[2, 1],
    &[300, 3],
    &[5, 3, 11],
    &[3, 1, 130],
    &[4, 3, 7, 7],
    &[3, 3, 17, 19],
    &[2, 3, 3, 4, 5],
    &[3, 3, 3, 3, 3],
];

/// Asserts equality of the Debug text (NaN matches NaN there).
fn assert_same<T: std::fmt::Debug>(a: &T, b: &T, what: &str) {
    let (a, b) = (format!("{a:?}"), format!("{b:?}"));
    assert!(a == b, "{what}:\n  {a}\n  {b}");
}

/// Inputs of one case, of type `T`.
struct Data<T> {
    x: Vec<T>,
    z: Option<Vec<T>>,
    dy: Vec<T>,
}

/// The data classes: well-conditioned, a large mean with a small spread as `T`
/// holds it (100 + std * N(0, 1), std a little over one and a half spacings of `T`
/// near 100: 0.1 for f16, 11 significant bits, a mean 1000 times the spread; 0.8
/// for bf16, 8 significant bits, a mean 125 times the spread), channel 0
/// constant, and a NaN in channel 0.
fn data<T: Float16>(rng: &mut StdRng, shape: &Shape, class: usize, with_z: bool) -> Data<T> {
    let mean = rng.random_range(-3.0..3.0);
    let spread = match T::DTYPE {
        DType::Bf16 => 0.8,
        _ => 0.1,
    };
    let mut x = match class {
        1 => normal(rng, shape, 100.0, spread),
        _ => normal(rng, shape, mean, 2.0),
    };
    match class {
        2 => (0..x.len())
            .filter(|&i| shape.channel_of(i) == 0)
            .for_each(|i| x[i] = 2.5),
        3 => x[shape.index(shape.n() - 1, 0, 0)] = f32::NAN,
        _ => {}
    }
    Data {
        x: narrow(&x),
        z: with_z.then(|| narrow(&normal(rng, shape, 0.5, 3.0))),
        dy: narrow(&normal(rng, shape, 0.1, 1.0)),
    }
}

/// `g` is `dy` masked by the activation at `y` (the reference's dz, exact in `T`).
fn compare_gradients<T: Float16>(
    g: &Gradients<T>,
    r: &ReferenceGradients,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    (x, gm): (&[f32], &[f32]),
    source: StatsSource,
    what: &str,
) -> f64 {
    let mut worst = 0f64;
    let stats = reference_stats(cpu, shape, x, source);
    assert_eq!(g.dz.is_some(), r.dz.is_some(), "{what}: dz presence");
    if let (Some(dz), Some(rdz)) = (&g.dz, &r.dz) {
        assert_eq!(widen(dz), gm, "{what}: dz is dy masked by the activation");
        let e = assert_16_close(&format!("{what} dz"), dz, rdz, |i| rdz[i].abs());
        worst = worst.max(e);
    }
    let (dx, rdx) = (g.dx.as_ref().expect("dx"), r.dx.as_ref().expect("dx"));
    let batch = source == StatsSource::Batch;
    let gamma = cpu.state.gamma.as_slice();
    let scale = dx_scale(shape, x, gm, gamma, &stats.mean, &stats.invstd, batch);
    worst = worst.max(assert_16_close(&format!("{what} dx"), dx, rdx, |i| {
        scale[i]
    }));
    if let (Some(dg), Some(rdg)) = (&g.dgamma, &r.dgamma) {
        let scale = dgamma_scale(shape, x, gm, &stats.mean, &stats.invstd);
        worst = worst.max(assert_sums_close(
            &format!("{what} dgamma"),
            dg,
            rdg,
            &scale,
            TOL,
        ));
    }
    if let (Some(db), Some(rdb)) = (&g.dbeta, &r.dbeta) {
        let scale = dbeta_scale(shape, gm);
        worst = worst.max(assert_sums_close(
            &format!("{what} dbeta"),
            db,
            rdb,
            &scale,
            TOL,
        ));
    }
    worst
}

/// The 16-bit fused backward of `y` (of the batch statistics `saved`, else of the
/// running ones, with the residual when the case has one): the f32 backward of
/// the widened inputs rounded, and against the reference. Returns the gradients
/// and the largest error.
fn check_backward<T: Float16>(
    (fast, fast32, cpu): (&CpuBatchNorm, &CpuBatchNorm, &ReferenceBatchNorm),
    shape: &Shape,
    d: &Data<T>,
    y16: &[T],
    saved: Option<&SavedStatsHost>,
    what: &str,
) -> (Gradients<T>, f64) {
    let source = match saved {
        Some(_) => StatsSource::Batch,
        None => StatsSource::Running,
    };
    let (residual, all) = (d.z.is_some(), GradMask::default());
    let (x, y, dy) = (widen(&d.x), widen(y16), widen(&d.dy));
    let gm = masked(cpu.config.activation, &y, &dy);
    let g = fast
        .backward_fused(shape, &d.x, y16, &d.dy, saved, all, residual)
        .unwrap();
    let g32 = fast32
        .backward_fused(shape, &x, &y, &dy, saved, all, residual)
        .unwrap();
    assert_rounded(&g, &g32, what);
    let rg = cpu
        .backward_fused(shape, &x, &y, &dy, source, all, residual)
        .unwrap();
    let e = compare_gradients(&g, &rg, cpu, shape, (&x, &gm), source, what);
    (g, e)
}

/// Every 16-bit entry point on one case, against the reference of the widened
/// inputs and, bit for bit, against the f32 entry points on those inputs
/// rounded to `T` once. Returns the largest error.
fn check_case<T: Float16>(
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    d: &Data<T>,
    what: &str,
) -> f64 {
    let state = random_signed_state(rng, config, &ACROSS_KINKS);
    let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
    let mut fast32 = fast.clone();
    let mut cpu = ReferenceBatchNorm::with_state(config.clone(), state).unwrap();
    let (x, z) = (widen(&d.x), d.z.as_deref().map(widen));
    let act = config.activation;
    let residual = z.is_some();
    let all = GradMask::default();
    let mut worst = 0f64;

    let (out, out32, r) = match (&d.z, &z) {
        (Some(z16), Some(z)) => (
            fast.forward_train_add(shape, &d.x, z16).unwrap(),
            fast32.forward_train_add(shape, &x, z).unwrap(),
            cpu.forward_train_add(shape, &x, z).unwrap(),
        ),
        _ => (
            fast.forward_train(shape, &d.x).unwrap(),
            fast32.forward_train(shape, &x).unwrap(),
            cpu.forward_train(shape, &x).unwrap(),
        ),
    };
    assert_eq!(
        bits(&out.y),
        bits(&narrow::<T>(&out32.y)),
        "{what}: y is the f32 y rounded"
    );
    assert_same(
        &out.saved,
        &out32.saved,
        &format!("{what}: saved statistics as in f32"),
    );
    assert_same(
        &fast.state,
        &fast32.state,
        &format!("{what}: state as in f32"),
    );
    worst = worst.max(assert_16_close(&format!("{what} y"), &out.y, &r.y, |i| {
        r.y[i].abs()
    }));
    worst = worst.max(assert_close(
        &format!("{what} mean"),
        &out.saved.mean,
        &r.mean,
        TOL,
    ));
    worst = worst.max(assert_close(
        &format!("{what} invstd"),
        &out.saved.invstd,
        &r.invstd,
        TOL,
    ));
    let (rm, rv) = (
        common::widen(&cpu.state.running_mean),
        common::widen(&cpu.state.running_var),
    );
    worst = worst.max(assert_close(
        &format!("{what} running_mean"),
        &fast.state.running_mean,
        &rm,
        TOL,
    ));
    worst = worst.max(assert_close(
        &format!("{what} running_var"),
        &fast.state.running_var,
        &rv,
        TOL,
    ));
    cpu.state = fast.state.clone();

    let layers = (&fast, &fast32, &cpu);
    let (g, e) = check_backward(layers, shape, d, &out.y, Some(&out.saved), what);
    worst = worst.max(e);
    if act == Activation::Identity && !residual {
        let plain = fast
            .backward(shape, &d.x, &d.dy, Some(&out.saved), all)
            .unwrap();
        let name = format!("{what}: backward is backward_fused without activation or residual");
        assert_same(&plain, &g, &name);
    }

    let (ev, ev32, r) = match (&d.z, &z) {
        (Some(z16), Some(z)) => (
            fast.forward_eval_add(shape, &d.x, z16).unwrap(),
            fast32.forward_eval_add(shape, &x, z).unwrap(),
            cpu.forward_eval_add(shape, &x, z).unwrap(),
        ),
        _ => (
            fast.forward_eval(shape, &d.x).unwrap(),
            fast32.forward_eval(shape, &x).unwrap(),
            cpu.forward_eval(shape, &x).unwrap(),
        ),
    };
    assert_eq!(
        bits(&ev.y),
        bits(&narrow::<T>(&ev32.y)),
        "{what}: eval y is the f32 y rounded"
    );
    assert_same(
        &ev.saved,
        &ev32.saved,
        &format!("{what}: eval statistics as in f32"),
    );
    worst = worst.max(assert_16_close(
        &format!("{what} eval y"),
        &ev.y,
        &r.y,
        |i| r.y[i].abs(),
    ));
    if config.track_running_stats {
        let layers = (&fast, &fast32, &cpu);
        let name = format!("{what} running");
        worst = worst.max(check_backward(layers, shape, d, &ev.y, None, &name).1);
    }
    worst
}

/// 16-bit gradients are the f32 ones rounded (dx, dz), the same (dgamma, dbeta).
fn assert_rounded<T: Float16>(g: &Gradients<T>, g32: &Gradients, what: &str) {
    let round = |v: &Option<Vec<f32>>| v.as_deref().map(|v| bits(&narrow::<T>(v)));
    assert_eq!(
        g.dx.as_deref().map(bits),
        round(&g32.dx),
        "{what}: dx is the f32 dx rounded"
    );
    assert_eq!(
        g.dz.as_deref().map(bits),
        round(&g32.dz),
        "{what}: dz is the f32 dz rounded"
    );
    assert_same(&g.dgamma, &g32.dgamma, &format!("{what}: dgamma as in f32"));
    assert_same(&g.dbeta, &g32.dbeta, &format!("{what}: dbeta as in f32"));
}

/// [`check_case`] over every shape, layout, activation, residual, option set and
/// data class, in `T`.
fn matches_reference<T: Float16>(test: &str) {
    let mut rng = rng(test);
    let mut worst = 0f64;
    let mut k = 0usize;
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let c = shape.c();
            for act in Activation::ALL {
                for with_z in [false, true] {
                    let config = match k % 4 {
                        0 => BatchNormConfig::new(c),
                        1 => BatchNormConfig::new(c).affine(false),
                        2 => BatchNormConfig::new(c).track_running_stats(false),
                        _ => BatchNormConfig::keras(c),
                    }
                    .activation(act);
                    let class = k % 4;
                    k += 1;
                    let d: Data<T> = data(&mut rng, &shape, class, with_z);
                    let what = format!(
                        "{} {dims:?} {layout:?} {act:?} residual {with_z} class {class} k {k}",
                        T::NAME
                    );
                    worst = worst.max(check_case(&mut rng, &shape, &config, &d, &what));
                }
            }
        }
    }
    println!(
        "largest error ({} outputs: fraction of the allowance): {worst:.3}",
        T::NAME
    );
}

#[test]
fn f16_matches_reference_every_shape_layout_activation_and_data_class() {
    matches_reference::<f16>("f16_matches_reference_every_shape_layout_activation_and_data_class");
}

#[test]
fn bf16_matches_reference_every_shape_layout_activation_and_data_class() {
    matches_reference::<bf16>(
        "bf16_matches_reference_every_shape_layout_activation_and_data_class",
    );
}

/// Channel 0 gets `y = beta + gamma * xhat` from `x = N(1, 0.5^2)`, channel 1 the
/// same negative, `dy` the spread `dy_std`: y (and dx when `dx_overflows`) past
/// the range of `T` is ±inf, as a plain f32 cast gives it, and within the bound
/// of tests/gpu_f16.rs of the reference; `overflows` says whether y has both
/// ±inf or is finite. dgamma and dbeta (f32) stay finite.
fn past_the_range<T: Float16>(
    test: &str,
    (gamma, beta, dy_std): (f32, f32, f32),
    (overflows, dx_overflows): (bool, bool),
) {
    let mut rng = rng(test);
    for layout in LAYOUTS {
        let shape = Shape::new(&[64, 3, 5, 5], layout).unwrap();
        let config = BatchNormConfig::new(3);
        let mut state = random_signed_state(&mut rng, &config, &ACROSS_KINKS);
        state.gamma[..2].copy_from_slice(&[gamma, gamma]);
        state.beta[..2].copy_from_slice(&[beta, -beta]);
        let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
        let mut cpu = ReferenceBatchNorm::with_state(config, state).unwrap();
        let x16: Vec<T> = narrow(&normal(&mut rng, &shape, 1.0, 0.5));
        let dy16: Vec<T> = narrow(&normal(&mut rng, &shape, 0.0, dy_std));
        let (x, dy) = (widen(&x16), widen(&dy16));
        let what = format!("{} {layout:?}", T::NAME);
        let out = fast.forward_train(&shape, &x16).unwrap();
        let r = cpu.forward_train(&shape, &x).unwrap();
        assert_16_close(&format!("{what} y"), &out.y, &r.y, |i| r.y[i].abs());
        assert!(
            r.y.iter().any(|v| v.abs() > 65520.0),
            "{what}: no output past the f16 range"
        );
        for sign in [1.0, -1.0] {
            assert_eq!(
                out.y.iter().any(|v| v.to_f32() == sign * f32::INFINITY),
                overflows,
                "{what}: {sign} inf"
            );
        }
        assert_eq!(
            out.y.iter().all(|v| v.to_f32().is_finite()),
            !overflows,
            "{what}: finite y"
        );
        let all = GradMask::default();
        let g = fast
            .backward(&shape, &x16, &dy16, Some(&out.saved), all)
            .unwrap();
        let rg = cpu
            .backward(&shape, &x, &dy, StatsSource::Batch, all)
            .unwrap();
        let dx = g.dx.as_ref().unwrap();
        assert_eq!(
            dx.iter().any(|v| v.to_f32().is_infinite()),
            dx_overflows,
            "{what}: dx overflowed"
        );
        let stats = cpu.clone().forward_train(&shape, &x).unwrap();
        let scale = dx_scale(
            &shape,
            &x,
            &dy,
            &cpu.state.gamma,
            &stats.mean,
            &stats.invstd,
            true,
        );
        assert_16_close(&format!("{what} dx"), dx, rg.dx.as_ref().unwrap(), |i| {
            scale[i]
        });
        let (dg, db) = (g.dgamma.unwrap(), g.dbeta.unwrap());
        assert!(
            dg.iter().chain(&db).all(|v| v.is_finite()),
            "{what}: {dg:?} {db:?}"
        );
    }
}

#[test]
fn outputs_past_the_range_are_inf() {
    // y = 65300 + 100 * xhat passes 65504 and rounds to ±inf in f16, and dx of
    // dy with a spread of 1000 (gamma * invstd = 200) too; in bf16, with f32's
    // range, both stay finite. y = 3.3935e38 + 1.5e35 * xhat passes bf16's
    // threshold (about 3.39617e38) from xhat ~ 1.8 and stays below f32::MAX
    // (3.40282e38) up to xhat ~ 6; dx (gamma * invstd ~ 3e35) stays finite.
    let past_f16 = (100.0, 65300.0, 1000.0);
    past_the_range::<f16>("f16 outputs_past_the_range_are_inf", past_f16, (true, true));
    let name = "bf16 outputs_past_the_range_are_inf";
    past_the_range::<bf16>(name, past_f16, (false, false));
    let near_max = (1.5e35, 3.3935e38, 1.0);
    past_the_range::<bf16>(&format!("{name} near f32::MAX"), near_max, (true, false));
}

#[test]
fn f32_through_the_generic_entry_points_is_the_f32_computation() {
    // The generic calls with f32 against the f32-only `*_into` calls, bit for bit.
    let mut rng = rng("f32_through_the_generic_entry_points_is_the_f32_computation");
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let c = shape.c();
            for (act, track) in [(Activation::Relu, true), (Activation::Identity, false)] {
                let config = BatchNormConfig::new(c)
                    .activation(act)
                    .track_running_stats(track);
                let state = random_signed_state(&mut rng, &config, &ACROSS_KINKS);
                let mut a = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
                let mut b = a.clone();
                let x = normal(&mut rng, &shape, 1.0, 2.0);
                let z = normal(&mut rng, &shape, 0.0, 1.0);
                let dy = normal(&mut rng, &shape, 0.0, 1.0);
                let what = format!("{dims:?} {layout:?} {act:?} track {track}");
                let mut y = vec![f32::NAN; x.len()];

                let out = a.forward_train(&shape, &x).unwrap();
                let saved = b.forward_train_into(&shape, &x, &mut y).unwrap();
                assert_eq!(
                    (bits(&out.y), &out.saved),
                    (bits(&y), &saved),
                    "{what} train"
                );
                let out = a.forward_train_add(&shape, &x, &z).unwrap();
                let saved = b.forward_train_add_into(&shape, &x, &z, &mut y).unwrap();
                assert_eq!(
                    (bits(&out.y), &out.saved),
                    (bits(&y), &saved),
                    "{what} train add"
                );
                assert_eq!(a.state, b.state, "{what}: state");
                let ev = a.forward_eval(&shape, &x).unwrap();
                let s = b.forward_eval_into(&shape, &x, &mut y).unwrap();
                assert_eq!((bits(&ev.y), &ev.saved), (bits(&y), &s), "{what} eval");
                let ev = a.forward_eval_add(&shape, &x, &z).unwrap();
                let s = b.forward_eval_add_into(&shape, &x, &z, &mut y).unwrap();
                assert_eq!((bits(&ev.y), &ev.saved), (bits(&y), &s), "{what} eval add");

                let sources: Vec<Option<&SavedStatsHost>> = if track {
                    vec![Some(&out.saved), None]
                } else {
                    vec![Some(&out.saved)]
                };
                for saved in sources {
                    let (mut dx, mut dg, mut db) = (
                        vec![f32::NAN; x.len()],
                        vec![f32::NAN; c],
                        vec![f32::NAN; c],
                    );
                    let g = a
                        .backward(&shape, &x, &dy, saved, GradMask::default())
                        .unwrap();
                    b.backward_into(
                        &shape,
                        &x,
                        &dy,
                        saved,
                        Some(&mut dx),
                        Some(&mut dg),
                        Some(&mut db),
                    )
                    .unwrap();
                    assert_eq!(bits(g.dx.as_ref().unwrap()), bits(&dx), "{what} dx");
                    assert_eq!(bits(g.dgamma.as_ref().unwrap()), bits(&dg), "{what} dgamma");
                    assert_eq!(bits(g.dbeta.as_ref().unwrap()), bits(&db), "{what} dbeta");
                    // The fused backward: dy masked at y, then the plain backward.
                    let gm = masked(act, &out.y, &dy);
                    let f = a
                        .backward_fused(&shape, &x, &out.y, &dy, saved, GradMask::default(), true)
                        .unwrap();
                    b.backward_into(
                        &shape,
                        &x,
                        &gm,
                        saved,
                        Some(&mut dx),
                        Some(&mut dg),
                        Some(&mut db),
                    )
                    .unwrap();
                    assert_eq!(bits(f.dx.as_ref().unwrap()), bits(&dx), "{what} fused dx");
                    assert_eq!(
                        bits(f.dgamma.as_ref().unwrap()),
                        bits(&dg),
                        "{what} fused dgamma"
                    );
                    assert_eq!(
                        bits(f.dbeta.as_ref().unwrap()),
                        bits(&db),
                        "{what} fused dbeta"
                    );
                    assert_eq!(bits(f.dz.as_ref().unwrap()), bits(&gm), "{what} fused dz");
                }
            }
        }
    }
}
