//! The fused activation and residual on the GPU (`y = act(bn(x) [+ z])` and its
//! backward from the forward's own `y`) against the f64 CPU reference, on fresh
//! random inputs: every activation with and without a residual, every layout and
//! option, every test tuning, every output mask; the recorded (encoder) calls with
//! accumulation; and the errors of the new arguments.

mod common;
mod gpu_support;

use common::{
    all_masks, assert_close, assert_nan_stays_in_channel, assert_presence, assert_sums_close, bits,
    combination, dbeta_scale, dgamma_scale, dx_scale, masked, normal, reference_stats, residual,
    rng, LAYOUTS,
};
use gpu_support::{ctx, describe, f64s, signed_pair as pair, tunings, SPLIT_SHAPES};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::{ReferenceBatchNorm, ReferenceGradients};
use wgpu_batchnorm::{
    Activation, BatchNorm, BatchNormConfig, Error, GpuContext, GradBuffers, GradMask, Gradients,
    Layout, SavedStats, SavedStatsHost, Shape, StatsSource,
};

/// Elementwise outputs, statistics and sums (docs/semantics.md).
const TOL: f64 = 1e-5;

/// Odd and even sizes of every rank: C = 1, 3, 8, 17; N = 1 with spatial > 1;
/// element counts that are not multiples of 4 or of a workgroup.
const SHAPES: &[&[usize]] = &[
    &[33, 17],
    &[2, 1],
    &[5, 3, 11],
    &[1, 17, 9],
    &[2, 1, 13],
    &[4, 3, 7, 7],
    &[3, 8, 5, 3],
    &[2, 3, 3, 4, 5],
];

