//! Optimizer steps on gamma and beta (SGD and Adam on the GPU) against PyTorch's
//! update rules written plainly in f64 here; host access to gamma and beta; and the
//! errors, which must leave the parameters, the optimizer state and the step count
//! as they were.

mod common;
mod gpu_support;

use common::{assert_close, normal, rng, std_normal};
use gpu_support::{ctx, layer_pair};
use rand::rngs::StdRng;
use rand::Rng;
use wgpu_batchnorm::{
    AffineOptimizer, BatchNorm, BatchNormConfig, Error, GpuContext, GradBuffers, GradMask, Layout,
    Optimizer, SavedStats, Shape, StatsSource,
};

const TOL: f64 = 1e-5;

const CHANNELS: &[usize] = &[1, 3, 17, 256, 257, 1000];

const STEPS: usize = 6;

// ----- PyTorch's update rules in f64 ------------------------------------------------

/// `torch.optim.SGD` / `torch.optim.Adam` (amsgrad off, maximize off) on one flat
/// parameter vector, in f64.
struct CpuOptimizer {
    optimizer: Optimizer,
    /// SGD's momentum buffer (None until the first step, as in PyTorch), or Adam's
    /// `exp_avg`.
    first: Option<Vec<f64>>,
    /// Adam's `exp_avg_sq`.
    second: Vec<f64>,
    t: u64,
}

impl CpuOptimizer {
    fn new(optimizer: Optimizer, len: usize) -> Self {
        let first = match optimizer {
            Optimizer::Sgd { .. } => None,
            Optimizer::Adam { .. } => Some(vec![0.0; len]),
        };
        Self {
            optimizer,
            first,
            second: vec![0.0; len],
            t: 0,
        }
    }

    fn step(&mut self, params: &mut [f64], grads: &[f64]) {
        assert_eq!(params.len(), grads.len());
        self.t += 1;
        match self.optimizer {
            Optimizer::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                let (lr, momentum, dampening, weight_decay) = (
                    f64::from(lr),
                    f64::from(momentum),
                    f64::from(dampening),
                    f64::from(weight_decay),
                );
                let mut d_p: Vec<f64> = grads.to_vec();
                if weight_decay != 0.0 {
                    for (d, p) in d_p.iter_mut().zip(params.iter()) {
                        *d += weight_decay * p;
                    }
                }
                if momentum != 0.0 {
                    let buf = match self.first.take() {
                        None => d_p.clone(),
                        Some(mut buf) => {
                            for (b, d) in buf.iter_mut().zip(&d_p) {
                                *b = momentum * *b + (1.0 - dampening) * d;
                            }
                            buf
                        }
                    };
                    if nesterov {
                        for (d, b) in d_p.iter_mut().zip(&buf) {
                            *d += momentum * b;
                        }
                    } else {
                        d_p = buf.clone();
                    }
                    self.first = Some(buf);
                }
                for (p, d) in params.iter_mut().zip(&d_p) {
                    *p -= lr * d;
                }
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let (lr, beta1, beta2, eps, weight_decay) = (
                    f64::from(lr),
                    f64::from(beta1),
                    f64::from(beta2),
                    f64::from(eps),
                    f64::from(weight_decay),
                );
                let t = self.t as i32;
                let bias_correction1 = 1.0 - beta1.powi(t);
                let bias_correction2 = 1.0 - beta2.powi(t);
                let exp_avg = self.first.as_mut().expect("Adam keeps exp_avg");
                for i in 0..params.len() {
                    let mut g = grads[i];
                    if weight_decay != 0.0 {
                        g += weight_decay * params[i];
                    }
                    exp_avg[i] = beta1 * exp_avg[i] + (1.0 - beta1) * g;
                    self.second[i] = beta2 * self.second[i] + (1.0 - beta2) * g * g;
                    let denom = self.second[i].sqrt() / bias_correction2.sqrt() + eps;
                    params[i] -= lr / bias_correction1 * exp_avg[i] / denom;
                }
            }
        }
    }

    /// The state in the layout of `AffineOptimizer::state_buffer` for `c` channels
    /// (segments `stride` apart; zero padding).
    fn state_layout(&self, c: usize, stride: usize) -> Vec<Vec<f64>> {
        let split = |v: &[f64]| vec![v[..c].to_vec(), v[c..].to_vec()];
        match self.optimizer {
            Optimizer::Sgd { momentum: 0.0, .. } => vec![],
            Optimizer::Sgd { .. } => split(self.first.as_ref().expect("a step was taken")),
            Optimizer::Adam { .. } => {
                let mut s = split(self.first.as_ref().expect("exp_avg"));
                s.extend(split(&self.second));
                s
            }
        }
        .into_iter()
        .inspect(|seg| assert!(seg.len() <= stride))
        .collect()
    }
}

