//! NaN and ±inf inputs (docs/semantics.md, "Non-finite inputs"): a non-finite value
//! in one channel makes that channel's batch statistics, running statistics and
//! outputs NaN (training forward), its own element non-finite (eval forward), its
//! own channel's gradients non-finite (backward), wherever it sits; every other
//! channel is bit for bit what it is without it. Checked on the GPU under every
//! launch geometry of `gpu_support::tunings` (so every walk of every kernel), and on
//! the f64 reference and the fast CPU path.

mod common;
mod gpu_support;

use common::{normal, rng};
use gpu_support::{random_state, tunings};
use rand::rngs::StdRng;
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, BatchNormState, GpuContext, GradMask, Gradients, Layout,
    SavedStatsHost, Shape, StatsSource,
};

/// One shape per walk of the kernels: channels-first packed units (C % 4 == 0,
/// S % 4 != 0), quads, vec4 runs, the rows view in 16-element units and in vec4s,
/// the flat walk, (N, C) rows, channels-last vec4 and 16-channel rows, the scalar
/// walk, 3-D tensors, and one channel alone.
const SHAPES: &[(&[usize], Layout)] = &[
    (&[2, 4, 5], Layout::ChannelsFirst),
    (&[3, 12, 7, 7], Layout::ChannelsFirst),
    (&[3, 5, 7, 7], Layout::ChannelsFirst),
    (&[4, 3, 4, 4], Layout::ChannelsFirst),
    (&[128, 16, 15], Layout::ChannelsFirst),
    (&[256, 4, 3, 3], Layout::ChannelsFirst),
    (&[260, 8, 4, 8], Layout::ChannelsFirst),
    (&[2, 3, 3, 4, 5], Layout::ChannelsFirst),
    (&[1000, 12], Layout::ChannelsLast),
    (&[513, 7], Layout::ChannelsLast),
    (&[3, 12, 7, 7], Layout::ChannelsLast),
    (&[5, 16, 7, 7], Layout::ChannelsLast),
    (&[5, 160, 29, 29], Layout::ChannelsLast),
    (&[4, 2, 9, 9, 9], Layout::ChannelsLast),
    (&[9, 1, 5], Layout::ChannelsFirst),
];

const POISONS: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// What the poisoned channel's values must be.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Every value NaN.
    Nan,
    /// Every value non-finite.
    NonFinite,
    /// Only the element at this index differs, and it is non-finite.
    OnlyAt(usize),
    /// Bit for bit the clean values.
    Same,
}

/// Compares a per-element (`channel_of` from the shape) or per-channel (identity)
/// output of a poisoned run with the clean run's.
fn check(
    what: &str,
    clean: &[f32],
    poisoned: &[f32],
    channel_of: impl Fn(usize) -> usize,
    c0: usize,
    expect: Expect,
) {
    assert_eq!(clean.len(), poisoned.len(), "{what}: lengths");
    for (i, (&a, &b)) in clean.iter().zip(poisoned).enumerate() {
        let same = a.to_bits() == b.to_bits();
        if channel_of(i) != c0 {
            assert!(
                same,
                "{what}: element {i} (channel {}) changed: {a} -> {b}",
                channel_of(i)
            );
            continue;
        }
        let ok = match expect {
            Expect::Nan => b.is_nan(),
            Expect::NonFinite => !b.is_finite(),
            Expect::OnlyAt(at) if i == at => !b.is_finite(),
            Expect::OnlyAt(_) | Expect::Same => same,
        };
        assert!(ok, "{what}: element {i} of the poisoned channel {c0} is {b} (clean {a}), expected {expect:?}");
    }
}

/// Everything one side (GPU or CPU path) gives for one input.
struct Outcome {
    train_y: Vec<f32>,
    saved: SavedStatsHost,
    state: BatchNormState,
    eval_y: Vec<f32>,
    train_grads: Gradients,
    eval_grads: Gradients,
}

/// Runs training forward, its backward, eval forward and eval-form backward, each on
/// a layer fresh from `state`. `saved` for the training backward: the forward's own,
/// unless given.
trait Side {
    fn run(
        &self,
        config: &BatchNormConfig,
        state: &BatchNormState,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        saved: Option<&SavedStatsHost>,
    ) -> Outcome;
}

struct Gpu<'a>(&'a GpuContext);

