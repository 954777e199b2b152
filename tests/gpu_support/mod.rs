//! GPU-test support: one context per test binary (printing the adapter), and
//! layers with random state so that every parameter matters in a comparison.
//! Test files that use it include `mod common;` too.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, BatchNormState, Convention, Cut, GpuContext, Tuning,
};

/// The context every GPU test uses. With no adapter this fails, with the message
/// of [`wgpu_batchnorm::Error::NoAdapter`] that says how to get one: GPU tests never
/// skip.
pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = GpuContext::from_env().unwrap_or_else(|e| match e {
            wgpu_batchnorm::Error::NoAdapter { .. } => panic!("GPU tests need an adapter: {e}"),
            e => panic!("GPU context could not be set up on this adapter: {e}"),
        });
        eprintln!("GPU tests run on: {}", ctx.describe());
        ctx
    })
}

/// The option combinations every layout is tested with.
pub fn configs(c: usize) -> Vec<BatchNormConfig> {
    vec![
        BatchNormConfig::new(c),
        BatchNormConfig::new(c).affine(false),
        BatchNormConfig::new(c).track_running_stats(false),
        BatchNormConfig::new(c)
            .affine(false)
            .track_running_stats(false),
        BatchNormConfig::new(c).momentum(None),
        BatchNormConfig::new(c).momentum(Some(1.0)).eps(1e-3),
        BatchNormConfig::keras(c),
        BatchNormConfig::keras(c).affine(false).momentum(Some(0.9)),
    ]
}

/// A random but valid state for `config` (gamma around 1, running var positive).
pub fn random_state(rng: &mut impl Rng, config: &BatchNormConfig) -> BatchNormState {
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
    s
}

/// The launch geometries every result must survive: the adapter's own, the GPU and
/// CPU tunings whatever the adapter (the CPU one also with the fused forward at any
/// size), a cut as fine as it goes (one unit per invocation, many splits, narrow
/// tiles, lane blocks of 4), one of values the walk has to round, and reductions
/// that read channels-last rows 16 channels per invocation in several splits
/// whatever the machine (the CPU tuning's floor of a workgroup per thread depends
/// on it). Every one merges within subgroups where the adapter has them, and one
/// (the adapter's own otherwise) through workgroup memory only.
pub fn tunings() -> Vec<(&'static str, GpuContext)> {
    let finest = Cut {
        target_workgroups: 4096,
        min_units: 1,
        lane_block: 4,
        max_row_tile: 4,
        runs_min_units: 0,
        max_wide_row: u32::MAX,
        wide_min_units: 1,
        min_row_span: 0,
        min_workgroups: 0,
        whole_channel_elements: 0,
    };
    // Values the walk cannot use as they are (zero, not powers of two): rounded.
    let odd = Cut {
        target_workgroups: 0,
        min_units: 0,
        lane_block: 6,
        max_row_tile: 48,
        runs_min_units: 100,
        max_wide_row: 1000,
        wide_min_units: 3000,
        min_row_span: 1000,
        min_workgroups: 3,
        whole_channel_elements: 100,
    };
    let wide_reductions = Cut {
        target_workgroups: 2,
        max_row_tile: 16,
        max_wide_row: u32::MAX,
        wide_min_units: 1,
        min_workgroups: 0,
        ..Tuning::cpu(8).reduce
    };
    vec![
        ("adapter", ctx().clone()),
        ("gpu", ctx().with_tuning(Tuning::gpu())),
        ("cpu", ctx().with_tuning(Tuning::cpu(8))),
        (
            "cpu, fused at any size",
            ctx().with_tuning(Tuning {
                fused_forward_max_elements: u64::MAX,
                fused_eval_max_elements: u64::MAX,
                ..Tuning::cpu(8)
            }),
        ),
        (
            "finest",
            ctx().with_tuning(Tuning {
                reduce: finest,
                elementwise: finest,
                fused_forward_max_elements: u64::MAX,
                fused_eval_max_elements: u64::MAX,
                subgroups: true,
                native_f16: true,
                merge_partials: true,
            }),
        ),
        (
            "wide reductions",
            ctx().with_tuning(Tuning {
                reduce: wide_reductions,
                fused_forward_max_elements: 0,
                ..Tuning::cpu(8)
            }),
        ),
        (
            "odd",
            ctx().with_tuning(Tuning {
                reduce: odd,
                elementwise: odd,
                fused_forward_max_elements: 0,
                fused_eval_max_elements: 0,
                subgroups: true,
                native_f16: true,
                merge_partials: true,
            }),
        ),
        (
            "without subgroups",
            ctx().with_tuning(Tuning {
                subgroups: false,
                ..ctx().tuning()
            }),
        ),
    ]
}

/// The same layer on the GPU and in the reference, from the same random state.
pub fn layer_pair(rng: &mut impl Rng, config: &BatchNormConfig) -> (BatchNorm, ReferenceBatchNorm) {
    layer_pair_on(ctx(), rng, config)
}

/// [`layer_pair`] on a given context.
pub fn layer_pair_on(
    ctx: &GpuContext,
    rng: &mut impl Rng,
    config: &BatchNormConfig,
) -> (BatchNorm, ReferenceBatchNorm) {
    pair_from_state(ctx, config, random_state(rng, config))
}