// ----- helpers ------------------------------------------------------------------------

/// The optimizers every size is stepped with: every SGD option alone and together,
/// Adam's defaults, and Adam with other betas, eps and weight decay.
fn optimizers() -> Vec<Optimizer> {
    vec![
        Optimizer::sgd(0.1),
        Optimizer::sgd(0.1).weight_decay(0.05),
        Optimizer::sgd(0.05).momentum(0.9),
        Optimizer::sgd(0.05).momentum(0.9).dampening(0.3),
        Optimizer::sgd(0.05).momentum(0.8).nesterov(true),
        Optimizer::sgd(0.1).momentum(0.5).weight_decay(0.01),
        Optimizer::sgd(0.02)
            .momentum(0.9)
            .nesterov(true)
            .weight_decay(1e-3),
        Optimizer::adam(1e-3),
        Optimizer::adam(0.05).betas(0.8, 0.95).weight_decay(0.01),
        Optimizer::adam(0.01).eps(1e-3),
        Optimizer::adam(0.1).betas(0.0, 0.5),
    ]
}

/// `n` values around `center`, a few exactly zero.
fn values(rng: &mut StdRng, n: usize, center: f64, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if rng.random_range(0..10) == 0 {
                0.0
            } else {
                (center + scale * std_normal(rng)) as f32
            }
        })
        .collect()
}

/// Gradients of a random size (between 0.01 and 10).
fn gradients(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let scale = 10f64.powf(rng.random_range(-2.0..1.0));
    values(rng, n, 0.0, scale)
}

