//! Plans (`BatchNorm::plan_*`): what an operation dispatches and binds, recorded
//! whole or one dispatch per compute pass with the same bits, and nothing run until
//! recorded and submitted; and the line that names the adapter they run on.

mod common;
mod gpu_support;

use common::{normal, rng};
use gpu_support::{random_state, tunings};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, GpuContext, GradBuffers, Layout, Plan, SavedStats, Shape,
};

/// Runs the forward-train, eval and backward plans of `bn` on `x`/`dy`, each
/// recorded by `record`, and returns y (train), y (eval), dx, dgamma, dbeta.
fn run(
    ctx: &GpuContext,
    bn: &mut BatchNorm,
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
    record: impl Fn(&Plan<'_>, &mut wgpu::CommandEncoder),
) -> Vec<Vec<f32>> {
    let (n, c) = (shape.numel(), shape.c());
    let xb = ctx.upload("x", x).unwrap();
    let dyb = ctx.upload("dy", dy).unwrap();
    let buffer = |len: usize| ctx.storage_buffer("out", 4 * len as u64).unwrap();
    let (y, y_eval, dx, dg, db) = (buffer(n), buffer(n), buffer(n), buffer(c), buffer(c));
    let saved = SavedStats::new(ctx, c).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    record(
        &bn.plan_forward_train(shape, &xb, &y, &saved).unwrap(),
        &mut enc,
    );
    let grads = GradBuffers::new().dx(&dx).dgamma(&dg).dbeta(&db);
    record(
        &bn.plan_backward(shape, &xb, &dyb, Some(&saved), grads)
            .unwrap(),
        &mut enc,
    );
    record(
        &bn.plan_forward_eval(shape, &xb, &y_eval, None).unwrap(),
        &mut enc,
    );
    ctx.submit_and_wait(enc).unwrap();
    let read = |b: &wgpu::Buffer, len| ctx.read_buffer::<f32>(b, len).unwrap();
    vec![
        read(&y, n),
        read(&y_eval, n),
        read(&dx, n),
        read(&dg, c),
        read(&db, c),
    ]
}

#[test]
fn dispatch_by_dispatch_gives_the_same_bits_as_whole_plans() {
    let mut rng = rng("dispatch_by_dispatch_gives_the_same_bits_as_whole_plans");
    for (tuning, ctx) in tunings() {
        for (dims, layout) in [
            (&[4, 6, 5, 5][..], Layout::ChannelsFirst),
            (&[16, 8, 30, 30][..], Layout::ChannelsLast),
            (&[300, 32][..], Layout::ChannelsLast),
        ] {
            let shape = Shape::new(dims, layout).unwrap();
            let config = BatchNormConfig::new(shape.c());
            let state = random_state(&mut rng, &config);
            let x = normal(&mut rng, &shape, 1.0, 2.0);
            let dy = normal(&mut rng, &shape, 0.0, 1.0);
            let layer = || BatchNorm::with_state(&ctx, config.clone(), &state).unwrap();
            let whole = run(&ctx, &mut layer(), &shape, &x, &dy, |plan, enc| {
                plan.record_into(enc)
            });
            let split = run(&ctx, &mut layer(), &shape, &x, &dy, |plan, enc| {
                for i in 0..plan.len() {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    plan.record_dispatch(i, &mut pass);
                }
            });
            let bits = |v: &[Vec<f32>]| {
                v.iter()
                    .map(|o| o.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&whole), bits(&split), "{tuning}: {dims:?} {layout:?}");
        }
    }
}

#[test]
fn plans_say_what_they_dispatch_and_run_nothing_until_recorded() {
    let ctx = gpu_support::ctx();
    let shape = Shape::channels_first(&[8, 16, 12, 12]).unwrap();
    let (n, c) = (shape.numel(), shape.c());
    let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(c)).unwrap();
    let before = bn.state().unwrap();
    let x = ctx.upload("x", &vec![1.5f32; n]).unwrap();
    let y = ctx.storage_buffer("y", shape.bytes()).unwrap();
    let saved = SavedStats::new(ctx, c).unwrap();
    let tensor = shape.bytes();

    let plan = bn.plan_forward_train(&shape, &x, &y, &saved).unwrap();
    let info = plan.dispatches();
    assert_eq!(info.len(), plan.len());
    assert!((1..=3).contains(&plan.len()), "{info:?}");
    assert!(
        info.iter()
            .all(|d| d.label.starts_with("bn.") && d.workgroups > 0),
        "{info:?}"
    );
    // x read at least once, y written once.
    assert!(
        info.iter().map(|d| d.bytes_read).sum::<u64>() >= tensor,
        "{info:?}"
    );
    assert!(
        info.iter().map(|d| d.bytes_written).sum::<u64>() >= tensor,
        "{info:?}"
    );
    drop(plan);
    // Planned, never recorded: nothing changed.
    assert_eq!(bn.state().unwrap(), before);

    // A backward asked for nothing dispatches nothing (statistics taken as written:
    // the forward above was planned, never recorded).
    saved.mark_filled();
    let plan = bn
        .plan_backward(&shape, &x, &x, Some(&saved), GradBuffers::new())
        .unwrap();
    assert!(plan.is_empty());
    // Eval with the running statistics: the normalize (after a fold of the running
    // statistics into coefficients, for larger tensors) reads x and writes y.
    let plan = bn.plan_forward_eval(&shape, &x, &y, None).unwrap();
    let info = plan.dispatches();
    assert!((1..=2).contains(&info.len()), "{info:?}");
    let last = info.last().unwrap();
    assert!(
        last.bytes_read >= tensor && last.bytes_written >= tensor,
        "{info:?}"
    );
}

