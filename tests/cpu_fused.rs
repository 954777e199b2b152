//! The fused activation and residual (`y = act(bn(x) [+ z])` and its backward) on
//! the CPU: the fast path against the f64 reference on fresh random inputs, for every
//! activation, with and without a residual, every layout and shape class; the
//! reference's fused backward against finite differences; and exact properties of
//! the math (ranges, masks, the Identity case equal to plain batch norm).

mod common;

use common::*;
use rand::rngs::StdRng;
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    Activation, BatchNormConfig, BatchNormState, Error, GradMask, Gradients, Layout,
    SavedStatsHost, Shape, StatsSource,
};

/// The tolerance of docs/semantics.md for well-conditioned f32 inputs.
const TOL: f64 = 1e-5;

/// (N, C), (N, C, L), NCHW and 5-D shapes with odd sizes, C = 1, N = 1 with
/// spatial > 1, channels-first planes below 16, between 16 and 63 and from 64
/// values (the fast path's traversals), row widths of 16-, 4- and 1-column tiles.
const SHAPES: &[&[usize]] = &[
    &[5, 3],
    &[64, 17],
    &[2, 1],
    &[4, 3, 7],
    &[1, 17, 33],
    &[3, 1, 130],
    &[150, 3, 5],
    &[2, 3, 7, 7],
    &[1, 5, 9, 10],
    &[3, 3, 17, 19],
    &[2, 3, 2, 3, 5],
    &[1, 1, 5, 6, 7],
];

/// The option combinations of the fused cases.
fn configs(c: usize, act: Activation) -> Vec<BatchNormConfig> {
    [
        BatchNormConfig::new(c),
        BatchNormConfig::new(c).affine(false),
        BatchNormConfig::new(c).track_running_stats(false),
        BatchNormConfig::keras(c),
    ]
    .into_iter()
    .map(|config| config.activation(act))
    .collect()
}

/// Gamma of both signs and up to 4 in size, so that the outputs cross 0 and 6
/// (both sides of every activation's kinks); running means in [-2, 2).
const STATE: StateRanges = StateRanges {
    running_mean: -2.0..2.0,
    batches_tracked: false,
    ..ACROSS_KINKS
};

/// A random state drawn from [`STATE`].
fn random_state(rng: &mut StdRng, config: &BatchNormConfig) -> BatchNormState {
    random_signed_state(rng, config, &STATE)
}

/// How often the outputs landed in each region of the activations, over a test.
#[derive(Default, Debug)]
struct Regions {
    below: usize,
    inside: usize,
    above: usize,
}

impl Regions {
    fn count(&mut self, y: &[f64]) {
        for &v in y {
            match v {
                v if v <= 0.0 => self.below += 1,
                v if v >= 6.0 => self.above += 1,
                _ => self.inside += 1,
            }
        }
    }
}

/// One case's description and largest errors.
struct Case {
    ctx: String,
    /// invstd is large by construction (tiny variance): dx is checked against the
    /// size of its terms.
    large_invstd: bool,
    worst: f64,
}

impl Case {
    fn close(&mut self, what: &str, out: &[f32], reference: &[f64]) {
        let e = assert_close(&format!("{what} ({})", self.ctx), out, reference, TOL);
        self.worst = self.worst.max(e);
    }

    fn sums_close(&mut self, what: &str, out: &[f32], reference: &[f64], scale: &[f64]) {
        let name = format!("{what} ({})", self.ctx);
        let e = assert_sums_close(&name, out, reference, scale, TOL);
        self.worst = self.worst.max(e);
    }
}