/// Gradients for the next step of `optimizer` from `params` (as [`gradients`]), with
/// the sign of those turned that the weight decay nearly cancels: where
/// `g = grad + weight_decay * w` comes near eps, Adam's step
/// (`lr * g / (|g| + eps)` on the first) magnifies the f32 rounding of that sum past
/// any tolerance — in PyTorch's f32 as here — so the comparison with f64 would
/// measure the input's conditioning, not the kernel.
fn gradients_for(rng: &mut StdRng, optimizer: &Optimizer, params: &[f64]) -> Vec<f32> {
    let weight_decay = match *optimizer {
        Optimizer::Sgd { weight_decay, .. } | Optimizer::Adam { weight_decay, .. } => {
            f64::from(weight_decay)
        }
    };
    let mut grads = gradients(rng, params.len());
    for (g, &w) in grads.iter_mut().zip(params) {
        let (a, b) = (f64::from(*g), weight_decay * w);
        if (a + b).abs() < 1e-3 * (a.abs() + b.abs()) {
            *g = -*g;
        }
    }
    grads
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

/// An affine layer of `c` channels with random gamma and beta (set with
/// `set_affine`), and the same parameters as one f64 vector `[gamma, beta]`.
fn random_layer(rng: &mut StdRng, c: usize) -> (BatchNorm, Vec<f64>) {
    let mut bn = BatchNorm::new(ctx(), BatchNormConfig::new(c)).expect("layer");
    let (gamma, beta) = (values(rng, c, 1.0, 0.5), values(rng, c, 0.0, 1.0));
    bn.set_affine(&gamma, &beta).expect("set_affine");
    let params = widen(&gamma).into_iter().chain(widen(&beta)).collect();
    (bn, params)
}

/// Compares the layer's gamma and beta with `params = [gamma, beta]`.
fn check_params(what: &str, bn: &BatchNorm, params: &[f64]) {
    let c = bn.config().num_features;
    let (gamma, beta) = bn.affine().expect("affine");
    assert_close(&format!("{what}: gamma"), &gamma, &params[..c], TOL);
    assert_close(&format!("{what}: beta"), &beta, &params[c..], TOL);
}

/// Compares the optimizer's state buffer with the CPU optimizer's state.
fn check_state(what: &str, bn: &BatchNorm, opt: &AffineOptimizer, cpu: &CpuOptimizer) {
    let (c, stride) = (bn.config().num_features, bn.stride());
    let want = cpu.state_layout(c, stride);
    if want.is_empty() {
        return;
    }
    let got: Vec<f32> = ctx()
        .read_buffer(opt.state_buffer(), want.len() * stride)
        .expect("state");
    for (k, seg) in want.iter().enumerate() {
        assert_close(
            &format!("{what}: state segment {k}"),
            &got[k * stride..k * stride + c],
            seg,
            TOL,
        );
    }
}

fn upload_grads(grads: &[f32], c: usize) -> (wgpu::Buffer, wgpu::Buffer) {
    (
        ctx().upload("dgamma", &grads[..c]).unwrap(),
        ctx().upload("dbeta", &grads[c..]).unwrap(),
    )
}

// ----- steps against the CPU ------------------------------------------------------------

#[test]
fn steps_match_pytorch_rules_for_every_size_and_option() {
    let mut rng = rng("steps_match_pytorch_rules_for_every_size_and_option");
    let ctx = ctx();
    for optimizer in optimizers() {
        for &c in CHANNELS {
            let what = format!("{optimizer:?} C={c}");
            let (mut bn, mut params) = random_layer(&mut rng, c);
            let mut opt = AffineOptimizer::new(&bn, optimizer).expect("optimizer");
            let mut cpu = CpuOptimizer::new(optimizer, 2 * c);
            assert_eq!(opt.steps(), 0);
            for s in 1..=STEPS {
                let grads = gradients_for(&mut rng, &optimizer, &params);
                let (dg, db) = upload_grads(&grads, c);
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                opt.step(&mut enc, &mut bn, &dg, &db).expect("step");
                ctx.submit_and_wait(enc).expect("submit");
                assert_eq!(opt.steps(), s as u64, "{what}: step count");
                cpu.step(&mut params, &widen(&grads));
                check_params(&format!("{what} step {s}"), &bn, &params);
            }
            check_state(&what, &bn, &opt, &cpu);
        }
    }
}

#[test]
fn steps_recorded_in_one_encoder_equal_steps_submitted_one_by_one() {
    let mut rng = rng("steps_recorded_in_one_encoder_equal_steps_submitted_one_by_one");
    let ctx = ctx();
    let c = 257;
    for optimizer in [
        Optimizer::adam(0.01).weight_decay(0.01),
        Optimizer::sgd(0.05).momentum(0.9).nesterov(true),
        Optimizer::sgd(0.05).momentum(0.7).dampening(0.2),
    ] {
        let (mut one_by_one, params0) = random_layer(&mut rng, c);
        let (gamma0, beta0) = one_by_one.affine().unwrap();
        // The gradients of the five steps, and the parameters after them on the CPU.
        let mut params = params0;
        let mut cpu = CpuOptimizer::new(optimizer, 2 * c);
        let grads: Vec<Vec<f32>> = (0..5)
            .map(|_| {
                let g = gradients_for(&mut rng, &optimizer, &params);
                cpu.step(&mut params, &widen(&g));
                g
            })
            .collect();
        let buffers: Vec<_> = grads.iter().map(|g| upload_grads(g, c)).collect();

        let mut opt = AffineOptimizer::new(&one_by_one, optimizer).unwrap();
        for (dg, db) in &buffers {
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            opt.step(&mut enc, &mut one_by_one, dg, db).unwrap();
            ctx.submit_and_wait(enc).unwrap();
        }
        let want = one_by_one.affine().unwrap();
        let want_state: Vec<f32> = ctx
            .read_buffer(opt.state_buffer(), (opt.state_buffer().size() / 4) as usize)
            .unwrap();

        for in_pass in [false, true] {
            let what = format!("{optimizer:?} in_pass={in_pass}");
            let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(c)).unwrap();
            bn.set_affine(&gamma0, &beta0).unwrap();
            let mut opt = AffineOptimizer::new(&bn, optimizer).unwrap();
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            if in_pass {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for (dg, db) in &buffers {
                    opt.step_in_pass(&mut pass, &mut bn, dg, db).unwrap();
                }
            } else {
                for (dg, db) in &buffers {
                    opt.step(&mut enc, &mut bn, dg, db).unwrap();
                }
            }
            assert_eq!(opt.steps(), 5, "{what}");
            ctx.submit_and_wait(enc).unwrap();
            let got = bn.affine().unwrap();
            assert_eq!(got, want, "{what}: gamma/beta differ from one-by-one steps");
            let state: Vec<f32> = ctx
                .read_buffer(opt.state_buffer(), want_state.len())
                .unwrap();
            assert_eq!(state, want_state, "{what}: optimizer state differs");
        }

        // Both also match the CPU (so neither path can be wrong in the same way).
        check_params(
            &format!("{optimizer:?} after 5 steps"),
            &one_by_one,
            &params,
        );
        // The steps must differ from each other (Adam's bias corrections, SGD's
        // first step): with every step the same, the comparison above proves less.
        assert_ne!(want.0, gamma0, "{optimizer:?}: the steps changed nothing");
    }
}

