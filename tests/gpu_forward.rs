//! GPU forward (training and eval) against the f64 CPU reference, on fresh random
//! inputs, for every layout and option combination.

mod common;
mod gpu_support;

use common::{assert_close, normal, rng};
use gpu_support::{
    configs, ctx, describe, f64s, layer_pair, layer_pair_on, merged_cuts, tunings, SPLIT_SHAPES,
};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Cut, GpuContext, Layout, SavedStats, Shape, Tuning,
};

/// Elementwise outputs and statistics (docs/semantics.md).
const TOL: f64 = 1e-5;

/// Odd and even sizes for every rank: C = 1, 3, 8, 17; 7x7 and 5x3 planes; N = 1
/// with spatial > 1; element counts that are not multiples of 4 or of the workgroup;
/// channels-first runs of S = 2, 15 and 13 elements in batch items of whole vec4s
/// (the rows view, 16 elements per invocation from S = 15).
const SHAPES: &[&[usize]] = &[
    &[33, 17],
    &[64, 4],
    &[5, 3, 11],
    &[1, 17, 9],
    &[2, 1, 13],
    &[4, 3, 7, 7],
    &[8, 16, 8, 8],
    &[1, 3, 5, 3],
    &[3, 8, 5, 3],
    &[2, 17, 4, 4],
    &[2, 3, 3, 4, 5],
    &[3, 4, 2, 2, 2],
    &[6, 6, 2],
    &[3, 16, 5, 3],
    &[4, 16, 13],
];

const LAYOUTS: [Layout; 2] = [Layout::ChannelsFirst, Layout::ChannelsLast];

/// Two training steps and an eval pass on the GPU and in the reference, comparing
/// y, the saved statistics and the state after each. Returns the largest error.
fn check_train_eval(
    gpu: &mut BatchNorm,
    cpu: &mut ReferenceBatchNorm,
    shape: &Shape,
    xs: &[Vec<f32>],
    tol: f64,
    what: &str,
) -> f64 {
    let mut worst = 0f64;
    for (step, x) in xs.iter().enumerate() {
        let name = format!("{what} step {step}");
        let out = gpu.forward_train_host(shape, x).expect("forward_train");
        let r = cpu.forward_train(shape, x).expect("reference");
        let saved = out.saved;
        worst = worst.max(assert_close(&format!("{name} y"), &out.y, &r.y, tol));
        worst = worst.max(assert_close(
            &format!("{name} mean"),
            &saved.mean,
            &r.mean,
            tol,
        ));
        worst = worst.max(assert_close(
            &format!("{name} invstd"),
            &saved.invstd,
            &r.invstd,
            tol,
        ));
        let exact_mean: Vec<f32> = saved
            .mean
            .iter()
            .zip(&saved.mean_lo)
            .map(|(h, l)| h + l)
            .collect();
        assert_close(&format!("{name} mean+mean_lo"), &exact_mean, &r.mean, tol);
        let state = gpu.state().expect("state");
        let want = &cpu.state;
        worst = worst.max(assert_close(
            &format!("{name} running_mean"),
            &state.running_mean,
            &f64s(&want.running_mean),
            tol,
        ));
        worst = worst.max(assert_close(
            &format!("{name} running_var"),
            &state.running_var,
            &f64s(&want.running_var),
            tol,
        ));
        assert_eq!(
            state.num_batches_tracked, want.num_batches_tracked,
            "{name} num_batches_tracked"
        );
        assert_eq!(
            state.gamma, want.gamma,
            "{name}: training must not change gamma"
        );
        assert_eq!(
            state.beta, want.beta,
            "{name}: training must not change beta"
        );
    }
    let x = &xs[0];
    let out = gpu.forward_eval_host(shape, x).expect("forward_eval");
    let r = cpu.forward_eval(shape, x).expect("reference eval");
    worst = worst.max(assert_close(&format!("{what} eval y"), &out.y, &r.y, tol));
    assert_eq!(
        out.saved.is_some(),
        !gpu.config().track_running_stats,
        "{what}: eval saves batch stats only without running stats"
    );
    worst
}

/// [`check_train_eval`] on a fresh layer pair (random state, on `ctx`) with two
/// random batches around a random mean.
fn check_random(
    ctx: &GpuContext,
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    what: &str,
) -> f64 {
    let (mut gpu, mut cpu) = layer_pair_on(ctx, rng, config);
    let mean = rng.random_range(-3.0..3.0);
    let xs: Vec<Vec<f32>> = (0..2).map(|_| normal(rng, shape, mean, 2.0)).collect();
    check_train_eval(&mut gpu, &mut cpu, shape, &xs, TOL, what)
}

