//! The f64 reference against hand-computed values, against finite differences of its
//! own forward, and against itself across layouts; plus its input checks.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::{channel_values, ReferenceBatchNorm};
use wgpu_batchnorm::{
    BatchNormConfig, BatchNormState, Error, GradMask, Layout, Shape, StatsSource,
};

fn close(name: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{name}: got {got}, expected {want}"
    );
}

// x = [1, 2, 3, 6]: mean 3, biased var 14/4 = 3.5, unbiased var 14/3.
const X: [f32; 4] = [1.0, 2.0, 3.0, 6.0];

#[test]
fn hand_computed_forward_and_running_stats_pytorch() {
    let shape = Shape::channels_first(&[4, 1]).unwrap();
    let mut bn = ReferenceBatchNorm::new(BatchNormConfig::new(1)).unwrap();
    let out = bn.forward_train(&shape, &X).unwrap();
    let inv = 1.0 / (3.5f64 + f64::from(1e-5f32)).sqrt();
    assert_eq!(out.mean, vec![3.0]);
    assert_eq!(out.var, vec![3.5]);
    close("invstd", out.invstd[0], inv, 1e-15);
    for (i, &v) in X.iter().enumerate() {
        close("y", out.y[i], (f64::from(v) - 3.0) * inv, 1e-15);
    }
    // One step, momentum 0.1: rm = 0.1 * 3, rv = 0.9 * 1 + 0.1 * 14/3.
    assert_eq!(bn.state.num_batches_tracked, 1);
    close("running_mean", bn.state.running_mean[0].into(), 0.3, 1e-7);
    close(
        "running_var",
        bn.state.running_var[0].into(),
        0.9 + 1.4 / 3.0,
        1e-7,
    );
    // Three steps on the same batch: r_k = b + (r_0 - b) * 0.9^k.
    bn.forward_train(&shape, &X).unwrap();
    bn.forward_train(&shape, &X).unwrap();
    let d = 0.9f64.powi(3);
    assert_eq!(bn.state.num_batches_tracked, 3);
    close(
        "running_mean",
        bn.state.running_mean[0].into(),
        3.0 * (1.0 - d),
        1e-6,
    );
    close(
        "running_var",
        bn.state.running_var[0].into(),
        14.0 / 3.0 + (1.0 - 14.0 / 3.0) * d,
        1e-6,
    );

    // Eval uses the running statistics, with gamma and beta.
    bn.state.gamma = vec![2.0];
    bn.state.beta = vec![0.5];
    let (rm, rv) = (
        f64::from(bn.state.running_mean[0]),
        f64::from(bn.state.running_var[0]),
    );
    let ev = bn.forward_eval(&shape, &X).unwrap();
    assert_eq!((ev.mean[0], ev.var[0]), (rm, rv));
    let a = 1.0 / (rv + f64::from(1e-5f32)).sqrt();
    close("eval invstd", ev.invstd[0], a, 1e-15);
    for (i, &v) in X.iter().enumerate() {
        close(
            "eval y",
            ev.y[i],
            (f64::from(v) - rm) * a * 2.0 + 0.5,
            1e-15,
        );
    }
    assert_eq!(
        bn.state.num_batches_tracked, 3,
        "eval must not count batches"
    );
}

#[test]
fn hand_computed_cumulative_average() {
    // momentum = None: the running stats are the plain average over the batches.
    let shape = Shape::channels_first(&[4, 1]).unwrap();
    let mut bn = ReferenceBatchNorm::new(BatchNormConfig::new(1).momentum(None)).unwrap();
    bn.forward_train(&shape, &X).unwrap();
    close("rm after 1", bn.state.running_mean[0].into(), 3.0, 1e-7);
    close(
        "rv after 1",
        bn.state.running_var[0].into(),
        14.0 / 3.0,
        1e-7,
    );
    // Batches with means 3, 13, -1 and unbiased variances 14/3, 56/3 (x2), 14/3.
    let x2: Vec<f32> = X.iter().map(|v| 2.0 * v + 7.0).collect();
    let x3: Vec<f32> = X.iter().map(|v| v - 4.0).collect();
    bn.forward_train(&shape, &x2).unwrap();
    bn.forward_train(&shape, &x3).unwrap();
    assert_eq!(bn.state.num_batches_tracked, 3);
    close(
        "rm after 3",
        bn.state.running_mean[0].into(),
        (3.0 + 13.0 - 1.0) / 3.0,
        1e-6,
    );
    close(
        "rv after 3",
        bn.state.running_var[0].into(),
        (14.0 / 3.0 + 56.0 / 3.0 + 14.0 / 3.0) / 3.0,
        1e-6,
    );
}

