//! The fast CPU path against the f64 reference, on fresh random inputs, for every
//! layout, shape class and option combination; plus ill-conditioned data,
//! determinism and input checks.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::cpu::reference::{ReferenceBatchNorm, ReferenceForward};
use wgpu_batchnorm::{
    BatchNormConfig, BatchNormState, Convention, Error, GradMask, Gradients, Layout,
    SavedStatsHost, Shape, StatsSource,
};

/// The tolerance of docs/semantics.md for well-conditioned f32 inputs.
const TOL: f64 = 1e-5;

/// One of each shape class, with the sizes that reach every branch of the fast
/// path: C = 1, 3, 17; N = 1 with spatial > 1; odd sizes; channels-first planes of
/// fewer than 16 values (rows everywhere), 16 to 63 (rows for the sums, planes for
/// the elementwise passes) and 64 or more (planes everywhere); planes with a
/// partial 256-block; row widths with 16-, 4- and 1-column tiles; more than 128
/// rows (several row blocks).
const SHAPES: &[&[usize]] = &[
    &[5, 3],
    &[64, 17],
    &[300, 3],
    &[2, 1],
    &[4, 3, 7],
    &[1, 17, 33],
    &[3, 1, 130],
    &[150, 3, 5],
    &[2, 3, 7, 7],
    &[1, 17, 9, 10],
    &[3, 3, 17, 19],
    &[2, 3, 2, 3, 5],
    &[2, 17, 3, 5, 7],
    &[1, 1, 5, 6, 7],
];

/// Every option combination: affine x track_running_stats x {momentum 0.1,
/// cumulative average, Keras}.
fn configs(c: usize) -> Vec<BatchNormConfig> {
    let mut out = Vec::new();
    for affine in [true, false] {
        for track in [true, false] {
            for base in [
                BatchNormConfig::new(c),
                BatchNormConfig::new(c).momentum(None),
                BatchNormConfig::keras(c),
            ] {
                out.push(base.affine(affine).track_running_stats(track));
            }
        }
    }
    out
}

/// A short description of the options, for messages.
fn describe(c: &BatchNormConfig) -> String {
    let momentum = match (c.convention, c.momentum) {
        (Convention::Keras, m) => format!("keras {m:?}"),
        (_, Some(m)) => format!("momentum {m}"),
        (_, None) => "cumulative".into(),
    };
    format!(
        "{}affine {}track {momentum} eps {}",
        if c.affine { "" } else { "!" },
        if c.track_running_stats { "" } else { "!" },
        c.eps
    )
}

/// A random state: gamma of both signs, any beta, running stats away from 0/1.
fn random_state(rng: &mut StdRng, config: &BatchNormConfig) -> BatchNormState {
    let ranges = StateRanges {
        gamma: 0.5..2.0,
        beta: -1.0..1.0,
        running_mean: -2.0..2.0,
        batches_tracked: false,
    };
    random_signed_state(rng, config, &ranges)
}

/// The data classes of docs/semantics.md.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Data {
    /// Per-channel means in [-5, 5), standard deviations in [0.5, 3).
    WellConditioned,
    /// `1e4 + 1e-3 * N(0, 1)`.
    LargeMean,
    /// `sign * 10^U(-3, 3)`.
    WideMagnitudes,
}

impl Data {
    fn draw(self, rng: &mut StdRng, shape: &Shape) -> Vec<f32> {
        match self {
            Data::WellConditioned => well_conditioned(rng, shape),
            Data::LargeMean => large_mean(rng, shape),
            Data::WideMagnitudes => wide_magnitudes(rng, shape),
        }
    }
}

/// Worst errors seen per quantity, with the case that produced each.
#[derive(Default)]
struct Worst(std::collections::BTreeMap<&'static str, (f64, String)>);

impl Worst {
    fn record(&mut self, what: &'static str, err: f64, ctx: &str) {
        let e = self.0.entry(what).or_insert((0.0, String::new()));
        if err > e.0 {
            *e = (err, ctx.to_string());
        }
    }

    fn print(&self, title: &str) {
        println!("{title}: max errors");
        for (what, (e, ctx)) in &self.0 {
            println!("  {what:<14} {e:.2e}  ({ctx})");
        }
    }
}

/// One case: the error bookkeeping and its description.
struct Case<'a> {
    w: &'a mut Worst,
    ctx: String,
    /// invstd is large by construction (tiny or zero variance): dx is checked
    /// against the size of its terms.
    large_invstd: bool,
}

