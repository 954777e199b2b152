//! The two networks, their seeded initial weights, the same training step on the
//! CPU (the crate's `CpuBatchNorm` and plain Rust matmuls) that checks the GPU run,
//! and folding the trained batch norms into the Linear layers for inference.

use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::{BatchNormConfig, BatchNormState, FoldedBatchNorm, Shape, WeightLayout};

use crate::data::Rng;

/// One layer. A Linear's weight is `[inputs, outputs]` row-major (Keras' `Dense`
/// kernel, `WeightLayout::KernelInOut`), so a batch is `X @ W + b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layer {
    Linear {
        inputs: usize,
        outputs: usize,
        relu: bool,
    },
    BatchNorm {
        channels: usize,
        relu: bool,
    },
}

impl Layer {
    pub fn width(&self) -> usize {
        match *self {
            Layer::Linear { outputs, .. } => outputs,
            Layer::BatchNorm { channels, .. } => channels,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// One logit per row, sigmoid + binary cross-entropy.
    Bce,
    /// One logit per class, softmax + cross-entropy.
    SoftmaxCe,
}

/// Whose conventions a network follows: its batch norm's options and its initial
/// weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `BatchNormConfig::keras` (eps 1e-3, momentum 0.99), Glorot-uniform weights,
    /// zero biases.
    Keras,
    /// `BatchNormConfig::new` (eps 1e-5, momentum 0.1), `nn.Linear`'s default
    /// U(-1/sqrt(in), 1/sqrt(in)) weights and biases.
    PyTorch,
}

#[derive(Clone, Debug)]
pub struct NetSpec {
    pub key: &'static str,
    pub flavor: Flavor,
    pub layers: Vec<Layer>,
    pub loss: Loss,
}

impl NetSpec {
    /// `Dense(3, relu) -> BatchNormalization -> Dense(2, relu) -> BatchNormalization
    /// -> Dense(1, sigmoid)`.
    pub fn keras(features: usize) -> Self {
        Self {
            key: "keras",
            flavor: Flavor::Keras,
            layers: vec![
                Layer::Linear {
                    inputs: features,
                    outputs: 3,
                    relu: true,
                },
                Layer::BatchNorm {
                    channels: 3,
                    relu: false,
                },
                Layer::Linear {
                    inputs: 3,
                    outputs: 2,
                    relu: true,
                },
                Layer::BatchNorm {
                    channels: 2,
                    relu: false,
                },
                Layer::Linear {
                    inputs: 2,
                    outputs: 1,
                    relu: false,
                },
            ],
            loss: Loss::Bce,
        }
    }

    /// `Linear(features, 256) -> BatchNorm1d(256) -> ReLU -> Linear(256, classes)`.
    pub fn pytorch(features: usize, classes: usize) -> Self {
        Self {
            key: "pytorch",
            flavor: Flavor::PyTorch,
            layers: vec![
                Layer::Linear {
                    inputs: features,
                    outputs: 256,
                    relu: false,
                },
                Layer::BatchNorm {
                    channels: 256,
                    relu: true,
                },
                Layer::Linear {
                    inputs: 256,
                    outputs: classes,
                    relu: false,
                },
            ],
            loss: Loss::SoftmaxCe,
        }
    }

    /// The same network without its batch norms (a ReLU after one moves onto the
    /// Linear before it). Its Linear layers are those of `self`, so both start from
    /// the same weights.
    pub fn without_bn(&self) -> Self {
        let mut layers: Vec<Layer> = Vec::new();
        for &layer in &self.layers {
            match layer {
                Layer::BatchNorm { relu, .. } => {
                    if let Some(Layer::Linear { relu: r, .. }) = layers.last_mut() {
                        *r |= relu;
                    }
                }
                linear => layers.push(linear),
            }
        }
        Self {
            layers,
            ..self.clone()
        }
    }