#[test]
fn learning_rate_can_change_between_steps() {
    let mut rng = rng("learning_rate_can_change_between_steps");
    let ctx = ctx();
    let c = 17;
    let optimizer = Optimizer::sgd(0.1).momentum(0.9);
    let (mut bn, mut params) = random_layer(&mut rng, c);
    let mut opt = AffineOptimizer::new(&bn, optimizer).unwrap();
    let mut cpu = CpuOptimizer::new(optimizer, 2 * c);
    for (s, lr) in [0.1f32, 0.05, 0.0, 0.2].into_iter().enumerate() {
        opt.set_lr(lr).unwrap();
        assert_eq!(opt.optimizer().lr(), lr);
        cpu.optimizer = cpu.optimizer.with_lr(lr);
        let grads = gradients(&mut rng, 2 * c);
        let (dg, db) = upload_grads(&grads, c);
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        opt.step(&mut enc, &mut bn, &dg, &db).unwrap();
        ctx.submit_and_wait(enc).unwrap();
        cpu.step(&mut params, &widen(&grads));
        check_params(&format!("step {s} lr={lr}"), &bn, &params);
    }
    check_state("after lr changes", &bn, &opt, &cpu);
    for bad in [-0.1f32, f32::NAN, f32::INFINITY] {
        let err = opt.set_lr(bad).unwrap_err();
        assert!(is_bad_hyper_parameter(&err, "lr"), "lr = {bad}: {err:?}");
        assert_eq!(opt.optimizer().lr(), 0.2, "a refused lr was kept");
    }
}

// ----- a whole training step in one encoder -----------------------------------------

#[test]
fn training_step_in_one_encoder_matches_reference_and_cpu_optimizer() {
    let mut rng = rng("training_step_in_one_encoder_matches_reference_and_cpu_optimizer");
    let ctx = ctx();
    for optimizer in [
        Optimizer::sgd(0.01)
            .momentum(0.9)
            .nesterov(true)
            .weight_decay(1e-3),
        Optimizer::adam(0.01).weight_decay(1e-3),
    ] {
        for (dims, layout) in [
            (&[8, 17, 5, 5][..], Layout::ChannelsFirst),
            (&[6, 33, 4, 3][..], Layout::ChannelsLast),
            (&[300, 5][..], Layout::ChannelsFirst),
        ] {
            let shape = Shape::new(dims, layout).unwrap();
            let c = shape.c();
            let what = format!("{optimizer:?} {dims:?} {layout:?}");
            let (mut gpu, mut reference) = layer_pair(&mut rng, &BatchNormConfig::new(c));
            let mut opt = AffineOptimizer::new(&gpu, optimizer).unwrap();
            let mut cpu = CpuOptimizer::new(optimizer, 2 * c);
            let mut params: Vec<f64> = widen(&reference.state.gamma)
                .into_iter()
                .chain(widen(&reference.state.beta))
                .collect();
            let saved = SavedStats::new(ctx, c).unwrap();
            let bytes = shape.bytes();
            let (y, dx) = (
                ctx.storage_buffer("y", bytes).unwrap(),
                ctx.storage_buffer("dx", bytes).unwrap(),
            );
            let (dg, db) = (
                ctx.storage_buffer("dgamma", 4 * c as u64).unwrap(),
                ctx.storage_buffer("dbeta", 4 * c as u64).unwrap(),
            );
            for iteration in 0..3 {
                let x = normal(&mut rng, &shape, 0.5, 2.0);
                let dy = normal(&mut rng, &shape, 0.0, 1.0);
                let (xb, dyb) = (ctx.upload("x", &x).unwrap(), ctx.upload("dy", &dy).unwrap());
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                gpu.forward_train(&mut enc, &shape, &xb, &y, &saved)
                    .unwrap();
                let grads = GradBuffers::new().dx(&dx).dgamma(&dg).dbeta(&db);
                gpu.backward(&mut enc, &shape, &xb, &dyb, Some(&saved), grads)
                    .unwrap();
                opt.step(&mut enc, &mut gpu, &dg, &db).unwrap();
                ctx.submit_and_wait(enc).unwrap();

                reference.forward_train(&shape, &x).unwrap();
                let r = reference
                    .backward(&shape, &x, &dy, StatsSource::Batch, GradMask::default())
                    .unwrap();
                let g: Vec<f64> = r
                    .dgamma
                    .unwrap()
                    .into_iter()
                    .chain(r.dbeta.unwrap())
                    .collect();
                cpu.step(&mut params, &g);
                reference.state.gamma = params[..c].iter().map(|&v| v as f32).collect();
                reference.state.beta = params[c..].iter().map(|&v| v as f32).collect();
                check_params(&format!("{what} iteration {iteration}"), &gpu, &params);
            }
            // (The optimizer state is not compared here: it holds the gradients
            // themselves, whose f32 error is bounded relative to the size of their
            // terms, not of their value; the steps tests compare it.)
            assert_eq!(opt.steps(), 3, "{what}");
        }
    }
}

// ----- errors ---------------------------------------------------------------------------

/// Whether `err` reports the hyper-parameter `name` as out of range. (Until the
/// error type has a variant of its own for this, such errors come as
/// `Error::MissingState` with a message naming the parameter.)
fn is_bad_hyper_parameter(err: &Error, name: &str) -> bool {
    matches!(err, Error::BadHyperParameter { name: n, .. } if *n == name)
}