impl Case<'_> {
    fn close(&mut self, what: &'static str, out: &[f32], reference: &[f64]) {
        let e = assert_close(&format!("{what} ({})", self.ctx), out, reference, TOL);
        self.w.record(what, e, &self.ctx);
    }

    fn sums_close(&mut self, what: &'static str, out: &[f32], reference: &[f64], scale: &[f64]) {
        let e = assert_sums_close(
            &format!("{what} ({})", self.ctx),
            out,
            reference,
            scale,
            TOL,
        );
        self.w.record(what, e, &self.ctx);
    }

    fn saved(&mut self, saved: &SavedStatsHost, r: &ReferenceForward) {
        // hi + lo is the mean to better than f32 precision: its error in units of
        // the spread (what it does to xhat) is small even on large-mean data, where
        // hi alone is off by up to half an ulp of the mean (half the spread).
        let xhat_err = saved
            .mean
            .iter()
            .zip(&saved.mean_lo)
            .zip(r.mean.iter().zip(&r.invstd))
            .map(|((&h, &l), (&m, &inv))| {
                let e = (f64::from(h) + f64::from(l) - m).abs() * inv;
                if m.is_nan() {
                    0.0
                } else {
                    e
                }
            })
            .fold(0.0, f64::max);
        assert!(
            xhat_err <= TOL,
            "mean hi + lo ({}): error {xhat_err:e} x std",
            self.ctx
        );
        self.w.record("mean (x std)", xhat_err, &self.ctx);
        self.close("mean", &saved.mean, &r.mean);
        self.close("invstd", &saved.invstd, &r.invstd);
    }
}

/// Compares the fast backward (every mask) with the reference.
fn check_backward(
    case: &mut Case,
    fast: &CpuBatchNorm,
    reference: &ReferenceBatchNorm,
    shape: &Shape,
    (x, dy): (&[f32], &[f32]),
    saved: Option<&SavedStatsHost>,
) {
    let source = if saved.is_some() {
        StatsSource::Batch
    } else {
        StatsSource::Running
    };
    let r = reference
        .backward(shape, x, dy, source, GradMask::default())
        .unwrap();
    let affine = fast.config.affine;
    let full = fast
        .backward(shape, x, dy, saved, GradMask::default())
        .unwrap();
    // Every mask on small tensors (the large ones only cost time here).
    let masks = if x.len() <= 20_000 {
        all_masks()
    } else {
        vec![]
    };
    for mask in masks {
        let g = fast.backward(shape, x, dy, saved, mask).unwrap();
        assert_presence(&case.ctx, &g, mask, affine);
        // Identical bits whatever else was asked for.
        let same = |a: &Option<Vec<f32>>, b: &Option<Vec<f32>>| {
            a.as_ref().is_none_or(|a| Some(a) == b.as_ref())
        };
        assert!(
            same(&g.dx, &full.dx) && same(&g.dgamma, &full.dgamma) && same(&g.dbeta, &full.dbeta)
        );
    }

    // The statistics the backward used, for the scales of sums.
    let stats = reference_stats(reference, shape, x, source);
    let Gradients {
        dx, dgamma, dbeta, ..
    } = full;
    let (dx, rdx) = (dx.unwrap(), r.dx.unwrap());
    // With a large gamma * invstd (data with a tiny spread, or a tiny batch whose
    // values happen to be close), dx is a small difference of terms of size
    // |gamma * invstd * dy|: rounding one input (6e-8) already moves it by more
    // than 1e-5 once that factor passes ~100. There it is bounded relative to the
    // size of its terms; elsewhere by the plain rule.
    let gain = |c: usize| {
        (reference.state.gamma.get(c).map_or(1.0, |&g| f64::from(g)) * stats.invstd[c]).abs()
    };
    if case.large_invstd || (0..shape.c()).any(|c| gain(c) > 8.0) {
        let scale = dx_scale(
            shape,
            x,
            dy,
            &reference.state.gamma,
            &stats.mean,
            &stats.invstd,
            source == StatsSource::Batch,
        );
        case.sums_close("dx (x terms)", &dx, &rdx, &scale);
    } else {
        case.close("dx", &dx, &rdx);
    }
    if affine {
        let gs = dgamma_scale(shape, x, dy, &stats.mean, &stats.invstd);
        case.sums_close("dgamma", &dgamma.unwrap(), &r.dgamma.unwrap(), &gs);
        case.sums_close(
            "dbeta",
            &dbeta.unwrap(),
            &r.dbeta.unwrap(),
            &dbeta_scale(shape, dy),
        );
    }
}