    pub fn has_bn(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, Layer::BatchNorm { .. }))
    }

    pub fn bn_config(&self, channels: usize) -> BatchNormConfig {
        match self.flavor {
            Flavor::Keras => BatchNormConfig::keras(channels),
            Flavor::PyTorch => BatchNormConfig::new(channels),
        }
    }

    pub fn outputs(&self) -> usize {
        self.layers.last().map_or(0, Layer::width)
    }

    /// The network in its framework's words.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for layer in &self.layers {
            match (self.flavor, *layer) {
                (Flavor::Keras, Layer::Linear { outputs, relu, .. }) => {
                    let last = outputs == self.outputs() && self.loss == Loss::Bce && !relu;
                    let act = if relu {
                        ", relu"
                    } else if last {
                        ", sigmoid"
                    } else {
                        ""
                    };
                    parts.push(format!("Dense({outputs}{act})"));
                }
                (Flavor::Keras, Layer::BatchNorm { relu, .. }) => {
                    parts.push("BatchNormalization".into());
                    if relu {
                        parts.push("ReLU".into());
                    }
                }
                (
                    Flavor::PyTorch,
                    Layer::Linear {
                        inputs,
                        outputs,
                        relu,
                    },
                ) => {
                    parts.push(format!("Linear({inputs}, {outputs})"));
                    if relu {
                        parts.push("ReLU".into());
                    }
                }
                (Flavor::PyTorch, Layer::BatchNorm { channels, relu }) => {
                    parts.push(format!("BatchNorm1d({channels})"));
                    if relu {
                        parts.push("ReLU".into());
                    }
                }
            }
        }
        parts.join(" -> ")
    }

    /// Initial weights and biases of the Linear layers, in order, from `seed`.
    pub fn init(&self, seed: u64) -> Vec<LinearParams> {
        let mut rng = Rng::new(seed);
        self.layers
            .iter()
            .filter_map(|l| match *l {
                Layer::Linear {
                    inputs, outputs, ..
                } => Some((inputs, outputs)),
                Layer::BatchNorm { .. } => None,
            })
            .map(|(inputs, outputs)| {
                let (limit, bias_limit) = match self.flavor {
                    Flavor::Keras => ((6.0 / (inputs + outputs) as f64).sqrt(), 0.0),
                    Flavor::PyTorch => {
                        let l = 1.0 / (inputs as f64).sqrt();
                        (l, l)
                    }
                };
                let w = (0..inputs * outputs)
                    .map(|_| rng.range(-limit, limit) as f32)
                    .collect();
                let b = (0..outputs)
                    .map(|_| rng.range(-bias_limit, bias_limit) as f32)
                    .collect();
                LinearParams { w, b }
            })
            .collect()
    }
}

/// A Linear layer's weight `[inputs, outputs]` and bias `[outputs]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearParams {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// `c = a @ b` with `a` m x k, `b` k x n (row-major), summed in ascending k in f32
/// as the GPU kernel does.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        for (kk, &av) in a[i * k..(i + 1) * k].iter().enumerate() {
            for (cv, &bv) in row.iter_mut().zip(&b[kk * n..(kk + 1) * n]) {
                *cv += av * bv;
            }
        }
    }
    c
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

fn relu_mask(h: &[f32], g: &mut [f32]) {
    for (g, &h) in g.iter_mut().zip(h) {
        if h <= 0.0 {
            *g = 0.0;
        }
    }
}

/// The loss of a batch of logits, its gradient and the accuracy, with the formulas
/// of bce.wgsl and softmax_xent.wgsl (sums in f64).
pub fn loss_and_grad(
    loss: Loss,
    logits: &[f32],
    labels: &[u32],
    outputs: usize,
) -> (f64, f64, Vec<f32>) {
    let rows = labels.len();
    let inv_rows = 1.0 / rows as f32;
    let mut grad = vec![0f32; logits.len()];
    let (mut total, mut hits) = (0f64, 0usize);
    for (r, &label) in labels.iter().enumerate() {
        let z = &logits[r * outputs..(r + 1) * outputs];
        match loss {
            Loss::Bce => {
                let (z, y) = (z[0], label as f32);
                total += f64::from(z.max(0.0) - z * y + (1.0 + (-z.abs()).exp()).ln());
                grad[r] = (1.0 / (1.0 + (-z).exp()) - y) * inv_rows;
                hits += usize::from((z > 0.0) == (y > 0.5));
            }
            Loss::SoftmaxCe => {
                let (mut top, mut arg) = (z[0], 0);
                for (j, &v) in z.iter().enumerate().skip(1) {
                    if v > top {
                        (top, arg) = (v, j);
                    }
                }
                let sum: f32 = z.iter().map(|&v| (v - top).exp()).sum();
                for (j, &v) in z.iter().enumerate() {
                    let p = (v - top).exp() / sum;
                    let hot = if j == label as usize { 1.0 } else { 0.0 };
                    grad[r * outputs + j] = (p - hot) * inv_rows;
                }
                total += f64::from(sum.ln() + top - z[label as usize]);
                hits += usize::from(arg == label as usize);
            }
        }
    }
    (total / rows as f64, hits as f64 / rows as f64, grad)
}