/// The same layer on the GPU (on `ctx`) and in the reference, from `state`.
pub fn pair_from_state(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    state: BatchNormState,
) -> (BatchNorm, ReferenceBatchNorm) {
    let gpu = BatchNorm::with_state(ctx, config.clone(), &state).expect("valid layer");
    let cpu = ReferenceBatchNorm::with_state(config.clone(), state).expect("valid layer");
    (gpu, cpu)
}

/// [`pair_from_state`] from a random state whose outputs cross both kinks of
/// every activation ([`crate::common::ACROSS_KINKS`]).
pub fn signed_pair(
    ctx: &GpuContext,
    rng: &mut StdRng,
    config: &BatchNormConfig,
) -> (BatchNorm, ReferenceBatchNorm) {
    let state = crate::common::random_signed_state(rng, config, &crate::common::ACROSS_KINKS);
    pair_from_state(ctx, config, state)
}

/// A short description of a configuration for messages.
pub fn describe(config: &BatchNormConfig) -> String {
    format!(
        "{}affine={} track={} momentum={:?} eps={}",
        if config.convention == Convention::Keras {
            "keras "
        } else {
            ""
        },
        config.affine,
        config.track_running_stats,
        config.momentum,
        config.eps
    )
}

/// f32 state vector as f64, for comparisons.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Shapes big enough to be split over many workgroups, odd sizes among them, and
/// channel counts that are multiples of 16 (the wide channels-last rows), and odd
/// planes whose batch items are whole vec4s (channels-first read as rows; by the
/// statistics too from a batch of 16 per split: 256x4x3x3 split, 32x64x7x7 past the
/// fused size), and planes of whole vec4s whose batch items are not a whole number
/// of lane blocks (the flat channels-first walk crossing from the last channel of
/// one batch item to the first of the next inside a block). Planes of 16 and 32
/// elements have runs exactly one lane block long (4 and 8 vec4s: the flat walk's
/// steps then leave each run at its end); 260x8x4x8 is past the fused training
/// forward of the CPU tuning, so its normalize pass is a dispatch of its own.
/// 5x160x29x29 channels-last has rows enough for the reductions to read them 16
/// channels per invocation (walks of at least 128 rows) on any machine: under the
/// "odd" tuning in one split (walks of 263 rows), under "wide reductions" in two
/// (132 rows). 128x16x15 has runs of S = 15 in batch items of 16-element units:
/// its statistics are read in the rows view per unit, in two splits under
/// "finest".
pub const SPLIT_SHAPES: &[&[usize]] = &[
    &[16, 8, 30, 30],
    &[7, 3, 4, 12],
    &[9, 5, 10, 12],
    &[7, 5, 33, 17],
    &[3, 12, 7, 7],
    &[1000, 12],
    &[513, 7],
    &[4, 2, 9, 9, 9],
    &[6, 48, 5, 5],
    &[300, 32],
    &[5, 16, 7, 7],
    &[256, 4, 3, 3],
    &[32, 64, 7, 7],
    &[9, 3, 4, 4],
    &[17, 3, 4, 8],
    &[260, 8, 4, 8],
    &[5, 160, 29, 29],
    &[128, 16, 15],
];

/// Shapes whose training forward and backward take two dispatches under
/// `Tuning::gpu()`, the elementwise pass merging the reduction's partials:
/// channels-first with split channels (vec4 and quad walks); channels-last in
/// the merged rows walks with several splits in both passes, vec4 units with a
/// tile past the last channel (C = 20: channels 20..31 of the second tile idle),
/// f32 units (C = 7, 33), 4 tiles of 16 channels, more reduction splits (22)
/// than the 16 invocations that merge each channel, and `(N, C)`.
pub fn merged_shapes() -> Vec<wgpu_batchnorm::Shape> {
    use wgpu_batchnorm::Shape;
    let cf = |d: &[usize]| Shape::channels_first(d).unwrap();
    let cl = |d: &[usize]| Shape::channels_last(d).unwrap();
    vec![
        cf(&[8, 16, 64, 64]),
        cf(&[6, 5, 33, 17]),
        cf(&[3, 7, 40, 40]),
        cl(&[16, 20, 15, 17]),
        cl(&[10, 7, 20, 20]),
        cl(&[4, 64, 24, 24]),
        cl(&[16, 32, 32, 64]),
        cf(&[3000, 33]),
    ]
}

/// The cuts the merged tests run: the GPU cut on every merged shape, and a GPU
/// elementwise cut after a CPU adapter's reduction cut (a tuning of one's own) on
/// the channels-last ones, whose merged walks do not depend on the reduction cut.
pub fn merged_cuts() -> Vec<(&'static str, GpuContext, Vec<wgpu_batchnorm::Shape>)> {
    let channels_last = merged_shapes()
        .into_iter()
        .filter(|s| s.layout() == wgpu_batchnorm::Layout::ChannelsLast || s.spatial_size() == 1)
        .collect();
    vec![
        ("gpu", ctx().with_tuning(Tuning::gpu()), merged_shapes()),
        (
            "cpu reductions, gpu elementwise",
            ctx().with_tuning(Tuning {
                reduce: Tuning::cpu(8).reduce,
                ..Tuning::gpu()
            }),
            channels_last,
        ),
    ]
}