/// Compares a GPU fused backward with the reference's, both from the output `y`;
/// `dz` must be the masked `dy` exactly.
#[allow(clippy::too_many_arguments)]
fn compare_gradients(
    g: &Gradients,
    r: &ReferenceGradients,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    (x, y, dy): (&[f32], &[f32], &[f32]),
    source: StatsSource,
    mask: GradMask,
    residual: bool,
    what: &str,
) -> f64 {
    assert_presence(what, g, mask, cpu.config.affine);
    assert_eq!(g.dz.is_some(), residual, "{what}: dz presence");
    let gm = masked(cpu.config.activation, y, dy);
    if let Some(dz) = &g.dz {
        assert_eq!(
            bits(dz),
            bits(&gm),
            "{what}: dz is dy masked by the activation"
        );
    }
    let stats = reference_stats(cpu, shape, x, source);
    let mut worst = 0f64;
    if let (Some(dx), Some(rdx)) = (&g.dx, &r.dx) {
        // With a large gamma * invstd, dx is a small difference of large terms: there
        // it is bounded relative to the size of its terms (as in gpu_backward.rs).
        let gamma = cpu.state.gamma.as_slice();
        let gain = |c: usize| (gamma.get(c).map_or(1.0, |&v| f64::from(v)) * stats.invstd[c]).abs();
        worst = worst.max(if (0..shape.c()).any(|c| gain(c) > 8.0) {
            let batch = source == StatsSource::Batch;
            let scale = dx_scale(shape, x, &gm, gamma, &stats.mean, &stats.invstd, batch);
            assert_sums_close(&format!("{what} dx (x terms)"), dx, rdx, &scale, TOL)
        } else {
            assert_close(&format!("{what} dx"), dx, rdx, TOL)
        });
    }
    if let (Some(dg), Some(rdg)) = (&g.dgamma, &r.dgamma) {
        let scale = dgamma_scale(shape, x, &gm, &stats.mean, &stats.invstd);
        worst = worst.max(assert_sums_close(
            &format!("{what} dgamma"),
            dg,
            rdg,
            &scale,
            TOL,
        ));
    }
    if let (Some(db), Some(rdb)) = (&g.dbeta, &r.dbeta) {
        let scale = dbeta_scale(shape, &gm);
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

/// The GPU fused backward of `y` (of the batch statistics `saved`, else of the
/// running ones), with or without the residual, for each of `masks`, against the
/// reference's. Returns the largest error.
#[allow(clippy::too_many_arguments)]
fn check_backwards(
    gpu: &mut BatchNorm,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    data: (&[f32], &[f32], &[f32]),
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
    let mut worst = 0f64;
    for &mask in masks {
        let name = format!("{what} {mask:?} {label}");
        let g = gpu
            .backward_fused_host(shape, x, Some(y), dy, saved, mask, residual)
            .expect("backward_fused");
        let rg = cpu
            .backward_fused(shape, x, y, dy, source, mask, residual)
            .expect("reference backward");
        let e = compare_gradients(&g, &rg, cpu, shape, data, source, mask, residual, &name);
        worst = worst.max(e);
    }
    worst
}

/// One layer pair through a training forward, the fused backward of its batch
/// statistics (from the GPU's own `y`, for each of `masks`), an eval forward and,
/// with running statistics, the eval backward; with a residual when `z` is given.
/// Returns the largest error.
#[allow(clippy::too_many_arguments)]
fn check_step(
    gpu: &mut BatchNorm,
    cpu: &mut ReferenceBatchNorm,
    shape: &Shape,
    x: &[f32],
    z: Option<&[f32]>,
    dy: &[f32],
    masks: &[GradMask],
    what: &str,
) -> f64 {
    let residual = z.is_some();
    let mut worst = 0f64;
    let (out, r) = match z {
        Some(z) => (
            gpu.forward_train_add_host(shape, x, z)
                .expect("forward_train_add"),
            cpu.forward_train_add(shape, x, z).expect("reference"),
        ),
        None => (
            gpu.forward_train_host(shape, x).expect("forward_train"),
            cpu.forward_train(shape, x).expect("reference"),
        ),
    };
    worst = worst.max(assert_close(&format!("{what} y"), &out.y, &r.y, TOL));
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
    let state = gpu.state().expect("state");
    assert_eq!(
        state.num_batches_tracked, cpu.state.num_batches_tracked,
        "{what}"
    );
    let (rm, rv) = (f64s(&cpu.state.running_mean), f64s(&cpu.state.running_var));
    worst = worst.max(assert_close(
        &format!("{what} running_mean"),
        &state.running_mean,
        &rm,
        TOL,
    ));
    worst = worst.max(assert_close(
        &format!("{what} running_var"),
        &state.running_var,
        &rv,
        TOL,
    ));
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

    let (ev, r) = match z {
        Some(z) => (
            gpu.forward_eval_add_host(shape, x, z)
                .expect("forward_eval_add"),
            cpu.forward_eval_add(shape, x, z).expect("reference"),
        ),
        None => (
            gpu.forward_eval_host(shape, x).expect("forward_eval"),
            cpu.forward_eval(shape, x).expect("reference"),
        ),
    };
    worst = worst.max(assert_close(&format!("{what} eval y"), &ev.y, &r.y, TOL));
    let track = cpu.config.track_running_stats;
    assert_eq!(
        ev.saved.is_some(),
        !track,
        "{what}: eval saves batch stats only without running stats"
    );
    if track {
        let data = (x, &ev.y[..], dy);
        let e = check_backwards(gpu, cpu, shape, data, None, masks, residual, what);
        worst = worst.max(e);
    }
    worst
}

/// [`check_step`] on a fresh pair with random `x` (and `z`) and `dy`.
fn check_random(
    ctx: &GpuContext,
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    with_z: bool,
    masks: &[GradMask],
    what: &str,
) -> f64 {
    let (mut gpu, mut cpu) = pair(ctx, rng, config);
    let mean = rng.random_range(-3.0..3.0);
    let x = normal(rng, shape, mean, 2.0);
    let z = with_z.then(|| residual(rng, shape));
    let dy = normal(rng, shape, 0.1, 1.0);
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
fn every_activation_and_residual_for_every_layout_and_option() {
    let mut rng = rng("every_activation_and_residual_for_every_layout_and_option");
    let mut worst = 0f64;
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let c = shape.c();
            for act in Activation::ALL {
                for with_z in [false, true] {
                    for config in [
                        BatchNormConfig::new(c),
                        BatchNormConfig::new(c).affine(false),
                        BatchNormConfig::new(c).track_running_stats(false),
                        BatchNormConfig::keras(c),
                    ] {
                        let config = config.activation(act);
                        let what = format!(
                            "{dims:?} {layout:?} {act:?} residual {with_z} {}",
                            describe(&config)
                        );
                        let masks = [GradMask::default()];
                        let e =
                            check_random(ctx(), &mut rng, &shape, &config, with_z, &masks, &what);
                        worst = worst.max(e);
                    }
                }
            }
        }
    }
    println!("largest error against the reference: {worst:.3e}");
}

#[test]
fn every_tuning_matches_reference() {
    // Every test tuning on the shapes that take each of its paths (the split, fused
    // and finalized-in-place forwards, the rows and wide-rows walks, the fused and
    // merged backwards), the six activation x residual combinations in turn.
    let mut rng = rng("fused every_tuning_matches_reference");
    let mut worst = 0f64;
    for (name, ctx) in tunings() {
        let mut k = 0;
        for dims in SPLIT_SHAPES.iter().chain(&SHAPES[..4]) {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let (act, with_z) = combination(k);
                k += 1;
                let config = BatchNormConfig::new(shape.c()).activation(act);
                let what = format!("tuning {name} {dims:?} {layout:?} {act:?} residual {with_z}");
                let masks = [GradMask::default()];
                worst = worst.max(check_random(
                    &ctx, &mut rng, &shape, &config, with_z, &masks, &what,
                ));
            }
        }
    }
    println!("largest error against the reference over every tuning: {worst:.3e}");
}

