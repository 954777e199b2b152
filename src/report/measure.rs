//! One shape's benchmark: its inputs (host and GPU, several copies to rotate
//! through), its layers, and the measurement of each operation in each layout.

use serde::Serialize;
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    Activation, BatchNorm, BatchNormConfig, DType, Element, Elementwise, GpuContext, GradBuffers,
    GradMask, Layout, Plan, SavedStats, SavedStatsHost, Shape,
};

use super::data::{layout_name, random_state, ShapeSpec, XorShift};
use super::timing::{median, time_cpu, Clock, GpuTime, GpuTimer, Recorder};
use super::BoxResult;

/// Largest error (`max |gpu - cpu| / (1 + |cpu|)`) of a result still reported.
pub const TOLERANCE: f64 = 1e-4;

/// The same for f16 tensor outputs, against the CPU's f32 result rounded to f16:
/// one f16 ulp is at most 2^-10 of the value (and of 1 + |value| below 1).
pub const TOLERANCE_F16: f64 = 2e-3;

/// The same for bf16 (one ulp at most 2^-7).
pub const TOLERANCE_BF16: f64 = 1.6e-2;

/// The tolerance of a dtype's tensor outputs.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => TOLERANCE,
        DType::F16 => TOLERANCE_F16,
        DType::Bf16 => TOLERANCE_BF16,
    }
}

/// The operations measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// Forward in training mode (batch statistics, running-stat update).
    Train,
    /// Forward in eval mode (running statistics).
    Eval,
    /// Backward of the training forward (dx, dgamma, dbeta).
    Backward,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Train => "forward-train",
            Op::Eval => "eval",
            Op::Backward => "backward",
        }
    }

    /// Tensor-sized streams that must move: train reads x twice (statistics, then
    /// normalize) and writes y; eval reads x, writes y; backward reads x and dy
    /// twice-and-once in its two passes and writes dx.
    fn floor_streams(self) -> u64 {
        match self {
            Op::Train => 3,
            Op::Eval => 2,
            Op::Backward => 5,
        }
    }
}

/// What an operation fuses around batch norm (`--fuse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fuse {
    /// Plain batch norm.
    None,
    /// `relu(bn(x))` (the layer's activation): against batch norm, then a ReLU.
    Relu,
    /// `relu(bn(x) + z)` (the `*_add` calls): against batch norm, an add, a ReLU.
    AddRelu,
}

impl Fuse {
    fn suffix(self) -> &'static str {
        match self {
            Fuse::None => "",
            Fuse::Relu => "+relu",
            Fuse::AddRelu => "+add+relu",
        }
    }

    fn residual(self) -> bool {
        self == Fuse::AddRelu
    }
}

/// An operation as measured: the op, what it fuses and the tensors' element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub op: Op,
    pub fuse: Fuse,
    pub dtype: DType,
}

impl From<Op> for Case {
    fn from(op: Op) -> Self {
        Case {
            op,
            fuse: Fuse::None,
            dtype: DType::F32,
        }
    }
}

impl Case {
    pub fn name(self) -> String {
        format!("{}{}", self.op.name(), self.fuse.suffix())
    }

    /// Tensor-sized streams of the fused operation: the op's, plus z read once by
    /// the normalize (`add`), plus y read by both backward passes for the mask
    /// (with a residual, the sums write dz, which the dx pass reads as its dy:
    /// the same count).
    fn floor_streams(self) -> u64 {
        let base = self.op.floor_streams();
        match (self.op, self.fuse) {
            (_, Fuse::None) => base,
            (Op::Train | Op::Eval, Fuse::Relu) => base,
            (Op::Train | Op::Eval, Fuse::AddRelu) => base + 1,
            (Op::Backward, _) => base + 2,
        }
    }

    /// Floor bytes on `numel` elements.
    pub fn floor_bytes(self, numel: usize) -> u64 {
        self.floor_streams() * numel as u64 * self.dtype.size()
    }

    /// Bytes of the unfused sequence it replaces: batch norm (its floor), then an
    /// add (3E) and a ReLU (2E) forward; backward, the ReLU's backward (dy, y -> g:
    /// 3E, g being dz with a residual) before batch norm's.
    pub fn unfused_bytes(self, numel: usize) -> Option<u64> {
        let streams = match (self.op, self.fuse) {
            (_, Fuse::None) => return None,
            (Op::Train | Op::Eval, Fuse::Relu) => self.op.floor_streams() + 2,
            (Op::Train | Op::Eval, Fuse::AddRelu) => self.op.floor_streams() + 5,
            (Op::Backward, _) => self.op.floor_streams() + 3,
        };
        Some(streams * numel as u64 * self.dtype.size())
    }
}

