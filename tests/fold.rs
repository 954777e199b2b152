//! Folding an eval-mode batch norm into the Linear or Conv2d before it: the folded
//! layer alone against layer-then-batch-norm on the f64 reference, in PyTorch's and
//! Keras' weight layouts; hand-computed folds; the argument checks.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNormConfig, BatchNormState, Error, FoldedBatchNorm, Shape, WeightLayout,
};

const TOL: f64 = 1e-5;

/// `len` values from `N(0, std^2)`.
fn normal_vec(rng: &mut StdRng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (std * std_normal(rng)) as f32).collect()
}

// ---- Plain CPU layers (f64 accumulation, f32 out, as a layer would emit) ----

/// PyTorch `nn.Linear`: `x [n, in]`, `w [out, in]`, `y = x W^T + b`, `y [n, out]`.
fn linear_out_in(x: &[f32], n: usize, fin: usize, w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let out = w.len() / fin;
    let mut y = Vec::with_capacity(n * out);
    for i in 0..n {
        for o in 0..out {
            let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
            for k in 0..fin {
                acc += f64::from(x[i * fin + k]) * f64::from(w[o * fin + k]);
            }
            y.push(acc as f32);
        }
    }
    y
}

/// Keras `Dense`: `x [n, in]`, `w [in, out]`, `y = x W + b`, `y [n, out]`.
fn linear_in_out(x: &[f32], n: usize, fin: usize, w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let out = w.len() / fin;
    let mut y = Vec::with_capacity(n * out);
    for i in 0..n {
        for o in 0..out {
            let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
            for k in 0..fin {
                acc += f64::from(x[i * fin + k]) * f64::from(w[k * out + o]);
            }
            y.push(acc as f32);
        }
    }
    y
}

/// Sizes of a stride-1, unpadded 2-d convolution.
#[derive(Clone, Copy, Debug)]
struct Conv {
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    groups: usize,
}

impl Conv {
    fn oh(&self) -> usize {
        self.h - self.kh + 1
    }
    fn ow(&self) -> usize {
        self.w - self.kw + 1
    }
    fn input_len(&self) -> usize {
        self.n * self.cin * self.h * self.w
    }
    fn weight_len(&self) -> usize {
        self.cout * (self.cin / self.groups) * self.kh * self.kw
    }
    fn output_dims(&self) -> [usize; 4] {
        [self.n, self.cout, self.oh(), self.ow()]
    }
}