/// Every option on the statistics finalized in place (`stats.wgsl`'s `finalized_*`):
/// with one split per channel and no fused forward, each forward with batch
/// statistics takes them, here in all five of their walks (channels-first vec4
/// and quads, channels-last vec4, 16 channels per invocation (48 channels: the
/// third unit's tile slot idle; walks of 130 rows) and scalar).
#[test]
fn every_option_with_the_statistics_finalized_in_place() {
    let mut rng = rng("every_option_with_the_statistics_finalized_in_place");
    let cpu = Tuning::cpu(8);
    let in_place = ctx().with_tuning(Tuning {
        reduce: Cut {
            target_workgroups: 1,
            ..cpu.reduce
        },
        fused_forward_max_elements: 0,
        ..cpu
    });
    let mut worst = 0f64;
    for dims in [
        &[16usize, 8, 30, 30][..],
        &[7, 5, 33, 17],
        &[1000, 12],
        &[513, 7],
        &[2, 48, 64, 65],
    ] {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            for config in configs(shape.c()) {
                let what = format!("in place {dims:?} {layout:?} {}", describe(&config));
                worst = worst.max(check_random(&in_place, &mut rng, &shape, &config, &what));
            }
        }
    }
    println!("largest error against the reference: {worst:.3e}");
}

#[test]
fn forward_matches_reference_for_every_layout_and_option() {
    let mut rng = rng("forward_matches_reference_for_every_layout_and_option");
    let mut worst = 0f64;
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            for config in configs(shape.c()) {
                let what = format!("{dims:?} {layout:?} {}", describe(&config));
                worst = worst.max(check_random(ctx(), &mut rng, &shape, &config, &what));
            }
        }
    }
    println!("largest error against the reference: {worst:.3e}");
}

#[test]
fn every_tuning_matches_reference() {
    let mut rng = rng("every_tuning_matches_reference");
    let mut worst = 0f64;
    for (name, ctx) in tunings() {
        for dims in SPLIT_SHAPES.iter().chain(SHAPES) {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let config = BatchNormConfig::new(shape.c());
                let what = format!("tuning {name} {dims:?} {layout:?}");
                worst = worst.max(check_random(&ctx, &mut rng, &shape, &config, &what));
            }
        }
    }
    println!("largest error against the reference over every tuning: {worst:.3e}");
}

#[test]
fn large_mean_tiny_variance_normalizes_exactly() {
    // x = 1e4 + 1e-3 * noise: PyTorch in f32 is off by up to 35% here.
    let mut rng = rng("large_mean_tiny_variance_normalizes_exactly");
    let mut worst = 0f64;
    for (dims, layout) in [
        (&[16usize, 8, 12, 12][..], Layout::ChannelsFirst),
        (&[16, 8, 12, 12][..], Layout::ChannelsLast),
        (&[300, 5][..], Layout::ChannelsFirst),
        (&[3, 3, 7, 7][..], Layout::ChannelsFirst),
        (&[5, 8, 7, 7][..], Layout::ChannelsFirst),
        (&[32, 48, 7, 7][..], Layout::ChannelsFirst),
        (&[4, 6, 5, 5][..], Layout::ChannelsLast),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        let config = BatchNormConfig::new(shape.c());
        let (mut gpu, mut cpu) = layer_pair(&mut rng, &config);
        let xs: Vec<Vec<f32>> = (0..2)
            .map(|_| common::large_mean(&mut rng, &shape))
            .collect();
        worst = worst.max(check_train_eval(
            &mut gpu,
            &mut cpu,
            &shape,
            &xs,
            TOL,
            &format!("large mean {dims:?} {layout:?}"),
        ));
    }
    println!("large-mean inputs: largest error {worst:.3e} (bound asserted: {TOL:e})");
}