#[test]
fn the_adapter_line_names_api_type_and_driver() {
    let line = gpu_support::ctx().describe();
    assert!(!line.contains("  "), "{line}");
    assert!(
        ["Vulkan", "Metal", "DirectX 12", "OpenGL", "WebGPU"]
            .iter()
            .any(|api| line.contains(&format!(" on {api}, "))),
        "{line}"
    );
    assert!(line.contains(", driver "), "{line}");
}

/// A context started from another's pipeline cache (Vulkan; none elsewhere) builds
/// the same pipelines and gives the same bits.
#[test]
fn pipeline_cache_data_starts_another_context() {
    let mut rng = rng("pipeline_cache_data_starts_another_context");
    let shape = Shape::new(&[6, 5, 7, 3], Layout::ChannelsLast).unwrap();
    let config = BatchNormConfig::new(5);
    let state = random_state(&mut rng, &config);
    let x = normal(&mut rng, &shape, 1.0, 2.0);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    let first = gpu_support::ctx().clone();
    let mut bn = BatchNorm::with_state(&first, config.clone(), &state).unwrap();
    let record = |plan: &Plan<'_>, enc: &mut wgpu::CommandEncoder| plan.record_into(enc);
    let want = run(&first, &mut bn, &shape, &x, &dy, record);
    let has_cache = first
        .device()
        .features()
        .contains(wgpu::Features::PIPELINE_CACHE);
    let data = first.pipeline_cache_data();
    assert_eq!(data.is_some(), has_cache, "{}", first.describe());
    println!(
        "pipeline cache: {}",
        data.as_ref()
            .map_or("none on this device".into(), |d| format!(
                "{} bytes",
                d.len()
            ))
    );
    // SAFETY: the data is what pipeline_cache_data returned.
    let second = unsafe { GpuContext::from_env_with_pipeline_cache(data.as_deref()) }.unwrap();
    let mut again = BatchNorm::with_state(&second, config, &state).unwrap();
    assert_eq!(run(&second, &mut again, &shape, &x, &dy, record), want);
}