/// The fast fused backward (every mask on small tensors) against the reference's,
/// both from the same output `y`.
#[allow(clippy::too_many_arguments)]
fn check_backward(
    case: &mut Case,
    fast: &CpuBatchNorm,
    reference: &ReferenceBatchNorm,
    shape: &Shape,
    (x, y, dy): (&[f32], &[f32], &[f32]),
    saved: Option<&SavedStatsHost>,
    residual: bool,
) {
    let source = if saved.is_some() {
        StatsSource::Batch
    } else {
        StatsSource::Running
    };
    let act = fast.config.activation;
    let affine = fast.config.affine;
    let all = GradMask::default();
    let full = fast
        .backward_fused(shape, x, y, dy, saved, all, residual)
        .unwrap();
    let r = reference
        .backward_fused(shape, x, y, dy, source, all, residual)
        .unwrap();
    let g = masked(act, y, dy);

    // dz is the masked dy, exactly, and only with a residual.
    assert_eq!(full.dz.is_some(), residual, "dz presence ({})", case.ctx);
    assert_eq!(
        r.dz.is_some(),
        residual,
        "reference dz presence ({})",
        case.ctx
    );
    if let (Some(dz), Some(rdz)) = (&full.dz, &r.dz) {
        assert_eq!(bits(dz), bits(&g), "dz is the masked dy ({})", case.ctx);
        assert_eq!(
            rdz,
            &widen(&g),
            "reference dz is the masked dy ({})",
            case.ctx
        );
    }

    let masks = if x.len() <= 20_000 {
        all_masks()
    } else {
        vec![]
    };
    for mask in masks {
        let m = fast
            .backward_fused(shape, x, y, dy, saved, mask, residual)
            .unwrap();
        assert_presence(&case.ctx, &m, mask, affine);
        // dz does not depend on the mask; every output keeps its bits whatever
        // else was asked for.
        assert_eq!(m.dz, full.dz, "dz with {mask:?} ({})", case.ctx);
        let same = |a: &Option<Vec<f32>>, b: &Option<Vec<f32>>| {
            a.as_ref()
                .is_none_or(|a| b.as_ref().map(|b| bits(a) == bits(b)) == Some(true))
        };
        assert!(
            same(&m.dx, &full.dx) && same(&m.dgamma, &full.dgamma) && same(&m.dbeta, &full.dbeta),
            "{mask:?} changed a gradient ({})",
            case.ctx
        );
    }

    let stats = reference_stats(reference, shape, x, source);
    let Gradients {
        dx, dgamma, dbeta, ..
    } = full;
    let (dx, rdx) = (dx.unwrap(), r.dx.unwrap());
    let gain = |c: usize| {
        (reference.state.gamma.get(c).map_or(1.0, |&v| f64::from(v)) * stats.invstd[c]).abs()
    };
    if case.large_invstd || (0..shape.c()).any(|c| gain(c) > 8.0) {
        let scale = dx_scale(
            shape,
            x,
            &g,
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
        let gs = dgamma_scale(shape, x, &g, &stats.mean, &stats.invstd);
        case.sums_close("dgamma", &dgamma.unwrap(), &r.dgamma.unwrap(), &gs);
        let bs = dbeta_scale(shape, &g);
        case.sums_close("dbeta", &dbeta.unwrap(), &r.dbeta.unwrap(), &bs);
    } else {
        assert!(dgamma.is_none() && dbeta.is_none());
    }
}

/// Two training steps, eval, and the fused backward of both statistics sources from
/// the fast path's own outputs, fast against reference.
fn run_case(
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    with_z: bool,
    large: bool,
    regions: &mut Regions,
) -> f64 {
    let mut case = Case {
        ctx: format!(
            "{:?} {:?} {:?} residual {with_z} affine {} track {} {:?}{}",
            config.activation,
            shape.dims(),
            shape.layout(),
            config.affine,
            config.track_running_stats,
            config.convention,
            if large { " large mean" } else { "" },
        ),
        large_invstd: large,
        worst: 0.0,
    };
    let state = random_state(rng, config);
    let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
    let mut reference = ReferenceBatchNorm::with_state(config.clone(), state).unwrap();
    let draw = |rng: &mut StdRng| {
        if large {
            large_mean(rng, shape)
        } else {
            well_conditioned(rng, shape)
        }
    };
    let mut last = None;
    for _ in 0..2 {
        let x = draw(rng);
        let z = with_z.then(|| residual(rng, shape));
        let (out, r) = match &z {
            Some(z) => (
                fast.forward_train_add(shape, &x, z).unwrap(),
                reference.forward_train_add(shape, &x, z).unwrap(),
            ),
            None => (
                fast.forward_train(shape, &x).unwrap(),
                reference.forward_train(shape, &x).unwrap(),
            ),
        };
        case.close("y", &out.y, &r.y);
        regions.count(&r.y);
        case.close("mean", &out.saved.mean, &r.mean);
        case.close("invstd", &out.saved.invstd, &r.invstd);
        assert_eq!(
            fast.state.num_batches_tracked,
            reference.state.num_batches_tracked
        );
        let (rm, rv) = (&reference.state.running_mean, &reference.state.running_var);
        case.close("running_mean", &fast.state.running_mean, &widen(rm));
        case.close("running_var", &fast.state.running_var, &widen(rv));
        last = Some((x, z, out));
    }
    // From here on both use the same f32 running statistics.
    reference.state = fast.state.clone();
    let (x, z, train) = last.unwrap();

    let (ev, r) = match &z {
        Some(z) => (
            fast.forward_eval_add(shape, &x, z).unwrap(),
            reference.forward_eval_add(shape, &x, z).unwrap(),
        ),
        None => (
            fast.forward_eval(shape, &x).unwrap(),
            reference.forward_eval(shape, &x).unwrap(),
        ),
    };
    case.close("eval y", &ev.y, &r.y);
    regions.count(&r.y);
    assert_eq!(ev.saved.is_some(), !config.track_running_stats);
    if !config.track_running_stats {
        assert_eq!(
            bits(&ev.y),
            bits(&train.y),
            "eval with batch stats ({})",
            case.ctx
        );
    }

    let dy = normal(rng, shape, 0.0, 1.0);
    let saved = Some(&train.saved);
    let data = (&x[..], &train.y[..], &dy[..]);
    check_backward(&mut case, &fast, &reference, shape, data, saved, with_z);
    if config.track_running_stats {
        let data = (&x[..], &ev.y[..], &dy[..]);
        check_backward(&mut case, &fast, &reference, shape, data, None, with_z);
    }
    case.worst
}

#[test]
fn fast_matches_reference_every_activation_residual_layout_and_shape() {
    let mut rng = rng("fast_matches_reference_every_activation_residual_layout_and_shape");
    let mut regions = Regions::default();
    let mut worst = 0f64;
    for act in Activation::ALL {
        for with_z in [false, true] {
            for dims in SHAPES {
                for layout in LAYOUTS {
                    let shape = Shape::new(dims, layout).unwrap();
                    for config in configs(shape.c(), act) {
                        worst = worst.max(run_case(
                            &mut rng,
                            &shape,
                            &config,
                            with_z,
                            false,
                            &mut regions,
                        ));
                    }
                }
            }
        }
    }
    println!("largest error {worst:.2e} (bound {TOL:e}); output regions {regions:?}");
    // Every side of the kinks was exercised.
    assert!(regions.below > 1000 && regions.inside > 1000 && regions.above > 100);
}

#[test]
fn fast_matches_reference_on_tensors_spanning_several_work_items() {
    let mut rng = rng("fast_matches_reference_on_tensors_spanning_several_work_items");
    let mut regions = Regions::default();
    for (dims, act) in [
        (&[2, 2, 200, 200][..], Activation::Relu),
        (&[70000, 3], Activation::Relu6),
        (&[3000, 2, 13], Activation::Relu),
    ] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let config = BatchNormConfig::new(shape.c()).activation(act);
            for with_z in [false, true] {
                run_case(&mut rng, &shape, &config, with_z, false, &mut regions);
            }
        }
    }
}

