//! Bad input is a typed error before anything is dispatched, and a failed call
//! leaves parameters, running statistics and outputs as they were.

mod common;
mod gpu_support;

use gpu_support::ctx;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, BatchNormState, Error, GpuContext, GradBuffers, GradMask, Layout,
    SavedStats, Shape,
};

const SENTINEL: f32 = -123.5;

struct Fixture {
    bn: BatchNorm,
    shape: Shape,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    saved: SavedStats,
    before: BatchNormState,
}

fn fixture(config: BatchNormConfig) -> Fixture {
    let ctx = ctx();
    let c = config.num_features;
    let shape = Shape::new(&[4, c, 3, 3], Layout::ChannelsFirst).unwrap();
    let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 11) as f32).collect();
    let mut bn = BatchNorm::new(ctx, config).unwrap();
    // One real step so that the state is not the initial one, and the saved
    // statistics are filled.
    let xb = ctx.upload("x", &x).unwrap();
    let saved = SavedStats::new(ctx, c).unwrap();
    let scratch_y = ctx.storage_buffer("y0", shape.bytes()).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    bn.forward_train(&mut enc, &shape, &xb, &scratch_y, &saved)
        .unwrap();
    ctx.submit_and_wait(enc).unwrap();
    let before = bn.state().unwrap();
    Fixture {
        x: xb,
        y: ctx.upload("y", &vec![SENTINEL; shape.numel()]).unwrap(),
        saved,
        bn,
        shape,
        before,
    }
}

impl Fixture {
    /// Submits whatever was recorded, then checks nothing changed.
    fn assert_untouched(&self, encoder: wgpu::CommandEncoder, what: &str) {
        let ctx = ctx();
        ctx.submit_and_wait(encoder).unwrap();
        assert_eq!(
            self.bn.state().unwrap(),
            self.before,
            "{what}: state changed"
        );
        let y: Vec<f32> = ctx.read_buffer(&self.y, self.shape.numel()).unwrap();
        assert!(y.iter().all(|&v| v == SENTINEL), "{what}: output written");
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        ctx().device().create_command_encoder(&Default::default())
    }

    /// Records a backward of x into a new dx buffer with `saved`; returns the
    /// encoder (to check that nothing changed) and the result.
    fn backward_dx(&mut self, saved: &SavedStats) -> (wgpu::CommandEncoder, Result<(), Error>) {
        let dx = ctx().storage_buffer("dx", self.shape.bytes()).unwrap();
        let mut enc = self.encoder();
        let grads = GradBuffers::new().dx(&dx);
        let r = self
            .bn
            .backward(&mut enc, &self.shape, &self.x, &self.x, Some(saved), grads);
        (enc, r)
    }
}

#[test]
fn channel_count_must_match_the_layer() {
    let mut f = fixture(BatchNormConfig::new(3));
    let wrong = Shape::new(&[4, 4, 3, 3], Layout::ChannelsFirst).unwrap();
    let mut enc = f.encoder();
    let e =
        f.bn.forward_train(&mut enc, &wrong, &f.x, &f.y, &f.saved)
            .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ChannelMismatch {
                expected: 3,
                got: 4
            }
        ),
        "{e}"
    );
    let e =
        f.bn.forward_eval(&mut enc, &wrong, &f.x, &f.y, None)
            .unwrap_err();
    assert!(matches!(e, Error::ChannelMismatch { .. }), "{e}");
    let wrong_saved = SavedStats::new(ctx(), 5).unwrap();
    let e =
        f.bn.forward_train(&mut enc, &f.shape, &f.x, &f.y, &wrong_saved)
            .unwrap_err();
    assert!(
        matches!(
            e,
            Error::SavedStatsMismatch {
                expected: 3,
                got: 5
            }
        ),
        "{e}"
    );
    f.assert_untouched(enc, "channel mismatch");
    // An eval forward with running statistics ignores `saved`, whatever its size.
    let y = ctx().storage_buffer("y", f.shape.bytes()).unwrap();
    let mut enc = f.encoder();
    f.bn.forward_eval(&mut enc, &f.shape, &f.x, &y, Some(&wrong_saved))
        .unwrap();
}