#[test]
fn bad_hyper_parameters_are_refused() {
    let layer = BatchNorm::new(ctx(), BatchNormConfig::new(4)).unwrap();
    let sgd = Optimizer::sgd(0.1);
    let adam = Optimizer::adam(1e-3);
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let hyper: Vec<(Optimizer, &str)> = vec![
        (Optimizer::sgd(-0.1), "lr"),
        (Optimizer::sgd(nan), "lr"),
        (Optimizer::adam(inf), "lr"),
        (Optimizer::adam(-1e-3), "lr"),
        (sgd.weight_decay(-1e-4), "weight_decay"),
        (sgd.weight_decay(nan), "weight_decay"),
        (adam.weight_decay(-1e-4), "weight_decay"),
        (sgd.momentum(0.9).dampening(nan), "dampening"),
        (sgd.nesterov(true), "nesterov"),
        (sgd.momentum(0.9).dampening(0.1).nesterov(true), "nesterov"),
        (adam.betas(1.0, 0.999), "beta1"),
        (adam.betas(-0.1, 0.999), "beta1"),
        (adam.betas(nan, 0.999), "beta1"),
        (adam.betas(0.9, 1.0), "beta2"),
        (adam.betas(0.9, -1e-3), "beta2"),
        (adam.betas(0.9, inf), "beta2"),
    ];
    for (optimizer, name) in hyper {
        let err = AffineOptimizer::new(&layer, optimizer)
            .err()
            .unwrap_or_else(|| panic!("{optimizer:?} was accepted"));
        assert!(is_bad_hyper_parameter(&err, name), "{optimizer:?}: {err:?}");
        assert!(optimizer.validate().is_err());
    }
    for momentum in [-0.1, 1.5, nan, inf] {
        let optimizer = sgd.momentum(momentum);
        let err = AffineOptimizer::new(&layer, optimizer).err();
        assert!(
            matches!(err, Some(Error::BadMomentum(m)) if m.to_bits() == momentum.to_bits()),
            "{optimizer:?}: {err:?}"
        );
    }
    for eps in [-1e-8, nan, inf] {
        let optimizer = adam.eps(eps);
        let err = AffineOptimizer::new(&layer, optimizer).err();
        assert!(
            matches!(err, Some(Error::BadEps(e)) if e.to_bits() == eps.to_bits()),
            "{optimizer:?}: {err:?}"
        );
    }
    // The edges that are allowed.
    for optimizer in [
        Optimizer::sgd(0.0),
        sgd.momentum(1.0).dampening(-0.5),
        sgd.momentum(0.9).nesterov(true),
        adam.betas(0.0, 0.0).eps(0.0),
        Optimizer::adam(0.0).weight_decay(0.0),
    ] {
        AffineOptimizer::new(&layer, optimizer)
            .unwrap_or_else(|e| panic!("{optimizer:?} refused: {e}"));
    }
    // A layer without gamma and beta.
    let plain = BatchNorm::new(ctx(), BatchNormConfig::new(4).affine(false)).unwrap();
    assert!(matches!(
        AffineOptimizer::new(&plain, adam),
        Err(Error::MissingState(_))
    ));
}

/// Everything a refused step must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    affine: (Vec<f32>, Vec<f32>),
    state: Vec<f32>,
    steps: u64,
}

fn snapshot(bn: &BatchNorm, opt: &AffineOptimizer) -> Snapshot {
    let state = opt.state_buffer();
    Snapshot {
        affine: bn.affine().unwrap(),
        state: ctx()
            .read_buffer(state, (state.size() / 4) as usize)
            .unwrap(),
        steps: opt.steps(),
    }
}

/// Runs a step through `record` (once as `step`, once as `step_in_pass`) and checks
/// the error, that it recorded nothing (the encoder is submitted) and that it changed
/// nothing of `bn` and `opt`.
fn expect_refused(
    what: &str,
    bn: &mut BatchNorm,
    opt: &mut AffineOptimizer,
    mut record: impl FnMut(
        &mut AffineOptimizer,
        &mut BatchNorm,
        &mut wgpu::CommandEncoder,
        bool,
    ) -> Result<(), Error>,
    check: impl Fn(&Error) -> bool,
) {
    for in_pass in [false, true] {
        let before = snapshot(bn, opt);
        let mut enc = ctx().device().create_command_encoder(&Default::default());
        let err = record(opt, bn, &mut enc, in_pass)
            .err()
            .unwrap_or_else(|| panic!("{what} (in_pass={in_pass}): accepted"));
        assert!(
            check(&err),
            "{what} (in_pass={in_pass}): wrong error {err:?}"
        );
        ctx().submit_and_wait(enc).unwrap();
        assert_eq!(
            snapshot(bn, opt),
            before,
            "{what} (in_pass={in_pass}): a refused step changed something"
        );
    }
}