/// Three training steps (fresh data each), eval, and backward in both sources,
/// fast against reference.
fn run_case(w: &mut Worst, rng: &mut StdRng, shape: &Shape, config: &BatchNormConfig, data: Data) {
    let mut case = Case {
        w,
        ctx: format!(
            "{data:?} {:?} {:?} {}",
            shape.dims(),
            shape.layout(),
            describe(config)
        ),
        large_invstd: data == Data::LargeMean,
    };
    let state = random_state(rng, config);
    let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
    let mut reference = ReferenceBatchNorm::with_state(config.clone(), state).unwrap();
    let mut last = None;
    for _ in 0..3 {
        let x = data.draw(rng, shape);
        let out = fast.forward_train(shape, &x).unwrap();
        let r = reference.forward_train(shape, &x).unwrap();
        case.close("y", &out.y, &r.y);
        let saved = out.saved;
        case.saved(&saved, &r);
        assert_eq!(
            fast.state.num_batches_tracked,
            reference.state.num_batches_tracked
        );
        let (rm, rv) = (&reference.state.running_mean, &reference.state.running_var);
        case.close("running_mean", &fast.state.running_mean, &widen(rm));
        case.close("running_var", &fast.state.running_var, &widen(rv));
        last = Some((x, saved));
    }
    // From here on both use the same f32 running statistics.
    reference.state = fast.state.clone();
    let (x, saved) = last.unwrap();

    let ev = fast.forward_eval(shape, &x).unwrap();
    let r = reference.forward_eval(shape, &x).unwrap();
    case.close("eval y", &ev.y, &r.y);
    assert_eq!(ev.saved.is_some(), !config.track_running_stats);
    if let Some(s) = &ev.saved {
        assert_eq!(s, &saved, "eval with batch stats saves what training saves");
    }

    let dy = normal(rng, shape, 0.0, 1.0);
    check_backward(&mut case, &fast, &reference, shape, (&x, &dy), Some(&saved));
    if config.track_running_stats {
        check_backward(&mut case, &fast, &reference, shape, (&x, &dy), None);
    }
}

#[test]
fn matches_reference_every_shape_layout_and_option() {
    let mut rng = rng("matches_reference_every_shape_layout_and_option");
    let mut w = Worst::default();
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            for config in configs(shape.c()) {
                run_case(&mut w, &mut rng, &shape, &config, Data::WellConditioned);
            }
        }
    }
    w.print("well-conditioned, every shape, layout and option (bound 1e-5)");
}

#[test]
fn matches_reference_on_tensors_spanning_several_work_items() {
    // More than 65536 values per channel (several work items per channel), and
    // 2-D / small-plane tensors with many rows.
    let mut rng = rng("matches_reference_on_tensors_spanning_several_work_items");
    let mut w = Worst::default();
    for dims in [&[2, 2, 200, 200][..], &[70000, 3], &[3000, 2, 13]] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let config = BatchNormConfig::new(shape.c());
            run_case(&mut w, &mut rng, &shape, &config, Data::WellConditioned);
        }
    }
    w.print("large tensors (bound 1e-5)");
}

#[test]
fn large_mean_stays_exact() {
    // x = 1e4 + 1e-3 * N(0, 1). Plain f32 batch norm (PyTorch) is off by up to 35%
    // here. Bounds reached: 1e-5 on y, mean (hi, and hi + lo in units of the
    // spread), invstd, running stats, dgamma/dbeta (sum rule); dx 1e-5 of the size
    // of its terms (see `check_backward`).
    let mut rng = rng("large_mean_stays_exact");
    let mut w = Worst::default();
    for dims in [
        &[64, 3][..],
        &[4, 3, 7],
        &[2, 3, 7, 7],
        &[2, 3, 16, 17],
        &[2, 2, 3, 4, 7],
        &[2, 1, 200, 200],
    ] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            for config in [
                BatchNormConfig::new(shape.c()),
                BatchNormConfig::keras(shape.c()),
            ] {
                run_case(&mut w, &mut rng, &shape, &config, Data::LargeMean);
            }
        }
    }
    w.print("large mean 1e4 + 1e-3 N(0,1)");
}

