//! The GPU side of the example: its own kernels (matmul, bias + ReLU, loss, SGD) and
//! a network whose whole training step — forward, loss, backward, every update — is
//! recorded into one command encoder, with the crate's `BatchNorm` and
//! `AffineOptimizer` for the batch-norm layers.

use wgpu::util::DeviceExt;
use wgpu_batchnorm::{
    AffineOptimizer, BatchNorm, BatchNormState, GpuContext, GradBuffers, Optimizer, SavedStats,
    Shape,
};

use crate::net::{Layer, LinearParams, Loss, NetSpec};

/// Side of the matmul workgroup in invocations (the WGSL `WG` override); each
/// invocation computes a 4 x 4 block, so a workgroup covers `4 * MATMUL_WG` squared.
const MATMUL_WG: u32 = 8;
/// Invocations per workgroup of the elementwise kernels (their `@workgroup_size`).
const ELEMENTWISE_WG: u32 = 256;
/// Workgroups per dimension a dispatch may use.
const MAX_GROUPS: u32 = 65535;

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The example's compute pipelines, built once.
pub struct Kernels {
    matmul: wgpu::ComputePipeline,
    bias_act: wgpu::ComputePipeline,
    relu_backward: wgpu::ComputePipeline,
    bias_grad: wgpu::ComputePipeline,
    sgd: wgpu::ComputePipeline,
    softmax_xent: wgpu::ComputePipeline,
    bce: wgpu::ComputePipeline,
    /// Bound where a kernel's optional input is absent (bias_act without bias).
    empty: wgpu::Buffer,
}

/// The WGSL sources, by name.
pub const SOURCES: [(&str, &str); 7] = [
    ("matmul", include_str!("matmul.wgsl")),
    ("bias_act", include_str!("bias_act.wgsl")),
    ("relu_backward", include_str!("relu_backward.wgsl")),
    ("bias_grad", include_str!("bias_grad.wgsl")),
    ("sgd", include_str!("sgd.wgsl")),
    ("softmax_xent", include_str!("softmax_xent.wgsl")),
    ("bce", include_str!("bce.wgsl")),
];

impl Kernels {
    pub fn new(ctx: &GpuContext) -> Self {
        let device = ctx.device();
        let build = |name: &str, constants: &[(&str, f64)]| {
            let source = SOURCES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| *s)
                .unwrap_or("");
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
        };
        Self {
            matmul: build("matmul", &[("WG", f64::from(MATMUL_WG))]),
            bias_act: build("bias_act", &[]),
            relu_backward: build("relu_backward", &[]),
            bias_grad: build("bias_grad", &[]),
            sgd: build("sgd", &[]),
            softmax_xent: build("softmax_xent", &[]),
            bce: build("bce", &[]),
            empty: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("train.empty"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
        }
    }
}

/// Records one dispatch of `pipeline` with a fresh uniform holding `params` (binding
/// 0) and `buffers` bound in order from binding 1.
fn dispatch(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    params: &[u32],
    buffers: &[&wgpu::Buffer],
    groups: (u32, u32),
) {
    let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("train.params"),
        contents: bytemuck::cast_slice(params),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let mut entries = vec![wgpu::BindGroupEntry {
        binding: 0,
        resource: uniform.as_entire_binding(),
    }];
    for (i, b) in buffers.iter().enumerate() {
        entries.push(wgpu::BindGroupEntry {
            binding: i as u32 + 1,
            resource: b.as_entire_binding(),
        });
    }
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("train"),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    pass.dispatch_workgroups(groups.0, groups.1, 1);
}