/// PyTorch `nn.Conv2d`: NCHW input, `[out, in/groups, kh, kw]` weight, NCHW output.
fn conv2d_nchw(p: &Conv, x: &[f32], wt: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (cin_g, cout_g) = (p.cin / p.groups, p.cout / p.groups);
    let (oh, ow) = (p.oh(), p.ow());
    let mut y = Vec::with_capacity(p.n * p.cout * oh * ow);
    for n in 0..p.n {
        for o in 0..p.cout {
            let g = o / cout_g;
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
                    for ci in 0..cin_g {
                        let c = g * cin_g + ci;
                        for u in 0..p.kh {
                            for v in 0..p.kw {
                                let xv = x[((n * p.cin + c) * p.h + i + u) * p.w + j + v];
                                let wv = wt[((o * cin_g + ci) * p.kh + u) * p.kw + v];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    y.push(acc as f32);
                }
            }
        }
    }
    y
}

/// Keras `Conv2D` (channels-last): NHWC input, `[kh, kw, in, out]` weight, NHWC
/// output.
fn conv2d_nhwc(p: &Conv, x: &[f32], wt: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(p.groups, 1);
    let (oh, ow) = (p.oh(), p.ow());
    let mut y = Vec::with_capacity(p.n * oh * ow * p.cout);
    for n in 0..p.n {
        for i in 0..oh {
            for j in 0..ow {
                for o in 0..p.cout {
                    let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
                    for u in 0..p.kh {
                        for v in 0..p.kw {
                            for c in 0..p.cin {
                                let xv = x[((n * p.h + i + u) * p.w + j + v) * p.cin + c];
                                let wv = wt[((u * p.kw + v) * p.cin + c) * p.cout + o];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    y.push(acc as f32);
                }
            }
        }
    }
    y
}

// ---- Batch-norm layers to fold ----

fn configs(c: usize) -> Vec<(&'static str, BatchNormConfig)> {
    vec![
        ("pytorch default", BatchNormConfig::new(c)),
        ("affine false", BatchNormConfig::new(c).affine(false)),
        ("keras", BatchNormConfig::keras(c)),
        ("eps 1e-3", BatchNormConfig::new(c).eps(1e-3)),
    ]
}

/// A trained-looking state: gamma of either sign with `|gamma|` in `[0.25, 2)`, beta
/// and running mean in `[-1, 1)`, running variance in `[0.25, 4)`.
fn random_state(rng: &mut StdRng, config: &BatchNormConfig) -> BatchNormState {
    let c = config.num_features;
    let mut uniform =
        |lo: f32, hi: f32| -> Vec<f32> { (0..c).map(|_| rng.random_range(lo..hi)).collect() };
    let (gamma, beta) = if config.affine {
        let magnitude = uniform(0.25, 2.0);
        let sign = uniform(-1.0, 1.0);
        let gamma = magnitude
            .iter()
            .zip(&sign)
            .map(|(&m, &s)| if s < 0.0 { -m } else { m })
            .collect();
        (gamma, uniform(-1.0, 1.0))
    } else {
        (vec![], vec![])
    };
    let running_mean = uniform(-1.0, 1.0);
    let running_var = uniform(0.25, 4.0);
    BatchNormState::from_parts(config, gamma, beta, running_mean, running_var, 100).unwrap()
}

/// `max |got - want| / (1 + |want|)`.
fn max_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

/// Batch norm (eval, f64 reference) of a layer's output `y` of `shape`.
fn bn_eval(config: &BatchNormConfig, state: &BatchNormState, shape: &Shape, y: &[f32]) -> Vec<f64> {
    ReferenceBatchNorm::with_state(config.clone(), state.clone())
        .unwrap()
        .forward_eval(shape, y)
        .unwrap()
        .y
}

fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    let err = max_err(got, want);
    println!("{what}: max error {err:e}");
    assert!(err <= TOL, "{what}: max error {err:e} > {TOL:e}");
}

// ---- Folded layer == layer then batch norm ----

/// A plain CPU Linear: (x, batch, in features, weight, bias) -> y.
type LinearFn = fn(&[f32], usize, usize, &[f32], Option<&[f32]>) -> Vec<f32>;

/// A Linear (`OutInKernel`: PyTorch's `[out, in]`) or Dense (`KernelInOut`: Keras'
/// `[in, out]`) folded, against the layer followed by the eval forward.
fn check_linear(test: &str, layout: WeightLayout) {
    let mut rng = rng(test);
    let n = 4;
    let (forward, name): (LinearFn, _) = match layout {
        WeightLayout::OutInKernel => (linear_out_in, "Linear"),
        WeightLayout::KernelInOut => (linear_in_out, "Dense"),
    };
    for cout in [1, 3, 17] {
        for fin in [5, 7] {
            for (cname, config) in configs(cout) {
                for with_bias in [true, false] {
                    let state = random_state(&mut rng, &config);
                    let x = normal_vec(&mut rng, n * fin, 1.0);
                    let w = normal_vec(&mut rng, cout * fin, 1.0 / (fin as f64).sqrt());
                    let b = with_bias.then(|| normal_vec(&mut rng, cout, 0.5));
                    // (N, C): the same memory in both layouts.
                    let shape = Shape::channels_first(&[n, cout]).unwrap();
                    let want = bn_eval(
                        &config,
                        &state,
                        &shape,
                        &forward(&x, n, fin, &w, b.as_deref()),
                    );
                    let folded = FoldedBatchNorm::from_state(&config, &state).unwrap();
                    let mut wf = w.clone();
                    let bf = folded.fold_into(&mut wf, b.as_deref(), layout).unwrap();
                    let got = forward(&x, n, fin, &wf, Some(&bf));
                    let what = format!("{name} ({cout} out, {fin} in) {cname} bias {with_bias}");
                    assert_close(&what, &got, &want);
                }
            }
        }
    }
}

#[test]
fn linear_pytorch_layout() {
    check_linear("linear_pytorch_layout", WeightLayout::OutInKernel);
}

#[test]
fn linear_keras_layout() {
    check_linear("linear_keras_layout", WeightLayout::KernelInOut);
}

fn conv_cases() -> Vec<Conv> {
    let mut cases = vec![];
    for cout in [1, 3, 17] {
        for cin in [5, 7] {
            for k in [3, 1] {
                cases.push(Conv {
                    n: 2,
                    cin,
                    cout,
                    h: 6,
                    w: 5,
                    kh: k,
                    kw: k,
                    groups: 1,
                });
            }
        }
    }
    cases
}

fn check_conv_nchw(rng: &mut StdRng, p: &Conv) {
    let fan_in = (p.cin / p.groups) * p.kh * p.kw;
    for (name, config) in configs(p.cout) {
        for with_bias in [true, false] {
            let state = random_state(rng, &config);
            let x = normal_vec(rng, p.input_len(), 1.0);
            let w = normal_vec(rng, p.weight_len(), 1.0 / (fan_in as f64).sqrt());
            let b = with_bias.then(|| normal_vec(rng, p.cout, 0.5));
            let shape = Shape::channels_first(&p.output_dims()).unwrap();
            let want = bn_eval(
                &config,
                &state,
                &shape,
                &conv2d_nchw(p, &x, &w, b.as_deref()),
            );

            let folded = FoldedBatchNorm::from_state(&config, &state).unwrap();
            let mut wf = w.clone();
            let bf = folded
                .fold_into(&mut wf, b.as_deref(), WeightLayout::OutInKernel)
                .unwrap();
            let got = conv2d_nchw(p, &x, &wf, Some(&bf));
            assert_close(
                &format!("Conv2d NCHW {p:?} {name} bias {with_bias}"),
                &got,
                &want,
            );
        }
    }
}

#[test]
fn conv2d_pytorch_layout_nchw() {
    let mut rng = rng("conv2d_pytorch_layout_nchw");
    for p in conv_cases() {
        check_conv_nchw(&mut rng, &p);
    }
}

#[test]
fn conv2d_depthwise_pytorch_layout_nchw() {
    // groups = in = out: weight [out, 1, kh, kw].
    let mut rng = rng("conv2d_depthwise_pytorch_layout_nchw");
    for c in [5, 7] {
        for k in [3, 1] {
            let p = Conv {
                n: 2,
                cin: c,
                cout: c,
                h: 6,
                w: 5,
                kh: k,
                kw: k,
                groups: c,
            };
            check_conv_nchw(&mut rng, &p);
        }
    }
}

#[test]
fn conv2d_keras_layout_nhwc() {
    let mut rng = rng("conv2d_keras_layout_nhwc");
    for p in conv_cases() {
        let fan_in = p.cin * p.kh * p.kw;
        for (name, config) in configs(p.cout) {
            for with_bias in [true, false] {
                let state = random_state(&mut rng, &config);
                let x = normal_vec(&mut rng, p.input_len(), 1.0);
                let w = normal_vec(&mut rng, p.weight_len(), 1.0 / (fan_in as f64).sqrt());
                let b = with_bias.then(|| normal_vec(&mut rng, p.cout, 0.5));
                let shape = Shape::channels_last(&p.output_dims()).unwrap();
                let want = bn_eval(
                    &config,
                    &state,
                    &shape,
                    &conv2d_nhwc(&p, &x, &w, b.as_deref()),
                );

                let folded = FoldedBatchNorm::from_state(&config, &state).unwrap();
                let mut wf = w.clone();
                let bf = folded
                    .fold_into(&mut wf, b.as_deref(), WeightLayout::KernelInOut)
                    .unwrap();
                let got = conv2d_nhwc(&p, &x, &wf, Some(&bf));
                assert_close(
                    &format!("Conv2D NHWC {p:?} {name} bias {with_bias}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn the_comparison_catches_a_wrong_fold() {
    // The same check as above, fed folds that are wrong: the error must be far
    // above the tolerance, or the tests above could not fail.
    let mut rng = rng("the_comparison_catches_a_wrong_fold");
    let p = Conv {
        n: 2,
        cin: 5,
        cout: 17,
        h: 6,
        w: 5,
        kh: 3,
        kw: 3,
        groups: 1,
    };
    let config = BatchNormConfig::new(p.cout);
    let state = random_state(&mut rng, &config);
    let x = normal_vec(&mut rng, p.input_len(), 1.0);
    let w = normal_vec(&mut rng, p.weight_len(), 1.0 / 45f64.sqrt());
    let b = normal_vec(&mut rng, p.cout, 0.5);
    let shape = Shape::channels_first(&p.output_dims()).unwrap();
    let want = bn_eval(&config, &state, &shape, &conv2d_nchw(&p, &x, &w, Some(&b)));
    let folded = FoldedBatchNorm::from_state(&config, &state).unwrap();

    // The right fold passes.
    let mut wf = w.clone();
    let bf = folded
        .fold_into(&mut wf, Some(&b), WeightLayout::OutInKernel)
        .unwrap();
    assert!(max_err(&conv2d_nchw(&p, &x, &wf, Some(&bf)), &want) <= TOL);

    // The wrong layout for a [out, in, kh, kw] weight.
    let mut wf = w.clone();
    let bf = folded
        .fold_into(&mut wf, Some(&b), WeightLayout::KernelInOut)
        .unwrap();
    let err = max_err(&conv2d_nchw(&p, &x, &wf, Some(&bf)), &want);
    assert!(err > 1e-2, "wrong layout: error only {err:e}");

    // The layer's bias forgotten.
    let mut wf = w.clone();
    let bf = folded
        .fold_into(&mut wf, None, WeightLayout::OutInKernel)
        .unwrap();
    let err = max_err(&conv2d_nchw(&p, &x, &wf, Some(&bf)), &want);
    assert!(err > 1e-2, "bias dropped: error only {err:e}");

    // The unfolded weight with the folded bias.
    let bf = folded
        .fold_into(&mut w.clone(), Some(&b), WeightLayout::OutInKernel)
        .unwrap();
    let err = max_err(&conv2d_nchw(&p, &x, &w, Some(&bf)), &want);
    assert!(err > 1e-2, "weight not scaled: error only {err:e}");
}

// ---- The map itself ----

#[test]
fn scale_and_shift_reproduce_the_eval_forward() {
    // y = x * scale + shift, on an NCHW and an NHWC tensor.
    let mut rng = rng("scale_and_shift_reproduce_the_eval_forward");
    for c in [1, 3, 17] {
        for (name, config) in configs(c) {
            for shape in [
                Shape::channels_first(&[3, c, 5, 7]).unwrap(),
                Shape::channels_last(&[3, c, 5, 7]).unwrap(),
            ] {
                let state = random_state(&mut rng, &config);
                let x = well_conditioned(&mut rng, &shape);
                let want = bn_eval(&config, &state, &shape, &x);
                let f = FoldedBatchNorm::from_state(&config, &state).unwrap();
                assert_eq!(f.channels(), c);
                let got: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let ch = shape.channel_of(i);
                        (f64::from(v) * f64::from(f.scale[ch]) + f64::from(f.shift[ch])) as f32
                    })
                    .collect();
                assert_close(&format!("{name} {:?} C={c}", shape.layout()), &got, &want);
            }
        }
    }
}

#[test]
fn hand_computed_scale_and_shift() {
    // eps = 1: sqrt(3 + 1) = 2, sqrt(0 + 1) = 1, all exact.
    let config = BatchNormConfig::new(3).eps(1.0);
    let state = BatchNormState::from_parts(
        &config,
        vec![2.0, -1.0, 0.5],
        vec![0.5, 0.0, 1.0],
        vec![1.0, -2.0, 4.0],
        vec![3.0, 0.0, 15.0],
        1,
    )
    .unwrap();
    let f = FoldedBatchNorm::from_state(&config, &state).unwrap();
    assert_eq!(f.scale, vec![1.0, -1.0, 0.125]);
    assert_eq!(f.shift, vec![-0.5, -2.0, 0.5]);

    // Without affine: gamma = 1, beta = 0.
    let config = BatchNormConfig::new(2).eps(1.0).affine(false);
    let state =
        BatchNormState::from_parts(&config, vec![], vec![], vec![2.0, -6.0], vec![3.0, 15.0], 1)
            .unwrap();
    let f = FoldedBatchNorm::from_state(&config, &state).unwrap();
    assert_eq!(f.scale, vec![0.5, 0.25]);
    assert_eq!(f.shift, vec![-1.0, 1.5]);

    // running_var + eps == 0: scale 0 (as the eval forward's invstd), y = beta.
    let config = BatchNormConfig::new(1).eps(0.0);
    let state = BatchNormState::from_parts(&config, vec![3.0], vec![0.25], vec![7.0], vec![0.0], 1)
        .unwrap();
    let f = FoldedBatchNorm::from_state(&config, &state).unwrap();
    assert_eq!((f.scale[0], f.shift[0]), (0.0, 0.25));
    let shape = Shape::channels_first(&[2, 1]).unwrap();
    assert_eq!(
        bn_eval(&config, &state, &shape, &[1.0, -5.0]),
        vec![0.25, 0.25]
    );
}

#[test]
fn hand_computed_fold_in_both_layouts() {
    let f = FoldedBatchNorm {
        scale: vec![2.0, 0.5],
        shift: vec![1.0, -1.0],
    };
    // [out = 2, in = 3]
    let mut w = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = f
        .fold_into(&mut w, Some(&[1.0, 2.0]), WeightLayout::OutInKernel)
        .unwrap();
    assert_eq!(w, vec![2.0, 4.0, 6.0, 2.0, 2.5, 3.0]);
    assert_eq!(b, vec![3.0, 0.0]);

    // [in = 3, out = 2]
    let mut w = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = f
        .fold_into(&mut w, Some(&[1.0, 2.0]), WeightLayout::KernelInOut)
        .unwrap();
    assert_eq!(w, vec![2.0, 1.0, 6.0, 2.0, 10.0, 3.0]);
    assert_eq!(b, vec![3.0, 0.0]);

    // No bias: the new bias is the shift.
    let mut w = vec![1.0; 6];
    let b = f
        .fold_into(&mut w, None, WeightLayout::OutInKernel)
        .unwrap();
    assert_eq!(b, f.shift);
}

// ---- Errors ----

#[test]
fn from_state_needs_running_statistics() {
    for config in [
        BatchNormConfig::new(4).track_running_stats(false),
        BatchNormConfig::new(4)
            .track_running_stats(false)
            .affine(false),
        BatchNormConfig::keras(4).track_running_stats(false),
    ] {
        let state = BatchNormState::new(&config);
        match FoldedBatchNorm::from_state(&config, &state) {
            Err(Error::MissingState(msg)) => {
                assert!(msg.contains("track_running_stats"), "message: {msg}")
            }
            other => panic!("expected MissingState, got {other:?}"),
        }
    }
}

#[test]
fn from_state_checks_config_and_state() {
    let config = BatchNormConfig::new(3);
    let mut state = BatchNormState::new(&config);
    state.running_var.pop();
    assert!(matches!(
        FoldedBatchNorm::from_state(&config, &state),
        Err(Error::LengthMismatch {
            name: "running_var",
            expected: 3,
            got: 2
        })
    ));
    // A state of another channel count.
    let state = BatchNormState::new(&BatchNormConfig::new(4));
    assert!(matches!(
        FoldedBatchNorm::from_state(&config, &state),
        Err(Error::LengthMismatch { name: "gamma", .. })
    ));
    let bad = BatchNormConfig::new(3).eps(-1.0);
    assert!(matches!(
        FoldedBatchNorm::from_state(&bad, &BatchNormState::new(&bad)),
        Err(Error::BadEps(_))
    ));
}

#[test]
fn length_errors_leave_the_weight_untouched() {
    let mut rng = rng("length_errors_leave_the_weight_untouched");
    let config = BatchNormConfig::new(3);
    let f = FoldedBatchNorm::from_state(&config, &random_state(&mut rng, &config)).unwrap();
    for layout in [WeightLayout::OutInKernel, WeightLayout::KernelInOut] {
        // Not a multiple of the channel count.
        let mut w = normal_vec(&mut rng, 10, 1.0);
        let before = w.clone();
        let err = f.fold_into(&mut w, Some(&[0.0; 3]), layout).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    name: "weight",
                    expected: 12,
                    got: 10
                }
            ),
            "{err:?}"
        );
        assert_eq!(w, before);

        // Empty.
        let err = f.fold_into(&mut [], None, layout).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    name: "weight",
                    expected: 3,
                    got: 0
                }
            ),
            "{err:?}"
        );

        // A bias of another length: the weight (a valid one) is not scaled.
        let mut w = normal_vec(&mut rng, 15, 1.0);
        let before = w.clone();
        for bias in [&[0.0f32; 2][..], &[0.0; 4], &[]] {
            let err = f.fold_into(&mut w, Some(bias), layout).unwrap_err();
            assert!(
                matches!(err, Error::LengthMismatch { name: "bias", expected: 3, got } if got == bias.len()),
                "{err:?}"
            );
            assert_eq!(w, before);
        }

        // scale and shift edited to different lengths, or to nothing.
        let mut g = f.clone();
        g.shift.pop();
        let err = g.fold_into(&mut w, None, layout).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    name: "shift",
                    expected: 3,
                    got: 2
                }
            ),
            "{err:?}"
        );
        assert_eq!(w, before);
        let empty = FoldedBatchNorm {
            scale: vec![],
            shift: vec![],
        };
        assert!(matches!(
            empty.fold_into(&mut w, None, layout),
            Err(Error::ZeroFeatures)
        ));
        assert_eq!(w, before);

        // And the valid call does change it.
        f.fold_into(&mut w, None, layout).unwrap();
        assert_ne!(w, before);
    }
}