/// A layer keeps no bind groups unless asked; asked, it records later steps on the
/// same buffers with the bind groups of the first (none made), with the same bits;
/// new buffers get their own, the cache stays within its capacity, and clearing it
/// changes no result.
#[test]
fn a_layer_reuses_bind_groups_on_the_same_buffers() {
    let mut rng = rng("a_layer_reuses_bind_groups_on_the_same_buffers");
    for (tuning, ctx) in tunings() {
        let shape = Shape::channels_last(&[6, 20, 9, 7]).unwrap();
        let (n, c) = (shape.numel(), shape.c());
        let config = BatchNormConfig::new(c);
        let mut bn =
            BatchNorm::with_state(&ctx, config.clone(), &random_state(&mut rng, &config)).unwrap();
        let xb = ctx
            .upload("x", &normal(&mut rng, &shape, 1.0, 2.0))
            .unwrap();
        let dyb = ctx
            .upload("dy", &normal(&mut rng, &shape, 0.0, 1.0))
            .unwrap();
        let buffer = |len: usize| ctx.storage_buffer("out", 4 * len as u64).unwrap();
        let (y, dx, dg, db) = (buffer(n), buffer(n), buffer(c), buffer(c));
        let saved = SavedStats::new(&ctx, c).unwrap();
        let step = |bn: &mut BatchNorm| {
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            bn.forward_train(&mut enc, &shape, &xb, &y, &saved).unwrap();
            let grads = GradBuffers::new().dx(&dx).dgamma(&dg).dbeta(&db);
            bn.backward(&mut enc, &shape, &xb, &dyb, Some(&saved), grads)
                .unwrap();
            ctx.submit_and_wait(enc).unwrap();
            [(&y, n), (&dx, n), (&dg, c), (&db, c)]
                .map(|(b, len)| ctx.read_buffer::<f32>(b, len).unwrap())
                .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        let first = step(&mut bn);
        assert_eq!(
            bn.cached_bind_groups(),
            0,
            "{tuning}: kept without being asked"
        );
        bn.keep_bind_groups(16);
        assert_eq!(step(&mut bn), first, "{tuning}: first kept step");
        let made = bn.cached_bind_groups();
        assert!(made >= 2, "{tuning}: {made} bind groups");
        assert_eq!(step(&mut bn), first, "{tuning}: second step");
        assert_eq!(
            bn.cached_bind_groups(),
            made,
            "{tuning}: second step made some"
        );
        bn.clear_bind_groups();
        assert_eq!(bn.cached_bind_groups(), 0);
        assert_eq!(step(&mut bn), first, "{tuning}: after clearing");
        assert_eq!(bn.cached_bind_groups(), made, "{tuning}: after clearing");
        // Each new output buffer, a bind group more, up to the bound (16).
        let mut most = made;
        for _ in 0..40 {
            let other = buffer(n);
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            bn.forward_eval(&mut enc, &shape, &xb, &other, None)
                .unwrap();
            ctx.submit_and_wait(enc).unwrap();
            most = most.max(bn.cached_bind_groups());
            assert!(bn.cached_bind_groups() <= 16, "{tuning}");
        }
        assert!(most > made, "{tuning}: {most} bind groups");
    }
}

/// `Tuning::merge_partials` off: a training forward and a backward whose
/// reductions split take three dispatches (a finalize between) instead of two, and
/// give the same results within float rounding (the merges differ in order).
#[test]
fn merge_partials_off_takes_a_finalize_dispatch() {
    let mut rng = rng("merge_partials_off_takes_a_finalize_dispatch");
    let merged = gpu_support::ctx().with_tuning(wgpu_batchnorm::Tuning::gpu());
    let separate = gpu_support::ctx().with_tuning(wgpu_batchnorm::Tuning {
        merge_partials: false,
        ..wgpu_batchnorm::Tuning::gpu()
    });
    for shape in gpu_support::merged_shapes() {
        let c = shape.c();
        let config = BatchNormConfig::new(c);
        let state = random_state(&mut rng, &config);
        let x = normal(&mut rng, &shape, 1.0, 2.0);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let mut outputs = Vec::new();
        for (ctx, dispatches) in [(&merged, 2), (&separate, 3)] {
            let mut bn = BatchNorm::with_state(ctx, config.clone(), &state).unwrap();
            let (xb, y) = (
                ctx.upload("x", &x).unwrap(),
                ctx.storage_buffer("y", shape.bytes()).unwrap(),
            );
            let saved = SavedStats::new(ctx, c).unwrap();
            let plan = bn.plan_forward_train(&shape, &xb, &y, &saved).unwrap();
            assert_eq!(plan.len(), dispatches, "{shape:?}: {:?}", plan.dispatches());
            drop(plan);
            saved.mark_filled();
            let plan = bn
                .plan_backward(&shape, &xb, &xb, Some(&saved), GradBuffers::new().dx(&y))
                .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
            assert_eq!(plan.len(), dispatches, "{shape:?}: {:?}", plan.dispatches());
            drop(plan);
            outputs.push(run(ctx, &mut bn, &shape, &x, &dy, |plan, enc| {
                plan.record_into(enc)
            }));
        }
        for (name, (a, b)) in ["y", "y eval", "dx", "dgamma", "dbeta"]
            .iter()
            .zip(outputs[0].iter().zip(&outputs[1]))
        {
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                let tol = 1e-5
                    * (1.0 + p.abs().max(q.abs()))
                    * if name.starts_with('d') { 10.0 } else { 1.0 };
                assert!(
                    (p - q).abs() <= tol,
                    "{shape:?} {name}[{i}]: {p} against {q}"
                );
            }
        }
    }
}