/// `opt.step` or `opt.step_in_pass` into `enc`.
fn step_either(
    opt: &mut AffineOptimizer,
    layer: &mut BatchNorm,
    enc: &mut wgpu::CommandEncoder,
    in_pass: bool,
    dgamma: &wgpu::Buffer,
    dbeta: &wgpu::Buffer,
) -> Result<(), Error> {
    if in_pass {
        let mut pass = enc.begin_compute_pass(&Default::default());
        opt.step_in_pass(&mut pass, layer, dgamma, dbeta)
    } else {
        opt.step(enc, layer, dgamma, dbeta)
    }
}

fn aliased(a: &'static str, b: &'static str) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::AliasedBuffers { a: x, b: y } if *x == a && *y == b)
}

#[test]
fn refused_steps_record_nothing_and_change_nothing() {
    let mut rng = rng("refused_steps_record_nothing_and_change_nothing");
    let ctx = ctx();
    let c = 6;
    for optimizer in [
        Optimizer::adam(0.01),
        Optimizer::sgd(0.1).momentum(0.9),
        Optimizer::sgd(0.1),
    ] {
        let name = format!("{optimizer:?}");
        let (mut bn, mut params) = random_layer(&mut rng, c);
        let mut opt = AffineOptimizer::new(&bn, optimizer).unwrap();
        let mut cpu = CpuOptimizer::new(optimizer, 2 * c);
        // One good step first, so that the state and the count are not zero.
        let grads = gradients(&mut rng, 2 * c);
        let (dg, db) = upload_grads(&grads, c);
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        opt.step(&mut enc, &mut bn, &dg, &db).unwrap();
        ctx.submit_and_wait(enc).unwrap();
        cpu.step(&mut params, &widen(&grads));
        assert_eq!(opt.steps(), 1);

        // A layer without gamma and beta.
        let mut plain = BatchNorm::new(ctx, BatchNormConfig::new(c).affine(false)).unwrap();
        expect_refused(
            &format!("{name}: affine = false"),
            &mut bn,
            &mut opt,
            |o, _, e, p| step_either(o, &mut plain, e, p, &dg, &db),
            |e| matches!(e, Error::MissingState(_)),
        );
        // A layer of another channel count (with gradient buffers that fit it).
        let (mut other, _) = random_layer(&mut rng, c + 1);
        let other_before = other.affine().unwrap();
        let (dg7, db7) = upload_grads(&gradients(&mut rng, 2 * (c + 1)), c + 1);
        expect_refused(
            &format!("{name}: C + 1 channels"),
            &mut bn,
            &mut opt,
            |o, _, e, p| step_either(o, &mut other, e, p, &dg7, &db7),
            |e| {
                matches!(e, Error::ChannelMismatch { expected, got }
                    if *expected == c + 1 && *got == c)
            },
        );
        assert_eq!(other.affine().unwrap(), other_before, "{name}: C + 1 layer");

        // Gradient buffers too small, or not STORAGE.
        let short = ctx.upload("short", &vec![1f32; c - 1]).unwrap();
        let unbound = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("not storage"),
            size: 4 * c as u64,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for (which, g, b) in [("dgamma", &short, &db), ("dbeta", &dg, &short)] {
            expect_refused(
                &format!("{name}: {which} too small"),
                &mut bn,
                &mut opt,
                |o, l, e, p| step_either(o, l, e, p, g, b),
                |e| matches!(e, Error::BufferTooSmall { name, .. } if *name == which),
            );
        }
        for (which, g, b) in [("dgamma", &unbound, &db), ("dbeta", &dg, &unbound)] {
            expect_refused(
                &format!("{name}: {which} without STORAGE"),
                &mut bn,
                &mut opt,
                |o, l, e, p| step_either(o, l, e, p, g, b),
                |e| matches!(e, Error::BufferUsage { name, .. } if *name == which),
            );
        }

        // Aliasing: the gradients with each other, with gamma/beta, with the state.
        expect_refused(
            &format!("{name}: dgamma == dbeta"),
            &mut bn,
            &mut opt,
            |o, l, e, p| step_either(o, l, e, p, &dg, &dg),
            aliased("dgamma", "dbeta"),
        );
        let affine = bn.affine_buffer().clone();
        for (which, g, b) in [("dgamma", &affine, &db), ("dbeta", &dg, &affine)] {
            expect_refused(
                &format!("{name}: {which} is the affine buffer"),
                &mut bn,
                &mut opt,
                |o, l, e, p| step_either(o, l, e, p, g, b),
                aliased(which, "the layer's gamma/beta (affine_buffer)"),
            );
        }
        let state = opt.state_buffer().clone();
        if state.size() >= 4 * c as u64 {
            for (which, g, b) in [("dgamma", &state, &db), ("dbeta", &dg, &state)] {
                expect_refused(
                    &format!("{name}: {which} is the optimizer state"),
                    &mut bn,
                    &mut opt,
                    |o, l, e, p| step_either(o, l, e, p, g, b),
                    aliased(which, "the optimizer's state (state_buffer)"),
                );
            }
        } else {
            // Plain SGD keeps no state: its placeholder is too small to pass.
            assert!(matches!(optimizer, Optimizer::Sgd { momentum, .. } if momentum == 0.0));
        }

        // After all that, the next step is step 2 and still right.
        let grads = gradients(&mut rng, 2 * c);
        let (dg, db) = upload_grads(&grads, c);
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        opt.step(&mut enc, &mut bn, &dg, &db).unwrap();
        ctx.submit_and_wait(enc).unwrap();
        assert_eq!(opt.steps(), 2, "{name}");
        cpu.step(&mut params, &widen(&grads));
        check_params(
            &format!("{name}: the step after the refused ones"),
            &bn,
            &params,
        );
        check_state(&name, &bn, &opt, &cpu);
    }
}