#[test]
fn large_mean_tiny_variance_channels() {
    // x = 1e4 + 1e-3 * N(0, 1): y to 1e-5, dgamma/dbeta to the sum rule and dx to
    // 1e-5 of the size of its terms, through every activation.
    let mut rng = rng("large_mean_tiny_variance_channels");
    let mut regions = Regions::default();
    let mut worst = 0f64;
    for act in Activation::ALL {
        for dims in [&[64, 3][..], &[4, 3, 7], &[2, 3, 16, 17], &[1, 2, 5, 6, 7]] {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let config = BatchNormConfig::new(shape.c()).activation(act);
                for with_z in [false, true] {
                    worst = worst.max(run_case(
                        &mut rng,
                        &shape,
                        &config,
                        with_z,
                        true,
                        &mut regions,
                    ));
                }
            }
        }
    }
    println!("large mean: largest error {worst:.2e}; output regions {regions:?}");
}

#[test]
fn outputs_stay_in_the_range_of_the_activation() {
    let mut rng = rng("outputs_stay_in_the_range_of_the_activation");
    for layout in LAYOUTS {
        let shape = Shape::new(&[6, 4, 5, 5], layout).unwrap();
        let x = well_conditioned(&mut rng, &shape);
        let z = residual(&mut rng, &shape);
        let base = BatchNormConfig::new(4);
        let state = random_state(&mut rng, &base);
        let layer = |act| CpuBatchNorm::with_state(base.clone().activation(act), state.clone());
        let mut identity = layer(Activation::Identity).unwrap();
        let plain = identity.forward_train(&shape, &x).unwrap();
        let plain_add = identity.clone().forward_train_add(&shape, &x, &z).unwrap();
        let plain_eval = identity.forward_eval_add(&shape, &x, &z).unwrap();
        assert!(plain.y.iter().any(|&v| v < 0.0) && plain_add.y.iter().any(|&v| v > 6.0));
        // With Identity the residual is added after the normalization, in f32.
        let sum: Vec<f32> = plain.y.iter().zip(&z).map(|(a, b)| a + b).collect();
        assert_eq!(bits(&plain_add.y), bits(&sum));
        assert_eq!(
            plain_add.saved, plain.saved,
            "z does not enter the statistics"
        );

        for act in [Activation::Relu, Activation::Relu6] {
            let mut bn = layer(act).unwrap();
            let out = bn.forward_train(&shape, &x).unwrap();
            let add = bn.clone().forward_train_add(&shape, &x, &z).unwrap();
            let eval = bn.forward_eval_add(&shape, &x, &z).unwrap();
            let top = if act == Activation::Relu {
                f32::INFINITY
            } else {
                6.0
            };
            for y in [&out.y, &add.y, &eval.y] {
                assert!(
                    y.iter().all(|&v| (0.0..=top).contains(&v)),
                    "{act:?}: {y:?}"
                );
            }
            // The activation of the plain output, bit for bit.
            let apply = |y: &[f32]| y.iter().map(|&v| act.apply(v)).collect::<Vec<f32>>();
            assert_eq!(bits(&out.y), bits(&apply(&plain.y)), "{act:?} train");
            assert_eq!(
                bits(&add.y),
                bits(&apply(&plain_add.y)),
                "{act:?} train + z"
            );
            assert_eq!(
                bits(&eval.y),
                bits(&apply(&plain_eval.y)),
                "{act:?} eval + z"
            );
            assert_eq!(
                out.saved, plain.saved,
                "{act:?}: the statistics are those of x"
            );
            assert_eq!(
                bn.state, identity.state,
                "{act:?}: the running statistics too"
            );
        }
    }
}