#[test]
fn buffers_too_small_or_without_storage_usage() {
    let mut f = fixture(BatchNormConfig::new(3));
    let ctx = ctx();
    let small = ctx.storage_buffer("small", f.shape.bytes() - 4).unwrap();
    let mut enc = f.encoder();
    let e =
        f.bn.forward_train(&mut enc, &f.shape, &small, &f.y, &f.saved)
            .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { name: "x", .. }), "{e}");
    let e =
        f.bn.forward_train(&mut enc, &f.shape, &f.x, &small, &f.saved)
            .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { name: "y", .. }), "{e}");
    let no_storage = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("no storage"),
        size: f.shape.bytes(),
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    let e =
        f.bn.forward_train(&mut enc, &f.shape, &f.x, &no_storage, &f.saved)
            .unwrap_err();
    assert!(matches!(e, Error::BufferUsage { name: "y", .. }), "{e}");
    let e =
        f.bn.forward_eval(&mut enc, &f.shape, &no_storage, &f.y, None)
            .unwrap_err();
    assert!(matches!(e, Error::BufferUsage { name: "x", .. }), "{e}");
    let dx_small = ctx.storage_buffer("dx", 8).unwrap();
    let grads = GradBuffers {
        dx: Some((&dx_small).into()),
        ..Default::default()
    };
    let e =
        f.bn.backward(&mut enc, &f.shape, &f.x, &f.x, Some(&f.saved), grads)
            .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { name: "dx", .. }), "{e}");
    f.assert_untouched(enc, "small/unusable buffers");
}

#[test]
fn the_same_buffer_for_input_and_output_is_refused() {
    let mut f = fixture(BatchNormConfig::new(3));
    let mut enc = f.encoder();
    let e =
        f.bn.forward_train(&mut enc, &f.shape, &f.y, &f.y, &f.saved)
            .unwrap_err();
    assert!(matches!(e, Error::AliasedBuffers { .. }), "{e}");
    // The saved statistics are written in the same dispatch that reads x.
    let small = Shape::new(&[2, 3], Layout::ChannelsLast).unwrap();
    let e =
        f.bn.forward_train(&mut enc, &small, f.saved.buffer(), &f.y, &f.saved)
            .unwrap_err();
    assert!(
        matches!(e, Error::AliasedBuffers { a: "x", b: "saved" }),
        "{e}"
    );
    // dgamma and dbeta in one buffer; dgamma written over the saved statistics
    // the same pass reads.
    let dg = ctx().storage_buffer("dg", 12).unwrap();
    for (dgamma, dbeta, pair) in [
        (&dg, Some(&dg), ("dgamma", "dbeta")),
        (f.saved.buffer(), None, ("saved", "dgamma")),
    ] {
        let grads = GradBuffers {
            dgamma: Some(dgamma.into()),
            dbeta: dbeta.map(Into::into),
            ..Default::default()
        };
        let e =
            f.bn.backward(&mut enc, &f.shape, &f.x, &f.x, Some(&f.saved), grads)
                .unwrap_err();
        assert!(
            matches!(e, Error::AliasedBuffers { a, b } if (a, b) == pair),
            "{e}"
        );
    }
    f.assert_untouched(enc, "aliasing");
}

#[test]
fn one_value_per_channel_cannot_train() {
    let mut f = fixture(BatchNormConfig::new(3));
    let mut enc = f.encoder();
    for dims in [&[1usize, 3][..], &[1, 3, 1, 1][..], &[1, 3, 1]] {
        let shape = Shape::new(dims, Layout::ChannelsLast).unwrap();
        let e =
            f.bn.forward_train(&mut enc, &shape, &f.x, &f.y, &f.saved)
                .unwrap_err();
        assert!(matches!(e, Error::SingleValuePerChannel { .. }), "{e}");
        assert!(e
            .to_string()
            .contains("expected more than 1 value per channel when training"));
        // Eval with running statistics is fine with one value per channel.
        f.bn.forward_eval(&mut f.encoder(), &shape, &f.x, &f.y, None)
            .unwrap();
    }
    let mut no_track = fixture(BatchNormConfig::new(3).track_running_stats(false));
    let one = Shape::new(&[1, 3], Layout::ChannelsFirst).unwrap();
    let e = no_track
        .bn
        .forward_eval_host(&one, &[1.0, 2.0, 3.0])
        .unwrap_err();
    assert!(matches!(e, Error::SingleValuePerChannel { .. }), "{e}");
    f.assert_untouched(enc, "m == 1");
}