/// Under `Tuning::gpu()` every op of the report's default table (batch 32) plans
/// at most two dispatches for a training forward or a backward (one where a
/// workgroup holds whole channels) and one for eval, binding and re-reading at
/// most 1.1 times its floor bytes (forward-train 3E, eval 2E, backward 5E).
/// Planned only: nothing runs.
#[test]
fn the_gpu_cut_plans_the_default_table_within_its_floor() {
    let gpu = gpu_support::ctx().with_tuning(wgpu_batchnorm::Tuning::gpu());
    let mut table: Vec<Vec<usize>> = vec![vec![256, 1024], vec![4096, 256]];
    for (c, hw) in [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)] {
        table.push(vec![32, c, hw, hw]);
    }
    table.push(vec![8, 16, 8, 8]);
    table.push(vec![2, 32, 16, 32, 32]);
    for dims in &table {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = Shape::new(dims, layout).unwrap();
            let (c, e) = (shape.c(), shape.bytes());
            let mut bn = BatchNorm::new(&gpu, BatchNormConfig::new(c)).unwrap();
            let tensor = || gpu.storage_buffer("t", e).unwrap();
            let (x, y, dy, dx) = (tensor(), tensor(), tensor(), tensor());
            let per_channel = || gpu.storage_buffer("c", 4 * c as u64).unwrap();
            let (dg, db) = (per_channel(), per_channel());
            let saved = SavedStats::new(&gpu, c).unwrap();
            saved.mark_filled();
            let moved = |info: &[wgpu_batchnorm::DispatchInfo]| {
                info.iter()
                    .map(|d| d.bytes_read + d.bytes_written + d.bytes_reread)
                    .sum::<u64>()
            };
            let check = |op: &str, info: Vec<wgpu_batchnorm::DispatchInfo>, most, floor| {
                assert!(info.len() <= most, "{dims:?} {layout:?} {op}: {info:?}");
                let over = moved(&info) as f64 / (floor * e) as f64;
                assert!(
                    over <= 1.1,
                    "{dims:?} {layout:?} {op}: {over:.3} of the floor, {info:?}"
                );
            };
            let info = bn
                .plan_forward_train(&shape, &x, &y, &saved)
                .unwrap()
                .dispatches();
            check("forward-train", info, 2, 3);
            let info = bn
                .plan_forward_eval(&shape, &x, &y, None)
                .unwrap()
                .dispatches();
            check("eval", info, 1, 2);
            let grads = GradBuffers::new().dx(&dx).dgamma(&dg).dbeta(&db);
            let info = bn
                .plan_backward(&shape, &x, &dy, Some(&saved), grads)
                .unwrap()
                .dispatches();
            check("backward", info, 2, 5);
        }
    }
}