#[test]
fn constant_channels_give_beta() {
    let mut rng = rng("constant_channels_give_beta");
    // C = 8 with S = 15 and 135: channels-first planes that are not whole vec4s in
    // batch items that are (read as rows by the normalize pass, and in the larger
    // one, past the fused size, by the statistics).
    for (dims, layout) in [&[4usize, 5, 3, 3][..], &[3, 8, 5, 3], &[64, 8, 15, 9]]
        .into_iter()
        .flat_map(|d| LAYOUTS.map(|l| (d, l)))
    {
        let shape = Shape::new(dims, layout).unwrap();
        let values = [0.0, 1.0, -7.5, 1e4, 3.25, -2.0, 0.5, 1e-3][..shape.c()].to_vec();
        let x: Vec<f32> = (0..shape.numel())
            .map(|i| values[shape.channel_of(i)])
            .collect();
        for eps in [1e-5f32, 0.0] {
            let config = BatchNormConfig::new(shape.c()).eps(eps);
            let (mut gpu, mut cpu) = layer_pair(&mut rng, &config);
            let out = gpu.forward_train_host(&shape, &x).unwrap();
            let r = cpu.forward_train(&shape, &x).unwrap();
            assert_close("constant y", &out.y, &r.y, TOL);
            let saved = out.saved;
            assert_eq!(
                saved.mean, values,
                "the mean of a constant channel is exact"
            );
            let want = if eps == 0.0 {
                0.0
            } else {
                1.0 / (eps as f64).sqrt()
            };
            for &v in &saved.invstd {
                assert!(
                    ((v as f64) - want).abs() <= 1e-5 * want.max(1.0),
                    "invstd {v} vs {want}"
                );
            }
            for (i, &y) in out.y.iter().enumerate() {
                assert_eq!(
                    y,
                    cpu.state.beta[shape.channel_of(i)],
                    "constant channel gives beta"
                );
            }
        }
    }
}

#[test]
fn a_channel_with_millions_of_elements() {
    let mut rng = rng("a_channel_with_millions_of_elements");
    for layout in LAYOUTS {
        let shape = Shape::new(&[8, 2, 512, 512], layout).unwrap(); // 2M per channel
        let config = BatchNormConfig::new(2);
        let (mut gpu, mut cpu) = layer_pair(&mut rng, &config);
        let x = normal(&mut rng, &shape, 5.0, 3.0);
        let e = check_train_eval(
            &mut gpu,
            &mut cpu,
            &shape,
            &[x],
            TOL,
            &format!("2M per channel {layout:?}"),
        );
        println!("{layout:?}: 2M elements per channel, largest error {e:.3e}");
    }
}

/// Thousands of channels, on either side of what the normalize reads through its
/// uniform window of coefficients (three segments of C rounded up to 4: up to 5460
/// channels): 4099 and 5460 through it, 5472 and 5467 from the storage binding
/// (16 channels per invocation and one). On the adapter's tuning and without the
/// one-dispatch forwards, so that every forward runs the normalize pass.
#[test]
fn thousands_of_channels() {
    let mut rng = rng("thousands_of_channels");
    let unfused = ctx().with_tuning(Tuning {
        fused_forward_max_elements: 0,
        fused_eval_max_elements: 0,
        ..ctx().tuning()
    });
    for (dims, layout) in [
        (&[64usize, 4099][..], Layout::ChannelsFirst),
        (&[4, 2048, 3, 3][..], Layout::ChannelsLast),
        (&[2, 3001, 2, 2][..], Layout::ChannelsFirst),
        (&[3, 5460, 2][..], Layout::ChannelsLast),
        (&[3, 5472][..], Layout::ChannelsLast),
        (&[2, 5467, 3][..], Layout::ChannelsLast),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        let config = BatchNormConfig::new(shape.c());
        for (tuning, ctx) in [("adapter", ctx()), ("unfused", &unfused)] {
            let (mut gpu, mut cpu) = layer_pair_on(ctx, &mut rng, &config);
            let x = normal(&mut rng, &shape, -1.0, 0.5);
            let e = check_train_eval(
                &mut gpu,
                &mut cpu,
                &shape,
                &[x],
                TOL,
                &format!("{dims:?} {layout:?} {tuning}"),
            );
            println!("{dims:?} {layout:?} {tuning}: largest error {e:.3e}");
        }
    }
}

#[test]
fn running_statistics_over_many_steps() {
    let mut rng = rng("running_statistics_over_many_steps");
    let shape = Shape::new(&[6, 7, 5, 3], Layout::ChannelsFirst).unwrap();
    for config in [
        BatchNormConfig::new(7),
        BatchNormConfig::new(7).momentum(None),
        BatchNormConfig::keras(7),
    ] {
        let (mut gpu, mut cpu) = layer_pair(&mut rng, &config);
        let xs: Vec<Vec<f32>> = (0..6)
            .map(|k| normal(&mut rng, &shape, k as f32 - 2.0, 1.0 + k as f32))
            .collect();
        check_train_eval(
            &mut gpu,
            &mut cpu,
            &shape,
            &xs,
            TOL,
            &format!("6 steps {}", describe(&config)),
        );
    }
}