#[test]
fn gradients_may_be_ranges_of_one_buffer() {
    let mut rng = rng("gradients_may_be_ranges_of_one_buffer");
    let ctx = ctx();
    let c = 100;
    let bytes = 4 * c as u64;
    let align = u64::from(ctx.device().limits().min_storage_buffer_offset_alignment).max(16);
    assert!(
        align < bytes,
        "the overlap case below needs an alignment under {bytes}"
    );
    let optimizer = Optimizer::adam(0.01);
    let (mut bn, mut params) = random_layer(&mut rng, c);
    let mut opt = AffineOptimizer::new(&bn, optimizer).unwrap();
    let mut cpu = CpuOptimizer::new(optimizer, 2 * c);

    // dgamma at 0, dbeta at the first aligned offset past it: both only read, so
    // one buffer may hold both.
    let at = bytes.next_multiple_of(align);
    let grads = gradients(&mut rng, 2 * c);
    let mut host = vec![f32::NAN; (at + bytes) as usize / 4 + 1];
    host[..c].copy_from_slice(&grads[..c]);
    host[at as usize / 4..][..c].copy_from_slice(&grads[c..]);
    let arena = ctx.upload("arena", &host).unwrap();
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    opt.step(
        &mut enc,
        &mut bn,
        arena.slice(..bytes),
        arena.slice(at..at + bytes),
    )
    .unwrap();
    ctx.submit_and_wait(enc).unwrap();
    cpu.step(&mut params, &widen(&grads));
    check_params("ranges of one buffer", &bn, &params);

    // Overlapping ranges, and a misaligned one: refused.
    expect_refused(
        "dbeta overlapping dgamma",
        &mut bn,
        &mut opt,
        |o, l, e, p| {
            let (g, b) = (arena.slice(..bytes), arena.slice(align..align + bytes));
            if p {
                let mut pass = e.begin_compute_pass(&Default::default());
                o.step_in_pass(&mut pass, l, g, b)
            } else {
                o.step(e, l, g, b)
            }
        },
        aliased("dgamma", "dbeta"),
    );
    expect_refused(
        "dbeta misaligned",
        &mut bn,
        &mut opt,
        |o, l, e, p| {
            let (g, b) = (arena.slice(..bytes), arena.slice(at + 4..at + 4 + bytes));
            if p {
                let mut pass = e.begin_compute_pass(&Default::default());
                o.step_in_pass(&mut pass, l, g, b)
            } else {
                o.step(e, l, g, b)
            }
        },
        |e| matches!(e, Error::MisalignedOffset { name, .. } if *name == "dbeta"),
    );
    assert_eq!(opt.steps(), 1);
}

