//! The async host calls against the f64 CPU reference: forward train and eval,
//! backward (batch and running statistics), both layouts, odd shapes, on fresh
//! random inputs at the tolerances of gpu_forward.rs and gpu_backward.rs.
//!
//! In a browser (`cargo test --target wasm32-unknown-unknown --test web`, run by
//! `wasm-bindgen-test-runner` in headless Chromium with WebGPU) these are the GPU
//! tests; natively the same futures run under `pollster`. Without an adapter they
//! fail, saying how to get one: they never skip.

mod common;

use common::{assert_close, assert_sums_close, dbeta_scale, dgamma_scale, dx_scale, normal};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    Activation, BatchNorm, BatchNormConfig, BatchNormState, Error, GpuContext, GradMask, Layout,
    Shape, StatsSource,
};

#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

/// One test: `async fn` under `wasm_bindgen_test` in the browser, a plain test
/// driving the same future with `pollster` natively.
macro_rules! web_test {
    ($(#[$doc:meta])* async fn $name:ident() $body:block) => {
        $(#[$doc])*
        #[cfg(target_arch = "wasm32")]
        #[wasm_bindgen_test::wasm_bindgen_test]
        async fn $name() $body

        $(#[$doc])*
        #[cfg(not(target_arch = "wasm32"))]
        #[test]
        fn $name() {
            pollster::block_on(async $body)
        }
    };
}

/// Prints to the test output (the browser's console is captured by the runner).
macro_rules! log {
    ($($t:tt)*) => {{
        #[cfg(target_arch = "wasm32")]
        wasm_bindgen_test::console_log!($($t)*);
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!($($t)*);
    }};
}

const TOL: f64 = 1e-5;

/// Odd and even sizes for every rank (a subset of gpu_forward.rs' shapes).
const SHAPES: &[&[usize]] = &[
    &[33, 17],
    &[5, 3, 11],
    &[1, 17, 9],
    &[4, 3, 7, 7],
    &[2, 17, 4, 4],
    &[3, 4, 2, 2, 2],
];

const LAYOUTS: [Layout; 2] = [Layout::ChannelsFirst, Layout::ChannelsLast];

/// A context on the default adapter (WebGPU in a browser), named in the output.
async fn ctx() -> GpuContext {
    let ctx = GpuContext::from_env_async()
        .await
        .unwrap_or_else(|e| match e {
            Error::NoAdapter { .. } if cfg!(target_arch = "wasm32") => panic!(
                "the browser tests need WebGPU, and this browser offered no adapter: {e} \
             (Chromium: --enable-unsafe-webgpu, see webdriver.json)"
            ),
            Error::NoAdapter { .. } => panic!("GPU tests need an adapter: {e}"),
            e => panic!("GPU context could not be set up on this adapter: {e}"),
        });
    log!(
        "GPU tests run on: {} ({:?})",
        ctx.describe(),
        ctx.adapter_info()
    );
    ctx
}

/// A generator seeded from the clock, the seed printed.
fn rng(test_name: &str) -> StdRng {
    #[cfg(target_arch = "wasm32")]
    let seed = js_sys::Date::now() as u64;
    #[cfg(not(target_arch = "wasm32"))]
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    log!("{test_name}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// The same random, valid state on the GPU and in the reference.
fn layer_pair(
    ctx: &GpuContext,
    rng: &mut StdRng,
    config: &BatchNormConfig,
) -> (BatchNorm, ReferenceBatchNorm) {
    let mut s = BatchNormState::new(config);
    s.gamma
        .iter_mut()
        .for_each(|g| *g = rng.random_range(0.5..1.5));
    s.beta
        .iter_mut()
        .for_each(|b| *b = rng.random_range(-1.0..1.0));
    s.running_mean
        .iter_mut()
        .for_each(|m| *m = rng.random_range(-0.5..0.5));
    s.running_var
        .iter_mut()
        .for_each(|v| *v = rng.random_range(0.5..2.0));
    if config.track_running_stats {
        s.num_batches_tracked = rng.random_range(0..5);
    }
    let gpu = BatchNorm::with_state(ctx, config.clone(), &s).expect("valid layer");
    let cpu = ReferenceBatchNorm::with_state(config.clone(), s).expect("valid layer");
    (gpu, cpu)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

web_test! {
    /// Two training steps (y, saved statistics, running statistics) and an eval.
    async fn forward_train_and_eval_match_reference() {
        let ctx = ctx().await;
        let mut rng = rng("forward_train_and_eval_match_reference");
        let mut worst = 0f64;
        for dims in SHAPES {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let c = shape.c();
                for config in [
                    BatchNormConfig::new(c),
                    BatchNormConfig::new(c).track_running_stats(false),
                    BatchNormConfig::keras(c),
                ] {
                    let what = format!("{dims:?} {layout:?} {config:?}");
                    let (mut gpu, mut cpu) = layer_pair(&ctx, &mut rng, &config);
                    let mean = rng.random_range(-2.0..2.0);
                    for step in 0..2 {
                        let x = normal(&mut rng, &shape, mean, 1.5);
                        let name = format!("{what} step {step}");
                        let out = gpu.forward_train_host_async(&shape, &x).await.expect("forward_train");
                        let r = cpu.forward_train(&shape, &x).expect("reference");
                        worst = worst.max(assert_close(&format!("{name} y"), &out.y, &r.y, TOL));
                        worst = worst.max(assert_close(&format!("{name} mean"), &out.saved.mean, &r.mean, TOL));
                        worst = worst.max(assert_close(&format!("{name} invstd"), &out.saved.invstd, &r.invstd, TOL));
                        let state = gpu.state_async().await.expect("state");
                        let want = &cpu.state;
                        worst = worst.max(assert_close(
                            &format!("{name} running_mean"),
                            &state.running_mean,
                            &f64s(&want.running_mean),
                            TOL,
                        ));
                        worst = worst.max(assert_close(
                            &format!("{name} running_var"),
                            &state.running_var,
                            &f64s(&want.running_var),
                            TOL,
                        ));
                        assert_eq!(state.num_batches_tracked, want.num_batches_tracked, "{name}");
                        assert_eq!(state.gamma, want.gamma, "{name}: training must not change gamma");
                    }
                    let x = normal(&mut rng, &shape, mean, 1.5);
                    let out = gpu.forward_eval_host_async(&shape, &x).await.expect("forward_eval");
                    let r = cpu.forward_eval(&shape, &x).expect("reference eval");
                    worst = worst.max(assert_close(&format!("{what} eval y"), &out.y, &r.y, TOL));
                    assert_eq!(out.saved.is_some(), !config.track_running_stats, "{what}");
                }
            }
        }
        log!("forward: worst error {worst:.2e} (tolerance {TOL:.0e})");
    }
}

web_test! {
    /// dx, dgamma, dbeta with the batch statistics of a training forward and with
    /// the running statistics.
    async fn backward_matches_reference() {
        let ctx = ctx().await;
        let mut rng = rng("backward_matches_reference");
        let mut worst = 0f64;
        for dims in SHAPES {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let c = shape.c();
                for config in [BatchNormConfig::new(c), BatchNormConfig::keras(c).affine(false)] {
                    for source in [StatsSource::Batch, StatsSource::Running] {
                        let what = format!("{dims:?} {layout:?} {config:?} {source:?}");
                        let (mut gpu, cpu) = layer_pair(&ctx, &mut rng, &config);
                        let mean = rng.random_range(-2.0..2.0);
                        let x = normal(&mut rng, &shape, mean, 1.5);
                        let dy = normal(&mut rng, &shape, 0.1, 1.0);
                        let saved = match source {
                            StatsSource::Batch => Some(
                                gpu.forward_train_host_async(&shape, &x).await.expect("forward").saved,
                            ),
                            StatsSource::Running => None,
                        };
                        let g = gpu
                            .backward_host_async(&shape, &x, &dy, saved.as_ref(), GradMask::default())
                            .await
                            .expect("backward");
                        // The statistics the backward uses: of the batch (computed
                        // on a copy, the reference's state untouched) or running.
                        let stats = match source {
                            StatsSource::Batch => {
                                let state = BatchNormState {
                                    running_mean: vec![],
                                    running_var: vec![],
                                    num_batches_tracked: 0,
                                    ..cpu.state.clone()
                                };
                                let mut copy = ReferenceBatchNorm::with_state(
                                    config.clone().track_running_stats(false),
                                    state,
                                )
                                .expect("valid");
                                copy.forward_train(&shape, &x).expect("reference")
                            }
                            StatsSource::Running => cpu.forward_eval(&shape, &x).expect("reference"),
                        };
                        let r = cpu
                            .backward(&shape, &x, &dy, source, GradMask::default())
                            .expect("reference backward");
                        let gamma = cpu.state.gamma.as_slice();
                        let dx = g.dx.as_deref().expect("dx");
                        let scale = dx_scale(
                            &shape,
                            &x,
                            &dy,
                            gamma,
                            &stats.mean,
                            &stats.invstd,
                            source == StatsSource::Batch,
                        );
                        let gain = |c: usize| {
                            (gamma.get(c).map_or(1.0, |&g| f64::from(g)) * stats.invstd[c]).abs()
                        };
                        worst = worst.max(if (0..c).any(|c| gain(c) > 8.0) {
                            assert_sums_close(&format!("{what} dx"), dx, r.dx.as_deref().unwrap(), &scale, TOL)
                        } else {
                            assert_close(&format!("{what} dx"), dx, r.dx.as_deref().unwrap(), TOL)
                        });
                        assert_eq!(g.dgamma.is_some(), config.affine, "{what}: dgamma presence");
                        if let (Some(dg), Some(rdg)) = (&g.dgamma, &r.dgamma) {
                            let sg = dgamma_scale(&shape, &x, &dy, &stats.mean, &stats.invstd);
                            worst = worst.max(assert_sums_close(&format!("{what} dgamma"), dg, rdg, &sg, TOL));
                        }
                        if let (Some(db), Some(rdb)) = (&g.dbeta, &r.dbeta) {
                            let sb = dbeta_scale(&shape, &dy);
                            worst = worst.max(assert_sums_close(&format!("{what} dbeta"), db, rdb, &sb, TOL));
                        }
                    }
                }
            }
        }
        log!("backward: worst error {worst:.2e} (tolerance {TOL:.0e})");
    }
}

web_test! {
    /// Bad calls are typed errors before anything runs, as natively; a layer
    /// without affine has no gamma and beta to read.
    async fn errors_are_typed() {
        let ctx = ctx().await;
        let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3).affine(false)).expect("layer");
        let shape = Shape::channels_last(&[2, 4, 5]).unwrap();
        let x = vec![0.5f32; shape.numel()];
        match bn.forward_train_host_async(&shape, &x).await {
            Err(Error::ChannelMismatch { .. }) => {}
            other => panic!("expected ChannelMismatch, got {other:?}"),
        }
        match bn.affine_async().await {
            Err(Error::MissingState(_)) => {}
            other => panic!("expected MissingState, got {other:?}"),
        }
        // The context is still usable: nothing was deferred.
        let shape = Shape::channels_first(&[2, 3, 5]).unwrap();
        let x: Vec<f32> = (0..shape.numel()).map(|i| i as f32).collect();
        bn.forward_eval_host_async(&shape, &x).await.expect("eval after errors");
        ctx.check_device().expect("no error kept for later");
    }
}

web_test! {
    /// The fused activation and residual: `y = act(bn(x) + z)` in training, and its
    /// backward from the forward's own `y` (dx, dgamma, dbeta, dz).
    async fn fused_activation_and_residual_match_reference() {
        let ctx = ctx().await;
        let mut rng = rng("fused_activation_and_residual_match_reference");
        let mut worst = 0f64;
        for dims in &SHAPES[..4] {
            for layout in LAYOUTS {
                let shape = Shape::new(dims, layout).unwrap();
                let c = shape.c();
                for (activation, residual) in [(Activation::Relu, true), (Activation::Relu6, false)] {
                    let config = BatchNormConfig::new(c).activation(activation);
                    let what = format!("{dims:?} {layout:?} {activation:?} residual={residual}");
                    let (mut gpu, mut cpu) = layer_pair(&ctx, &mut rng, &config);
                    let mean = rng.random_range(-2.0..2.0);
                    let x = normal(&mut rng, &shape, mean, 1.5);
                    let z = normal(&mut rng, &shape, 0.0, 1.0);
                    let dy = normal(&mut rng, &shape, 0.1, 1.0);
                    let (out, r) = if residual {
                        (
                            gpu.forward_train_add_host_async(&shape, &x, &z).await.expect("forward_train_add"),
                            cpu.forward_train_add(&shape, &x, &z).expect("reference"),
                        )
                    } else {
                        (
                            gpu.forward_train_host_async(&shape, &x).await.expect("forward_train"),
                            cpu.forward_train(&shape, &x).expect("reference"),
                        )
                    };
                    worst = worst.max(assert_close(&format!("{what} y"), &out.y, &r.y, TOL));
                    let g = gpu
                        .backward_fused_host_async(&shape, &x, Some(&out.y), &dy, Some(&out.saved), GradMask::default(), residual)
                        .await
                        .expect("backward_fused");
                    let rg = cpu
                        .backward_fused(&shape, &x, &out.y, &dy, StatsSource::Batch, GradMask::default(), residual)
                        .expect("reference backward");
                    // The gradient that reaches the batch norm: dy where the
                    // activation passed it (decided by the same y on both sides).
                    let passed: Vec<f32> = out
                        .y
                        .iter()
                        .zip(&dy)
                        .map(|(&y, &d)| match activation {
                            Activation::Relu6 if y > 0.0 && y < 6.0 => d,
                            Activation::Relu if y > 0.0 => d,
                            _ => 0.0,
                        })
                        .collect();
                    let gamma = cpu.state.gamma.as_slice();
                    let sx = dx_scale(&shape, &x, &passed, gamma, &r.mean, &r.invstd, true);
                    worst = worst.max(assert_sums_close(
                        &format!("{what} dx"),
                        g.dx.as_deref().expect("dx"),
                        rg.dx.as_deref().expect("reference dx"),
                        &sx,
                        TOL,
                    ));
                    let sg = dgamma_scale(&shape, &x, &passed, &r.mean, &r.invstd);
                    worst = worst.max(assert_sums_close(
                        &format!("{what} dgamma"),
                        g.dgamma.as_deref().expect("dgamma"),
                        rg.dgamma.as_deref().expect("reference dgamma"),
                        &sg,
                        TOL,
                    ));
                    let sb = dbeta_scale(&shape, &passed);
                    worst = worst.max(assert_sums_close(
                        &format!("{what} dbeta"),
                        g.dbeta.as_deref().expect("dbeta"),
                        rg.dbeta.as_deref().expect("reference dbeta"),
                        &sb,
                        TOL,
                    ));
                    assert_eq!(g.dz.is_some(), residual, "{what}: dz presence");
                    if let (Some(dz), Some(rdz)) = (&g.dz, &rg.dz) {
                        worst = worst.max(assert_close(&format!("{what} dz"), dz, rdz, TOL));
                    }
                }
            }
        }
        log!("fused: worst error {worst:.2e} (tolerance {TOL:.0e})");
    }
}

web_test! {
    /// An error wgpu raises inside a synchronous call (a write into a destroyed
    /// buffer): returned by the call natively; on the web the call cannot wait for
    /// it, and the next call that checks the device returns it, once.
    async fn gpu_errors_of_synchronous_calls() {
        let ctx = ctx().await;
        let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3)).expect("layer");
        bn.affine_buffer().destroy();
        let written = bn.set_affine(&[1.0; 3], &[0.0; 3]);
        let empty = || ctx.device().create_command_encoder(&Default::default());
        #[cfg(not(target_arch = "wasm32"))]
        let error = written.expect_err("a write into a destroyed buffer");
        #[cfg(target_arch = "wasm32")]
        let error = {
            assert!(written.is_ok(), "on the web the write cannot wait: {written:?}");
            let mut error = None;
            for _ in 0..50 {
                if let Err(e) = ctx.submit_async(empty()).await {
                    error = Some(e);
                    break;
                }
            }
            error.expect("the write's error, returned by a later call")
        };
        assert!(
            matches!(error, Error::Gpu { context: "writing a buffer", .. }),
            "{error:?}"
        );
        ctx.submit_async(empty()).await.expect("the error is returned once");
    }
}
