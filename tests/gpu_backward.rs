//! GPU backward (dx, dgamma, dbeta; batch and running statistics) against the f64
//! CPU reference, on fresh random inputs.

mod common;
mod gpu_support;

use common::{
    assert_close, assert_presence, assert_sums_close, dbeta_scale, dgamma_scale, dx_scale, normal,
    rng,
};
use gpu_support::{ctx, describe, layer_pair, layer_pair_on, merged_cuts, tunings, SPLIT_SHAPES};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, GpuContext, GradBuffers, GradMask, Layout, Shape, StatsSource,
};

const TOL: f64 = 1e-5;

/// As gpu_forward.rs' shapes, less three of them.
const SHAPES: &[&[usize]] = &[
    &[33, 17],
    &[5, 3, 11],
    &[1, 17, 9],
    &[4, 3, 7, 7],
    &[8, 16, 8, 8],
    &[3, 8, 5, 3],
    &[2, 17, 4, 4],
    &[2, 3, 3, 4, 5],
    &[3, 4, 2, 2, 2],
    &[6, 6, 2],
    &[3, 16, 5, 3],
    &[4, 16, 13],
];

const LAYOUTS: [Layout; 2] = [Layout::ChannelsFirst, Layout::ChannelsLast];

/// Runs one backward on both sides and compares every output asked for.
#[allow(clippy::too_many_arguments)]
fn check_backward(
    gpu: &mut BatchNorm,
    cpu: &ReferenceBatchNorm,
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
    source: StatsSource,
    mask: GradMask,
    what: &str,
) -> f64 {
    let saved = match source {
        StatsSource::Batch => Some(gpu.forward_train_host(shape, x).expect("forward").saved),
        StatsSource::Running => None,
    };
    let g = gpu
        .backward_host(shape, x, dy, saved.as_ref(), mask)
        .expect("backward");
    let r = cpu
        .backward(shape, x, dy, source, mask)
        .expect("reference backward");
    let stats = match source {
        StatsSource::Batch => cpu.forward_eval_batch(shape, x),
        StatsSource::Running => cpu.forward_eval(shape, x).expect("reference eval"),
    };
    let (sg, sb) = (
        dgamma_scale(shape, x, dy, &stats.mean, &stats.invstd),
        dbeta_scale(shape, dy),
    );
    let affine = gpu.config().affine;
    let mut worst = 0f64;
    assert_presence(what, &g, mask, affine);
    if let (Some(dx), Some(rdx)) = (&g.dx, &r.dx) {
        // With a large gamma * invstd (large mean with a tiny spread), dx is a small
        // difference of terms of size |gamma * invstd * dy|: rounding one input
        // (6e-8) already moves it by more than 1e-5 once that factor passes ~100.
        // There it is bounded relative to the size of its terms (the bound stated
        // for ill-conditioned data); elsewhere by the plain rule.
        let gamma = cpu.state.gamma.as_slice();
        let gain = |c: usize| (gamma.get(c).map_or(1.0, |&g| f64::from(g)) * stats.invstd[c]).abs();
        worst = worst.max(if (0..shape.c()).any(|c| gain(c) > 8.0) {
            let scale = dx_scale(
                shape,
                x,
                dy,
                gamma,
                &stats.mean,
                &stats.invstd,
                source == StatsSource::Batch,
            );
            assert_sums_close(&format!("{what} dx (x terms)"), dx, rdx, &scale, TOL)
        } else {
            assert_close(&format!("{what} dx"), dx, rdx, TOL)
        });
    }
    if let (Some(dg), Some(rdg)) = (&g.dgamma, &r.dgamma) {
        worst = worst.max(assert_sums_close(
            &format!("{what} dgamma"),
            dg,
            rdg,
            &sg,
            TOL,
        ));
    }
    if let (Some(db), Some(rdb)) = (&g.dbeta, &r.dbeta) {
        worst = worst.max(assert_sums_close(
            &format!("{what} dbeta"),
            db,
            rdb,
            &sb,
            TOL,
        ));
    }
    worst
}

/// Extension on the reference: batch statistics without touching its state.
trait BatchStats {
    fn forward_eval_batch(
        &self,
        shape: &Shape,
        x: &[f32],
    ) -> wgpu_batchnorm::cpu::reference::ReferenceForward;
}

impl BatchStats for ReferenceBatchNorm {
    fn forward_eval_batch(
        &self,
        shape: &Shape,
        x: &[f32],
    ) -> wgpu_batchnorm::cpu::reference::ReferenceForward {
        let mut copy = ReferenceBatchNorm::with_state(
            self.config.clone().track_running_stats(false),
            wgpu_batchnorm::BatchNormState {
                running_mean: vec![],
                running_var: vec![],
                num_batches_tracked: 0,
                ..self.state.clone()
            },
        )
        .expect("valid");
        copy.forward_train(shape, x).expect("reference")
    }
}