/// The training step of the GPU run on the CPU, in the same order: forward (batch
/// norm in training mode), loss, backward, then plain SGD on every weight, bias,
/// gamma and beta.
pub struct CpuNet {
    spec: NetSpec,
    linears: Vec<LinearParams>,
    bns: Vec<CpuBatchNorm>,
    lr: f32,
}

impl CpuNet {
    pub fn new(spec: &NetSpec, params: &[LinearParams], lr: f32) -> wgpu_batchnorm::Result<Self> {
        let bns = spec
            .layers
            .iter()
            .filter_map(|l| match *l {
                Layer::BatchNorm { channels, .. } => {
                    Some(CpuBatchNorm::new(spec.bn_config(channels)))
                }
                Layer::Linear { .. } => None,
            })
            .collect::<wgpu_batchnorm::Result<_>>()?;
        Ok(Self {
            spec: spec.clone(),
            linears: params.to_vec(),
            bns,
            lr,
        })
    }

    /// One step on a batch; returns (mean loss, accuracy) of the batch before the
    /// update.
    pub fn step(&mut self, x: &[f32], labels: &[u32]) -> wgpu_batchnorm::Result<(f64, f64)> {
        let rows = labels.len();
        let layers = self.spec.layers.clone();
        let mut values: Vec<Vec<f32>> = Vec::with_capacity(layers.len());
        let mut saved = Vec::new();
        let (mut li, mut bi) = (0, 0);
        for (i, layer) in layers.iter().enumerate() {
            let input: &[f32] = if i == 0 { x } else { &values[i - 1] };
            let out = match *layer {
                Layer::Linear {
                    inputs,
                    outputs,
                    relu,
                } => {
                    let p = &self.linears[li];
                    li += 1;
                    let mut z = matmul(input, &p.w, rows, inputs, outputs);
                    for (j, v) in z.iter_mut().enumerate() {
                        *v += p.b[j % outputs];
                        if relu {
                            *v = v.max(0.0);
                        }
                    }
                    z
                }
                Layer::BatchNorm { channels, relu } => {
                    let shape = Shape::channels_last(&[rows, channels])?;
                    let mut y = vec![0f32; rows * channels];
                    saved.push(self.bns[bi].forward_train_into(&shape, input, &mut y)?);
                    bi += 1;
                    if relu {
                        y.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                    y
                }
            };
            values.push(out);
        }
        let outputs = self.spec.outputs();
        let (loss, acc, mut g) =
            loss_and_grad(self.spec.loss, &values[layers.len() - 1], labels, outputs);

        let mut linear_grads = vec![None; self.linears.len()];
        let mut bn_grads = vec![None; self.bns.len()];
        for (i, layer) in layers.iter().enumerate().rev() {
            let input: &[f32] = if i == 0 { x } else { &values[i - 1] };
            match *layer {
                Layer::Linear {
                    inputs,
                    outputs,
                    relu,
                } => {
                    li -= 1;
                    if relu {
                        relu_mask(&values[i], &mut g);
                    }
                    let dw = matmul(&transpose(input, rows, inputs), &g, inputs, rows, outputs);
                    let mut db = vec![0f32; outputs];
                    for r in 0..rows {
                        for (d, &v) in db.iter_mut().zip(&g[r * outputs..(r + 1) * outputs]) {
                            *d += v;
                        }
                    }
                    if i > 0 {
                        let wt = transpose(&self.linears[li].w, inputs, outputs);
                        g = matmul(&g, &wt, rows, outputs, inputs);
                    }
                    linear_grads[li] = Some((dw, db));
                }
                Layer::BatchNorm { channels, relu } => {
                    bi -= 1;
                    if relu {
                        relu_mask(&values[i], &mut g);
                    }
                    let shape = Shape::channels_last(&[rows, channels])?;
                    let (mut dx, mut dgamma, mut dbeta) = (
                        vec![0f32; rows * channels],
                        vec![0f32; channels],
                        vec![0f32; channels],
                    );
                    self.bns[bi].backward_into(
                        &shape,
                        input,
                        &g,
                        Some(&saved[bi]),
                        Some(&mut dx),
                        Some(&mut dgamma),
                        Some(&mut dbeta),
                    )?;
                    g = dx;
                    bn_grads[bi] = Some((dgamma, dbeta));
                }
            }
        }
        let lr = self.lr;
        let sgd = |p: &mut [f32], g: &[f32]| p.iter_mut().zip(g).for_each(|(p, g)| *p -= lr * g);
        for (p, grads) in self.linears.iter_mut().zip(linear_grads) {
            if let Some((dw, db)) = grads {
                sgd(&mut p.w, &dw);
                sgd(&mut p.b, &db);
            }
        }
        for (bn, grads) in self.bns.iter_mut().zip(bn_grads) {
            if let Some((dgamma, dbeta)) = grads {
                sgd(&mut bn.state.gamma, &dgamma);
                sgd(&mut bn.state.beta, &dbeta);
            }
        }
        Ok((loss, acc))
    }
}

/// A network folded for inference: Linear layers only, and where each batch norm
/// went.
pub struct Folded {
    pub spec: NetSpec,
    pub params: Vec<LinearParams>,
    pub notes: Vec<String>,
}

/// The network for inference: every batch norm, as the affine map its eval forward
/// is (`FoldedBatchNorm`), folded into a Linear, leaving Linear layers only.
///
/// A batch norm right after a Linear without activation (the PyTorch network) is
/// folded into that Linear with `FoldedBatchNorm::fold_into`. A batch norm after a
/// ReLU (the Keras network) cannot go into the Linear before it, as the ReLU sits
/// between; it goes into the Linear after it instead:
/// `(h * scale + shift) @ W + b = h @ (diag(scale) W) + (shift @ W + b)`, row `k`
/// of `W` times `scale[k]`, computed here in f64 and rounded once, as `fold_into`
/// does for the layer before.
pub fn fold(
    spec: &NetSpec,
    params: &[LinearParams],
    states: &[BatchNormState],
) -> Result<Folded, Box<dyn std::error::Error>> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut out_params: Vec<LinearParams> = Vec::new();
    let mut notes = Vec::new();
    let mut pending: Option<(FoldedBatchNorm, usize)> = None;
    let (mut li, mut bi) = (0, 0);
    for &layer in &spec.layers {
        match layer {
            Layer::Linear {
                inputs,
                outputs,
                relu,
            } => {
                let mut p = params[li].clone();
                li += 1;
                if let Some((f, channels)) = pending.take() {
                    let mut b: Vec<f64> = p.b.iter().map(|&v| f64::from(v)).collect();
                    for k in 0..inputs {
                        for (j, bj) in b.iter_mut().enumerate() {
                            let w = f64::from(p.w[k * outputs + j]);
                            *bj += f64::from(f.shift[k]) * w;
                            p.w[k * outputs + j] = (w * f64::from(f.scale[k])) as f32;
                        }
                    }
                    p.b = b.into_iter().map(|v| v as f32).collect();
                    notes.push(format!(
                        "batch norm ({channels} channels) after a ReLU: folded into the Linear \
                         after it ({inputs} -> {outputs})"
                    ));
                }
                layers.push(Layer::Linear {
                    inputs,
                    outputs,
                    relu,
                });
                out_params.push(p);
            }
            Layer::BatchNorm { channels, relu } => {
                let f = FoldedBatchNorm::from_state(&spec.bn_config(channels), &states[bi])?;
                bi += 1;
                match (layers.last_mut(), out_params.last_mut()) {
                    (
                        Some(Layer::Linear {
                            inputs,
                            relu: before @ false,
                            ..
                        }),
                        Some(p),
                    ) => {
                        p.b = f.fold_into(&mut p.w, Some(&p.b), WeightLayout::KernelInOut)?;
                        *before = relu;
                        notes.push(format!(
                            "batch norm ({channels} channels) after a Linear ({inputs} -> \
                             {channels}): folded into it with FoldedBatchNorm::fold_into"
                        ));
                    }
                    _ if !relu => pending = Some((f, channels)),
                    _ => {
                        return Err(
                            "a batch norm between two ReLUs has no Linear to fold into".into()
                        )
                    }
                }
            }
        }
    }
    if pending.is_some() {
        return Err("a batch norm after the last Linear has no Linear to fold into".into());
    }
    Ok(Folded {
        spec: NetSpec {
            layers,
            ..spec.clone()
        },
        params: out_params,
        notes,
    })
}