#[test]
fn zero_sized_dims_and_bad_ranks() {
    assert!(matches!(
        Shape::new(&[0, 3], Layout::ChannelsFirst),
        Err(Error::ZeroDim { dim: 0, .. })
    ));
    assert!(matches!(
        Shape::new(&[2, 3, 0, 4], Layout::ChannelsLast),
        Err(Error::ZeroDim { dim: 2, .. })
    ));
    assert!(matches!(
        Shape::new(&[5], Layout::ChannelsFirst),
        Err(Error::BadRank(1))
    ));
    assert!(matches!(
        Shape::new(&[1, 2, 3, 4, 5, 6], Layout::ChannelsFirst),
        Err(Error::BadRank(6))
    ));
    assert!(matches!(
        Shape::new(&[1 << 16, 1 << 16, 2], Layout::ChannelsFirst),
        Err(Error::TooManyElements { .. })
    ));
}

#[test]
fn bad_options_are_refused() {
    let ctx = ctx();
    for (config, what) in [
        (BatchNormConfig::new(3).eps(f32::NAN), "eps NaN"),
        (BatchNormConfig::new(3).eps(-1e-5), "eps < 0"),
        (BatchNormConfig::new(3).eps(f32::INFINITY), "eps inf"),
        (BatchNormConfig::new(3).momentum(Some(1.5)), "momentum > 1"),
        (BatchNormConfig::new(3).momentum(Some(-0.1)), "momentum < 0"),
        (
            BatchNormConfig::new(3).momentum(Some(f32::NAN)),
            "momentum NaN",
        ),
        (BatchNormConfig::new(0), "no features"),
    ] {
        let e = BatchNorm::new(ctx, config)
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert!(
            matches!(
                e,
                Error::BadEps(_) | Error::BadMomentum(_) | Error::ZeroFeatures
            ),
            "{what}: {e}"
        );
    }
    let config = BatchNormConfig::new(3);
    let mut bad = BatchNormState::new(&config);
    bad.gamma.pop();
    assert!(matches!(
        BatchNorm::with_state(ctx, config.clone(), &bad),
        Err(Error::LengthMismatch { name: "gamma", .. })
    ));
    let mut f = fixture(config);
    assert!(f.bn.set_state(&bad).is_err());
    f.assert_untouched(f.encoder(), "bad state");
}

#[test]
fn tensors_larger_than_a_binding_are_refused() {
    let mut f = fixture(BatchNormConfig::new(3));
    let huge = Shape::new(&[1 << 30, 3], Layout::ChannelsLast).unwrap();
    assert!(huge.bytes() > ctx().max_binding_size());
    let mut enc = f.encoder();
    let e =
        f.bn.forward_train(&mut enc, &huge, &f.x, &f.y, &f.saved)
            .unwrap_err();
    assert!(
        matches!(e, Error::TooLargeForDevice { name: "x", .. }),
        "{e}"
    );
    f.assert_untouched(enc, "too large");
}