/// Workgroups for `len` elements, `per_group` each, split over two dimensions past
/// the per-dimension limit (the kernels fold `gid.y` back in).
fn elementwise_groups(len: usize) -> (u32, u32) {
    let groups = (len as u32).div_ceil(ELEMENTWISE_WG).max(1);
    if groups <= MAX_GROUPS {
        (groups, 1)
    } else {
        (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
    }
}

/// A strided view of a matrix in a buffer: element (i, j) at `off + i * row + j * col`.
#[derive(Clone, Copy)]
struct View<'a> {
    buffer: &'a wgpu::Buffer,
    off: usize,
    row: usize,
    col: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with `cols` columns.
    fn rows(buffer: &'a wgpu::Buffer, off: usize, cols: usize) -> Self {
        Self {
            buffer,
            off,
            row: cols,
            col: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    fn transposed(buffer: &'a wgpu::Buffer, off: usize, cols: usize) -> Self {
        Self {
            buffer,
            off,
            row: 1,
            col: cols,
        }
    }
}

impl Kernels {
    /// `c (m x n, row-major) = a (m x k) @ b (k x n)`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        (m, n, k): (usize, usize, usize),
        a: View<'_>,
        b: View<'_>,
        c: &wgpu::Buffer,
    ) {
        let params = [m, n, k, a.off, a.row, a.col, b.off, b.row, b.col, 0, 0, 0].map(|v| v as u32);
        let side = 4 * MATMUL_WG;
        let groups = ((n as u32).div_ceil(side), (m as u32).div_ceil(side));
        dispatch(
            device,
            encoder,
            &self.matmul,
            &params,
            &[a.buffer, b.buffer, c],
            groups,
        );
    }

    fn bias_act(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        h: &wgpu::Buffer,
        (rows, cols): (usize, usize),
        bias: Option<&wgpu::Buffer>,
        relu: bool,
    ) {
        let len = rows * cols;
        let params = [
            len as u32,
            cols as u32,
            u32::from(bias.is_some()),
            u32::from(relu),
        ];
        let bias = bias.unwrap_or(&self.empty);
        dispatch(
            device,
            encoder,
            &self.bias_act,
            &params,
            &[bias, h],
            elementwise_groups(len),
        );
    }

    fn relu_backward(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        h: &wgpu::Buffer,
        g: &wgpu::Buffer,
        len: usize,
    ) {
        let params = [len as u32, 0, 0, 0];
        dispatch(
            device,
            encoder,
            &self.relu_backward,
            &params,
            &[h, g],
            elementwise_groups(len),
        );
    }

    fn bias_grad(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        g: &wgpu::Buffer,
        (rows, cols): (usize, usize),
        db: &wgpu::Buffer,
    ) {
        let params = [rows as u32, cols as u32, 0, 0];
        let groups = ((cols as u32).div_ceil(64), 1);
        dispatch(device, encoder, &self.bias_grad, &params, &[g, db], groups);
    }

    fn sgd(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        w: &wgpu::Buffer,
        g: &wgpu::Buffer,
        len: usize,
        lr: f32,
    ) {
        let params = [len as u32, lr.to_bits(), 0, 0];
        dispatch(
            device,
            encoder,
            &self.sgd,
            &params,
            &[g, w],
            elementwise_groups(len),
        );
    }
}

struct GpuLinear {
    inputs: usize,
    outputs: usize,
    w: wgpu::Buffer,
    b: wgpu::Buffer,
    dw: wgpu::Buffer,
    db: wgpu::Buffer,
}

struct GpuBn {
    layer: BatchNorm,
    optimizer: AffineOptimizer,
    saved: SavedStats,
    dgamma: wgpu::Buffer,
    dbeta: wgpu::Buffer,
}

/// Per-layer outputs and their gradients for batches of up to `rows` rows. A ReLU
/// works in place on its layer's output.
struct Activations {
    rows: usize,
    values: Vec<wgpu::Buffer>,
    grads: Vec<wgpu::Buffer>,
}

impl Activations {
    fn new(ctx: &GpuContext, spec: &NetSpec, rows: usize, grads: bool) -> BoxResult<Self> {
        let mut values = Vec::new();
        let mut grad_buffers = Vec::new();
        for (i, layer) in spec.layers.iter().enumerate() {
            let bytes = (rows * layer.width() * 4) as u64;
            values.push(ctx.storage_buffer(&format!("train.value{i}"), bytes)?);
            if grads {
                grad_buffers.push(ctx.storage_buffer(&format!("train.grad{i}"), bytes)?);
            }
        }
        Ok(Self {
            rows,
            values,
            grads: grad_buffers,
        })
    }
}

/// A network on the GPU: weights, batch-norm layers with their optimizers, and the
/// buffers of one training batch.
pub struct GpuNet<'k> {
    ctx: GpuContext,
    kernels: &'k Kernels,
    spec: NetSpec,
    linears: Vec<GpuLinear>,
    bns: Vec<GpuBn>,
    train: Option<Activations>,
    /// `[count, pad, (loss, accuracy) per step]`, appended to by the loss kernel.
    history: wgpu::Buffer,
    history_read: usize,
    lr: f32,
}