/// One line of the report: an operation on a shape in a layout.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub shape: String,
    pub dims: Vec<usize>,
    /// `cf`, `cl`, or `cf=cl` for shapes without spatial dims.
    pub layout: String,
    pub op: String,
    /// The tensors' element type (`f32`, `f16`).
    pub dtype: String,
    pub numel: usize,
    pub floor_bytes: u64,
    pub reps: usize,
    /// Copies of the inputs rotated through (so that repeated runs miss the caches).
    pub input_copies: usize,
    pub cpu_ms: Option<f64>,
    pub cpu_gbs: Option<f64>,
    /// GPU time used for the speeds (see `gpu_clock`); absent for failed rows.
    pub gpu_ms: Option<f64>,
    /// `timestamp` or `wall`.
    pub gpu_clock: Option<String>,
    pub gpu_wall_ms: Option<f64>,
    pub gpu_timestamp_ms: Option<f64>,
    pub gpu_gbs: Option<f64>,
    /// The vec4 copy kernel on the same tensor size, timed taking turns with the
    /// operation (moves 2 * numel * 4 bytes).
    pub copy_ms: Option<f64>,
    pub copy_gbs: Option<f64>,
    /// The headline: GPU effective bandwidth over copy bandwidth.
    pub gpu_over_copy: Option<f64>,
    /// CPU time / GPU time (> 1: the GPU is faster).
    pub speedup: Option<f64>,
    /// Largest error over every output of the operation: `|gpu - cpu| / (1 + |cpu|)`
    /// for elementwise outputs and statistics, `|gpu - cpu| / (1 + sum |terms|)` for
    /// dgamma and dbeta.
    pub max_err: Option<f64>,
    /// `ok`, `FAILED` (error above tolerance: no GPU speed reported) or `ERROR: ...`.
    pub status: String,
    /// Dispatches the operation records.
    pub dispatches: Option<usize>,
    /// Bytes of the storage ranges its dispatches bind, plus the partials their
    /// workgroups read again (an upper bound of the bytes it moves), and that over
    /// the floor bytes.
    pub bytes_bound: Option<u64>,
    pub bound_over_floor: Option<f64>,
    /// CPU time to check, plan and record the operation into a compute pass
    /// (median, microseconds; pipelines already built).
    pub record_us: Option<f64>,
    /// Wall time of the row's first plan, which builds the pipelines it is the first
    /// to need (ms).
    pub first_plan_ms: Option<f64>,
    /// With `--detail`: each dispatch timed alone (its own compute pass with
    /// timestamp writes).
    pub detail: Vec<DispatchTime>,
    /// Fused operations: the unfused sequence on the GPU (batch norm's op and the
    /// elementwise kernels), timed taking turns with the fused one, its bytes
    /// (floor of each step), and its time over the fused time.
    pub unfused_ms: Option<f64>,
    pub unfused_bytes: Option<u64>,
    pub fused_speedup: Option<f64>,
}

/// Bind groups each of the report's layers keeps: its tensors live through the
/// run, rotated over up to 8 input copies, so every op's dispatches on every copy
/// find theirs (`rec us` then counts no bind-group creation after the first).
const KEPT_BIND_GROUPS: usize = 64;

/// A layer of the report, from `state`, keeping its bind groups.
fn gpu_layer(
    ctx: &GpuContext,
    config: &BatchNormConfig,
    state: &wgpu_batchnorm::BatchNormState,
) -> wgpu_batchnorm::Result<BatchNorm> {
    let layer = BatchNorm::with_state(ctx, config.clone(), state)?;
    layer.keep_bind_groups(KEPT_BIND_GROUPS);
    Ok(layer)
}

/// One dispatch of an operation, timed alone.
#[derive(Clone, Debug, Serialize)]
pub struct DispatchTime {
    pub label: String,
    pub workgroups: u32,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_reread: u64,
    /// Median GPU time (timestamps), ms.
    pub ms: f64,
}

impl Row {
    /// A row with nothing measured yet (status `ok`).
    pub fn new(
        spec: &ShapeSpec,
        layout: &str,
        case: impl Into<Case>,
        reps: usize,
        input_copies: usize,
    ) -> Self {
        let case = case.into();
        let numel = spec.numel();
        Self {
            shape: spec.label(),
            dims: spec.dims.clone(),
            layout: layout.into(),
            op: case.name(),
            dtype: case.dtype.name().into(),
            numel,
            floor_bytes: case.floor_bytes(numel),
            reps,
            input_copies,
            cpu_ms: None,
            cpu_gbs: None,
            gpu_ms: None,
            gpu_clock: None,
            gpu_wall_ms: None,
            gpu_timestamp_ms: None,
            gpu_gbs: None,
            copy_ms: None,
            copy_gbs: None,
            gpu_over_copy: None,
            speedup: None,
            max_err: None,
            status: "ok".into(),
            dispatches: None,
            bytes_bound: None,
            bound_over_floor: None,
            record_us: None,
            first_plan_ms: None,
            detail: Vec::new(),
            unfused_ms: None,
            unfused_bytes: case.unfused_bytes(numel),
            fused_speedup: None,
        }
    }
}

/// GB/s for `bytes` moved in `ms` milliseconds.
pub fn gbs(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / ms / 1e6
}

/// `max |gpu - cpu| / (1 + |cpu|)`; a NaN anywhere in `gpu` gives infinity.
fn max_rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    gpu.iter().zip(cpu).fold(0.0, |acc: f64, (&g, &c)| {
        let e = (f64::from(g) - f64::from(c)).abs() / (1.0 + f64::from(c).abs());
        if e.is_nan() {
            f64::INFINITY
        } else {
            acc.max(e)
        }
    })
}