#[test]
fn fused_backward_is_the_plain_backward_of_the_masked_gradient() {
    let mut rng = rng("fused_backward_is_the_plain_backward_of_the_masked_gradient");
    for layout in LAYOUTS {
        let shape = Shape::new(&[5, 3, 4, 3], layout).unwrap();
        for act in Activation::ALL {
            let config = BatchNormConfig::new(3).activation(act);
            let state = random_state(&mut rng, &config);
            let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
            let reference = ReferenceBatchNorm::with_state(config, state).unwrap();
            let x = well_conditioned(&mut rng, &shape);
            let z = residual(&mut rng, &shape);
            let dy = normal(&mut rng, &shape, 0.0, 1.0);
            let out = fast.forward_train_add(&shape, &x, &z).unwrap();
            let g = masked(act, &out.y, &dy);
            if act != Activation::Identity {
                let zeros = g.iter().filter(|&&v| v == 0.0).count();
                assert!(
                    zeros > 0 && zeros < g.len(),
                    "{act:?}: the mask is not trivial"
                );
            }
            for (saved, source) in [
                (Some(&out.saved), StatsSource::Batch),
                (None, StatsSource::Running),
            ] {
                for residual in [false, true] {
                    let all = GradMask::default();
                    let fused = fast
                        .backward_fused(&shape, &x, &out.y, &dy, saved, all, residual)
                        .unwrap();
                    let plain = fast.backward(&shape, &x, &g, saved, all).unwrap();
                    let what = format!("{layout:?} {act:?} {source:?} residual {residual}");
                    for (a, b) in [
                        (&fused.dx, &plain.dx),
                        (&fused.dgamma, &plain.dgamma),
                        (&fused.dbeta, &plain.dbeta),
                    ] {
                        assert_eq!(
                            bits(a.as_ref().unwrap()),
                            bits(b.as_ref().unwrap()),
                            "{what}"
                        );
                    }
                    assert_eq!(fused.dz.as_deref().map(bits), residual.then(|| bits(&g)));

                    let rf = reference
                        .backward_fused(&shape, &x, &out.y, &dy, source, all, residual)
                        .unwrap();
                    let rp = reference.backward(&shape, &x, &g, source, all).unwrap();
                    assert_eq!(
                        (&rf.dx, &rf.dgamma, &rf.dbeta),
                        (&rp.dx, &rp.dgamma, &rp.dbeta)
                    );
                    assert_eq!(rf.dz, residual.then(|| widen(&g)), "{what}");
                }
            }
            if act == Activation::Identity {
                // Without activation and residual: the plain backward, dy as given.
                for (saved, source) in [
                    (Some(&out.saved), StatsSource::Batch),
                    (None, StatsSource::Running),
                ] {
                    for mask in all_masks() {
                        let f = fast
                            .backward_fused(&shape, &x, &out.y, &dy, saved, mask, false)
                            .unwrap();
                        let p = fast.backward(&shape, &x, &dy, saved, mask).unwrap();
                        assert_eq!(format!("{f:?}"), format!("{p:?}"));
                        let rf = reference
                            .backward_fused(&shape, &x, &out.y, &dy, source, mask, false)
                            .unwrap();
                        let rp = reference.backward(&shape, &x, &dy, source, mask).unwrap();
                        assert_eq!(rf, rp);
                    }
                }
            }
        }
    }
}

