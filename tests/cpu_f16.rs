//! The fast CPU path's f16 entry points: against the f64 reference of the widened
//! inputs, rounded to f16, with the tolerances of tests/gpu_f16.rs (y, dx, dz within
//! one f16 ulp of the rounded reference, with a floor of `4e-5 * (1 + s)` near 0;
//! statistics, dgamma and dbeta as for f32); exactly the f32 computation on the
//! widened inputs, rounded once; and f32 through the generic entry points bit for
//! bit what the f32 `*_into` calls give.

mod common;

use common::{
    assert_close, assert_f16_close, assert_sums_close, bits, dbeta_scale, dgamma_scale, dx_scale,
    masked, normal, random_signed_state, reference_stats, rng, to_f16, ACROSS_KINKS, LAYOUTS,
};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::cpu::reference::{widen, ReferenceBatchNorm, ReferenceGradients};
use wgpu_batchnorm::half::f16;
use wgpu_batchnorm::{
    Activation, BatchNormConfig, GradMask, Gradients, SavedStatsHost, Shape, StatsSource,
};

/// Statistics, dgamma and dbeta (as for f32).
const TOL: f64 = 1e-5;

/// Every rank and both traversals of the fast path (planes of 64 or more, rows),
/// odd element counts (f16 tensors of odd length), C = 1, 3, 17.
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

/// Inputs of one case, as f16.
struct Data {
    x: Vec<f16>,
    z: Option<Vec<f16>>,
    dy: Vec<f16>,
}

/// The data classes: well-conditioned, a large mean with a small spread as f16
/// holds it (100 + 0.1 * N(0, 1): 1000 times the spread, a few f16 spacings each
/// side), channel 0 constant, and a NaN in channel 0.
fn data(rng: &mut StdRng, shape: &Shape, class: usize, with_z: bool) -> Data {
    let mean = rng.random_range(-3.0..3.0);
    let mut x = match class {
        1 => normal(rng, shape, 100.0, 0.1),
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
        x: to_f16(&x),
        z: with_z.then(|| to_f16(&normal(rng, shape, 0.5, 3.0))),
        dy: to_f16(&normal(rng, shape, 0.1, 1.0)),
    }
}

/// `g` is `dy` masked by the activation at `y` (the reference's dz, exact in f16).
fn compare_gradients(
    g: &Gradients<f16>,
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
        let e = assert_f16_close(&format!("{what} dz"), dz, rdz, |i| rdz[i].abs());
        worst = worst.max(e);
    }
    let (dx, rdx) = (g.dx.as_ref().expect("dx"), r.dx.as_ref().expect("dx"));
    let batch = source == StatsSource::Batch;
    let gamma = cpu.state.gamma.as_slice();
    let scale = dx_scale(shape, x, gm, gamma, &stats.mean, &stats.invstd, batch);
    worst = worst.max(assert_f16_close(&format!("{what} dx"), dx, rdx, |i| {
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

/// The f16 fused backward of `y` (of the batch statistics `saved`, else of the
/// running ones, with the residual when the case has one): the f32 backward of
/// the widened inputs rounded, and against the reference. Returns the gradients
/// and the largest error.
fn check_backward(
    (fast, fast32, cpu): (&CpuBatchNorm, &CpuBatchNorm, &ReferenceBatchNorm),
    shape: &Shape,
    d: &Data,
    y16: &[f16],
    saved: Option<&SavedStatsHost>,
    what: &str,
) -> (Gradients<f16>, f64) {
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

/// Every f16 entry point on one case, against the reference of the widened
/// inputs and, bit for bit, against the f32 entry points on those inputs
/// rounded to f16 once. Returns the largest error.
fn check_case(
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    d: &Data,
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
        bits(&to_f16(&out32.y)),
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
    worst = worst.max(assert_f16_close(&format!("{what} y"), &out.y, &r.y, |i| {
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
        bits(&to_f16(&ev32.y)),
        "{what}: eval y is the f32 y rounded"
    );
    assert_same(
        &ev.saved,
        &ev32.saved,
        &format!("{what}: eval statistics as in f32"),
    );
    worst = worst.max(assert_f16_close(
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

/// f16 gradients are the f32 ones rounded (dx, dz), the same (dgamma, dbeta).
fn assert_rounded(g: &Gradients<f16>, g32: &Gradients, what: &str) {
    let round = |v: &Option<Vec<f32>>| v.as_deref().map(|v| bits(&to_f16(v)));
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

#[test]
fn f16_matches_reference_every_shape_layout_activation_and_data_class() {
    let mut rng = rng("f16_matches_reference_every_shape_layout_activation_and_data_class");
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
                    let d = data(&mut rng, &shape, class, with_z);
                    let what = format!(
                        "{dims:?} {layout:?} {act:?} residual {with_z} class {class} k {k}"
                    );
                    worst = worst.max(check_case(&mut rng, &shape, &config, &d, &what));
                }
            }
        }
    }
    println!("largest error (f16 outputs: fraction of the allowance): {worst:.3}");
}

#[test]
fn outputs_past_the_f16_range_are_inf() {
    // y = 65300 + 100 * xhat on channel 0 (and its negative on channel 1) passes
    // 65504 and rounds to ±inf as a plain f32 to f16 cast does; dx of dy with a
    // spread of 1000 too; dgamma and dbeta (f32) stay finite.
    let mut rng = rng("f16 outputs_past_the_f16_range_are_inf");
    for layout in LAYOUTS {
        let shape = Shape::new(&[64, 3, 5, 5], layout).unwrap();
        let config = BatchNormConfig::new(3);
        let mut state = random_signed_state(&mut rng, &config, &ACROSS_KINKS);
        state.gamma[..2].copy_from_slice(&[100.0, 100.0]);
        state.beta[..2].copy_from_slice(&[65300.0, -65300.0]);
        let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
        let mut cpu = ReferenceBatchNorm::with_state(config, state).unwrap();
        let x16 = to_f16(&normal(&mut rng, &shape, 1.0, 0.5));
        let dy16 = to_f16(&normal(&mut rng, &shape, 0.0, 1000.0));
        let (x, dy) = (widen(&x16), widen(&dy16));
        let out = fast.forward_train(&shape, &x16).unwrap();
        let r = cpu.forward_train(&shape, &x).unwrap();
        assert_f16_close(&format!("{layout:?} y"), &out.y, &r.y, |i| r.y[i].abs());
        for sign in [1.0, -1.0] {
            assert!(
                out.y.iter().any(|v| v.to_f32() == sign * f32::INFINITY),
                "{layout:?}: no {sign} inf"
            );
        }
        let all = GradMask::default();
        let g = fast
            .backward(&shape, &x16, &dy16, Some(&out.saved), all)
            .unwrap();
        let rg = cpu
            .backward(&shape, &x, &dy, StatsSource::Batch, all)
            .unwrap();
        let dx = g.dx.as_ref().unwrap();
        assert!(
            dx.iter().any(|v| v.is_infinite()),
            "{layout:?}: no dx overflowed"
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
        assert_f16_close(
            &format!("{layout:?} dx"),
            dx,
            rg.dx.as_ref().unwrap(),
            |i| scale[i],
        );
        let (dg, db) = (g.dgamma.unwrap(), g.dbeta.unwrap());
        assert!(
            dg.iter().chain(&db).all(|v| v.is_finite()),
            "{layout:?}: {dg:?} {db:?}"
        );
    }
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