/// `max |gpu - cpu| / (1 + scale)` for per-channel sums, `scale` being the sum of
/// the terms' magnitudes (the tolerance of docs/semantics.md): a sum that cancels to
/// almost nothing is still only as exact as the scale of its terms.
fn max_sum_err(gpu: &[f32], cpu: &[f32], scale: &[f64]) -> f64 {
    if gpu.len() != cpu.len() || gpu.len() != scale.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for ((&g, &c), &s) in gpu.iter().zip(cpu).zip(scale) {
        let e = (f64::from(g) - f64::from(c)).abs() / (1.0 + s);
        worst = if e.is_nan() {
            f64::INFINITY
        } else {
            worst.max(e)
        };
    }
    worst
}

/// Per channel: `sum |dy|` (the scale of dbeta) and `sum |dy * xhat|` (of dgamma).
fn grad_scales(
    shape: &Shape,
    x: &[f32],
    dy: &[f32],
    saved: &SavedStatsHost,
) -> (Vec<f64>, Vec<f64>) {
    let c = shape.c();
    let (mut beta, mut gamma) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (i, (&x, &dy)) in x.iter().zip(dy).enumerate() {
        let ch = shape.channel_of(i);
        let xhat = (f64::from(x) - f64::from(saved.mean[ch])) * f64::from(saved.invstd[ch]);
        beta[ch] += f64::from(dy).abs();
        gamma[ch] += (f64::from(dy) * xhat).abs();
    }
    (beta, gamma)
}

/// `values` rounded to the dtype (kept as f32).
fn round_to(dtype: DType, mut values: Vec<f32>) -> Vec<f32> {
    let round: fn(f32) -> f32 = match dtype {
        DType::F32 => return values,
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        DType::Bf16 => |v| bf16::from_f32(v).to_f32(),
    };
    values.iter_mut().for_each(|v| *v = round(*v));
    values
}

/// A GPU tensor of the dtype holding `values`.
fn upload(
    ctx: &GpuContext,
    label: &str,
    dtype: DType,
    values: &[f32],
) -> wgpu_batchnorm::Result<wgpu::Buffer> {
    fn narrowed<T: Element>(values: &[f32]) -> Vec<T> {
        values.iter().map(|&v| T::from_f32(v)).collect()
    }
    match dtype {
        DType::F32 => ctx.upload(label, values),
        DType::F16 => ctx.upload(label, &narrowed::<f16>(values)),
        DType::Bf16 => ctx.upload(label, &narrowed::<bf16>(values)),
    }
}

/// A GPU tensor of the dtype read back as f32.
fn read_tensor(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    numel: usize,
    dtype: DType,
) -> wgpu_batchnorm::Result<Vec<f32>> {
    fn widened<T: Element>(values: Vec<T>) -> Vec<f32> {
        values.into_iter().map(T::to_f32).collect()
    }
    Ok(match dtype {
        DType::F32 => ctx.read_buffer(buffer, numel)?,
        DType::F16 => widened(ctx.read_buffer::<f16>(buffer, numel)?),
        DType::Bf16 => widened(ctx.read_buffer::<bf16>(buffer, numel)?),
    })
}

/// Bytes of a tensor's whole vec4s (what the copy and elementwise kernels cover).
fn whole_vec4s(shape: &Shape) -> u64 {
    let unit = 4 * shape.dtype().size();
    shape.numel() as u64 * shape.dtype().size() / unit * unit
}

/// Number of input copies to rotate through so that they span `rotate_bytes`.
fn input_copies(bytes: u64, rotate_bytes: u64) -> usize {
    rotate_bytes.div_ceil(bytes.max(1)).clamp(1, 8) as usize
}

/// Everything one shape needs, shared by its layouts (the random data is just as
/// random in either memory order).
pub struct ShapeBench {
    pub spec: ShapeSpec,
    /// Element type of the GPU tensors (the host copies hold their values as f32).
    dtype: DType,
    ctx: GpuContext,
    host_x: Vec<Vec<f32>>,
    host_dy: Vec<Vec<f32>>,
    gpu_x: Vec<wgpu::Buffer>,
    gpu_dy: Vec<wgpu::Buffer>,
    // GPU outputs.
    gpu_y: wgpu::Buffer,
    gpu_dx: wgpu::Buffer,
    gpu_dgamma: wgpu::Buffer,
    gpu_dbeta: wgpu::Buffer,
    gpu_copy: wgpu::Buffer,
    /// Written by the timed training forwards.
    gpu_train_saved: SavedStats,
    // CPU outputs.
    y: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
    // Layers: training forward and backward share one; eval has its own, never
    // trained, so that GPU and CPU normalize with the same running statistics.
    gpu_train: BatchNorm,
    gpu_eval: BatchNorm,
    cpu_train: CpuBatchNorm,
    cpu_eval: CpuBatchNorm,
    /// For `--fuse`: the same layers with a ReLU, the residual and scratch tensors.
    fused: Option<FusedBench>,
}