#[test]
fn the_mask_follows_the_output_at_the_kinks() {
    // Hand-picked outputs: 0, -0, 6 and beyond stop the gradient; values strictly
    // inside pass it; NaN passes it.
    let shape = Shape::channels_first(&[4, 2]).unwrap();
    let x = [1.0, 2.0, 3.0, 5.0, -1.0, 0.5, 4.0, 7.0];
    let dy = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let y = [0.0, -0.0, 1e-30, 6.0, 5.999_999_5, 7.0, f32::NAN, -2.0];
    let expect = |act: Activation| -> [f32; 8] {
        match act {
            Activation::Identity => dy,
            Activation::Relu => [0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0],
            Activation::Relu6 => [0.0, 0.0, 3.0, 0.0, 5.0, 0.0, 7.0, 0.0],
        }
    };
    for act in Activation::ALL {
        let config = BatchNormConfig::new(2).activation(act);
        let fast = CpuBatchNorm::new(config.clone()).unwrap();
        let reference = ReferenceBatchNorm::new(config).unwrap();
        let f = fast
            .backward_fused(&shape, &x, &y, &dy, None, GradMask::default(), true)
            .unwrap();
        assert_eq!(bits(&f.dz.unwrap()), bits(&expect(act)), "{act:?}");
        let r = reference
            .backward_fused(
                &shape,
                &x,
                &y,
                &dy,
                StatsSource::Running,
                GradMask::default(),
                true,
            )
            .unwrap();
        assert_eq!(r.dz.unwrap(), widen(&expect(act)), "{act:?}");
    }
}

#[test]
fn nan_stays_in_its_channel() {
    let mut rng = rng("nan_stays_in_its_channel");
    for layout in LAYOUTS {
        for dims in [&[6, 3][..], &[2, 3, 80], &[3, 3, 3, 3]] {
            let shape = Shape::new(dims, layout).unwrap();
            for act in Activation::ALL {
                for nan_in_z in [false, true] {
                    let config = BatchNormConfig::new(3).activation(act);
                    let state = random_state(&mut rng, &config);
                    let mut fast = CpuBatchNorm::with_state(config.clone(), state.clone()).unwrap();
                    let mut reference = ReferenceBatchNorm::with_state(config, state).unwrap();
                    let mut x = well_conditioned(&mut rng, &shape);
                    let mut z = residual(&mut rng, &shape);
                    let at = shape.index(1, 1, 0);
                    if nan_in_z {
                        z[at] = f32::NAN;
                    } else {
                        x[at] = f32::NAN;
                    }
                    let what = format!("{dims:?} {layout:?} {act:?} NaN in z {nan_in_z}");
                    let out = fast.forward_train_add(&shape, &x, &z).unwrap();
                    let r = reference.forward_train_add(&shape, &x, &z).unwrap();
                    for (i, &v) in out.y.iter().enumerate() {
                        // A NaN in x spoils its channel's statistics; one in z only
                        // its own output.
                        let spoiled = if nan_in_z {
                            i == at
                        } else {
                            shape.channel_of(i) == 1
                        };
                        assert_eq!(v.is_nan(), spoiled, "{what}: y[{i}] = {v}");
                    }
                    assert_close(&format!("{what} y"), &out.y, &r.y, TOL);
                    assert_eq!(fast.state.running_mean[1].is_nan(), !nan_in_z, "{what}");
                    assert!(fast.state.running_mean[0].is_finite());
                    assert!(fast.state.running_mean[2].is_finite());

                    reference.state = fast.state.clone();
                    let dy = normal(&mut rng, &shape, 0.0, 1.0);
                    let all = GradMask::default();
                    let g = fast
                        .backward_fused(&shape, &x, &out.y, &dy, Some(&out.saved), all, true)
                        .unwrap();
                    let rg = reference
                        .backward_fused(&shape, &x, &out.y, &dy, StatsSource::Batch, all, true)
                        .unwrap();
                    let dx = g.dx.unwrap();
                    for (i, &v) in dx.iter().enumerate() {
                        let spoiled = !nan_in_z && shape.channel_of(i) == 1;
                        assert_eq!(v.is_nan(), spoiled, "{what}: dx[{i}] = {v}");
                    }
                    let (dg, db) = (g.dgamma.unwrap(), g.dbeta.unwrap());
                    assert!(
                        dg[0].is_finite() && dg[2].is_finite(),
                        "{what}: dgamma {dg:?}"
                    );
                    assert!(db.iter().all(|v| v.is_finite()), "{what}: dbeta {db:?}");
                    // dz is dy where the output is NaN (the gradient passes there).
                    let dz = g.dz.unwrap();
                    assert!(dz.iter().all(|v| v.is_finite()));
                    if nan_in_z {
                        assert_eq!(dz[at], dy[at], "{what}");
                    }
                    for c in [0, 2] {
                        let pick = |v: &[f32]| -> Vec<f32> {
                            (0..v.len())
                                .filter(|&i| shape.channel_of(i) == c)
                                .map(|i| v[i])
                                .collect()
                        };
                        let pick64 = |v: &[f64]| -> Vec<f64> {
                            (0..v.len())
                                .filter(|&i| shape.channel_of(i) == c)
                                .map(|i| v[i])
                                .collect()
                        };
                        let rdx = rg.dx.as_ref().unwrap();
                        let e = max_rel_err(&pick(&dx), &pick64(rdx));
                        assert!(e <= TOL, "{what}: dx of channel {c}: error {e:e}");
                    }
                }
            }
        }
    }
}