#[test]
fn every_output_mask() {
    let mut rng = rng("fused every_output_mask");
    let masks = all_masks();
    for layout in LAYOUTS {
        for (dims, act, with_z) in [
            (&[3usize, 5, 3, 3][..], Activation::Relu, true),
            (&[3, 5, 3, 3][..], Activation::Relu6, false),
            (&[40, 6][..], Activation::Identity, true),
        ] {
            let shape = Shape::new(dims, layout).unwrap();
            let config = BatchNormConfig::new(shape.c()).activation(act);
            let what = format!("{dims:?} {layout:?} {act:?} residual {with_z}");
            check_random(ctx(), &mut rng, &shape, &config, with_z, &masks, &what);
        }
    }
}

#[test]
fn large_mean_tiny_variance() {
    // x = 1e4 + 1e-3 * N(0, 1): y and the statistics to 1e-5, the sums to the sum
    // rule, dx to 1e-5 of the size of its terms, through the activations.
    let mut rng = rng("fused large_mean_tiny_variance");
    let mut k = 0;
    for (dims, layout) in [
        (&[16usize, 8, 12, 12][..], Layout::ChannelsFirst),
        (&[16, 8, 12, 12][..], Layout::ChannelsLast),
        (&[300, 5][..], Layout::ChannelsFirst),
        (&[5, 8, 7, 7][..], Layout::ChannelsFirst),
        (&[4, 6, 5, 5][..], Layout::ChannelsLast),
        (&[3, 3, 7, 7][..], Layout::ChannelsFirst),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        for _ in 0..2 {
            let (act, with_z) = combination(k);
            k += 1;
            let config = BatchNormConfig::new(shape.c()).activation(act);
            let (mut gpu, mut cpu) = pair(ctx(), &mut rng, &config);
            let x = common::large_mean(&mut rng, &shape);
            let z = with_z.then(|| residual(&mut rng, &shape));
            let dy = normal(&mut rng, &shape, 0.0, 1.0);
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
            println!("{what}: largest error {e:.3e}");
        }
    }
}

#[test]
fn outputs_stay_in_the_range_of_the_activation() {
    let mut rng = rng("fused outputs_stay_in_the_range_of_the_activation");
    for layout in LAYOUTS {
        let shape = Shape::new(&[6, 4, 5, 5], layout).unwrap();
        let x = normal(&mut rng, &shape, 1.0, 2.0);
        let z = residual(&mut rng, &shape);
        for act in [Activation::Relu, Activation::Relu6] {
            let (mut gpu, _) = pair(ctx(), &mut rng, &BatchNormConfig::new(4).activation(act));
            let top = if act == Activation::Relu {
                f32::INFINITY
            } else {
                6.0
            };
            let outputs = [
                gpu.forward_train_host(&shape, &x).unwrap().y,
                gpu.forward_train_add_host(&shape, &x, &z).unwrap().y,
                gpu.forward_eval_host(&shape, &x).unwrap().y,
                gpu.forward_eval_add_host(&shape, &x, &z).unwrap().y,
            ];
            for y in &outputs {
                assert!(
                    y.iter().all(|&v| (0.0..=top).contains(&v)),
                    "{layout:?} {act:?}: {y:?}"
                );
                assert!(y.contains(&0.0), "{layout:?} {act:?}: nothing clamped at 0");
            }
            if act == Activation::Relu6 {
                assert!(
                    outputs[1].contains(&6.0),
                    "{layout:?}: nothing clamped at 6"
                );
            }
        }
    }
}