/// [`check_backward`] (every output) on a fresh layer pair (random state, on `ctx`)
/// with random x around `mean` and random dy.
fn check_random(
    ctx: &GpuContext,
    rng: &mut StdRng,
    shape: &Shape,
    config: &BatchNormConfig,
    mean: f32,
    source: StatsSource,
    what: &str,
) -> f64 {
    let (mut gpu, cpu) = layer_pair_on(ctx, rng, config);
    let x = normal(rng, shape, mean, 1.5);
    let dy = normal(rng, shape, 0.1, 1.0);
    check_backward(
        &mut gpu,
        &cpu,
        shape,
        &x,
        &dy,
        source,
        GradMask::default(),
        what,
    )
}

#[test]
fn backward_matches_reference_for_every_layout_and_option() {
    let mut rng = rng("backward_matches_reference_for_every_layout_and_option");
    let mut worst = 0f64;
    for dims in SHAPES {
        for layout in LAYOUTS {
            let shape = Shape::new(dims, layout).unwrap();
            let c = shape.c();
            for config in [
                BatchNormConfig::new(c),
                BatchNormConfig::new(c).affine(false),
                BatchNormConfig::new(c).track_running_stats(false),
                BatchNormConfig::keras(c),
            ] {
                let sources: &[StatsSource] = if config.track_running_stats {
                    &[StatsSource::Batch, StatsSource::Running]
                } else {
                    &[StatsSource::Batch]
                };
                for &source in sources {
                    let mean = rng.random_range(-2.0..2.0);
                    let what = format!("{dims:?} {layout:?} {} {source:?}", describe(&config));
                    worst = worst.max(check_random(
                        ctx(),
                        &mut rng,
                        &shape,
                        &config,
                        mean,
                        source,
                        &what,
                    ));
                }
            }
        }
    }
    println!("largest backward error against the reference: {worst:.3e}");
}

#[test]
fn every_tuning_matches_reference() {
    let mut rng = rng("backward every_tuning_matches_reference");
    let mut worst = 0f64;
    for (name, ctx) in tunings() {
        for dims in SPLIT_SHAPES.iter().chain(SHAPES) {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let config = BatchNormConfig::new(shape.c());
                for source in [StatsSource::Batch, StatsSource::Running] {
                    let what = format!("tuning {name} {dims:?} {layout:?} {source:?}");
                    worst = worst.max(check_random(
                        &ctx, &mut rng, &shape, &config, 0.5, source, &what,
                    ));
                }
            }
        }
    }
    println!("largest backward error against the reference over every tuning: {worst:.3e}");
}

#[test]
fn every_output_mask() {
    let mut rng = rng("every_output_mask");
    for layout in LAYOUTS {
        let shape = Shape::new(&[3, 5, 3, 3], layout).unwrap();
        for bits in 0..8u8 {
            let mask = GradMask {
                dx: bits & 1 != 0,
                dgamma: bits & 2 != 0,
                dbeta: bits & 4 != 0,
            };
            for source in [StatsSource::Batch, StatsSource::Running] {
                let (mut gpu, cpu) = layer_pair(&mut rng, &BatchNormConfig::new(5));
                let x = normal(&mut rng, &shape, 0.0, 1.0);
                let dy = normal(&mut rng, &shape, 0.0, 1.0);
                check_backward(
                    &mut gpu,
                    &cpu,
                    &shape,
                    &x,
                    &dy,
                    source,
                    mask,
                    &format!("{layout:?} {mask:?} {source:?}"),
                );
            }
        }
    }
}