/// Where a batch's rows come from: `x` from row `first`, `features` values per row.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub x: &'a wgpu::Buffer,
    pub labels: &'a wgpu::Buffer,
    pub first: usize,
    pub rows: usize,
    pub features: usize,
}

impl<'k> GpuNet<'k> {
    /// A network with the given Linear weights, batch norms in their initial state,
    /// room for `steps` history entries, and training buffers for batches of
    /// `batch` rows (none when `batch` is 0: inference only).
    pub fn new(
        ctx: &GpuContext,
        kernels: &'k Kernels,
        spec: &NetSpec,
        params: &[LinearParams],
        batch: usize,
        lr: f32,
        steps: usize,
    ) -> BoxResult<Self> {
        let mut linears = Vec::new();
        let mut bns = Vec::new();
        let mut it = params.iter();
        for (i, layer) in spec.layers.iter().enumerate() {
            match *layer {
                Layer::Linear {
                    inputs, outputs, ..
                } => {
                    let p = it.next().ok_or("fewer weights than Linear layers")?;
                    linears.push(GpuLinear {
                        inputs,
                        outputs,
                        w: ctx.upload(&format!("train.linear{i}.w"), &p.w)?,
                        b: ctx.upload(&format!("train.linear{i}.b"), &p.b)?,
                        dw: ctx.storage_buffer(
                            &format!("train.linear{i}.dw"),
                            (p.w.len() * 4) as u64,
                        )?,
                        db: ctx.storage_buffer(
                            &format!("train.linear{i}.db"),
                            (p.b.len() * 4) as u64,
                        )?,
                    });
                }
                Layer::BatchNorm { channels, .. } => {
                    let layer = BatchNorm::new(ctx, spec.bn_config(channels))?;
                    // Every step binds the same buffers: forward, backward and
                    // eval dispatches keep their bind groups.
                    layer.keep_bind_groups(8);
                    let optimizer = AffineOptimizer::new(&layer, Optimizer::sgd(lr))?;
                    let bytes = (channels * 4) as u64;
                    bns.push(GpuBn {
                        layer,
                        optimizer,
                        saved: SavedStats::new(ctx, channels)?,
                        dgamma: ctx.storage_buffer(&format!("train.bn{i}.dgamma"), bytes)?,
                        dbeta: ctx.storage_buffer(&format!("train.bn{i}.dbeta"), bytes)?,
                    });
                }
            }
        }
        let train = if batch > 0 {
            Some(Activations::new(ctx, spec, batch, true)?)
        } else {
            None
        };
        let history = ctx.storage_buffer("train.history", (8 + 8 * steps.max(1)) as u64)?;
        Ok(Self {
            ctx: ctx.clone(),
            kernels,
            spec: spec.clone(),
            linears,
            bns,
            train,
            history,
            history_read: 0,
            lr,
        })
    }