impl Side for Gpu<'_> {
    fn run(
        &self,
        config: &BatchNormConfig,
        state: &BatchNormState,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        saved: Option<&SavedStatsHost>,
    ) -> Outcome {
        let layer = || BatchNorm::with_state(self.0, config.clone(), state).expect("layer");
        let mut bn = layer();
        let train = bn.forward_train_host(shape, x).expect("forward_train");
        let fwd_saved = train.saved.clone();
        let state_after = bn.state().expect("state");
        let saved = saved.cloned().unwrap_or(fwd_saved.clone());
        let mask = GradMask::default();
        let train_grads = layer()
            .backward_host(shape, x, dy, Some(&saved), mask)
            .expect("backward");
        let eval_y = layer().forward_eval_host(shape, x).expect("forward_eval").y;
        let eval_grads = layer()
            .backward_host(shape, x, dy, None, mask)
            .expect("eval backward");
        Outcome {
            train_y: train.y,
            saved: fwd_saved,
            state: state_after,
            eval_y,
            train_grads,
            eval_grads,
        }
    }
}

/// The fast CPU path.
struct Fast;

impl Side for Fast {
    fn run(
        &self,
        config: &BatchNormConfig,
        state: &BatchNormState,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        saved: Option<&SavedStatsHost>,
    ) -> Outcome {
        let layer = || CpuBatchNorm::with_state(config.clone(), state.clone()).expect("layer");
        let mut bn = layer();
        let train = bn.forward_train(shape, x).expect("forward_train");
        let fwd_saved = train.saved.clone();
        let saved = saved.cloned().unwrap_or(fwd_saved.clone());
        let mask = GradMask::default();
        let train_grads = layer()
            .backward(shape, x, dy, Some(&saved), mask)
            .expect("backward");
        Outcome {
            train_y: train.y,
            saved: fwd_saved,
            state: bn.state.clone(),
            eval_y: layer().forward_eval(shape, x).expect("forward_eval").y,
            train_grads,
            eval_grads: layer()
                .backward(shape, x, dy, None, mask)
                .expect("eval backward"),
        }
    }
}

/// The f64 reference (rounded to f32; its training backward recomputes the
/// statistics from `x`, so `saved` is not used).
struct Reference;

impl Side for Reference {
    fn run(
        &self,
        config: &BatchNormConfig,
        state: &BatchNormState,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        _saved: Option<&SavedStatsHost>,
    ) -> Outcome {
        let f = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let fo = |v: Option<Vec<f64>>| v.map(|v| f(&v));
        let layer =
            || ReferenceBatchNorm::with_state(config.clone(), state.clone()).expect("layer");
        let mut bn = layer();
        let train = bn.forward_train(shape, x).expect("forward_train");
        let mask = GradMask::default();
        let grads = |source| {
            let g = layer()
                .backward(shape, x, dy, source, mask)
                .expect("backward");
            Gradients {
                dx: fo(g.dx),
                dgamma: fo(g.dgamma),
                dbeta: fo(g.dbeta),
            }
        };
        Outcome {
            train_y: f(&train.y),
            saved: SavedStatsHost {
                mean: f(&train.mean),
                invstd: f(&train.invstd),
                mean_lo: vec![0.0; shape.c()],
            },
            state: bn.state.clone(),
            eval_y: f(&layer().forward_eval(shape, x).expect("forward_eval").y),
            train_grads: grads(StatsSource::Batch),
            eval_grads: grads(StatsSource::Running),
        }
    }
}

/// Element indices of channel `c`: its first, one in the middle, its last.
fn positions(shape: &Shape, c: usize) -> [usize; 3] {
    let s = shape.spatial_size();
    [
        shape.index(0, c, 0),
        shape.index(shape.n() / 2, c, s / 2),
        shape.index(shape.n() - 1, c, s - 1),
    ]
}