#[test]
fn backward_needs_saved_statistics_and_matching_shapes() {
    let mut no_track = fixture(BatchNormConfig::new(3).track_running_stats(false));
    let dx = ctx().storage_buffer("dx", no_track.shape.bytes()).unwrap();
    let grads = GradBuffers {
        dx: Some((&dx).into()),
        ..Default::default()
    };
    let mut enc = no_track.encoder();
    let e = no_track
        .bn
        .backward(
            &mut enc,
            &no_track.shape,
            &no_track.x,
            &no_track.x,
            None,
            grads,
        )
        .unwrap_err();
    assert!(matches!(e, Error::MissingSavedStats(_)), "{e}");
    no_track.assert_untouched(enc, "backward without saved");

    let mut not_affine = fixture(BatchNormConfig::new(3).affine(false));
    let dg = ctx().storage_buffer("dg", 12).unwrap();
    let grads = GradBuffers {
        dgamma: Some((&dg).into()),
        ..Default::default()
    };
    let mut enc = not_affine.encoder();
    let e = not_affine
        .bn
        .backward(
            &mut enc,
            &not_affine.shape,
            &not_affine.x,
            &not_affine.x,
            None,
            grads,
        )
        .unwrap_err();
    assert!(matches!(e, Error::MissingState(_)), "{e}");
    not_affine.assert_untouched(enc, "dgamma without affine");

    let mut f = fixture(BatchNormConfig::new(3));
    let shape = f.shape.clone();
    let x = vec![0.0; shape.numel()];
    let e =
        f.bn.backward_host(&shape, &x, &x[1..], None, GradMask::default())
            .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { name: "dy", .. }), "{e}");
    let saved4 = wgpu_batchnorm::SavedStatsHost {
        mean: vec![0.0; 4],
        invstd: vec![1.0; 4],
        mean_lo: vec![0.0; 4],
    };
    let e =
        f.bn.backward_host(&shape, &x, &x, Some(&saved4), GradMask::default())
            .unwrap_err();
    assert!(matches!(e, Error::SavedStatsMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("saved statistics hold 4 channels"),
        "{e}"
    );
    let e = f.bn.forward_train_host(&shape, &x[..5]).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { name: "x", .. }), "{e}");
    f.assert_untouched(f.encoder(), "host length errors");
}

#[test]
fn adapter_name_that_matches_nothing_is_an_error() {
    // Safe to set here: this binary's other tests already hold their context.
    let _ = ctx();
    std::env::set_var("WGPU_ADAPTER_NAME", "no adapter is called this");
    let e = wgpu_batchnorm::GpuContext::from_env()
        .err()
        .expect("no such adapter");
    std::env::remove_var("WGPU_ADAPTER_NAME");
    assert!(matches!(e, Error::AdapterNotFound { .. }), "{e}");
}

/// A change to a device's limits.
type LimitChange = fn(&mut wgpu::Limits);

/// A device on the tests' adapter (chosen as `GpuContext::from_env` chooses it)
/// with the adapter's limits changed by `change`.
fn device_with(change: LimitChange) -> (wgpu::Device, wgpu::Queue) {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let wanted = ctx().adapter_info().name.clone();
    let adapter = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .find(|a| a.get_info().name == wanted)
        .expect("the tests' adapter");
    let mut limits = adapter.limits();
    change(&mut limits);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with lower limits");
    (device, queue)
}

#[test]
fn devices_short_of_what_the_kernels_need_are_refused() {
    let cases: [(&str, LimitChange); 2] = [
        ("max_compute_workgroups_per_dimension", |l| {
            l.max_compute_workgroups_per_dimension = 256
        }),
        ("max_compute_workgroup_storage_size", |l| {
            l.max_compute_workgroup_storage_size = 8 << 10
        }),
    ];
    for (limit, change) in cases {
        let (device, queue) = device_with(change);
        match GpuContext::from_device(device, queue) {
            Err(Error::DeviceLimit { name, .. }) => assert_eq!(name, limit),
            Err(e) => panic!("{limit}: {e}"),
            Ok(_) => panic!("{limit}: accepted"),
        }
    }
}