#[test]
fn large_mean_large_channel_and_many_channels() {
    let mut rng = rng("large_mean_large_channel_and_many_channels");
    let mut worst_large_mean = 0f64;
    for (dims, layout, large_mean) in [
        (&[16usize, 8, 12, 12][..], Layout::ChannelsFirst, true),
        (&[16, 8, 12, 12][..], Layout::ChannelsLast, true),
        (&[300, 5][..], Layout::ChannelsFirst, true),
        (&[5, 8, 7, 7][..], Layout::ChannelsFirst, true),
        (&[8, 2, 512, 512][..], Layout::ChannelsFirst, false),
        (&[8, 2, 256, 256][..], Layout::ChannelsLast, false),
        (&[64, 4099][..], Layout::ChannelsFirst, false),
        (&[4, 2048, 3, 3][..], Layout::ChannelsLast, false),
        // dx's coefficients (four segments) fill its uniform window at 4096 channels;
        // past it (4099 above) they are read from the storage binding.
        (&[3, 4096, 2][..], Layout::ChannelsLast, false),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        let x = if large_mean {
            common::large_mean(&mut rng, &shape)
        } else {
            normal(&mut rng, &shape, 2.0, 3.0)
        };
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        for source in [StatsSource::Batch, StatsSource::Running] {
            // A fresh pair: the batch case's training forward moves the running stats.
            let (mut gpu, cpu) = layer_pair(&mut rng, &BatchNormConfig::new(shape.c()));
            let e = check_backward(
                &mut gpu,
                &cpu,
                &shape,
                &x,
                &dy,
                source,
                GradMask::default(),
                &format!("{dims:?} {layout:?} {source:?}"),
            );
            if large_mean && source == StatsSource::Batch {
                worst_large_mean = worst_large_mean.max(e);
            }
            println!("{dims:?} {layout:?} {source:?}: largest error {e:.3e}");
        }
    }
    println!(
        "large-mean inputs, training backward: largest error {worst_large_mean:.3e} \
         (dx relative to its terms; bound asserted {TOL:e})"
    );
}

#[test]
fn gradients_accumulate_when_asked() {
    let mut rng = rng("gradients_accumulate_when_asked");
    let ctx = ctx();
    let shape = Shape::new(&[4, 6, 5, 5], Layout::ChannelsLast).unwrap();
    let (mut gpu, cpu) = layer_pair(&mut rng, &BatchNormConfig::new(6));
    let x = normal(&mut rng, &shape, 1.0, 2.0);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    let out = gpu.forward_train_host(&shape, &x).unwrap();
    let saved = wgpu_batchnorm::SavedStats::from_host(ctx, &out.saved).unwrap();
    let prior_g: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let prior_b: Vec<f32> = (0..6).map(|i| 2.0 - i as f32).collect();
    let (xb, dyb) = (ctx.upload("x", &x).unwrap(), ctx.upload("dy", &dy).unwrap());
    let r = cpu
        .backward(&shape, &x, &dy, StatsSource::Batch, GradMask::default())
        .unwrap();
    for accumulate in [false, true] {
        let (dg, db) = (
            ctx.upload("dgamma", &prior_g).unwrap(),
            ctx.upload("dbeta", &prior_b).unwrap(),
        );
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let grads = GradBuffers {
            dx: None,
            dgamma: Some((&dg).into()),
            dbeta: Some((&db).into()),
            accumulate,
            ..Default::default()
        };
        gpu.backward(&mut enc, &shape, &xb, &dyb, Some(&saved), grads)
            .unwrap();
        ctx.submit_and_wait(enc).unwrap();
        let got_g: Vec<f32> = ctx.read_buffer(&dg, 6).unwrap();
        let got_b: Vec<f32> = ctx.read_buffer(&db, 6).unwrap();
        let base = |p: &[f32], i: usize| if accumulate { p[i] as f64 } else { 0.0 };
        let want_g: Vec<f64> = (0..6)
            .map(|i| r.dgamma.as_ref().unwrap()[i] + base(&prior_g, i))
            .collect();
        let want_b: Vec<f64> = (0..6)
            .map(|i| r.dbeta.as_ref().unwrap()[i] + base(&prior_b, i))
            .collect();
        assert_close(
            &format!("dgamma accumulate={accumulate}"),
            &got_g,
            &want_g,
            1e-4,
        );
        assert_close(
            &format!("dbeta accumulate={accumulate}"),
            &got_b,
            &want_b,
            1e-4,
        );
    }
}

#[test]
fn backward_is_deterministic() {
    // Under every test tuning: the serial and the 32-lane merges, the fused backward.
    let mut rng = rng("backward_is_deterministic");
    for (layout, (tuning, ctx)) in LAYOUTS
        .into_iter()
        .flat_map(|l| tunings().into_iter().map(move |t| (l, t)))
    {
        let shape = Shape::new(&[16, 32, 14, 14], layout).unwrap();
        let x = normal(&mut rng, &shape, 1.0, 1.0);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let run = || {
            let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(32)).unwrap();
            let saved = Some(bn.forward_train_host(&shape, &x).unwrap().saved);
            bn.backward_host(&shape, &x, &dy, saved.as_ref(), GradMask::default())
                .unwrap()
        };
        let (a, b) = (run(), run());
        let bits = |v: &Option<Vec<f32>>| {
            v.as_ref()
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&a.dx), bits(&b.dx), "{layout:?} ({tuning}) dx");
        assert_eq!(
            bits(&a.dgamma),
            bits(&b.dgamma),
            "{layout:?} ({tuning}) dgamma"
        );
        assert_eq!(
            bits(&a.dbeta),
            bits(&b.dbeta),
            "{layout:?} ({tuning}) dbeta"
        );
    }
}