#[test]
fn a_layer_of_another_context_is_refused() {
    let mut rng = rng("a_layer_of_another_context_is_refused");
    let c = 5;
    let optimizer = Optimizer::adam(0.01);
    let (mut bn, mut params) = random_layer(&mut rng, c);
    let mut opt = AffineOptimizer::new(&bn, optimizer).unwrap();
    let mut cpu = CpuOptimizer::new(optimizer, 2 * c);
    let other_ctx = GpuContext::from_env().expect("a second device");
    let mut elsewhere = BatchNorm::new(&other_ctx, BatchNormConfig::new(c)).unwrap();
    let before = elsewhere.affine().unwrap();
    let grads = gradients(&mut rng, 2 * c);
    let (dg, db) = (
        other_ctx.upload("dgamma", &grads[..c]).unwrap(),
        other_ctx.upload("dbeta", &grads[c..]).unwrap(),
    );
    let mut enc = other_ctx
        .device()
        .create_command_encoder(&Default::default());
    let err = opt.step(&mut enc, &mut elsewhere, &dg, &db).unwrap_err();
    assert!(matches!(&err, Error::ContextMismatch(_)), "{err:?}");
    other_ctx.submit_and_wait(enc).unwrap();
    assert_eq!(elsewhere.affine().unwrap(), before);
    assert_eq!(opt.steps(), 0);
    // The optimizer still works with its own context's layers, and with those of a
    // clone of it with another tuning.
    let (dg, db) = upload_grads(&grads, c);
    let mut enc = ctx().device().create_command_encoder(&Default::default());
    opt.step(&mut enc, &mut bn, &dg, &db).unwrap();
    ctx().submit_and_wait(enc).unwrap();
    assert_eq!(opt.steps(), 1);
    cpu.step(&mut params, &widen(&grads));
    check_params("own context", &bn, &params);
    // (Its state carries over to the other layer: step 2 from gamma = 1, beta = 0.)
    let tuned = ctx().with_tuning(wgpu_batchnorm::Tuning::cpu(2));
    let mut same_device = BatchNorm::new(&tuned, BatchNormConfig::new(c)).unwrap();
    let mut enc = tuned.device().create_command_encoder(&Default::default());
    opt.step(&mut enc, &mut same_device, &dg, &db).unwrap();
    tuned.submit_and_wait(enc).unwrap();
    assert_eq!(opt.steps(), 2);
    let mut fresh: Vec<f64> = [vec![1.0; c], vec![0.0; c]].concat();
    cpu.step(&mut fresh, &widen(&grads));
    check_params("a clone of the context", &same_device, &fresh);
}

// ----- host access to gamma and beta ----------------------------------------------------

#[test]
fn set_affine_and_affine_round_trip() {
    let mut rng = rng("set_affine_and_affine_round_trip");
    let ctx = ctx();
    for &c in &[1usize, 5, 8, 257] {
        let config = BatchNormConfig::new(c);
        let (mut gpu, mut reference) = layer_pair(&mut rng, &config);
        let state_before = gpu.state().unwrap();
        assert_eq!(
            gpu.affine().unwrap(),
            (state_before.gamma.clone(), state_before.beta.clone())
        );
        let gamma = values(&mut rng, c, 1.0, 0.5);
        let beta = values(&mut rng, c, 0.0, 2.0);
        gpu.set_affine(&gamma, &beta).unwrap();
        assert_eq!(
            gpu.affine().unwrap(),
            (gamma.clone(), beta.clone()),
            "C={c}"
        );
        // The rest of the state is untouched, and the kernels use the new values.
        let state = gpu.state().unwrap();
        assert_eq!((&state.gamma, &state.beta), (&gamma, &beta));
        assert_eq!(state.running_mean, state_before.running_mean);
        assert_eq!(state.running_var, state_before.running_var);
        assert_eq!(state.num_batches_tracked, state_before.num_batches_tracked);
        reference.state.gamma = gamma.clone();
        reference.state.beta = beta.clone();
        let shape = Shape::channels_first(&[4, c, 3]).unwrap();
        let x = normal(&mut rng, &shape, 0.0, 1.0);
        let got = gpu.forward_eval_host(&shape, &x).unwrap();
        let want = reference.forward_eval(&shape, &x).unwrap();
        assert_close(
            &format!("C={c}: eval y after set_affine"),
            &got.y,
            &want.y,
            TOL,
        );

        // Wrong lengths: refused, nothing written.
        let long = vec![0.5f32; c + 1];
        let short = vec![0.5f32; c - 1];
        for (which, g, b, got) in [
            ("gamma", &long[..], &beta[..], c + 1),
            ("gamma", &short[..], &beta[..], c - 1),
            ("beta", &gamma[..], &long[..], c + 1),
            ("beta", &gamma[..], &short[..], c - 1),
        ] {
            let err = gpu.set_affine(g, b).unwrap_err();
            assert!(
                matches!(err, Error::LengthMismatch { name, expected, got: n }
                    if name == which && expected == c && n == got),
                "C={c} {which} of {got}: {err:?}"
            );
        }
        let _ = ctx.device().poll(wgpu::PollType::wait_indefinitely());
        assert_eq!(
            gpu.affine().unwrap(),
            (gamma, beta),
            "C={c}: after refusals"
        );
    }
    // Without affine: both refused.
    let mut plain = BatchNorm::new(ctx, BatchNormConfig::new(3).affine(false)).unwrap();
    assert!(matches!(plain.affine(), Err(Error::MissingState(_))));
    assert!(matches!(
        plain.set_affine(&[1.0; 3], &[0.0; 3]),
        Err(Error::MissingState(_))
    ));
}