/// WebGPU's downlevel limits (4 storage buffers per stage, 16 KiB uniform bindings):
/// the context is made, eval forwards run (through the normalize that folds the
/// running statistics itself, which binds 4 storage buffers; the uniform window of
/// the coefficients shrinks to 16 KiB), and what needs more storage buffers
/// (statistics, backward) is a typed error that changes nothing.
#[test]
fn downlevel_devices_run_what_fits_and_refuse_the_rest() {
    let (device, queue) = device_with(|l| *l = wgpu::Limits::downlevel_defaults());
    let small = GpuContext::from_device(device, queue).unwrap();
    assert_eq!(
        small.device().limits().max_storage_buffers_per_shader_stage,
        4
    );
    // 3 to 2000 channels (the uniform window holds the coefficients of up to 1365);
    // the largest tensor is past the adapter tuning's one-dispatch eval, so the
    // normalize that folds the running statistics is chosen for the device's limits.
    for (c, dims) in [
        (3, [5usize, 3, 3]),
        (1000, [5, 1000, 3]),
        (2000, [5, 2000, 3]),
        (8, [4, 8, 140_000]),
    ] {
        let config = BatchNormConfig::new(c);
        let mut state = BatchNormState::new(&config);
        for (i, (m, v)) in state
            .running_mean
            .iter_mut()
            .zip(&mut state.running_var)
            .enumerate()
        {
            *m = (i % 7) as f32 * 0.25;
            *v = 0.5 + (i % 5) as f32;
        }
        let mut bn = BatchNorm::with_state(&small, config.clone(), &state).unwrap();
        let reference =
            wgpu_batchnorm::cpu::reference::ReferenceBatchNorm::with_state(config, state.clone())
                .unwrap();
        let shape = Shape::channels_last(&dims).unwrap();
        let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 13) as f32 - 6.0).collect();
        let y = bn.forward_eval_host(&shape, &x).unwrap().y;
        let want = reference.forward_eval(&shape, &x).unwrap().y;
        for (g, r) in y.iter().zip(&want) {
            assert!(
                (f64::from(*g) - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "C = {c}: {g} vs {r}"
            );
        }
        let e = bn.forward_train_host(&shape, &x).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DeviceLimit {
                    name: "max_storage_buffers_per_shader_stage",
                    actual: 4,
                    ..
                }
            ),
            "C = {c}: {e}"
        );
        let e = bn
            .backward_host(&shape, &x, &x, None, GradMask::default())
            .unwrap_err();
        assert!(matches!(e, Error::DeviceLimit { .. }), "C = {c}: {e}");
        assert_eq!(
            bn.state().unwrap(),
            state,
            "C = {c}: a refused call changed the state"
        );
    }
}

#[test]
fn buffers_past_the_device_limits_are_refused_before_they_are_made() {
    let (device, queue) = device_with(|l| {
        l.max_storage_buffer_binding_size = 1 << 20;
        l.max_buffer_size = 1 << 20;
    });
    let small = GpuContext::from_device(device, queue).unwrap();
    assert_eq!(small.max_binding_size(), 1 << 20);
    // 70000 channels need 1.12 MB of per-channel state.
    let e = BatchNorm::new(&small, BatchNormConfig::new(70_000))
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Error::TooLargeForDevice {
                name: "per-channel state",
                ..
            }
        ),
        "{e}"
    );
    let e = SavedStats::new(&small, 70_000).err().unwrap();
    assert!(matches!(e, Error::TooLargeForDevice { .. }), "{e}");

    // The host path checks a 2 MiB tensor before uploading it.
    let mut bn = BatchNorm::new(&small, BatchNormConfig::new(4)).unwrap();
    let before = bn.state().unwrap();
    let big = Shape::channels_first(&[128, 4, 32, 32]).unwrap();
    let x = vec![0.5; big.numel()];
    for (what, r) in [
        ("train", bn.forward_train_host(&big, &x).err()),
        ("eval", bn.forward_eval_host(&big, &x).err()),
        (
            "backward",
            bn.backward_host(&big, &x, &x, None, GradMask::default())
                .err(),
        ),
    ] {
        assert!(
            matches!(r, Some(Error::TooLargeForDevice { name: "x", .. })),
            "{what}: {r:?}"
        );
    }
    assert_eq!(bn.state().unwrap(), before);
    // What fits runs.
    let fits = Shape::channels_first(&[8, 4, 8, 8]).unwrap();
    bn.forward_train_host(&fits, &x[..fits.numel()]).unwrap();
}