/// Values on a 2^-12 grid, so that `x +- h` (h a power of two >= 2^-12) is exact in
/// f32 and the finite differences see exactly the perturbation they assume.
fn grid_normal(rng: &mut StdRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((mean + std * std_normal(rng)) * 4096.0).round() as f32 / 4096.0)
        .collect()
}

/// Central difference with one Richardson step (error O(h^4)).
fn derivative(f: &mut dyn FnMut(f32) -> f64) -> f64 {
    let h = 1.0 / 256.0;
    let d = |f: &mut dyn FnMut(f32) -> f64, h: f32| (f(h) - f(-h)) / (2.0 * f64::from(h));
    let (d1, d2) = (d(f, h), d(f, h / 2.0));
    (4.0 * d2 - d1) / 3.0
}

#[test]
fn reference_fused_backward_matches_finite_differences() {
    // loss = sum(w * act(bn(x) + z)); the data are redrawn until no output is near a
    // kink, where the loss is smooth over the perturbations.
    let mut rng = rng("reference_fused_backward_matches_finite_differences");
    let mut worst = 0f64;
    for (dims, layout) in [
        (&[6usize, 2][..], Layout::ChannelsFirst),
        (&[3, 2, 4][..], Layout::ChannelsLast),
        (&[2, 2, 2, 3][..], Layout::ChannelsFirst),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        for act in [Activation::Relu, Activation::Relu6] {
            for source in [StatsSource::Batch, StatsSource::Running] {
                let config = BatchNormConfig::new(2).activation(act);
                let loss = |bn: &ReferenceBatchNorm, x: &[f32], z: &[f32], w: &[f32]| -> f64 {
                    let y = match source {
                        StatsSource::Batch => bn.clone().forward_train_add(&shape, x, z).unwrap().y,
                        StatsSource::Running => bn.forward_eval_add(&shape, x, z).unwrap().y,
                    };
                    y.iter().zip(w).map(|(a, &b)| a * f64::from(b)).sum()
                };
                let (bn, x, z, w, y) = (0..1000)
                    .find_map(|_| {
                        let mut state = BatchNormState::new(&config);
                        state.gamma = grid_normal(&mut rng, 2, 1.5, 0.5);
                        state.beta = grid_normal(&mut rng, 2, 1.0, 1.0);
                        state.running_mean = grid_normal(&mut rng, 2, 0.0, 1.0);
                        state.running_var = vec![1.0, 0.75];
                        let bn = ReferenceBatchNorm::with_state(config.clone(), state).unwrap();
                        let n = shape.numel();
                        let x = grid_normal(&mut rng, n, 0.5, 1.5);
                        let z = grid_normal(&mut rng, n, 1.0, 3.0);
                        let w = grid_normal(&mut rng, n, 0.0, 1.0);
                        let mut pre = bn.clone();
                        pre.config.activation = Activation::Identity;
                        let u = match source {
                            StatsSource::Batch => pre.forward_train_add(&shape, &x, &z).unwrap().y,
                            StatsSource::Running => pre.forward_eval_add(&shape, &x, &z).unwrap().y,
                        };
                        let smooth = u.iter().all(|&v| v.abs() > 0.1 && (v - 6.0).abs() > 0.1);
                        let y = match source {
                            StatsSource::Batch => bn.clone().forward_train_add(&shape, &x, &z),
                            StatsSource::Running => bn.forward_eval_add(&shape, &x, &z),
                        };
                        let y: Vec<f32> = y.unwrap().y.iter().map(|&v| v as f32).collect();
                        smooth.then_some((bn, x, z, w, y))
                    })
                    .expect("a draw with every output away from the kinks");
                let g = bn
                    .backward_fused(&shape, &x, &y, &w, source, GradMask::default(), true)
                    .unwrap();
                let what = format!("{dims:?} {layout:?} {act:?} {source:?}");
                let mut check = |name: &str, i: usize, analytic: f64, numeric: f64| {
                    let e = (analytic - numeric).abs() / (1.0 + numeric.abs());
                    assert!(
                        e < 1e-6,
                        "{what} {name}[{i}]: analytic {analytic}, numeric {numeric}"
                    );
                    worst = worst.max(e);
                };
                let (dx, dz) = (g.dx.unwrap(), g.dz.unwrap());
                for i in 0..x.len() {
                    let num = derivative(&mut |h| {
                        let mut xp = x.clone();
                        xp[i] += h;
                        loss(&bn, &xp, &z, &w)
                    });
                    check("dx", i, dx[i], num);
                    let num = derivative(&mut |h| {
                        let mut zp = z.clone();
                        zp[i] += h;
                        loss(&bn, &x, &zp, &w)
                    });
                    check("dz", i, dz[i], num);
                }
                let (dgamma, dbeta) = (g.dgamma.unwrap(), g.dbeta.unwrap());
                for ch in 0..2 {
                    let num = derivative(&mut |h| {
                        let mut b = bn.clone();
                        b.state.gamma[ch] += h;
                        loss(&b, &x, &z, &w)
                    });
                    check("dgamma", ch, dgamma[ch], num);
                    let num = derivative(&mut |h| {
                        let mut b = bn.clone();
                        b.state.beta[ch] += h;
                        loss(&b, &x, &z, &w)
                    });
                    check("dbeta", ch, dbeta[ch], num);
                }
            }
        }
    }
    println!("finite differences: worst relative difference {worst:.2e} (bound 1e-6)");
}