#[test]
fn wide_magnitudes_meet_tolerance() {
    // sign * 10^U(-3, 3): six decades in one channel. Bound reached: 1e-5.
    let mut rng = rng("wide_magnitudes_meet_tolerance");
    let mut w = Worst::default();
    for dims in [
        &[64, 3][..],
        &[4, 3, 7],
        &[2, 3, 9, 9],
        &[2, 2, 3, 4, 7],
        &[2, 3, 150, 150],
    ] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            for config in [
                BatchNormConfig::new(shape.c()),
                BatchNormConfig::new(shape.c()).momentum(None),
            ] {
                run_case(&mut w, &mut rng, &shape, &config, Data::WideMagnitudes);
            }
        }
    }
    w.print("wide magnitudes (bound 1e-5)");
}

#[test]
fn constant_channels_give_beta_exactly() {
    let mut rng = rng("constant_channels_give_beta_exactly");
    let mut w = Worst::default();
    for dims in [
        &[6, 3][..],
        &[3, 3, 70],
        &[2, 3, 9, 9],
        &[2, 3, 2, 3, 4],
        &[300, 3],
    ] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let values: Vec<f32> = (0..3).map(|_| rng.random_range(-1e4f32..1e4)).collect();
            for eps in [1e-5f32, 0.0] {
                let config = BatchNormConfig::new(3).eps(eps);
                let x = constant_channels(&shape, &values);
                let state = random_state(&mut rng, &config);
                let mut fast = CpuBatchNorm::with_state(config.clone(), state).unwrap();
                let out = fast.forward_train(&shape, &x).unwrap();
                let saved = out.saved;
                // Exactly: mean = the value, var = 0, invstd = 1/sqrt(eps) (0 when
                // eps = 0, never inf), y = beta.
                assert_eq!(saved.mean, values);
                assert_eq!(saved.mean_lo, vec![0.0; 3]);
                let inv = if eps == 0.0 {
                    0.0
                } else {
                    (1.0 / f64::from(eps).sqrt()) as f32
                };
                assert_eq!(saved.invstd, vec![inv; 3]);
                for (i, &y) in out.y.iter().enumerate() {
                    assert_eq!(y, fast.state.beta[shape.channel_of(i)]);
                }
                let reference =
                    ReferenceBatchNorm::with_state(config.clone(), fast.state.clone()).unwrap();
                let dy = normal(&mut rng, &shape, 0.0, 1.0);
                let mut case = Case {
                    w: &mut w,
                    ctx: format!("constant {dims:?} {layout:?} eps {eps}"),
                    large_invstd: true,
                };
                check_backward(
                    &mut case,
                    &fast,
                    &reference,
                    &shape,
                    (&x, &dy),
                    Some(&saved),
                );
                check_backward(&mut case, &fast, &reference, &shape, (&x, &dy), None);
            }
        }
    }
    w.print("constant channels (forward exact; backward bound 1e-5)");
}

/// Everything a layer computes for one input, for bitwise comparison.
fn everything(
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
) -> (
    Vec<f32>,
    SavedStatsHost,
    Gradients,
    Gradients,
    BatchNormState,
) {
    let mut bn = CpuBatchNorm::new(BatchNormConfig::new(shape.c())).unwrap();
    let out = bn.forward_train(shape, x).unwrap();
    let saved = out.saved;
    let g = bn
        .backward(shape, x, dy, Some(&saved), GradMask::default())
        .unwrap();
    let ge = bn
        .backward(shape, x, dy, None, GradMask::default())
        .unwrap();
    (out.y, saved, g, ge, bn.state)
}

