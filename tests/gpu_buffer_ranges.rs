//! Tensors at an offset inside larger buffers (`TensorBuffer`: slices, bindings):
//! the same bits as whole buffers, nothing written outside a range, and typed
//! errors for misaligned offsets, short ranges and written tensors that share a
//! buffer.

mod common;
mod gpu_support;

use common::{assert_close, normal, rng};
use gpu_support::{ctx, random_state};
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Error, GpuContext, GradBuffers, Layout, SavedStats, Shape,
    TensorBuffer,
};

const SENTINEL: f32 = -77.25;

/// The offset alignment the crate asks for on this device.
fn alignment(ctx: &GpuContext) -> u64 {
    u64::from(ctx.device().limits().min_storage_buffer_offset_alignment).max(16)
}

/// A buffer of `before` bytes of sentinels, `data`, then `after` bytes of sentinels.
fn padded(ctx: &GpuContext, before: u64, data: &[f32], after: u64) -> wgpu::Buffer {
    let mut all = vec![SENTINEL; (before / 4) as usize];
    all.extend_from_slice(data);
    all.extend(std::iter::repeat_n(SENTINEL, (after / 4) as usize));
    ctx.upload("padded", &all).unwrap()
}

/// Reads `len` floats at byte `offset` of `buffer`, and checks that everything else
/// in it is still the sentinel.
fn read_range(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Vec<f32> {
    let all: Vec<f32> = ctx
        .read_buffer(buffer, (buffer.size() / 4) as usize)
        .unwrap();
    let at = (offset / 4) as usize;
    for (i, v) in all.iter().enumerate() {
        if i < at || i >= at + len {
            assert_eq!(
                v.to_bits(),
                SENTINEL.to_bits(),
                "byte {} outside the range written",
                4 * i
            );
        }
    }
    all[at..at + len].to_vec()
}

#[test]
fn tensors_at_offsets_give_the_same_bits_as_whole_buffers() {
    let mut rng = rng("tensors_at_offsets_give_the_same_bits_as_whole_buffers");
    let ctx = ctx();
    let a = alignment(ctx);
    for (dims, layout) in [
        (&[5, 6, 7, 3][..], Layout::ChannelsFirst),
        (&[5, 6, 7, 3][..], Layout::ChannelsLast),
        (&[33, 17][..], Layout::ChannelsLast),
    ] {
        let shape = Shape::new(dims, layout).unwrap();
        let (n, c) = (shape.numel(), shape.c());
        let config = BatchNormConfig::new(c);
        let state = random_state(&mut rng, &config);
        let x = normal(&mut rng, &shape, 1.0, 2.0);
        let dy = normal(&mut rng, &shape, 0.0, 1.0);
        let what = format!("{dims:?} {layout:?}");

        // Whole buffers, the same calls recorded.
        let mut whole = BatchNorm::with_state(ctx, config.clone(), &state).unwrap();
        let (xw, dyw) = (ctx.upload("x", &x).unwrap(), ctx.upload("dy", &dy).unwrap());
        let out = |len: usize| ctx.upload("out", &vec![SENTINEL; len]).unwrap();
        let (yw, y_evalw, dxw, dgw, dbw) = (out(n), out(n), out(n), out(c), out(c));
        let saved_w = SavedStats::new(ctx, c).unwrap();
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        whole
            .forward_train(&mut enc, &shape, &xw, &yw, &saved_w)
            .unwrap();
        let all = GradBuffers::new().dx(&dxw).dgamma(&dgw).dbeta(&dbw);
        whole
            .backward(&mut enc, &shape, &xw, &dyw, Some(&saved_w), all)
            .unwrap();
        whole
            .forward_eval(&mut enc, &shape, &xw, &y_evalw, None)
            .unwrap();
        ctx.submit_and_wait(enc).unwrap();
        let read = |b: &wgpu::Buffer, len| ctx.read_buffer::<f32>(b, len).unwrap();

        // The same at offsets: x and dy in one buffer (both only read), every output
        // in a buffer of its own with sentinels around it.
        let mut ranged = BatchNorm::with_state(ctx, config, &state).unwrap();
        let x_at = 3 * a;
        let dy_at = (x_at + shape.bytes()).next_multiple_of(a) + a;
        let mut inputs = vec![SENTINEL; (x_at / 4) as usize];
        inputs.extend_from_slice(&x);
        inputs.resize((dy_at / 4) as usize, SENTINEL);
        inputs.extend_from_slice(&dy);
        inputs.extend(std::iter::repeat_n(SENTINEL, 16));
        let inputs = ctx.upload("inputs", &inputs).unwrap();
        let xr = TensorBuffer::new(&inputs, x_at).with_size(shape.bytes());
        let dyr = TensorBuffer::from(inputs.slice(dy_at..dy_at + shape.bytes()));
        let out_at = 2 * a;
        let y = padded(ctx, out_at, &vec![SENTINEL; n], a);
        let y_eval = padded(ctx, a, &vec![SENTINEL; n], 2 * a);
        let dx = padded(ctx, out_at, &vec![SENTINEL; n], 2 * a);
        let dgamma = padded(ctx, a, &vec![SENTINEL; c], a);
        let dbeta = padded(ctx, 4 * a, &vec![SENTINEL; c], 8);
        let saved = SavedStats::new(ctx, c).unwrap();
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        ranged
            .forward_train(&mut enc, &shape, xr, y.slice(out_at..), &saved)
            .unwrap();
        let outputs = GradBuffers::new()
            .dx(TensorBuffer::new(&dx, out_at))
            .dgamma(wgpu::BufferBinding {
                buffer: &dgamma,
                offset: a,
                size: None,
            })
            .dbeta(dbeta.slice(4 * a..));
        ranged
            .backward(&mut enc, &shape, xr, dyr, Some(&saved), outputs)
            .unwrap();
        ranged
            .forward_eval(&mut enc, &shape, xr, y_eval.slice(a..), None)
            .unwrap();
        ctx.submit_and_wait(enc).unwrap();

        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let same = |name: &str, got: Vec<f32>, want: &[f32]| {
            assert_eq!(
                bits(&got),
                bits(want),
                "{what}: {name} differs at an offset"
            );
        };
        same("y", read_range(ctx, &y, out_at, n), &read(&yw, n));
        same("eval y", read_range(ctx, &y_eval, a, n), &read(&y_evalw, n));
        same("dx", read_range(ctx, &dx, out_at, n), &read(&dxw, n));
        same("dgamma", read_range(ctx, &dgamma, a, c), &read(&dgw, c));
        same("dbeta", read_range(ctx, &dbeta, 4 * a, c), &read(&dbw, c));
        // And against the f64 reference, so that equal bits are right bits.
        let mut reference =
            ReferenceBatchNorm::with_state(BatchNormConfig::new(c), state.clone()).unwrap();
        let r = reference.forward_train(&shape, &x).unwrap();
        assert_close(&format!("{what}: y"), &read(&yw, n), &r.y, 1e-5);
        assert_eq!(
            ranged.state().unwrap(),
            whole.state().unwrap(),
            "{what}: state"
        );
    }
}

#[test]
fn bad_ranges_are_typed_errors() {
    let ctx = ctx();
    let a = alignment(ctx);
    let shape = Shape::channels_first(&[4, 3, 5]).unwrap();
    let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
    let before = bn.state().unwrap();
    let big = ctx
        .storage_buffer("big", 4 * a + 2 * shape.bytes())
        .unwrap();
    let y = ctx.storage_buffer("y", a + shape.bytes()).unwrap();
    let saved = SavedStats::new(ctx, 3).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());

    // An offset off the alignment.
    let e = bn
        .forward_train(&mut enc, &shape, TensorBuffer::new(&big, a + 4), &y, &saved)
        .unwrap_err();
    assert!(
        matches!(e, Error::MisalignedOffset { name: "x", offset, .. } if offset == a + 4),
        "{e}"
    );
    // A range shorter than the tensor, and one running past the buffer's end.
    let short = TensorBuffer::new(&big, a).with_size(shape.bytes() - 4);
    let e = bn
        .forward_train(&mut enc, &shape, short, &y, &saved)
        .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { name: "x", .. }), "{e}");
    let e = bn
        .forward_train(&mut enc, &shape, &big, y.slice(a..), &saved)
        .map(|_| ())
        .and_then(|_| bn.forward_eval(&mut enc, &shape, &big, TensorBuffer::new(&y, 2 * a), None))
        .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { name: "y", .. }), "{e}");
    // The output in the input's buffer, even where the ranges do not overlap (wgpu
    // checks usages per buffer).
    let far = (a + shape.bytes()).next_multiple_of(a);
    let e = bn
        .forward_eval(
            &mut enc,
            &shape,
            TensorBuffer::new(&big, 0),
            big.slice(far..),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::AliasedBuffers { a: "x", b: "y" }), "{e}");
    ctx.submit_and_wait(enc).unwrap();
    // One forward did run (the one whose output fits); nothing else changed.
    let after = bn.state().unwrap();
    assert_eq!(after.num_batches_tracked, before.num_batches_tracked + 1);
}