#[test]
fn hand_computed_keras_convention() {
    // Keras: eps 1e-3, momentum 0.99 weighting the old value, biased running var.
    let shape = Shape::channels_last(&[4, 1]).unwrap();
    let mut bn = ReferenceBatchNorm::new(BatchNormConfig::keras(1)).unwrap();
    let out = bn.forward_train(&shape, &X).unwrap();
    close(
        "invstd",
        out.invstd[0],
        1.0 / (3.5f64 + f64::from(1e-3f32)).sqrt(),
        1e-15,
    );
    close(
        "rm after 1",
        bn.state.running_mean[0].into(),
        0.01 * 3.0,
        1e-7,
    );
    close(
        "rv after 1",
        bn.state.running_var[0].into(),
        0.99 + 0.01 * 3.5,
        1e-7,
    );
    bn.forward_train(&shape, &X).unwrap();
    bn.forward_train(&shape, &X).unwrap();
    let d = 0.99f64.powi(3);
    close(
        "rm after 3",
        bn.state.running_mean[0].into(),
        3.0 * (1.0 - d),
        1e-6,
    );
    close(
        "rv after 3",
        bn.state.running_var[0].into(),
        3.5 + (1.0 - 3.5) * d,
        1e-6,
    );
}

#[test]
fn hand_computed_two_channels_channels_last_with_affine() {
    // (N=2, C=2, L=2) channels-last: channel 0 = {0, 2, 4, 6}, channel 1 = {1, 1, 1, 1}.
    let shape = Shape::channels_last(&[2, 2, 2]).unwrap();
    let x = [0.0, 1.0, 2.0, 1.0, 4.0, 1.0, 6.0, 1.0];
    let state = BatchNormState {
        gamma: vec![3.0, 2.0],
        beta: vec![1.0, -1.0],
        ..BatchNormState::new(&BatchNormConfig::new(2))
    };
    let mut bn = ReferenceBatchNorm::with_state(BatchNormConfig::new(2).eps(0.0), state).unwrap();
    let out = bn.forward_train(&shape, &x).unwrap();
    assert_eq!(out.mean, vec![3.0, 1.0]);
    assert_eq!(out.var, vec![5.0, 0.0]);
    // Constant channel with eps = 0: invstd = 0, never inf, and y = beta.
    assert_eq!(out.invstd[1], 0.0);
    for i in [1, 3, 5, 7] {
        assert_eq!(out.y[i], -1.0);
    }
    let inv = 1.0 / 5f64.sqrt();
    for (i, v) in [(0, 0.0), (2, 2.0), (4, 4.0), (6, 6.0)] {
        close("y", out.y[i], (v - 3.0) * inv * 3.0 + 1.0, 1e-15);
    }
    // Backward with dy = 1 everywhere: dbeta = m, dgamma = sum xhat = 0, dx = 0.
    let g = bn
        .backward(
            &shape,
            &x,
            &[1.0; 8],
            StatsSource::Batch,
            GradMask::default(),
        )
        .unwrap();
    assert_eq!(g.dbeta.unwrap(), vec![4.0, 4.0]);
    for v in g.dgamma.unwrap() {
        assert!(v.abs() < 1e-14);
    }
    for v in g.dx.unwrap() {
        assert!(v.abs() < 1e-14);
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
    let h = 1.0 / 64.0;
    let d = |f: &mut dyn FnMut(f32) -> f64, h: f32| (f(h) - f(-h)) / (2.0 * f64::from(h));
    let (d1, d2) = (d(f, h), d(f, h / 2.0));
    (4.0 * d2 - d1) / 3.0
}

fn check_gradients_by_finite_differences(
    rng: &mut StdRng,
    shape: &Shape,
    source: StatsSource,
) -> f64 {
    let c = shape.c();
    let config = BatchNormConfig::new(c);
    let mut state = BatchNormState::new(&config);
    state.gamma = grid_normal(rng, c, 1.0, 0.5);
    state.beta = grid_normal(rng, c, 0.0, 1.0);
    state.running_mean = grid_normal(rng, c, 0.0, 1.0);
    state.running_var = (0..c).map(|_| rng.random_range(0.5f32..2.0)).collect();
    let bn = ReferenceBatchNorm::with_state(config, state).unwrap();
    let x = grid_normal(rng, shape.numel(), 0.5, 1.5);
    let w = grid_normal(rng, shape.numel(), 0.0, 1.0);

    // loss = sum(y * w), so dy = w.
    let loss = |bn: &ReferenceBatchNorm, x: &[f32]| -> f64 {
        let y = match source {
            StatsSource::Batch => bn.clone().forward_train(shape, x).unwrap().y,
            StatsSource::Running => bn.forward_eval(shape, x).unwrap().y,
        };
        y.iter().zip(&w).map(|(a, &b)| a * f64::from(b)).sum()
    };
    let g = bn
        .backward(shape, &x, &w, source, GradMask::default())
        .unwrap();
    let (dx, dgamma, dbeta) = (g.dx.unwrap(), g.dgamma.unwrap(), g.dbeta.unwrap());

    let mut worst = 0.0f64;
    let mut check = |name: &str, i: usize, analytic: f64, numeric: f64| {
        let e = (analytic - numeric).abs() / (1.0 + numeric.abs());
        assert!(
            e < 1e-7,
            "{name}[{i}] ({source:?}, {:?} {:?}): analytic {analytic}, numeric {numeric}",
            shape.dims(),
            shape.layout()
        );
        worst = worst.max(e);
    };
    for i in 0..x.len() {
        let num = derivative(&mut |h| {
            let mut xp = x.clone();
            xp[i] += h;
            loss(&bn, &xp)
        });
        check("dx", i, dx[i], num);
    }
    for ch in 0..c {
        let num = derivative(&mut |h| {
            let mut b = bn.clone();
            b.state.gamma[ch] += h;
            loss(&b, &x)
        });
        check("dgamma", ch, dgamma[ch], num);
        let num = derivative(&mut |h| {
            let mut b = bn.clone();
            b.state.beta[ch] += h;
            loss(&b, &x)
        });
        check("dbeta", ch, dbeta[ch], num);
    }
    worst
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = rng("backward_matches_finite_differences");
    let mut worst = 0.0f64;
    for dims in [&[6, 3][..], &[3, 2, 5], &[2, 2, 3, 2], &[2, 2, 2, 2, 3]] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            for source in [StatsSource::Batch, StatsSource::Running] {
                worst = worst.max(check_gradients_by_finite_differences(
                    &mut rng, &shape, source,
                ));
            }
        }
    }
    println!("finite differences: worst relative difference {worst:.2e} (bound 1e-7)");
}