/// Poisons x, then dy, of channel `c0` at each position with each value, and checks
/// every output against the clean run.
fn check_side(side: &dyn Side, name: &str, rng: &mut StdRng, dims: &[usize], layout: Layout) {
    let shape = Shape::new(dims, layout).unwrap();
    let c = shape.c();
    let c0 = c / 2;
    let config = BatchNormConfig::new(c);
    let state = random_state(rng, &config);
    let x = normal(rng, &shape, 0.5, 2.0);
    let dy = normal(rng, &shape, 0.0, 1.0);
    let clean = side.run(&config, &state, &shape, &x, &dy, None);
    let per_elem = |i: usize| shape.channel_of(i);
    let per_chan = |i: usize| i;
    let grads = |what: &str, a: &Gradients, b: &Gradients, dx: Expect, dg: Expect, db: Expect| {
        let g = |v: &Option<Vec<f32>>| v.clone().expect("gradient");
        check(
            &format!("{what} dx"),
            &g(&a.dx),
            &g(&b.dx),
            per_elem,
            c0,
            dx,
        );
        check(
            &format!("{what} dgamma"),
            &g(&a.dgamma),
            &g(&b.dgamma),
            per_chan,
            c0,
            dg,
        );
        check(
            &format!("{what} dbeta"),
            &g(&a.dbeta),
            &g(&b.dbeta),
            per_chan,
            c0,
            db,
        );
    };
    for at in positions(&shape, c0) {
        for v in POISONS {
            let what = format!("{name}: {dims:?} {layout:?}, x[{at}] = {v}");
            let mut xp = x.clone();
            xp[at] = v;
            let p = side.run(&config, &state, &shape, &xp, &dy, None);
            check(
                &format!("{what}: y"),
                &clean.train_y,
                &p.train_y,
                per_elem,
                c0,
                Expect::Nan,
            );
            check(
                &format!("{what}: mean"),
                &clean.saved.mean,
                &p.saved.mean,
                per_chan,
                c0,
                Expect::Nan,
            );
            check(
                &format!("{what}: invstd"),
                &clean.saved.invstd,
                &p.saved.invstd,
                per_chan,
                c0,
                Expect::Nan,
            );
            let (a, b) = (&clean.state, &p.state);
            check(
                &format!("{what}: running_mean"),
                &a.running_mean,
                &b.running_mean,
                per_chan,
                c0,
                Expect::Nan,
            );
            check(
                &format!("{what}: running_var"),
                &a.running_var,
                &b.running_var,
                per_chan,
                c0,
                Expect::Nan,
            );
            assert_eq!(
                a.num_batches_tracked, b.num_batches_tracked,
                "{what}: num_batches_tracked"
            );
            check(
                &format!("{what}: eval y"),
                &clean.eval_y,
                &p.eval_y,
                per_elem,
                c0,
                Expect::OnlyAt(at),
            );
            let nan = Expect::Nan;
            grads(
                &format!("{what}: backward"),
                &clean.train_grads,
                &p.train_grads,
                nan,
                nan,
                Expect::Same,
            );
            // Eval form: dx = dy * gamma * invstd does not read x.
            let nf = Expect::NonFinite;
            grads(
                &format!("{what}: eval backward"),
                &clean.eval_grads,
                &p.eval_grads,
                Expect::Same,
                nf,
                Expect::Same,
            );

            let what = format!("{name}: {dims:?} {layout:?}, dy[{at}] = {v}");
            let mut dyp = dy.clone();
            dyp[at] = v;
            let p = side.run(&config, &state, &shape, &x, &dyp, Some(&clean.saved));
            grads(
                &format!("{what}: backward"),
                &clean.train_grads,
                &p.train_grads,
                nf,
                nf,
                nf,
            );
            let only = Expect::OnlyAt(at);
            grads(
                &format!("{what}: eval backward"),
                &clean.eval_grads,
                &p.eval_grads,
                only,
                nf,
                nf,
            );
        }
    }
}

#[test]
fn nonfinite_values_stay_in_their_channel_on_the_gpu() {
    let mut rng = rng("nonfinite_values_stay_in_their_channel_on_the_gpu");
    for (tuning, ctx) in tunings() {
        for &(dims, layout) in SHAPES {
            check_side(
                &Gpu(&ctx),
                &format!("gpu ({tuning})"),
                &mut rng,
                dims,
                layout,
            );
        }
    }
}

#[test]
fn nonfinite_values_stay_in_their_channel_on_the_cpu() {
    let mut rng = rng("nonfinite_values_stay_in_their_channel_on_the_cpu");
    for &(dims, layout) in SHAPES {
        check_side(&Fast, "fast CPU path", &mut rng, dims, layout);
        check_side(&Reference, "reference", &mut rng, dims, layout);
    }
}