#[test]
fn identity_without_residual_is_the_plain_backward() {
    let mut rng = rng("identity_without_residual_is_the_plain_backward");
    for layout in LAYOUTS {
        let shape = Shape::new(&[4, 6, 5, 3], layout).unwrap();
        let config = BatchNormConfig::new(6);
        let (mut gpu, _) = pair(ctx(), &mut rng, &config);
        let x = normal(&mut rng, &shape, 1.0, 2.0);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let out = gpu.forward_train_host(&shape, &x).unwrap();
        for saved in [Some(&out.saved), None] {
            let all = GradMask::default();
            let plain = gpu.backward_host(&shape, &x, &dy, saved, all).unwrap();
            for y in [None, Some(&out.y[..])] {
                let fused = gpu
                    .backward_fused_host(&shape, &x, y, &dy, saved, all, false)
                    .unwrap();
                assert_eq!(
                    format!("{fused:?}"),
                    format!("{plain:?}"),
                    "{layout:?} saved {} y {}",
                    saved.is_some(),
                    y.is_some()
                );
            }
            // With a residual and no activation, dz is dy as it is.
            let with_dz = gpu
                .backward_fused_host(&shape, &x, None, &dy, saved, all, true)
                .unwrap();
            assert_eq!(bits(&with_dz.dz.unwrap()), bits(&dy), "{layout:?}");
        }
    }
}

/// Uploads for the recorded-call tests.
struct Buffers {
    x: wgpu::Buffer,
    z: wgpu::Buffer,
    dy: wgpu::Buffer,
    y: wgpu::Buffer,
    dx: wgpu::Buffer,
    dz: wgpu::Buffer,
}

impl Buffers {
    fn new(ctx: &GpuContext, shape: &Shape, x: &[f32], z: &[f32], dy: &[f32]) -> Self {
        let out = |label| ctx.storage_buffer(label, shape.bytes()).unwrap();
        Self {
            x: ctx.upload("x", x).unwrap(),
            z: ctx.upload("z", z).unwrap(),
            dy: ctx.upload("dy", dy).unwrap(),
            y: out("y"),
            dx: out("dx"),
            dz: out("dz"),
        }
    }
}

