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
                dz: None,
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
    // (name, clean, poisoned, one value per element (else per channel), expected)
    type Case<'a> = (&'a str, &'a [f32], &'a [f32], bool, Expect);
    let check_all = |what: &str, cases: &[Case<'_>]| {
        for &(output, a, b, per_element, expect) in cases {
            let channel_of = |i: usize| if per_element { shape.channel_of(i) } else { i };
            check(&format!("{what}: {output}"), a, b, channel_of, c0, expect);
        }
    };
    let g = |v: &Option<Vec<f32>>| v.clone().expect("gradient");
    // dx, dgamma, dbeta of two backward results.
    let grads = |what: &str, a: &Gradients, b: &Gradients, expect: [Expect; 3]| {
        let (adx, bdx, adg, bdg, adb, bdb) = (
            g(&a.dx),
            g(&b.dx),
            g(&a.dgamma),
            g(&b.dgamma),
            g(&a.dbeta),
            g(&b.dbeta),
        );
        check_all(
            what,
            &[
                ("dx", &adx, &bdx, true, expect[0]),
                ("dgamma", &adg, &bdg, false, expect[1]),
                ("dbeta", &adb, &bdb, false, expect[2]),
            ],
        );
    };
    let (nan, nf, same) = (Expect::Nan, Expect::NonFinite, Expect::Same);
    for at in positions(&shape, c0) {
        for v in POISONS {
            let what = format!("{name}: {dims:?} {layout:?}, x[{at}] = {v}");
            let mut xp = x.clone();
            xp[at] = v;
            let p = side.run(&config, &state, &shape, &xp, &dy, None);
            let (a, b) = (&clean.state, &p.state);
            check_all(
                &what,
                &[
                    ("y", &clean.train_y, &p.train_y, true, nan),
                    ("mean", &clean.saved.mean, &p.saved.mean, false, nan),
                    ("invstd", &clean.saved.invstd, &p.saved.invstd, false, nan),
                    ("running_mean", &a.running_mean, &b.running_mean, false, nan),
                    ("running_var", &a.running_var, &b.running_var, false, nan),
                    ("eval y", &clean.eval_y, &p.eval_y, true, Expect::OnlyAt(at)),
                ],
            );
            assert_eq!(
                a.num_batches_tracked, b.num_batches_tracked,
                "{what}: num_batches_tracked"
            );
            let backward = format!("{what}: backward");
            grads(
                &backward,
                &clean.train_grads,
                &p.train_grads,
                [nan, nan, same],
            );
            // Eval form: dx = dy * gamma * invstd does not read x.
            let eval = format!("{what}: eval backward");
            grads(&eval, &clean.eval_grads, &p.eval_grads, [same, nf, same]);

            let what = format!("{name}: {dims:?} {layout:?}, dy[{at}] = {v}");
            let mut dyp = dy.clone();
            dyp[at] = v;
            let p = side.run(&config, &state, &shape, &x, &dyp, Some(&clean.saved));
            let backward = format!("{what}: backward");
            grads(&backward, &clean.train_grads, &p.train_grads, [nf, nf, nf]);
            let eval = format!("{what}: eval backward");
            grads(
                &eval,
                &clean.eval_grads,
                &p.eval_grads,
                [Expect::OnlyAt(at), nf, nf],
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