/// Under the GPU cut, ResNet-50's last stages (small channels, many of them) keep
/// whole channels per workgroup (channels-last in tiles of 8 channels), and the
/// backward of batch statistics is one fused dispatch (sums, dgamma/dbeta, dx),
/// which matches the reference; with dx not asked for it is the usual sums and
/// finalize.
#[test]
fn the_fused_backward_under_the_gpu_cut() {
    let mut rng = rng("the_fused_backward_under_the_gpu_cut");
    let gpu = ctx().with_tuning(wgpu_batchnorm::Tuning::gpu());
    for layout in LAYOUTS {
        let shape = Shape::new(&[32, 2048, 7, 7], layout).unwrap();
        let config = BatchNormConfig::new(shape.c());
        let (mut bn, cpu) = layer_pair_on(&gpu, &mut rng, &config);
        let x = normal(&mut rng, &shape, 1.0, 2.0);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let (xb, dyb) = (gpu.upload("x", &x).unwrap(), gpu.upload("dy", &dy).unwrap());
        let out = |len: usize| gpu.storage_buffer("out", 4 * len as u64).unwrap();
        let (y, dx, dg, db) = (out(shape.numel()), out(shape.numel()), out(2048), out(2048));
        let saved = wgpu_batchnorm::SavedStats::new(&gpu, shape.c()).unwrap();
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        bn.forward_train(&mut enc, &shape, &xb, &y, &saved).unwrap();
        gpu.submit_and_wait(enc).unwrap();
        let all = GradBuffers::new().dx(&dx).dgamma(&dg).dbeta(&db);
        let plan = bn
            .plan_backward(&shape, &xb, &dyb, Some(&saved), all)
            .unwrap();
        assert_eq!(plan.len(), 1, "{:?}", plan.dispatches());
        drop(plan);
        let sums_only = GradBuffers::new().dgamma(&dg).dbeta(&db);
        let plan = bn
            .plan_backward(&shape, &xb, &dyb, Some(&saved), sums_only)
            .unwrap();
        assert_eq!(plan.len(), 2, "{:?}", plan.dispatches());
        drop(plan);
        let e = check_backward(
            &mut bn,
            &cpu,
            &shape,
            &x,
            &dy,
            StatsSource::Batch,
            GradMask::default(),
            &format!("gpu cut, fused, {layout:?}"),
        );
        println!("32x2048x7x7 {layout:?} fused backward: largest error {e:.3e}");
    }
}

/// Under the GPU cut, a backward of batch statistics whose sums split takes two
/// dispatches: the sums' partials, then dx merging them (and writing
/// dgamma/dbeta), channels-first and in the channels-last merged rows walks; it
/// matches the reference for every output mask.
#[test]
fn the_gpu_cut_merges_partials_in_the_dx_pass() {
    let mut rng = rng("the_gpu_cut_merges_partials_in_the_dx_pass");
    for (tuning, gpu, shape) in merged_cuts()
        .into_iter()
        .flat_map(|(t, g, shapes)| shapes.into_iter().map(move |s| (t, g.clone(), s)))
    {
        let dims = (tuning, shape.dims().to_vec());
        let config = BatchNormConfig::new(shape.c());
        let x = normal(&mut rng, &shape, 2.0, 1.5);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let (xb, dyb) = (gpu.upload("x", &x).unwrap(), gpu.upload("dy", &dy).unwrap());
        let dx = gpu.storage_buffer("dx", shape.bytes()).unwrap();
        let (mut bn, cpu) = layer_pair_on(&gpu, &mut rng, &config);
        let saved = wgpu_batchnorm::SavedStats::from_host(
            &gpu,
            &bn.forward_train_host(&shape, &x).unwrap().saved,
        )
        .unwrap();
        let plan = bn
            .plan_backward(&shape, &xb, &dyb, Some(&saved), GradBuffers::new().dx(&dx))
            .unwrap();
        let info = plan.dispatches();
        // Several workgroups of a tile each merge its channels' partials.
        assert!(info.last().unwrap().bytes_reread > 0, "{dims:?}: {info:?}");
        let labels: Vec<String> = info.into_iter().map(|d| d.label).collect();
        assert_eq!(labels.len(), 2, "{dims:?}: {labels:?}");
        assert!(
            labels[1].starts_with("bn.backward_dx.merged_"),
            "{dims:?}: {labels:?}"
        );
        drop(plan);
        for mask in common::all_masks() {
            let e = check_backward(
                &mut bn,
                &cpu,
                &shape,
                &x,
                &dy,
                StatsSource::Batch,
                mask,
                &format!("{dims:?} {mask:?}"),
            );
            println!("{dims:?} {mask:?}: largest error {e:.3e}");
        }
    }
}