#[test]
fn recorded_calls_with_residual_and_accumulation() {
    // forward_train_add and the fused backward recorded into encoders, dgamma and
    // dbeta accumulated onto prior values (and overwritten), against the reference.
    let mut rng = rng("recorded_calls_with_residual_and_accumulation");
    let ctx = ctx();
    for (layout, act) in [
        (Layout::ChannelsLast, Activation::Relu),
        (Layout::ChannelsFirst, Activation::Relu6),
    ] {
        let shape = Shape::new(&[4, 6, 5, 5], layout).unwrap();
        let config = BatchNormConfig::new(6).activation(act);
        let (mut gpu, mut cpu) = pair(ctx, &mut rng, &config);
        let x = normal(&mut rng, &shape, 1.0, 2.0);
        let z = residual(&mut rng, &shape);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let b = Buffers::new(ctx, &shape, &x, &z, &dy);
        let saved = SavedStats::new(ctx, 6).unwrap();
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        gpu.forward_train_add(&mut enc, &shape, &b.x, &b.z, &b.y, &saved)
            .unwrap();
        ctx.submit_and_wait(enc).unwrap();
        let y: Vec<f32> = ctx.read_buffer(&b.y, shape.numel()).unwrap();
        let r = cpu.forward_train_add(&shape, &x, &z).unwrap();
        assert_close("recorded y", &y, &r.y, TOL);
        assert_close(
            "recorded mean",
            &saved.to_host(ctx).unwrap().mean,
            &r.mean,
            TOL,
        );

        let rg = cpu
            .backward_fused(
                &shape,
                &x,
                &y,
                &dy,
                StatsSource::Batch,
                GradMask::default(),
                true,
            )
            .unwrap();
        let prior_g: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let prior_b: Vec<f32> = (0..6).map(|i| 2.0 - i as f32).collect();
        for accumulate in [false, true] {
            let dg = ctx.upload("dgamma", &prior_g).unwrap();
            let db = ctx.upload("dbeta", &prior_b).unwrap();
            let grads = GradBuffers::new()
                .dx(&b.dx)
                .dgamma(&dg)
                .dbeta(&db)
                .output(&b.y)
                .dz(&b.dz)
                .accumulate(accumulate);
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            gpu.backward(&mut enc, &shape, &b.x, &b.dy, Some(&saved), grads)
                .unwrap();
            ctx.submit_and_wait(enc).unwrap();
            let what = format!("{layout:?} {act:?} accumulate={accumulate}");
            let base = |p: &[f32], i: usize| if accumulate { f64::from(p[i]) } else { 0.0 };
            let want_g: Vec<f64> = (0..6)
                .map(|i| rg.dgamma.as_ref().unwrap()[i] + base(&prior_g, i))
                .collect();
            let want_b: Vec<f64> = (0..6)
                .map(|i| rg.dbeta.as_ref().unwrap()[i] + base(&prior_b, i))
                .collect();
            let got_g: Vec<f32> = ctx.read_buffer(&dg, 6).unwrap();
            let got_b: Vec<f32> = ctx.read_buffer(&db, 6).unwrap();
            assert_close(&format!("{what} dgamma"), &got_g, &want_g, 1e-4);
            assert_close(&format!("{what} dbeta"), &got_b, &want_b, 1e-4);
            let dx: Vec<f32> = ctx.read_buffer(&b.dx, shape.numel()).unwrap();
            assert_close(&format!("{what} dx"), &dx, rg.dx.as_ref().unwrap(), TOL);
            let dz: Vec<f32> = ctx.read_buffer(&b.dz, shape.numel()).unwrap();
            assert_eq!(bits(&dz), bits(&masked(act, &y, &dy)), "{what} dz");
        }
    }
}

#[test]
fn recorded_eval_with_residual_running_and_batch_statistics() {
    let mut rng = rng("recorded_eval_with_residual_running_and_batch_statistics");
    let ctx = ctx();
    let shape = Shape::new(&[3, 5, 4, 7], Layout::ChannelsFirst).unwrap();
    for track in [true, false] {
        let config = BatchNormConfig::new(5)
            .activation(Activation::Relu)
            .track_running_stats(track);
        let (mut gpu, cpu) = pair(ctx, &mut rng, &config);
        let x = normal(&mut rng, &shape, -1.0, 1.5);
        let z = residual(&mut rng, &shape);
        let b = Buffers::new(ctx, &shape, &x, &z, &z);
        let saved = SavedStats::new(ctx, 5).unwrap();
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        gpu.forward_eval_add(&mut enc, &shape, &b.x, &b.z, &b.y, Some(&saved))
            .unwrap();
        ctx.submit_and_wait(enc).unwrap();
        let y: Vec<f32> = ctx.read_buffer(&b.y, shape.numel()).unwrap();
        let r = cpu.forward_eval_add(&shape, &x, &z).unwrap();
        assert_close(&format!("eval + z track={track} y"), &y, &r.y, TOL);
        if !track {
            let s = saved.to_host(ctx).unwrap();
            assert_close("eval + z batch mean", &s.mean, &r.mean, TOL);
        }
        assert_eq!(gpu.state().unwrap(), cpu.state, "eval updates nothing");
    }
}