#[test]
fn results_are_deterministic_whatever_the_thread_count() {
    let mut rng = rng("results_are_deterministic_whatever_the_thread_count");
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let three_threads = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for dims in [&[2, 4, 130, 130][..], &[8000, 17], &[8, 5, 30, 40]] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let x = well_conditioned(&mut rng, &shape);
            let dy = normal(&mut rng, &shape, 0.0, 1.0);
            let a = everything(&shape, &x, &dy);
            let b = everything(&shape, &x, &dy);
            let c = one_thread.install(|| everything(&shape, &x, &dy));
            let d = three_threads.install(|| everything(&shape, &x, &dy));
            // PartialEq on f32 would accept -0 == 0: compare the exact decimal forms.
            let bits = |r: &(
                Vec<f32>,
                SavedStatsHost,
                Gradients,
                Gradients,
                BatchNormState,
            )| { format!("{r:?}") };
            assert_eq!(bits(&a), bits(&b), "two runs differ ({dims:?} {layout:?})");
            assert_eq!(bits(&a), bits(&c), "1 thread differs ({dims:?} {layout:?})");
            assert_eq!(bits(&a), bits(&d), "3 threads differ ({dims:?} {layout:?})");
        }
    }
}

#[test]
fn into_variants_check_lengths_and_overwrite() {
    let shape = Shape::channels_last(&[4, 3, 5]).unwrap();
    let mut rng = rng("into_variants_check_lengths_and_overwrite");
    let x = well_conditioned(&mut rng, &shape);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    let mut bn = CpuBatchNorm::new(BatchNormConfig::new(3)).unwrap();
    let mut y = vec![0.0; shape.numel() + 1];
    assert!(matches!(
        bn.forward_train_into(&shape, &x, &mut y),
        Err(Error::LengthMismatch { name: "y", .. })
    ));
    assert!(matches!(
        bn.forward_eval_into(&shape, &x, &mut y),
        Err(Error::LengthMismatch { name: "y", .. })
    ));
    assert_eq!(bn.state.num_batches_tracked, 0);
    let mut y = vec![f32::NAN; shape.numel()];
    let saved = bn.forward_train_into(&shape, &x, &mut y).unwrap();
    assert_eq!(y, bn.clone().forward_train(&shape, &x).unwrap().y);

    let expect = bn
        .backward(&shape, &x, &dy, Some(&saved), GradMask::default())
        .unwrap();
    let (mut dx, mut dg, mut db) = (vec![7.0; shape.numel()], vec![7.0; 3], vec![7.0; 3]);
    bn.backward_into(
        &shape,
        &x,
        &dy,
        Some(&saved),
        Some(&mut dx),
        Some(&mut dg),
        Some(&mut db),
    )
    .unwrap();
    assert_eq!(
        (Some(dx.clone()), Some(dg.clone()), Some(db.clone())),
        (expect.dx, expect.dgamma, expect.dbeta)
    );

    let mut short = vec![0.0; 2];
    assert!(matches!(
        bn.backward_into(&shape, &x, &dy, Some(&saved), None, Some(&mut short), None),
        Err(Error::LengthMismatch { name: "dgamma", .. })
    ));
    assert!(matches!(
        bn.backward_into(&shape, &x, &dy, Some(&saved), None, None, Some(&mut short)),
        Err(Error::LengthMismatch { name: "dbeta", .. })
    ));
    assert!(matches!(
        bn.backward_into(&shape, &x, &dy, Some(&saved), Some(&mut short), None, None),
        Err(Error::LengthMismatch { name: "dx", .. })
    ));
    assert!(matches!(
        bn.backward(&shape, &x, &dy[1..], Some(&saved), GradMask::default()),
        Err(Error::LengthMismatch { name: "dy", .. })
    ));
    let mut bad = saved.clone();
    bad.mean_lo.pop();
    assert!(matches!(
        bn.backward(&shape, &x, &dy, Some(&bad), GradMask::default()),
        Err(Error::LengthMismatch {
            name: "saved.mean_lo",
            ..
        })
    ));
    let plain = CpuBatchNorm::new(BatchNormConfig::new(3).affine(false)).unwrap();
    assert!(matches!(
        plain.backward_into(&shape, &x, &dy, Some(&saved), None, Some(&mut dg), None),
        Err(Error::MissingState(_))
    ));
}