#[test]
fn mask_selects_outputs_and_affine_false_has_no_parameter_gradients() {
    let shape = Shape::channels_first(&[3, 2, 4]).unwrap();
    let mut rng = rng("mask_selects_outputs");
    let x = normal(&mut rng, &shape, 0.0, 1.0);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    for affine in [true, false] {
        let bn = ReferenceBatchNorm::new(BatchNormConfig::new(2).affine(affine)).unwrap();
        let full = bn
            .backward(&shape, &x, &dy, StatsSource::Batch, GradMask::default())
            .unwrap();
        for mask in all_masks() {
            let g = bn
                .backward(&shape, &x, &dy, StatsSource::Batch, mask)
                .unwrap();
            assert_eq!(g.dx.is_some(), mask.dx);
            assert_eq!(g.dgamma.is_some(), mask.dgamma && affine);
            assert_eq!(g.dbeta.is_some(), mask.dbeta && affine);
            // A gradient does not depend on which others were asked for.
            if let Some(dx) = g.dx {
                assert_eq!(Some(dx), full.dx);
            }
        }
    }
}

#[test]
fn errors_are_typed_and_change_nothing() {
    let mut bn = ReferenceBatchNorm::new(BatchNormConfig::new(3)).unwrap();
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
    let short = vec![0.0; s.numel() - 1];
    assert!(matches!(
        bn.forward_train(&s, &short),
        Err(Error::LengthMismatch { name: "x", .. })
    ));
    let x = vec![0.0; s.numel()];
    assert!(matches!(
        bn.backward(&s, &x, &short, StatsSource::Batch, GradMask::default()),
        Err(Error::LengthMismatch { name: "dy", .. })
    ));

    // One value per channel: an error when batch statistics are needed.
    let one = Shape::channels_first(&[1, 3, 1, 1]).unwrap();
    let x1 = [1.0, 2.0, 3.0];
    assert!(matches!(
        bn.forward_train(&one, &x1),
        Err(Error::SingleValuePerChannel { .. })
    ));
    assert!(matches!(
        bn.backward(&one, &x1, &x1, StatsSource::Batch, GradMask::default()),
        Err(Error::SingleValuePerChannel { .. })
    ));
    // ... but fine with running statistics.
    bn.forward_eval(&one, &x1).unwrap();
    bn.backward(&one, &x1, &x1, StatsSource::Running, GradMask::default())
        .unwrap();
    assert_eq!(bn, before, "a failed call changed the layer");

    let untracked =
        ReferenceBatchNorm::new(BatchNormConfig::new(3).track_running_stats(false)).unwrap();
    assert!(matches!(
        untracked.forward_eval(&one, &x1),
        Err(Error::SingleValuePerChannel { .. })
    ));
    assert!(matches!(
        untracked.backward(&s, &x, &x, StatsSource::Running, GradMask::default()),
        Err(Error::MissingSavedStats(_))
    ));

    // Bad options and state.
    assert!(matches!(
        ReferenceBatchNorm::new(BatchNormConfig::new(0)),
        Err(Error::ZeroFeatures)
    ));
    assert!(matches!(
        ReferenceBatchNorm::new(BatchNormConfig::new(2).eps(-1.0)),
        Err(Error::BadEps(_))
    ));
    assert!(matches!(
        ReferenceBatchNorm::new(BatchNormConfig::new(2).momentum(Some(1.5))),
        Err(Error::BadMomentum(_))
    ));
    let config = BatchNormConfig::new(2);
    let mut state = BatchNormState::new(&config);
    state.running_var.pop();
    assert!(matches!(
        ReferenceBatchNorm::with_state(config, state),
        Err(Error::LengthMismatch {
            name: "running_var",
            ..
        })
    ));
}