/// The fused operations' layers (ReLU, the same state as the plain ones) and
/// tensors: the residual z (as many copies as x), the unfused sequence's
/// intermediates, and dz.
struct FusedBench {
    host_z: Vec<Vec<f32>>,
    gpu_z: Vec<wgpu::Buffer>,
    gpu_t1: wgpu::Buffer,
    gpu_t2: wgpu::Buffer,
    gpu_dz: wgpu::Buffer,
    dz: Vec<f32>,
    gpu_train: BatchNorm,
    gpu_eval: BatchNorm,
    cpu_train: CpuBatchNorm,
    cpu_eval: CpuBatchNorm,
}

impl ShapeBench {
    /// Generates the inputs (`input_copies` of x and dy, spanning `rotate_bytes`)
    /// and uploads them.
    pub fn new(
        ctx: &GpuContext,
        spec: &ShapeSpec,
        rotate_bytes: u64,
        fused: bool,
        dtype: DType,
    ) -> BoxResult<Self> {
        let numel = spec.numel();
        let c = spec.dims[1];
        let bytes = (numel as u64 * dtype.size()).next_multiple_of(4);
        ctx.check_size("the tensor", bytes)?;
        let copies = input_copies(bytes, rotate_bytes);
        let mut rng = XorShift::new(0x5eed ^ numel as u64);
        // Values of the dtype (f16: rounded), kept as f32 for the CPU.
        let mut fill = |lo, hi| round_to(dtype, rng.fill(numel, lo, hi));
        let host_x: Vec<Vec<f32>> = (0..copies).map(|_| fill(-2.0, 2.0)).collect();
        let host_dy: Vec<Vec<f32>> = (0..copies).map(|_| fill(-1.0, 1.0)).collect();
        let host_z: Vec<Vec<f32>> = if fused {
            (0..copies).map(|_| fill(-1.0, 1.0)).collect()
        } else {
            Vec::new()
        };
        let gpu_x = host_x
            .iter()
            .map(|x| upload(ctx, "bench.x", dtype, x))
            .collect::<Result<_, _>>()?;
        let gpu_dy = host_dy
            .iter()
            .map(|d| upload(ctx, "bench.dy", dtype, d))
            .collect::<Result<_, _>>()?;
        let config = BatchNormConfig::new(c);
        let state = random_state(&config, &mut rng);
        let fused = if fused {
            let gpu_z = host_z
                .iter()
                .map(|z| upload(ctx, "bench.z", dtype, z))
                .collect::<Result<_, _>>()?;
            let relu = config.clone().activation(Activation::Relu);
            Some(FusedBench {
                host_z,
                gpu_z,
                gpu_t1: ctx.storage_buffer("bench.t1", bytes)?,
                gpu_t2: ctx.storage_buffer("bench.t2", bytes)?,
                gpu_dz: ctx.storage_buffer("bench.dz", bytes)?,
                dz: vec![0.0; numel],
                gpu_train: gpu_layer(ctx, &relu, &state)?,
                gpu_eval: gpu_layer(ctx, &relu, &state)?,
                cpu_train: CpuBatchNorm::with_state(relu.clone(), state.clone())?,
                cpu_eval: CpuBatchNorm::with_state(relu, state.clone())?,
            })
        } else {
            None
        };
        Ok(Self {
            fused,
            dtype,
            spec: spec.clone(),
            ctx: ctx.clone(),
            host_x,
            host_dy,
            gpu_x,
            gpu_dy,
            gpu_y: ctx.storage_buffer("bench.y", bytes)?,
            gpu_dx: ctx.storage_buffer("bench.dx", bytes)?,
            gpu_dgamma: ctx.storage_buffer("bench.dgamma", c as u64 * 4)?,
            gpu_dbeta: ctx.storage_buffer("bench.dbeta", c as u64 * 4)?,
            gpu_copy: ctx.storage_buffer("bench.copy", bytes)?,
            gpu_train_saved: SavedStats::new(ctx, c)?,
            y: vec![0.0; numel],
            dx: vec![0.0; numel],
            dgamma: vec![0.0; c],
            dbeta: vec![0.0; c],
            gpu_train: gpu_layer(ctx, &config, &state)?,
            gpu_eval: gpu_layer(ctx, &config, &state)?,
            cpu_train: CpuBatchNorm::with_state(config.clone(), state.clone())?,
            cpu_eval: CpuBatchNorm::with_state(config, state)?,
        })
    }

    pub fn copies(&self) -> usize {
        self.host_x.len()
    }