#[test]
fn read_buffer_checks_its_arguments() {
    let ctx = ctx();
    let no_copy = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let e = ctx.read_buffer::<f32>(&no_copy, 4).unwrap_err();
    assert!(matches!(e, Error::BufferUsage { .. }), "{e}");
    let b = ctx.upload("b", &[1.5f32; 16]).unwrap();
    let e = ctx.read_buffer::<f32>(&b, 17).unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { .. }), "{e}");
    // Part of a 4-byte word (e.g. an odd number of f16) reads the whole word and
    // keeps what was asked.
    let bytes = 1.5f32.to_le_bytes();
    assert_eq!(ctx.read_buffer::<u8>(&b, 3).unwrap(), bytes[..3].to_vec());
    assert_eq!(ctx.read_buffer::<f32>(&b, 16).unwrap(), vec![1.5; 16]);
}

#[test]
fn the_batch_counter_holds_32_bits_and_stops_at_its_top() {
    let config = BatchNormConfig::new(3).momentum(None);
    let mut state = BatchNormState::new(&config);
    state.num_batches_tracked = 1 << 32;
    let e = BatchNorm::with_state(ctx(), config.clone(), &state)
        .err()
        .unwrap();
    assert!(matches!(e, Error::BatchCountTooLarge(_)), "{e}");
    // At the top, a cumulative average goes on with the count held there.
    state.num_batches_tracked = u32::MAX.into();
    let mut bn = BatchNorm::with_state(ctx(), config, &state).unwrap();
    let shape = Shape::channels_first(&[4, 3, 5]).unwrap();
    let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32).collect();
    bn.forward_train_host(&shape, &x).unwrap();
    let after = bn.state().unwrap();
    assert_eq!(after.num_batches_tracked, u64::from(u32::MAX));
    assert!(after
        .running_mean
        .iter()
        .chain(&after.running_var)
        .all(|v| v.is_finite()));
    let mut too_many = after.clone();
    too_many.num_batches_tracked = u64::MAX;
    assert!(matches!(
        bn.set_state(&too_many),
        Err(Error::BatchCountTooLarge(_))
    ));
    assert_eq!(bn.state().unwrap(), after);
}

#[test]
fn the_layers_own_buffers_are_refused_as_tensors() {
    let mut f = fixture(BatchNormConfig::new(3));
    // Small enough to fit in the layer's buffers, so that only aliasing is wrong.
    let tiny = Shape::new(&[2, 3], Layout::ChannelsLast).unwrap();
    let mut enc = f.encoder();
    let affine = f.bn.affine_buffer().clone();
    let running = f.bn.running_buffer().clone();
    let e =
        f.bn.forward_train(&mut enc, &tiny, &f.x, &affine, &f.saved)
            .unwrap_err();
    assert!(
        matches!(e, Error::AliasedBuffers { a: "y", b } if b.contains("affine_buffer")),
        "{e}"
    );
    let e =
        f.bn.forward_eval(&mut enc, &tiny, &running, &f.y, None)
            .unwrap_err();
    assert!(
        matches!(e, Error::AliasedBuffers { a: "x", b } if b.contains("running")),
        "{e}"
    );
    let grads = GradBuffers::new().dx(&running);
    let e =
        f.bn.backward(&mut enc, &tiny, &f.x, &f.x, Some(&f.saved), grads)
            .unwrap_err();
    assert!(
        matches!(e, Error::AliasedBuffers { a: "dx", b } if b.contains("running")),
        "{e}"
    );
    let grads = GradBuffers::new().dgamma(&affine);
    let e =
        f.bn.backward(&mut enc, &tiny, &f.x, &f.x, None, grads)
            .unwrap_err();
    assert!(
        matches!(e, Error::AliasedBuffers { a: "dgamma", .. }),
        "{e}"
    );
    f.assert_untouched(enc, "the layer's own buffers as tensors");
}