#[test]
fn two_runs_give_identical_bits() {
    // Under every test tuning: the merges of partials (serial, and 32 lanes then a
    // tree on the GPU cut), the fused and finalized-in-place forwards.
    let mut rng = rng("two_runs_give_identical_bits");
    for ((dims, layout), (tuning, ctx)) in [
        (&[16usize, 32, 14, 14][..], Layout::ChannelsFirst),
        (&[16, 32, 14, 14][..], Layout::ChannelsLast),
        (&[1000, 7][..], Layout::ChannelsFirst),
    ]
    .into_iter()
    .flat_map(|case| tunings().into_iter().map(move |t| (case, t)))
    {
        let shape = Shape::new(dims, layout).unwrap();
        let x = normal(&mut rng, &shape, 1.0, 1.0);
        let run = || {
            let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(shape.c())).unwrap();
            let out = bn.forward_train_host(&shape, &x).unwrap();
            (out, bn.state().unwrap())
        };
        let (a, sa) = run();
        let (b, sb) = run();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&a.y),
            bits(&b.y),
            "{dims:?} {layout:?} ({tuning}): y differs between runs"
        );
        let (a, b) = (a.saved, b.saved);
        assert_eq!(bits(&a.mean), bits(&b.mean));
        assert_eq!(bits(&a.invstd), bits(&b.invstd));
        assert_eq!(bits(&sa.running_var), bits(&sb.running_var));
    }
}

#[test]
fn nan_and_inf_propagate_to_their_channel_only() {
    let shape = Shape::new(&[4, 3, 2, 2], Layout::ChannelsFirst).unwrap();
    let mut x: Vec<f32> = (0..shape.numel()).map(|i| (i % 5) as f32).collect();
    x[shape.index(2, 1, 3)] = f32::NAN;
    x[shape.index(1, 2, 0)] = f32::INFINITY;
    let mut bn = BatchNorm::new(ctx(), BatchNormConfig::new(3)).unwrap();
    let out = bn.forward_train_host(&shape, &x).unwrap();
    for (i, y) in out.y.iter().enumerate() {
        match shape.channel_of(i) {
            0 => assert!(y.is_finite(), "channel 0 stays finite"),
            _ => assert!(y.is_nan(), "channels with NaN/inf give NaN (as PyTorch)"),
        }
    }
}

#[test]
fn calls_recorded_into_one_encoder_keep_their_own_parameters() {
    // Two shapes and two layers in one command encoder, submitted once: each call's
    // parameters must be its own (uniforms are never rewritten in place).
    let mut rng = rng("calls_recorded_into_one_encoder_keep_their_own_parameters");
    let c = 6;
    let config = BatchNormConfig::new(c);
    let (mut gpu, mut cpu) = layer_pair(&mut rng, &config);
    let shapes = [
        Shape::new(&[4, c, 5, 5], Layout::ChannelsFirst).unwrap(),
        Shape::new(&[9, c], Layout::ChannelsLast).unwrap(),
        Shape::new(&[2, c, 8, 4], Layout::ChannelsLast).unwrap(),
    ];
    let ctx = ctx();
    let xs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| normal(&mut rng, s, 0.5, 1.5))
        .collect();
    let xb: Vec<_> = xs.iter().map(|x| ctx.upload("x", x).unwrap()).collect();
    let yb: Vec<_> = shapes
        .iter()
        .map(|s| ctx.storage_buffer("y", s.bytes()).unwrap())
        .collect();
    let saved: Vec<_> = shapes
        .iter()
        .map(|_| SavedStats::new(ctx, c).unwrap())
        .collect();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    for i in 0..shapes.len() {
        gpu.forward_train(&mut encoder, &shapes[i], &xb[i], &yb[i], &saved[i])
            .unwrap();
    }
    ctx.submit_and_wait(encoder).unwrap();
    for i in 0..shapes.len() {
        let r = cpu.forward_train(&shapes[i], &xs[i]).unwrap();
        let y: Vec<f32> = ctx.read_buffer(&yb[i], shapes[i].numel()).unwrap();
        assert_close(&format!("recorded call {i} y"), &y, &r.y, TOL);
        assert_close(
            &format!("recorded call {i} mean"),
            &saved[i].to_host(ctx).unwrap().mean,
            &r.mean,
            TOL,
        );
    }
    let state = gpu.state().unwrap();
    assert_eq!(state.num_batches_tracked, cpu.state.num_batches_tracked);
    assert_close(
        "running_var after 3 recorded steps",
        &state.running_var,
        &f64s(&cpu.state.running_var),
        TOL,
    );
}