#[test]
fn residual_and_output_lengths_are_checked_and_change_nothing() {
    let shape = Shape::channels_last(&[4, 3, 5]).unwrap();
    let mut rng = rng("residual_and_output_lengths_are_checked_and_change_nothing");
    let x = well_conditioned(&mut rng, &shape);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    let config = BatchNormConfig::new(3).activation(Activation::Relu);
    let mut fast = CpuBatchNorm::new(config.clone()).unwrap();
    let mut reference = ReferenceBatchNorm::new(config).unwrap();
    let (fast_before, reference_before) = (fast.clone(), reference.clone());
    let short = &x[1..];
    let long: Vec<f32> = x.iter().chain(&[1.0]).copied().collect();
    for z in [short, &long[..]] {
        let is_z = |e: Error| matches!(e, Error::LengthMismatch { name: "z", .. });
        assert!(is_z(fast.forward_train_add(&shape, &x, z).unwrap_err()));
        assert!(is_z(fast.forward_eval_add(&shape, &x, z).unwrap_err()));
        assert!(is_z(
            reference.forward_train_add(&shape, &x, z).unwrap_err()
        ));
        assert!(is_z(reference.forward_eval_add(&shape, &x, z).unwrap_err()));
    }
    // x is checked before z.
    let is_x = |e: Error| matches!(e, Error::LengthMismatch { name: "x", .. });
    assert!(is_x(fast.forward_train_add(&shape, short, &x).unwrap_err()));
    assert!(is_x(
        reference.forward_train_add(&shape, short, &x).unwrap_err()
    ));
    let mut y_long = vec![0.0; x.len() + 1];
    let is_y = |e: Error| matches!(e, Error::LengthMismatch { name: "y", .. });
    assert!(is_y(
        fast.forward_train_add_into(&shape, &x, &x, &mut y_long)
            .unwrap_err()
    ));
    assert!(is_y(
        fast.forward_eval_add_into(&shape, &x, &x, &mut y_long)
            .unwrap_err()
    ));
    assert_eq!(fast, fast_before, "a failed call changed the fast layer");
    // The `_into` variants overwrite the caller's slice with what the others return.
    let z = normal(&mut rng, &shape, 0.0, 3.0);
    let mut y_into = vec![f32::NAN; x.len()];
    let saved = fast
        .clone()
        .forward_train_add_into(&shape, &x, &z, &mut y_into)
        .unwrap();
    let out = fast.clone().forward_train_add(&shape, &x, &z).unwrap();
    assert_eq!((bits(&y_into), &saved), (bits(&out.y), &out.saved));
    let saved = fast
        .clone()
        .forward_eval_add_into(&shape, &x, &z, &mut y_into)
        .unwrap();
    let out = fast.clone().forward_eval_add(&shape, &x, &z).unwrap();
    assert_eq!((bits(&y_into), saved), (bits(&out.y), out.saved));
    assert_eq!(
        reference, reference_before,
        "a failed call changed the reference"
    );

    let y = fast.forward_train(&shape, &x).unwrap();
    let all = GradMask::default();
    let (saved, src) = (Some(&y.saved), StatsSource::Batch);
    for (name, yy, gg) in [("y", short, &dy[..]), ("dy", &y.y[..], short)] {
        let is = |e: Error| matches!(e, Error::LengthMismatch { name: n, .. } if n == name);
        assert!(is(fast
            .backward_fused(&shape, &x, yy, gg, saved, all, true)
            .unwrap_err()));
        assert!(is(reference
            .backward_fused(&shape, &x, yy, gg, src, all, true)
            .unwrap_err()));
    }
    let untracked = BatchNormConfig::new(3).track_running_stats(false);
    let plain = CpuBatchNorm::new(untracked.clone()).unwrap();
    let plain_ref = ReferenceBatchNorm::new(untracked).unwrap();
    let running = StatsSource::Running;
    assert!(matches!(
        plain.backward_fused(&shape, &x, &y.y, &dy, None, all, true),
        Err(Error::MissingSavedStats(_))
    ));
    assert!(matches!(
        plain_ref.backward_fused(&shape, &x, &y.y, &dy, running, all, true),
        Err(Error::MissingSavedStats(_))
    ));
    let one = Shape::channels_last(&[1, 3]).unwrap();
    let v = [1.0, 2.0, 3.0];
    assert!(matches!(
        fast.forward_train_add(&one, &v, &v),
        Err(Error::SingleValuePerChannel { .. })
    ));
    // N = 1 with one value per channel is fine in eval with running statistics.
    reference.state = fast.state.clone();
    let eval = fast.forward_eval_add(&one, &v, &v).unwrap();
    let r = reference.forward_eval_add(&one, &v, &v).unwrap();
    assert_close("N = 1 eval + z", &eval.y, &r.y, TOL);
}