#[test]
fn backward_refuses_saved_statistics_never_written() {
    let mut f = fixture(BatchNormConfig::new(3));
    let ctx = ctx();
    let fresh = SavedStats::new(ctx, 3).unwrap();
    assert!(!fresh.is_filled());
    let (enc, e) = f.backward_dx(&fresh);
    let e = e.unwrap_err();
    assert!(matches!(e, Error::MissingSavedStats(_)), "{e}");
    assert!(e.to_string().contains("never written"), "{e}");
    f.assert_untouched(enc, "unwritten saved statistics");
    // A training forward recorded into them fills them; so does an upload.
    let y = ctx.storage_buffer("y", f.shape.bytes()).unwrap();
    let mut enc = f.encoder();
    f.bn.forward_train(&mut enc, &f.shape, &f.x, &y, &fresh)
        .unwrap();
    ctx.submit_and_wait(enc).unwrap();
    assert!(fresh.is_filled());
    let (enc, r) = f.backward_dx(&fresh);
    r.unwrap();
    ctx.submit_and_wait(enc).unwrap();
    let host = fresh.to_host(ctx).unwrap();
    assert!(SavedStats::from_host(ctx, &host).unwrap().is_filled());
}

#[test]
fn buffers_larger_than_the_device_allows_are_errors_not_panics() {
    let ctx = ctx();
    let e = ctx.storage_buffer("huge", 1 << 40).unwrap_err();
    assert!(matches!(e, Error::TooLargeForDevice { .. }), "{e}");
    let e = ctx.upload("huge", &[0u8; 0]).map(|_| ());
    assert!(e.is_ok(), "an empty upload is a 4-byte buffer: {e:?}");
}

#[test]
fn a_lost_device_gives_typed_errors() {
    // A device of its own: the other tests share theirs.
    let ctx = GpuContext::from_env().unwrap();
    let shape = Shape::channels_first(&[4, 3, 5]).unwrap();
    let x: Vec<f32> = (0..shape.numel()).map(|i| (i % 7) as f32).collect();
    let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3)).unwrap();
    let out = bn.forward_train_host(&shape, &x).unwrap();
    let xb = ctx.upload("x", &x).unwrap();
    let yb = ctx.storage_buffer("y", shape.bytes()).unwrap();
    let saved = SavedStats::new(&ctx, 3).unwrap();
    ctx.device().destroy();
    let lost = |what: &str, r: Result<(), Error>| {
        assert!(matches!(r, Err(Error::DeviceLost(_))), "{what}: {r:?}");
    };
    lost(
        "forward_train_host",
        bn.forward_train_host(&shape, &x).map(|_| ()),
    );
    lost(
        "forward_eval_host",
        bn.forward_eval_host(&shape, &x).map(|_| ()),
    );
    lost(
        "backward_host",
        bn.backward_host(&shape, &x, &x, Some(&out.saved), GradMask::default())
            .map(|_| ()),
    );
    lost("state", bn.state().map(|_| ()));
    lost("set_state", bn.set_state(&BatchNormState::new(bn.config())));
    lost(
        "BatchNorm::new",
        BatchNorm::new(&ctx, BatchNormConfig::new(3)).map(|_| ()),
    );
    lost("storage_buffer", ctx.storage_buffer("b", 64).map(|_| ()));
    lost("upload", ctx.upload("b", &x).map(|_| ()));
    lost("SavedStats::new", SavedStats::new(&ctx, 3).map(|_| ()));
    lost("read_buffer", ctx.read_buffer::<f32>(&xb, 4).map(|_| ()));
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    lost(
        "forward_train",
        bn.forward_train(&mut enc, &shape, &xb, &yb, &saved),
    );
    lost("submit_and_wait", ctx.submit_and_wait(enc));
}

#[test]
fn a_plan_never_recorded_fills_no_saved_statistics() {
    let mut f = fixture(BatchNormConfig::new(3));
    let ctx = ctx();
    let fresh = SavedStats::new(ctx, 3).unwrap();
    let y = ctx.storage_buffer("y", f.shape.bytes()).unwrap();
    let plan = f.bn.plan_forward_train(&f.shape, &f.x, &y, &fresh).unwrap();
    assert!(!plan.is_empty());
    drop(plan);
    assert!(!fresh.is_filled(), "planned, not recorded");
    let (enc, e) = f.backward_dx(&fresh);
    let e = e.unwrap_err();
    assert!(matches!(e, Error::MissingSavedStats(_)), "{e}");
    f.assert_untouched(enc, "a plan never recorded");
}