#[test]
fn untracked_layer_uses_batch_stats_in_eval_and_counts_nothing() {
    let mut rng = rng("untracked_layer_uses_batch_stats_in_eval");
    let shape = Shape::channels_first(&[4, 3, 6]).unwrap();
    let x = well_conditioned(&mut rng, &shape);
    let mut bn =
        ReferenceBatchNorm::new(BatchNormConfig::new(3).track_running_stats(false)).unwrap();
    let ev = bn.forward_eval(&shape, &x).unwrap();
    let tr = bn.forward_train(&shape, &x).unwrap();
    assert_eq!(ev, tr);
    assert_eq!(bn.state.num_batches_tracked, 0);
    assert!(bn.state.running_mean.is_empty());
}

#[test]
fn layouts_agree() {
    let mut rng = rng("layouts_agree");
    for dims in [&[5, 3][..], &[3, 4, 7], &[2, 3, 4, 5], &[2, 2, 3, 2, 4]] {
        let cf = Shape::new(dims, Layout::ChannelsFirst).unwrap();
        let cl = Shape::new(dims, Layout::ChannelsLast).unwrap();
        let x = well_conditioned(&mut rng, &cf);
        let dy = normal(&mut rng, &cf, 0.0, 1.0);
        let (xl, dyl) = (permute(&x, &cf, &cl), permute(&dy, &cf, &cl));
        for c in 0..cf.c() {
            assert!(channel_values(&cf, &x, c).eq(channel_values(&cl, &xl, c)));
        }

        let config = BatchNormConfig::new(cf.c());
        let mut a = ReferenceBatchNorm::new(config.clone()).unwrap();
        let mut b = ReferenceBatchNorm::new(config).unwrap();
        let fa = a.forward_train(&cf, &x).unwrap();
        let fb = b.forward_train(&cl, &xl).unwrap();
        // Same values in the same (n, s) order per channel: identical statistics.
        assert_eq!(
            (&fa.mean, &fa.var, &fa.invstd),
            (&fb.mean, &fb.var, &fb.invstd)
        );
        assert_eq!(a.state, b.state);
        for n in 0..cf.n() {
            for c in 0..cf.c() {
                for s in 0..cf.spatial_size() {
                    assert_eq!(fa.y[cf.index(n, c, s)], fb.y[cl.index(n, c, s)]);
                }
            }
        }
        for source in [StatsSource::Batch, StatsSource::Running] {
            let ga = a
                .backward(&cf, &x, &dy, source, GradMask::default())
                .unwrap();
            let gb = b
                .backward(&cl, &xl, &dyl, source, GradMask::default())
                .unwrap();
            let (dxa, dxb) = (ga.dx.unwrap(), gb.dx.unwrap());
            for n in 0..cf.n() {
                for c in 0..cf.c() {
                    for s in 0..cf.spatial_size() {
                        let (u, v) = (dxa[cf.index(n, c, s)], dxb[cl.index(n, c, s)]);
                        assert!((u - v).abs() <= 1e-12 * (1.0 + v.abs()));
                    }
                }
            }
            for (u, v) in ga.dgamma.unwrap().iter().zip(gb.dgamma.unwrap()) {
                assert!((u - v).abs() <= 1e-12 * (1.0 + v.abs()));
            }
            for (u, v) in ga.dbeta.unwrap().iter().zip(gb.dbeta.unwrap()) {
                assert!((u - v).abs() <= 1e-12 * (1.0 + v.abs()));
            }
        }
    }
}

#[test]
fn nan_and_inf_propagate() {
    let shape = Shape::channels_first(&[3, 2]).unwrap();
    let mut bn = ReferenceBatchNorm::new(BatchNormConfig::new(2)).unwrap();
    let out = bn
        .forward_train(&shape, &[f32::NAN, 1.0, 2.0, 2.0, 3.0, 4.0])
        .unwrap();
    assert!(out.mean[0].is_nan() && out.y.iter().step_by(2).all(|v| v.is_nan()));
    assert_eq!(out.mean[1], 7.0 / 3.0);
    assert!(out.y.iter().skip(1).step_by(2).all(|v| v.is_finite()));
    assert!(bn.state.running_mean[0].is_nan() && bn.state.running_mean[1].is_finite());
    let out = bn
        .forward_train(&shape, &[f32::INFINITY, 1.0, 2.0, 2.0, 3.0, 4.0])
        .unwrap();
    // An infinity makes the whole channel's statistics NaN (docs/semantics.md),
    // as a NaN does.
    assert!(out.y.iter().step_by(2).all(|v| v.is_nan()));
    assert!(out.mean[0].is_nan() && out.var[0].is_nan() && out.invstd[0].is_nan());
}