#[test]
fn fused_results_are_deterministic_whatever_the_thread_count() {
    let mut rng = rng("fused_results_are_deterministic_whatever_the_thread_count");
    let pools: Vec<rayon::ThreadPool> = [1, 3]
        .into_iter()
        .map(|n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        })
        .collect();
    for dims in [&[2, 4, 130, 130][..], &[8000, 17]] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let x = well_conditioned(&mut rng, &shape);
            let z = residual(&mut rng, &shape);
            let dy = normal(&mut rng, &shape, 0.0, 1.0);
            let run = || {
                let config = BatchNormConfig::new(shape.c()).activation(Activation::Relu6);
                let mut bn = CpuBatchNorm::new(config).unwrap();
                let out = bn.forward_train_add(&shape, &x, &z).unwrap();
                let g = bn
                    .backward_fused(
                        &shape,
                        &x,
                        &out.y,
                        &dy,
                        Some(&out.saved),
                        GradMask::default(),
                        true,
                    )
                    .unwrap();
                format!("{:?}", (out, g, bn.state))
            };
            let a = run();
            assert_eq!(a, run(), "two runs differ ({dims:?} {layout:?})");
            for pool in &pools {
                assert_eq!(
                    a,
                    pool.install(run),
                    "a thread count differs ({dims:?} {layout:?})"
                );
            }
        }
    }
}