/// A backward's outputs sub-allocated from one arena: non-overlapping ranges are
/// accepted and give the same bits as buffers of their own; overlapping ones are
/// refused.
#[test]
fn written_tensors_may_share_a_buffer_where_they_do_not_overlap() {
    let mut rng = rng("written_tensors_may_share_a_buffer_where_they_do_not_overlap");
    let ctx = ctx();
    let a = alignment(ctx);
    let shape = Shape::channels_first(&[6, 5, 9, 7]).unwrap();
    let (n, c) = (shape.numel(), shape.c());
    let config = BatchNormConfig::new(c);
    let state = random_state(&mut rng, &config);
    let x = normal(&mut rng, &shape, 1.0, 2.0);
    let dy = normal(&mut rng, &shape, 0.0, 1.0);
    let (xb, dyb) = (ctx.upload("x", &x).unwrap(), ctx.upload("dy", &dy).unwrap());
    let saved = {
        let mut bn = BatchNorm::with_state(ctx, config.clone(), &state).unwrap();
        let s = bn.forward_train_host(&shape, &x).unwrap().saved;
        SavedStats::from_host(ctx, &s).unwrap()
    };
    let run = |grads: GradBuffers<'_>| {
        let mut bn = BatchNorm::with_state(ctx, config.clone(), &state).unwrap();
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        let r = bn.backward(&mut enc, &shape, &xb, &dyb, Some(&saved), grads);
        ctx.submit_and_wait(enc).unwrap();
        r
    };
    let (dx, dg, db) = (
        ctx.storage_buffer("dx", shape.bytes()).unwrap(),
        ctx.storage_buffer("dg", 4 * c as u64).unwrap(),
        ctx.storage_buffer("db", 4 * c as u64).unwrap(),
    );
    run(GradBuffers::new().dx(&dx).dgamma(&dg).dbeta(&db)).unwrap();
    let dg_at = shape.bytes().next_multiple_of(a);
    let db_at = (dg_at + 4 * c as u64).next_multiple_of(a);
    let arena = ctx.storage_buffer("arena", db_at + 4 * c as u64).unwrap();
    run(GradBuffers::new()
        .dx(TensorBuffer::new(&arena, 0))
        .dgamma(TensorBuffer::new(&arena, dg_at))
        .dbeta(TensorBuffer::new(&arena, db_at)))
    .unwrap();
    let read = |b: &wgpu::Buffer, at: u64, len: usize| {
        let all: Vec<f32> = ctx.read_buffer(b, (b.size() / 4) as usize).unwrap();
        all[(at / 4) as usize..(at / 4) as usize + len]
            .iter()
            .map(|f| f.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(read(&arena, 0, n), read(&dx, 0, n), "dx");
    assert_eq!(read(&arena, dg_at, c), read(&dg, 0, c), "dgamma");
    assert_eq!(read(&arena, db_at, c), read(&db, 0, c), "dbeta");
    // dgamma's range inside dx's: refused before anything runs.
    let e = run(GradBuffers::new()
        .dx(TensorBuffer::new(&arena, 0))
        .dgamma(TensorBuffer::new(&arena, a)))
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::AliasedBuffers {
                a: "dx",
                b: "dgamma"
            }
        ),
        "{e}"
    );
}