#[test]
fn errors_match_the_reference_and_change_nothing() {
    let mut bn = CpuBatchNorm::new(BatchNormConfig::new(3)).unwrap();
    let before = bn.clone();
    let s = Shape::channels_first(&[2, 4, 5]).unwrap();
    let x = vec![0.0; s.numel()];
    assert!(matches!(
        bn.forward_train(&s, &x),
        Err(Error::ChannelMismatch {
            expected: 3,
            got: 4
        })
    ));
    assert!(matches!(
        bn.forward_eval(&s, &x),
        Err(Error::ChannelMismatch { .. })
    ));
    let s = Shape::channels_last(&[2, 3, 5]).unwrap();
    assert!(matches!(
        bn.forward_train(&s, &x[1..]),
        Err(Error::LengthMismatch { name: "x", .. })
    ));
    let one = Shape::channels_last(&[1, 3]).unwrap();
    let x1 = [1.0, 2.0, 3.0];
    assert!(matches!(
        bn.forward_train(&one, &x1),
        Err(Error::SingleValuePerChannel { .. })
    ));
    let fake = SavedStatsHost {
        mean: vec![0.0; 3],
        invstd: vec![1.0; 3],
        mean_lo: vec![0.0; 3],
    };
    assert!(matches!(
        bn.backward(&one, &x1, &x1, Some(&fake), GradMask::default()),
        Err(Error::SingleValuePerChannel { .. })
    ));
    // With running statistics a single value per channel is fine.
    assert!(bn.forward_eval(&one, &x1).unwrap().saved.is_none());
    bn.backward(&one, &x1, &x1, None, GradMask::default())
        .unwrap();
    assert_eq!(bn, before, "a failed call changed the layer");

    let mut untracked =
        CpuBatchNorm::new(BatchNormConfig::new(3).track_running_stats(false)).unwrap();
    assert!(matches!(
        untracked.forward_eval(&one, &x1),
        Err(Error::SingleValuePerChannel { .. })
    ));
    let x = vec![0.5; s.numel()];
    assert!(matches!(
        untracked.backward(&s, &x, &x, None, GradMask::default()),
        Err(Error::MissingSavedStats(_))
    ));
    assert!(matches!(
        CpuBatchNorm::new(BatchNormConfig::new(0)),
        Err(Error::ZeroFeatures)
    ));
    let config = BatchNormConfig::new(2);
    let mut state = BatchNormState::new(&config);
    state.gamma.push(1.0);
    assert!(matches!(
        CpuBatchNorm::with_state(config, state),
        Err(Error::LengthMismatch { name: "gamma", .. })
    ));
}

#[test]
fn nan_propagates_like_the_reference() {
    let mut rng = rng("nan_propagates_like_the_reference");
    for layout in LAYOUTS {
        for dims in [&[6, 2][..], &[2, 2, 80]] {
            let shape = Shape::new(dims, layout).unwrap();
            let mut x = well_conditioned(&mut rng, &shape);
            x[shape.index(1, 0, 0)] = f32::NAN;
            let config = BatchNormConfig::new(2);
            let mut fast = CpuBatchNorm::new(config.clone()).unwrap();
            let mut reference = ReferenceBatchNorm::new(config).unwrap();
            let out = fast.forward_train(&shape, &x).unwrap();
            let r = reference.forward_train(&shape, &x).unwrap();
            assert!(r
                .y
                .iter()
                .enumerate()
                .all(|(i, v)| v.is_nan() == (shape.channel_of(i) == 0)));
            assert_close("y with NaN", &out.y, &r.y, TOL);
            assert!(fast.state.running_mean[0].is_nan() && fast.state.running_mean[1].is_finite());
        }
    }
}

#[test]
fn layouts_give_the_same_statistics() {
    let mut rng = rng("layouts_give_the_same_statistics");
    for dims in [&[5, 3][..], &[3, 4, 70], &[2, 3, 4, 5], &[2, 2, 3, 2, 4]] {
        let cf = Shape::new(dims, Layout::ChannelsFirst).unwrap();
        let cl = Shape::new(dims, Layout::ChannelsLast).unwrap();
        let x = well_conditioned(&mut rng, &cf);
        let mut a = CpuBatchNorm::new(BatchNormConfig::new(cf.c())).unwrap();
        let mut b = a.clone();
        let ya = a.forward_train(&cf, &x).unwrap();
        let yb = b.forward_train(&cl, &permute(&x, &cf, &cl)).unwrap();
        let (sa, sb) = (ya.saved, yb.saved);
        let r = ReferenceBatchNorm::new(BatchNormConfig::new(cf.c()))
            .unwrap()
            .forward_train(&cf, &x)
            .unwrap();
        assert_close("mean", &sb.mean, &widen(&sa.mean), TOL);
        assert_close("invstd", &sb.invstd, &widen(&sa.invstd), TOL);
        assert_close("y", &permute(&yb.y, &cl, &cf), &r.y, TOL);
    }
}