#[test]
fn state_round_trips_through_the_gpu() {
    let mut rng = rng("state_round_trips_through_the_gpu");
    for config in configs(5) {
        let state = gpu_support::random_state(&mut rng, &config);
        let mut bn = BatchNorm::new(ctx(), config.clone()).unwrap();
        assert_eq!(
            bn.state().unwrap(),
            wgpu_batchnorm::BatchNormState::new(&config),
            "initial state"
        );
        bn.set_state(&state).unwrap();
        assert_eq!(bn.state().unwrap(), state, "{}", describe(&config));
    }
}

/// The GPU cut keeps whole channels in a workgroup where a channel is small and
/// the channels alone launch enough workgroups (ResNet-50's last stages): the
/// training forward is then one dispatch (fused), or two (statistics finalized in
/// place, then normalize) past its size limit, and matches the reference.
#[test]
fn the_gpu_cut_keeps_small_channels_whole() {
    let mut rng = rng("the_gpu_cut_keeps_small_channels_whole");
    let gpu = ctx().with_tuning(Tuning::gpu());
    let unfused = ctx().with_tuning(Tuning {
        fused_forward_max_elements: 0,
        ..Tuning::gpu()
    });
    for ((dims, tuning, dispatches), layout) in [
        (&[32usize, 2048, 7, 7][..], &gpu, 1),
        (&[32, 2048, 7, 7][..], &unfused, 2),
    ]
    .into_iter()
    .flat_map(|case| LAYOUTS.into_iter().map(move |l| (case, l)))
    {
        let shape = Shape::new(dims, layout).unwrap();
        let config = BatchNormConfig::new(shape.c());
        let (mut bn, mut cpu) = layer_pair_on(tuning, &mut rng, &config);
        let x = normal(&mut rng, &shape, 2.0, 0.5);
        let xb = tuning.upload("x", &x).unwrap();
        let y = tuning.storage_buffer("y", shape.bytes()).unwrap();
        let saved = SavedStats::new(tuning, shape.c()).unwrap();
        let plan = bn.plan_forward_train(&shape, &xb, &y, &saved).unwrap();
        assert_eq!(plan.len(), dispatches, "{dims:?}: {:?}", plan.dispatches());
        drop(plan);
        let e = check_train_eval(&mut bn, &mut cpu, &shape, &[x], TOL, &format!("{dims:?}"));
        println!("{dims:?}: largest error {e:.3e}");
    }
}

/// Under the GPU cut, a training forward whose statistics split takes two
/// dispatches: the statistics' partials, then the normalize that merges them (and
/// writes the saved and running statistics); channels-first, and channels-last in
/// the merged rows walks (vec4 and f32 units, channels past a tile's end, several
/// splits in both passes); it matches the reference, running statistics included,
/// over two steps.
#[test]
fn the_gpu_cut_merges_partials_in_the_normalize() {
    let mut rng = rng("the_gpu_cut_merges_partials_in_the_normalize");
    for (tuning, gpu, shape) in merged_cuts()
        .into_iter()
        .flat_map(|(t, g, shapes)| shapes.into_iter().map(move |s| (t, g.clone(), s)))
    {
        let dims = (tuning, shape.dims().to_vec());
        for config in [
            BatchNormConfig::new(shape.c()),
            BatchNormConfig::new(shape.c()).momentum(None),
            BatchNormConfig::keras(shape.c()).affine(false),
        ] {
            let (mut bn, mut cpu) = layer_pair_on(&gpu, &mut rng, &config);
            let xs = [
                normal(&mut rng, &shape, 3.0, 2.0),
                normal(&mut rng, &shape, -1.0, 0.5),
            ];
            let xb = gpu.upload("x", &xs[0]).unwrap();
            let y = gpu.storage_buffer("y", shape.bytes()).unwrap();
            let saved = SavedStats::new(&gpu, shape.c()).unwrap();
            let plan = bn.plan_forward_train(&shape, &xb, &y, &saved).unwrap();
            let info = plan.dispatches();
            // Several workgroups of a tile each merge its channels' partials.
            assert!(info.last().unwrap().bytes_reread > 0, "{dims:?}: {info:?}");
            let labels: Vec<String> = info.into_iter().map(|d| d.label).collect();
            assert_eq!(labels.len(), 2, "{dims:?}: {labels:?}");
            assert!(
                labels[1].starts_with("bn.apply.merged_"),
                "{dims:?}: {labels:?}"
            );
            drop(plan);
            let what = format!("{dims:?} {}", describe(&config));
            let e = check_train_eval(&mut bn, &mut cpu, &shape, &xs, TOL, &what);
            println!("{what}: largest error {e:.3e}");
        }
    }
}