#[test]
fn nan_stays_in_its_channel() {
    let mut rng = rng("fused nan_stays_in_its_channel");
    for layout in LAYOUTS {
        let shape = Shape::new(&[4, 3, 3, 3], layout).unwrap();
        for (act, nan_in_z) in [(Activation::Relu, false), (Activation::Relu6, true)] {
            let config = BatchNormConfig::new(3).activation(act);
            let (mut gpu, mut cpu) = pair(ctx(), &mut rng, &config);
            let mut x = normal(&mut rng, &shape, 0.5, 2.0);
            let mut z = residual(&mut rng, &shape);
            let at = shape.index(1, 1, 4);
            if nan_in_z {
                z[at] = f32::NAN;
            } else {
                x[at] = f32::NAN;
            }
            let what = format!("{layout:?} {act:?} NaN in z {nan_in_z}");
            let out = gpu.forward_train_add_host(&shape, &x, &z).unwrap();
            let r = cpu.forward_train_add(&shape, &x, &z).unwrap();
            assert_close(&format!("{what} y"), &out.y, &r.y, TOL);
            let dy = normal(&mut rng, &shape, 0.0, 1.0);
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
fn errors_of_the_fused_calls_change_nothing() {
    let mut rng = rng("errors_of_the_fused_calls_change_nothing");
    let ctx = ctx();
    let shape = Shape::new(&[4, 3, 5], Layout::ChannelsLast).unwrap();
    let config = BatchNormConfig::new(3).activation(Activation::Relu);
    let (mut gpu, _) = pair(ctx, &mut rng, &config);
    let before = gpu.state().unwrap();
    let x = normal(&mut rng, &shape, 0.0, 1.0);
    let z = residual(&mut rng, &shape);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    let b = Buffers::new(ctx, &shape, &x, &z, &dy);
    let saved = SavedStats::new(ctx, 3).unwrap();

    // A residual of the wrong length.
    for bad in [&z[1..], &[z.clone(), vec![1.0]].concat()[..]] {
        let is_z = |e: Error| matches!(e, Error::LengthMismatch { name: "z", .. });
        assert!(is_z(
            gpu.forward_train_add_host(&shape, &x, bad).unwrap_err()
        ));
        assert!(is_z(
            gpu.forward_eval_add_host(&shape, &x, bad).unwrap_err()
        ));
    }
    let small = ctx.storage_buffer("small z", shape.bytes() - 4).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    assert!(matches!(
        gpu.forward_train_add(&mut enc, &shape, &b.x, &small, &b.y, &saved),
        Err(Error::BufferTooSmall { name: "z", .. })
    ));
    // z aliasing y (in-place residual add).
    assert!(matches!(
        gpu.forward_train_add(&mut enc, &shape, &b.x, &b.y, &b.y, &saved),
        Err(Error::AliasedBuffers { .. })
    ));
    assert!(matches!(
        gpu.forward_eval_add(&mut enc, &shape, &b.x, &b.y, &b.y, None),
        Err(Error::AliasedBuffers { .. })
    ));
    drop(enc);
    assert_eq!(
        gpu.state().unwrap(),
        before,
        "a failed forward changed the layer"
    );

    let out = gpu.forward_train_add_host(&shape, &x, &z).unwrap();
    let dev_saved = SavedStats::from_host(ctx, &out.saved).unwrap();
    let yb = ctx.upload("y", &out.y).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    // The backward of a layer with an activation needs the forward's output.
    let is_missing = |r: wgpu_batchnorm::Result<()>| matches!(r, Err(Error::MissingOutput(_)));
    let no_output = GradBuffers::new().dx(&b.dx).dz(&b.dz);
    assert!(is_missing(gpu.backward(
        &mut enc,
        &shape,
        &b.x,
        &b.dy,
        Some(&dev_saved),
        no_output
    )));
    let all = GradMask::default();
    assert!(matches!(
        gpu.backward_host(&shape, &x, &dy, Some(&out.saved), all),
        Err(Error::MissingOutput(_))
    ));
    assert!(matches!(
        gpu.backward_fused_host(&shape, &x, None, &dy, Some(&out.saved), all, true),
        Err(Error::MissingOutput(_))
    ));
    // dz written over dx, or over the output it reads.
    let same = GradBuffers::new().output(&yb).dx(&b.dx).dz(&b.dx);
    assert!(matches!(
        gpu.backward(&mut enc, &shape, &b.x, &b.dy, Some(&dev_saved), same),
        Err(Error::AliasedBuffers { .. })
    ));
    let over_y = GradBuffers::new().output(&yb).dx(&b.dx).dz(&yb);
    assert!(matches!(
        gpu.backward(&mut enc, &shape, &b.x, &b.dy, Some(&dev_saved), over_y),
        Err(Error::AliasedBuffers { .. })
    ));
    // An output of the wrong length.
    assert!(matches!(
        gpu.backward_fused_host(
            &shape,
            &x,
            Some(&out.y[1..]),
            &dy,
            Some(&out.saved),
            all,
            true
        ),
        Err(Error::LengthMismatch { name: "y", .. })
    ));
    drop(enc);
    let state = gpu.state().unwrap();
    assert_eq!(state.num_batches_tracked, before.num_batches_tracked + 1);
}