    /// Prepares a layout: the saved statistics of a training forward on the first
    /// input copy, on both sides, for the backward. A shape that cannot train (one
    /// value per channel) can still be measured in eval mode.
    pub fn layout(&mut self, layout: Layout, timer: &GpuTimer) -> BoxResult<LayoutBench<'_>> {
        let shape = Shape::new(&self.spec.dims, layout)?.with_dtype(self.dtype);
        let c = shape.c();
        let gpu_saved = SavedStats::new(&self.ctx, c)?;
        let trained = match self
            .cpu_train
            .forward_train_into(&shape, &self.host_x[0], &mut self.y)
        {
            Ok(cpu_saved) => timer
                .run_once(|pass| {
                    self.gpu_train.forward_train_in_pass(
                        pass,
                        &shape,
                        &self.gpu_x[0],
                        &self.gpu_y,
                        &gpu_saved,
                    )
                })
                .map(|()| cpu_saved),
            Err(e) => Err(e.into()),
        };
        let (cpu_saved, train_error) = match trained {
            Ok(saved) => (saved, None),
            Err(e) => {
                let zeros = vec![0.0; c];
                let placeholder = SavedStatsHost {
                    mean: zeros.clone(),
                    invstd: zeros.clone(),
                    mean_lo: zeros,
                };
                (placeholder, Some(e.to_string()))
            }
        };
        // The fused backward's y (ReLU, and ReLU after the residual add), from the
        // plain forward's on input copy 0, one copy for both sides: a mask that
        // differs by a rounding would show as an error of the GPU.
        let fused_y = match &self.fused {
            Some(f) if train_error.is_none() => {
                let relu = |v: f32| Activation::Relu.apply(v);
                let y_relu: Vec<f32> = self.y.iter().map(|&v| relu(v)).collect();
                let y_add: Vec<f32> = self
                    .y
                    .iter()
                    .zip(&f.host_z[0])
                    .map(|(&v, &z)| relu(v + z))
                    .collect();
                let up = |y: Vec<f32>| -> BoxResult<(Vec<f32>, wgpu::Buffer)> {
                    let y = round_to(self.dtype, y);
                    let b = upload(&self.ctx, "bench.fused_y", self.dtype, &y)?;
                    Ok((y, b))
                };
                vec![up(y_relu)?, up(y_add)?]
            }
            _ => Vec::new(),
        };
        Ok(LayoutBench {
            bench: self,
            shape,
            cpu_saved,
            gpu_saved,
            train_error,
            fused_y,
        })
    }
}

/// A shape in one layout, ready to measure.
pub struct LayoutBench<'a> {
    bench: &'a mut ShapeBench,
    shape: Shape,
    cpu_saved: SavedStatsHost,
    gpu_saved: SavedStats,
    /// Why the training forward failed, if it did (then only eval is measured).
    train_error: Option<String>,
    /// With `--fuse`: the y of the fused backward, ReLU then add-ReLU (host, GPU).
    fused_y: Vec<(Vec<f32>, wgpu::Buffer)>,
}