    /// Records a forward over `batch` into `encoder`: batch norms in training mode
    /// (batch statistics, running statistics updated) or in eval mode (running
    /// statistics).
    fn record_forward(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        acts: &Activations,
        batch: Batch<'_>,
        training: bool,
    ) -> BoxResult<()> {
        let device = self.ctx.device().clone();
        let rows = batch.rows;
        let (mut li, mut bi) = (0, 0);
        for (i, layer) in self.spec.layers.iter().enumerate() {
            let out = &acts.values[i];
            match *layer {
                Layer::Linear { relu, .. } => {
                    let l = &self.linears[li];
                    li += 1;
                    let a = if i == 0 {
                        View::rows(batch.x, batch.first * batch.features, batch.features)
                    } else {
                        View::rows(&acts.values[i - 1], 0, l.inputs)
                    };
                    let dims = (rows, l.outputs, l.inputs);
                    self.kernels.matmul(
                        &device,
                        encoder,
                        dims,
                        a,
                        View::rows(&l.w, 0, l.outputs),
                        out,
                    );
                    self.kernels.bias_act(
                        &device,
                        encoder,
                        out,
                        (rows, l.outputs),
                        Some(&l.b),
                        relu,
                    );
                }
                Layer::BatchNorm { channels, relu } => {
                    let bn = &mut self.bns[bi];
                    bi += 1;
                    let shape = Shape::channels_last(&[rows, channels])?;
                    let x = &acts.values[i - 1];
                    if training {
                        bn.layer.forward_train(encoder, &shape, x, out, &bn.saved)?;
                    } else {
                        bn.layer.forward_eval(encoder, &shape, x, out, None)?;
                    }
                    if relu {
                        self.kernels
                            .bias_act(&device, encoder, out, (rows, channels), None, true);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records one whole training step on `batch` into `encoder`: forward, loss (its
    /// mean and the batch accuracy appended to the history on the GPU), backward,
    /// and the SGD updates of every weight, bias, gamma and beta.
    pub fn record_step(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        batch: Batch<'_>,
    ) -> BoxResult<()> {
        let acts = self
            .train
            .take()
            .ok_or("this network has no training buffers")?;
        let result = self.record_step_with(encoder, &acts, batch);
        self.train = Some(acts);
        result
    }

    fn record_step_with(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        acts: &Activations,
        batch: Batch<'_>,
    ) -> BoxResult<()> {
        if batch.rows != acts.rows {
            return Err(format!("batch of {} rows, buffers for {}", batch.rows, acts.rows).into());
        }
        self.record_forward(encoder, acts, batch, true)?;
        let device = self.ctx.device().clone();
        let k = self.kernels;
        let rows = batch.rows;
        let last = self.spec.layers.len() - 1;
        let (logits, dlogits) = (&acts.values[last], &acts.grads[last]);
        match self.spec.loss {
            Loss::Bce => {
                let params = [rows as u32, batch.first as u32, 0, 0];
                let buffers = [logits, batch.labels, dlogits, &self.history];
                dispatch(&device, encoder, &k.bce, &params, &buffers, (1, 1));
            }
            Loss::SoftmaxCe => {
                let params = [
                    rows as u32,
                    self.spec.outputs() as u32,
                    batch.first as u32,
                    0,
                ];
                let buffers = [logits, batch.labels, dlogits, &self.history];
                dispatch(&device, encoder, &k.softmax_xent, &params, &buffers, (1, 1));
            }
        }

        let (mut li, mut bi) = (self.linears.len(), self.bns.len());
        for (i, layer) in self.spec.layers.iter().enumerate().rev() {
            let (h, g) = (&acts.values[i], &acts.grads[i]);
            match *layer {
                Layer::Linear { relu, .. } => {
                    li -= 1;
                    let l = &self.linears[li];
                    if relu {
                        k.relu_backward(&device, encoder, h, g, rows * l.outputs);
                    }
                    // dW = X^T @ g: X^T is inputs x rows.
                    let xt = if i == 0 {
                        View::transposed(batch.x, batch.first * batch.features, batch.features)
                    } else {
                        View::transposed(&acts.values[i - 1], 0, l.inputs)
                    };
                    let g_rows = View::rows(g, 0, l.outputs);
                    k.matmul(
                        &device,
                        encoder,
                        (l.inputs, l.outputs, rows),
                        xt,
                        g_rows,
                        &l.dw,
                    );
                    k.bias_grad(&device, encoder, g, (rows, l.outputs), &l.db);
                    if i > 0 {
                        // dX = g @ W^T: W^T is outputs x inputs.
                        let wt = View::transposed(&l.w, 0, l.outputs);
                        k.matmul(
                            &device,
                            encoder,
                            (rows, l.inputs, l.outputs),
                            g_rows,
                            wt,
                            &acts.grads[i - 1],
                        );
                    }
                }
                Layer::BatchNorm { channels, relu } => {
                    bi -= 1;
                    if relu {
                        k.relu_backward(&device, encoder, h, g, rows * channels);
                    }
                    let bn = &mut self.bns[bi];
                    let shape = Shape::channels_last(&[rows, channels])?;
                    let grads = GradBuffers::new()
                        .dx(&acts.grads[i - 1])
                        .dgamma(&bn.dgamma)
                        .dbeta(&bn.dbeta);
                    bn.layer.backward(
                        encoder,
                        &shape,
                        &acts.values[i - 1],
                        g,
                        Some(&bn.saved),
                        grads,
                    )?;
                }
            }
        }

        for l in &self.linears {
            k.sgd(&device, encoder, &l.w, &l.dw, l.inputs * l.outputs, self.lr);
            k.sgd(&device, encoder, &l.b, &l.db, l.outputs, self.lr);
        }
        for bn in &mut self.bns {
            bn.optimizer
                .step(encoder, &mut bn.layer, &bn.dgamma, &bn.dbeta)?;
        }
        Ok(())
    }

    /// The (loss, accuracy) entries the loss kernel appended since the last call
    /// (reads back; waits for the steps submitted so far).
    pub fn new_history(&mut self) -> BoxResult<Vec<(f32, f32)>> {
        let words: Vec<u32> = self
            .ctx
            .read_buffer(&self.history, (self.history.size() / 4) as usize)?;
        let count = words[0] as usize;
        let entries: Vec<(f32, f32)> = (self.history_read..count)
            .map(|i| {
                (
                    f32::from_bits(words[2 + 2 * i]),
                    f32::from_bits(words[3 + 2 * i]),
                )
            })
            .collect();
        self.history_read = count;
        Ok(entries)
    }

    /// Logits of `rows` rows of `x` (from row 0), in chunks of up to `chunk` rows,
    /// with every batch norm in eval mode (running statistics).
    pub fn eval_logits(
        &mut self,
        x: &wgpu::Buffer,
        rows: usize,
        features: usize,
        chunk: usize,
    ) -> BoxResult<Vec<f32>> {
        let chunk = chunk.min(rows).max(1);
        let acts = Activations::new(&self.ctx, &self.spec, chunk, false)?;
        let outputs = self.spec.outputs();
        let mut logits = Vec::with_capacity(rows * outputs);
        let mut first = 0;
        while first < rows {
            let n = chunk.min(rows - first);
            let mut encoder = self
                .ctx
                .device()
                .create_command_encoder(&Default::default());
            // Labels are not read in eval; any buffer fills the slot.
            let batch = Batch {
                x,
                labels: x,
                first,
                rows: n,
                features,
            };
            self.record_forward(&mut encoder, &acts, batch, false)?;
            self.ctx.submit_and_wait(encoder)?;
            let last = acts.values.last().ok_or("a network without layers")?;
            logits.extend(self.ctx.read_buffer::<f32>(last, n * outputs)?);
            first += n;
        }
        Ok(logits)
    }

    /// Weights and biases of the Linear layers, read back.
    pub fn linear_params(&self) -> BoxResult<Vec<LinearParams>> {
        self.linears
            .iter()
            .map(|l| {
                Ok(LinearParams {
                    w: self.ctx.read_buffer(&l.w, l.inputs * l.outputs)?,
                    b: self.ctx.read_buffer(&l.b, l.outputs)?,
                })
            })
            .collect()
    }

    /// The state of each batch norm (gamma, beta, running statistics), read back.
    pub fn bn_states(&self) -> BoxResult<Vec<BatchNormState>> {
        Ok(self
            .bns
            .iter()
            .map(|bn| bn.layer.state())
            .collect::<Result<_, _>>()?)
    }
}