// ---- Folded into the layer after: batch norm then layer == folded layer ----

/// The eval forward of `x` of `shape`, rounded to f32 as the layer after reads it.
fn bn_eval_f32(
    config: &BatchNormConfig,
    state: &BatchNormState,
    shape: &Shape,
    x: &[f32],
) -> Vec<f32> {
    bn_eval(config, state, shape, x)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

#[test]
fn folded_into_the_next_linear_or_dense() {
    let mut rng = rng("folded_into_the_next_linear_or_dense");
    let n = 4;
    for (layout, forward) in [
        (WeightLayout::OutInKernel, linear_out_in as LinearFn),
        (WeightLayout::KernelInOut, linear_in_out as LinearFn),
    ] {
        for fin in [1, 3, 17] {
            for cout in [2, 5] {
                for (cname, config) in configs(fin) {
                    let state = random_state(&mut rng, &config);
                    let x = normal_vec(&mut rng, n * fin, 1.5);
                    let w = normal_vec(&mut rng, cout * fin, 1.0 / (fin as f64).sqrt());
                    let b = normal_vec(&mut rng, cout, 0.5);
                    let shape = Shape::channels_first(&[n, fin]).unwrap();
                    let normalized = bn_eval_f32(&config, &state, &shape, &x);
                    let want: Vec<f64> = forward(&normalized, n, fin, &w, Some(&b))
                        .into_iter()
                        .map(f64::from)
                        .collect();
                    let folded = FoldedBatchNorm::from_state(&config, &state).unwrap();
                    let mut wf = w.clone();
                    let bf = folded
                        .fold_into_next(&mut wf, Some(&b), cout, layout)
                        .unwrap();
                    let got = forward(&x, n, fin, &wf, Some(&bf));
                    assert_close(&format!("{layout:?} {fin} -> {cout} {cname}"), &got, &want);
                }
            }
        }
    }
}

#[test]
fn folded_into_the_next_unpadded_conv() {
    let mut rng = rng("folded_into_the_next_unpadded_conv");
    for p in conv_cases() {
        let config = BatchNormConfig::new(p.cin);
        let state = random_state(&mut rng, &config);
        let fan_in = p.cin * p.kh * p.kw;
        let w = normal_vec(&mut rng, p.weight_len(), 1.0 / (fan_in as f64).sqrt());
        let b = normal_vec(&mut rng, p.cout, 0.5);
        let folded = FoldedBatchNorm::from_state(&config, &state).unwrap();
        // NCHW with PyTorch's weight.
        let x = normal_vec(&mut rng, p.input_len(), 1.5);
        let shape = Shape::channels_first(&[p.n, p.cin, p.h, p.w]).unwrap();
        let normalized = bn_eval_f32(&config, &state, &shape, &x);
        let want: Vec<f64> = conv2d_nchw(&p, &normalized, &w, Some(&b))
            .into_iter()
            .map(f64::from)
            .collect();
        let mut wf = w.clone();
        let bf = folded
            .fold_into_next(&mut wf, Some(&b), p.cout, WeightLayout::OutInKernel)
            .unwrap();
        assert_close(
            &format!("Conv2d NCHW {p:?}"),
            &conv2d_nchw(&p, &x, &wf, Some(&bf)),
            &want,
        );
        // NHWC with Keras' weight [kh, kw, in, out] (the same values, permuted).
        let shape = Shape::channels_last(&[p.n, p.cin, p.h, p.w]).unwrap();
        let normalized = bn_eval_f32(&config, &state, &shape, &x);
        let mut wk = vec![0.0f32; w.len()];
        for o in 0..p.cout {
            for c in 0..p.cin {
                for u in 0..p.kh {
                    for v in 0..p.kw {
                        wk[((u * p.kw + v) * p.cin + c) * p.cout + o] =
                            w[((o * p.cin + c) * p.kh + u) * p.kw + v];
                    }
                }
            }
        }
        let want: Vec<f64> = conv2d_nhwc(&p, &normalized, &wk, Some(&b))
            .into_iter()
            .map(f64::from)
            .collect();
        let bf = folded
            .fold_into_next(&mut wk, Some(&b), p.cout, WeightLayout::KernelInOut)
            .unwrap();
        assert_close(
            &format!("Conv2D NHWC {p:?}"),
            &conv2d_nhwc(&p, &x, &wk, Some(&bf)),
            &want,
        );
    }
}

#[test]
fn folding_into_the_next_checks_lengths() {
    let folded = FoldedBatchNorm {
        scale: vec![2.0, 3.0],
        shift: vec![1.0, 1.0],
    };
    let mut w = vec![1.0f32; 6];
    let e = folded
        .fold_into_next(&mut w, None, 4, WeightLayout::OutInKernel)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                name: "weight",
                expected: 8,
                ..
            }
        ),
        "{e}"
    );
    let e = folded
        .fold_into_next(&mut w, Some(&[0.0; 2]), 3, WeightLayout::OutInKernel)
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthMismatch { name: "bias", .. }),
        "{e}"
    );
    let e = folded
        .fold_into_next(&mut w, None, 0, WeightLayout::OutInKernel)
        .unwrap_err();
    assert!(matches!(e, Error::ZeroFeatures), "{e}");
    assert_eq!(w, vec![1.0; 6], "failed folds leave the weight as it was");
}