impl LayoutBench<'_> {
    /// The layout's name in the report.
    pub fn layout_label(&self) -> String {
        if self.bench.spec.layouts_coincide() {
            "cf=cl".into()
        } else {
            layout_name(self.shape.layout()).into()
        }
    }

    /// Runs `op` on the CPU with input copy `i % copies`. (The backward always
    /// uses the statistics of copy 0: the same work, and the check uses copy 0.)
    fn run_cpu(&mut self, case: Case, i: usize) -> BoxResult<()> {
        if case.fuse != Fuse::None {
            return self.run_cpu_fused(case, i);
        }
        let b = &mut *self.bench;
        let k = i % b.host_x.len();
        let (shape, x) = (&self.shape, &b.host_x[k]);
        match case.op {
            Op::Train => {
                b.cpu_train.forward_train_into(shape, x, &mut b.y)?;
            }
            Op::Eval => {
                b.cpu_eval.forward_eval_into(shape, x, &mut b.y)?;
            }
            Op::Backward => b.cpu_train.backward_into(
                shape,
                x,
                &b.host_dy[k],
                Some(&self.cpu_saved),
                Some(&mut b.dx),
                Some(&mut b.dgamma),
                Some(&mut b.dbeta),
            )?,
        }
        Ok(())
    }

    /// The fused `case` on the CPU (fast path) with input copy `i % copies`.
    fn run_cpu_fused(&mut self, case: Case, i: usize) -> BoxResult<()> {
        let b = &mut *self.bench;
        let k = i % b.host_x.len();
        let f = b.fused.as_mut().ok_or("--fuse without fused layers")?;
        let (shape, x, z) = (&self.shape, &b.host_x[k], &f.host_z[k]);
        let residual = case.fuse.residual();
        match (case.op, residual) {
            (Op::Train, false) => {
                f.cpu_train.forward_train_into(shape, x, &mut b.y)?;
            }
            (Op::Train, true) => {
                f.cpu_train.forward_train_add_into(shape, x, z, &mut b.y)?;
            }
            (Op::Eval, false) => {
                f.cpu_eval.forward_eval_into(shape, x, &mut b.y)?;
            }
            (Op::Eval, true) => {
                f.cpu_eval.forward_eval_add_into(shape, x, z, &mut b.y)?;
            }
            (Op::Backward, _) => {
                let y = &self.fused_y[usize::from(residual)].0;
                let g = f.cpu_train.backward_fused(
                    shape,
                    x,
                    y,
                    &b.host_dy[k],
                    Some(&self.cpu_saved),
                    GradMask::default(),
                    residual,
                )?;
                let copy = |out: &mut Vec<f32>, v: Option<Vec<f32>>| {
                    if let Some(v) = v {
                        *out = v;
                    }
                };
                copy(&mut b.dx, g.dx);
                copy(&mut b.dgamma, g.dgamma);
                copy(&mut b.dbeta, g.dbeta);
                copy(&mut f.dz, g.dz);
            }
        }
        Ok(())
    }

    /// The plan of `case` on the GPU with input copy `i % copies`.
    fn plan(&mut self, case: Case, i: usize) -> wgpu_batchnorm::Result<Plan<'_>> {
        if case.fuse != Fuse::None {
            return self.plan_fused(case, i);
        }
        let b = &mut *self.bench;
        let k = i % b.gpu_x.len();
        let (shape, x) = (&self.shape, &b.gpu_x[k]);
        match case.op {
            Op::Train => b
                .gpu_train
                .plan_forward_train(shape, x, &b.gpu_y, &b.gpu_train_saved),
            Op::Eval => b.gpu_eval.plan_forward_eval(shape, x, &b.gpu_y, None),
            Op::Backward => b.gpu_train.plan_backward(
                shape,
                x,
                &b.gpu_dy[k],
                Some(&self.gpu_saved),
                GradBuffers::new()
                    .dx(&b.gpu_dx)
                    .dgamma(&b.gpu_dgamma)
                    .dbeta(&b.gpu_dbeta),
            ),
        }
    }

    /// The plan of the fused `case` (the ReLU layers) with input copy `i % copies`.
    fn plan_fused(&mut self, case: Case, i: usize) -> wgpu_batchnorm::Result<Plan<'_>> {
        let b = &mut *self.bench;
        let k = i % b.gpu_x.len();
        let Some(f) = b.fused.as_mut() else {
            return Err(wgpu_batchnorm::Error::MissingState(
                "--fuse without fused layers",
            ));
        };
        let (shape, x, z) = (&self.shape, &b.gpu_x[k], &f.gpu_z[k]);
        let residual = case.fuse.residual();
        match (case.op, residual) {
            (Op::Train, false) => {
                f.gpu_train
                    .plan_forward_train(shape, x, &b.gpu_y, &b.gpu_train_saved)
            }
            (Op::Train, true) => {
                f.gpu_train
                    .plan_forward_train_add(shape, x, z, &b.gpu_y, &b.gpu_train_saved)
            }
            (Op::Eval, false) => f.gpu_eval.plan_forward_eval(shape, x, &b.gpu_y, None),
            (Op::Eval, true) => f
                .gpu_eval
                .plan_forward_eval_add(shape, x, z, &b.gpu_y, None),
            (Op::Backward, _) => {
                let grads = GradBuffers::new()
                    .dx(&b.gpu_dx)
                    .dgamma(&b.gpu_dgamma)
                    .dbeta(&b.gpu_dbeta)
                    .output(&self.fused_y[usize::from(residual)].1);
                let grads = if residual { grads.dz(&f.gpu_dz) } else { grads };
                f.gpu_train
                    .plan_backward(shape, x, &b.gpu_dy[k], Some(&self.gpu_saved), grads)
            }
        }
    }

    /// Records `case` on the GPU with input copy `i % copies` into `pass`.
    fn record_gpu(
        &mut self,
        case: Case,
        pass: &mut wgpu::ComputePass<'_>,
        i: usize,
    ) -> wgpu_batchnorm::Result<()> {
        self.plan(case, i)?.record(pass);
        Ok(())
    }

    /// Records the unfused sequence a fused `case` replaces: the plain layer's op,
    /// then the add and the ReLU (forward), or the ReLU's backward then the plain
    /// backward. The elementwise steps cover the tensor's whole vec4s.
    fn record_unfused(
        &mut self,
        case: Case,
        pass: &mut wgpu::ComputePass<'_>,
        i: usize,
    ) -> wgpu_batchnorm::Result<()> {
        let b = &mut *self.bench;
        let k = i % b.gpu_x.len();
        let Some(f) = b.fused.as_ref() else {
            return Err(wgpu_batchnorm::Error::MissingState(
                "--fuse without fused layers",
            ));
        };
        let (shape, x, z) = (&self.shape, &b.gpu_x[k], &f.gpu_z[k]);
        let bytes = whole_vec4s(shape);
        let ctx = b.ctx.clone();
        let relu = Activation::Relu;
        let residual = case.fuse.residual();
        match case.op {
            Op::Train | Op::Eval => {
                if case.op == Op::Train {
                    b.gpu_train
                        .plan_forward_train(shape, x, &f.gpu_t1, &b.gpu_train_saved)?
                        .record(pass);
                } else {
                    b.gpu_eval
                        .plan_forward_eval(shape, x, &f.gpu_t1, None)?
                        .record(pass);
                }
                let mut act_in = &f.gpu_t1;
                if residual {
                    ctx.elementwise_in_pass(
                        pass,
                        Elementwise::Add,
                        shape.dtype(),
                        &f.gpu_t1,
                        Some(z),
                        &f.gpu_t2,
                        bytes,
                    )?;
                    act_in = &f.gpu_t2;
                }
                ctx.elementwise_in_pass(
                    pass,
                    Elementwise::Activation(relu),
                    shape.dtype(),
                    act_in,
                    None,
                    &b.gpu_y,
                    bytes,
                )
            }
            Op::Backward => {
                // g = dz with a residual (dz is g).
                let g = if residual { &f.gpu_dz } else { &f.gpu_t1 };
                ctx.elementwise_in_pass(
                    pass,
                    Elementwise::ActivationBackward(relu),
                    shape.dtype(),
                    &b.gpu_dy[k],
                    Some(&self.fused_y[usize::from(residual)].1),
                    g,
                    bytes,
                )?;
                let grads = GradBuffers::new()
                    .dx(&b.gpu_dx)
                    .dgamma(&b.gpu_dgamma)
                    .dbeta(&b.gpu_dbeta);
                b.gpu_train
                    .plan_backward(shape, x, g, Some(&self.gpu_saved), grads)?
                    .record(pass);
                Ok(())
            }
        }
    }

    /// Dispatches and bound bytes of `op` (with the bytes read again, see
    /// `DispatchInfo::bytes_reread`), and the CPU time to record it.
    fn host_side(&mut self, op: Case, reps: usize, row: &mut Row) -> BoxResult<()> {
        let info = self.plan(op, 0)?.dispatches();
        let bound: u64 = info
            .iter()
            .map(|d| d.bytes_read + d.bytes_written + d.bytes_reread)
            .sum();
        row.dispatches = Some(info.len());
        row.bytes_bound = Some(bound);
        row.bound_over_floor = Some(bound as f64 / row.floor_bytes as f64);
        let device = self.bench.ctx.device().clone();
        let samples = time_cpu(reps.min(21), |i| {
            let mut encoder = device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            self.record_gpu(op, &mut pass, i)?;
            Ok(())
        })?;
        row.record_us = Some(median(&samples) * 1e3);
        Ok(())
    }

    /// Times each dispatch of `op` alone (input copy 0), where the adapter has
    /// timestamp queries.
    fn detail(&mut self, op: Case, timer: &GpuTimer, reps: usize, row: &mut Row) -> BoxResult<()> {
        let plan = self.plan(op, 0)?;
        let Some(ms) = timer.time_dispatches(reps, &plan)? else {
            return Ok(());
        };
        row.detail = plan
            .dispatches()
            .into_iter()
            .zip(ms)
            .map(|(d, ms)| DispatchTime {
                label: d.label,
                workgroups: d.workgroups,
                bytes_read: d.bytes_read,
                bytes_written: d.bytes_written,
                bytes_reread: d.bytes_reread,
                ms,
            })
            .collect();
        Ok(())
    }

    /// Runs `op` once on both sides with input copy 0 and returns the largest
    /// error of the GPU's outputs against the fast CPU path's (see [`Row::max_err`]).
    /// Returns the largest error and whether every output is within its tolerance
    /// (tensor outputs: the dtype's; statistics and sums: [`TOLERANCE`]).
    fn check(&mut self, op: Case, timer: &GpuTimer) -> BoxResult<(f64, bool)> {
        self.run_cpu(op, 0)?;
        timer.run_once(|pass| self.record_gpu(op, pass, 0))?;
        let b = &*self.bench;
        let (ctx, numel, c) = (&b.ctx, self.shape.numel(), self.shape.c());
        // A tensor output, against the CPU's rounded to the dtype.
        let tensor_err = |gpu: &wgpu::Buffer, cpu: &[f32]| -> BoxResult<f64> {
            let gpu = read_tensor(ctx, gpu, numel, b.dtype)?;
            Ok(max_rel_err(&gpu, &round_to(b.dtype, cpu.to_vec())))
        };
        let dz_err = match (&b.fused, op.op, op.fuse.residual()) {
            (Some(f), Op::Backward, true) => tensor_err(&f.gpu_dz, &f.dz)?,
            _ => 0.0,
        };
        let dy = match (op.op, op.fuse) {
            // The fused backward's sums are of the masked dy (dz with a residual).
            (Op::Backward, Fuse::Relu | Fuse::AddRelu) => {
                let y = &self.fused_y[usize::from(op.fuse.residual())].0;
                let relu = Activation::Relu;
                let g = y.iter().zip(&b.host_dy[0]);
                g.map(|(&y, &d)| if relu.passes(y) { d } else { 0.0 })
                    .collect()
            }
            _ => b.host_dy[0].clone(),
        };
        let (tensors, others) = match op.op {
            Op::Train => {
                let saved = b.gpu_train_saved.to_host(ctx)?;
                (
                    tensor_err(&b.gpu_y, &b.y)?,
                    max_rel_err(&saved.mean, &self.cpu_saved.mean)
                        .max(max_rel_err(&saved.invstd, &self.cpu_saved.invstd)),
                )
            }
            Op::Eval => (tensor_err(&b.gpu_y, &b.y)?, 0.0),
            Op::Backward => {
                let x = &b.host_x[0];
                let (beta_scale, gamma_scale) = grad_scales(&self.shape, x, &dy, &self.cpu_saved);
                let dgamma = ctx.read_buffer(&b.gpu_dgamma, c)?;
                let dbeta = ctx.read_buffer(&b.gpu_dbeta, c)?;
                (
                    tensor_err(&b.gpu_dx, &b.dx)?.max(dz_err),
                    max_sum_err(&dgamma, &b.dgamma, &gamma_scale).max(max_sum_err(
                        &dbeta,
                        &b.dbeta,
                        &beta_scale,
                    )),
                )
            }
        };
        let within = tensors <= tolerance(b.dtype) && others <= TOLERANCE;
        Ok((tensors.max(others), within))
    }

    /// Checks and times `op` on both sides. A GPU result off by more than
    /// [`TOLERANCE`] is not timed on the GPU (the row says FAILED); an error of
    /// the library is reported in the row rather than ending the run.
    /// With `detail`, each dispatch is also timed alone.
    pub fn measure(&mut self, op: Case, timer: &GpuTimer, reps: usize, detail: bool) -> Row {
        let layout = self.layout_label();
        let mut row = Row::new(&self.bench.spec, &layout, op, reps, self.bench.copies());
        if self.train_error.is_none() || op.op == Op::Eval {
            let started = std::time::Instant::now();
            if self.plan(op, 0).is_ok() {
                row.first_plan_ms = Some(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        let measured = self.measure_into(op, timer, reps, &mut row).and_then(|()| {
            if row.status != "ok" {
                return Ok(());
            }
            self.host_side(op, reps, &mut row)?;
            if detail {
                self.detail(op, timer, reps, &mut row)?;
            }
            Ok(())
        });
        if let Err(e) = measured {
            row.status = format!("ERROR: {e}");
        }
        row
    }

    fn measure_into(
        &mut self,
        op: Case,
        timer: &GpuTimer,
        reps: usize,
        row: &mut Row,
    ) -> BoxResult<()> {
        if let (Some(e), Op::Train | Op::Backward) = (&self.train_error, op.op) {
            return Err(e.clone().into());
        }
        let (err, within) = self.check(op, timer)?;
        row.max_err = Some(err);
        let cpu_ms = median(&time_cpu(reps, |i| self.run_cpu(op, i))?);
        row.cpu_ms = Some(cpu_ms);
        row.cpu_gbs = Some(gbs(row.floor_bytes, cpu_ms));
        if err.is_nan() || !within {
            row.status = "FAILED".into();
            return Ok(());
        }
        // The copy kernel on the same inputs, taking turns with the operation.
        let dtype = self.shape.dtype();
        let copy_bytes = whole_vec4s(&self.shape);
        let (ctx, sources, dst) = (
            self.bench.ctx.clone(),
            self.bench.gpu_x.clone(),
            self.bench.gpu_copy.clone(),
        );
        let mut copy_kernel = |pass: &mut wgpu::ComputePass<'_>, i: usize| {
            ctx.copy_in_pass(pass, dtype, &sources[i % sources.len()], &dst, copy_bytes)
        };
        // A fused op's unfused sequence takes turns with them too.
        let fused = op.fuse != Fuse::None;
        let this = std::cell::RefCell::new(&mut *self);
        let mut operation =
            |pass: &mut wgpu::ComputePass<'_>, i: usize| this.borrow_mut().record_gpu(op, pass, i);
        let mut unfused_sequence = |pass: &mut wgpu::ComputePass<'_>, i: usize| {
            this.borrow_mut().record_unfused(op, pass, i)
        };
        let mut recorders: Vec<&mut Recorder<'_>> = vec![&mut operation];
        if copy_bytes > 0 {
            recorders.push(&mut copy_kernel);
        }
        if fused {
            recorders.push(&mut unfused_sequence);
        }
        let samples = timer.time_interleaved(reps, &mut recorders)?;
        drop(recorders);
        let gpu = samples[0].summarize();
        let copy = (copy_bytes > 0).then(|| (samples[1].summarize(), 2 * copy_bytes));
        let unfused = fused.then(|| samples[samples.len() - 1].summarize());
        // Compare op and copy on one clock: timestamps only when both have them.
        let on_timestamps =
            gpu.clock == Clock::Timestamp && copy.is_none_or(|(c, _)| c.clock == Clock::Timestamp);
        let pick = |t: &GpuTime| if on_timestamps { t.ms } else { t.wall_ms };
        let clock = if on_timestamps {
            Clock::Timestamp
        } else {
            Clock::Wall
        };
        let gpu_ms = pick(&gpu);
        let gpu_gbs = gbs(row.floor_bytes, gpu_ms);
        row.gpu_ms = Some(gpu_ms);
        row.gpu_clock = Some(clock.name().into());
        row.gpu_wall_ms = Some(gpu.wall_ms);
        row.gpu_timestamp_ms = gpu.timestamp_ms;
        row.gpu_gbs = Some(gpu_gbs);
        if let Some((c, bytes)) = copy {
            let copy_ms = pick(&c);
            row.copy_ms = Some(copy_ms);
            row.copy_gbs = Some(gbs(bytes, copy_ms));
            row.gpu_over_copy = Some(gpu_gbs / gbs(bytes, copy_ms));
        }
        row.speedup = Some(cpu_ms / gpu_ms);
        if let Some(u) = unfused {
            let unfused_ms = pick(&u);
            row.unfused_ms = Some(unfused_ms);
            row.fused_speedup = Some(unfused_ms / gpu_ms);
        }
        Ok(())
    }
}
