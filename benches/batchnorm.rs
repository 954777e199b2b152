//! Criterion benchmarks: the fast CPU path against the GPU kernels for the
//! training forward, the eval forward and the backward, on a few shapes.
//!
//! `cargo bench` (a few minutes on a 2-core machine with a software GPU);
//! `cargo bench -- backward` runs the matching groups only. The adapter comes from
//! the environment (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`); without one, only the CPU
//! benchmarks run.
//!
//! Each GPU iteration records the operation into a compute pass, submits it and
//! waits for the device (`GpuContext::submit_and_wait`): the time includes
//! recording and submission, as an application calling the layer would see it.
//! For kernel-only times (timestamp queries) and the comparison with a copy
//! kernel, run the report binary (`cargo run --release`).
//!
//! Throughput is the floor bytes of the operation (E elements of 4 bytes:
//! forward-train 3E*4, eval 2E*4, backward 5E*4), so criterion's bytes/s is the
//! effective bandwidth.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, GpuContext, GradBuffers, Layout, SavedStats, SavedStatsHost, Shape,
};

/// The shapes benchmarked: a ResNet-style activation in both layouts, and a 2-D one.
const CASES: &[(&str, &[usize], Layout)] = &[
    ("8x64x56x56-nchw", &[8, 64, 56, 56], Layout::ChannelsFirst),
    ("8x64x56x56-nhwc", &[8, 64, 56, 56], Layout::ChannelsLast),
    ("4096x256", &[4096, 256], Layout::ChannelsFirst),
];

#[derive(Clone, Copy, Debug)]
enum Op {
    Train,
    Eval,
    Backward,
}

impl Op {
    const ALL: [Op; 3] = [Op::Train, Op::Eval, Op::Backward];

    fn name(self) -> &'static str {
        match self {
            Op::Train => "forward_train",
            Op::Eval => "eval",
            Op::Backward => "backward",
        }
    }

    /// Bytes that must move: forward-train 3Es, eval 2Es, backward 5Es (s = 4).
    fn floor_bytes(self, numel: usize) -> u64 {
        let streams = match self {
            Op::Train => 3,
            Op::Eval => 2,
            Op::Backward => 5,
        };
        streams * numel as u64 * 4
    }
}

/// `len` values uniform in `[-scale, scale)` from xorshift64*.
fn random(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let unit = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            scale * (2.0 * unit - 1.0)
        })
        .collect()
}

/// The CPU side of a case: the layer, its inputs and output slices.
struct CpuCase {
    bn: CpuBatchNorm,
    x: Vec<f32>,
    dy: Vec<f32>,
    saved: SavedStatsHost,
    y: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

impl CpuCase {
    fn new(shape: &Shape, x: Vec<f32>, dy: Vec<f32>) -> Self {
        let c = shape.c();
        let mut bn = CpuBatchNorm::new(BatchNormConfig::new(c)).expect("config");
        let mut y = vec![0.0; x.len()];
        let saved = bn.forward_train_into(shape, &x, &mut y).expect("forward");
        Self {
            bn,
            dx: vec![0.0; x.len()],
            x,
            dy,
            saved,
            y,
            dgamma: vec![0.0; c],
            dbeta: vec![0.0; c],
        }
    }

    fn run(&mut self, op: Op, shape: &Shape) {
        match op {
            Op::Train => {
                self.bn
                    .forward_train_into(shape, &self.x, &mut self.y)
                    .expect("forward_train");
            }
            Op::Eval => {
                self.bn
                    .forward_eval_into(shape, &self.x, &mut self.y)
                    .expect("forward_eval");
            }
            Op::Backward => self
                .bn
                .backward_into(
                    shape,
                    &self.x,
                    &self.dy,
                    Some(&self.saved),
                    Some(&mut self.dx),
                    Some(&mut self.dgamma),
                    Some(&mut self.dbeta),
                )
                .expect("backward"),
        }
        black_box(&self.y);
    }
}

/// The GPU side of a case: the layer and its buffers.
struct GpuCase {
    ctx: GpuContext,
    bn: BatchNorm,
    x: wgpu::Buffer,
    dy: wgpu::Buffer,
    y: wgpu::Buffer,
    dx: wgpu::Buffer,
    dgamma: wgpu::Buffer,
    dbeta: wgpu::Buffer,
    /// Statistics of one training forward, for the backward.
    saved: SavedStats,
    /// Written by the benchmarked training forwards.
    train_saved: SavedStats,
}

impl GpuCase {
    fn new(ctx: &GpuContext, shape: &Shape, x: &[f32], dy: &[f32]) -> Self {
        let c = shape.c();
        let mut case = Self {
            ctx: ctx.clone(),
            bn: BatchNorm::new(ctx, BatchNormConfig::new(c)).expect("layer"),
            x: ctx.upload("bench.x", x).expect("buffer"),
            dy: ctx.upload("bench.dy", dy).expect("buffer"),
            y: ctx
                .storage_buffer("bench.y", shape.bytes())
                .expect("buffer"),
            dx: ctx
                .storage_buffer("bench.dx", shape.bytes())
                .expect("buffer"),
            dgamma: ctx
                .storage_buffer("bench.dgamma", c as u64 * 4)
                .expect("buffer"),
            dbeta: ctx
                .storage_buffer("bench.dbeta", c as u64 * 4)
                .expect("buffer"),
            saved: SavedStats::new(ctx, c).expect("saved"),
            train_saved: SavedStats::new(ctx, c).expect("saved"),
        };
        let mut encoder = ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        case.bn
            .forward_train(&mut encoder, shape, &case.x, &case.y, &case.saved)
            .expect("forward_train");
        ctx.submit_and_wait(encoder).expect("submit");
        case
    }

    /// Records `op` into one compute pass, submits it and waits for the device.
    fn run(&mut self, op: Op, shape: &Shape) {
        let mut encoder =
            self.ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bench"),
                });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench"),
                timestamp_writes: None,
            });
            let recorded = match op {
                Op::Train => self.bn.forward_train_in_pass(
                    &mut pass,
                    shape,
                    &self.x,
                    &self.y,
                    &self.train_saved,
                ),
                Op::Eval => self
                    .bn
                    .forward_eval_in_pass(&mut pass, shape, &self.x, &self.y, None),
                Op::Backward => self.bn.backward_in_pass(
                    &mut pass,
                    shape,
                    &self.x,
                    &self.dy,
                    Some(&self.saved),
                    GradBuffers::new()
                        .dx(&self.dx)
                        .dgamma(&self.dgamma)
                        .dbeta(&self.dbeta),
                ),
            };
            recorded.expect("record");
        }
        self.ctx.submit_and_wait(encoder).expect("submit");
    }
}

fn batchnorm(c: &mut Criterion) {
    let ctx = match GpuContext::from_env() {
        Ok(ctx) => {
            eprintln!("GPU: {}", ctx.describe());
            Some(ctx)
        }
        Err(e) => {
            eprintln!("no GPU adapter ({e}): CPU benchmarks only");
            None
        }
    };
    for (i, &(name, dims, layout)) in CASES.iter().enumerate() {
        let shape = Shape::new(dims, layout).expect("shape");
        let numel = shape.numel();
        let x = random(numel, 2 * i as u64 + 1, 2.0);
        let dy = random(numel, 2 * i as u64 + 2, 1.0);
        let mut gpu = ctx.as_ref().map(|ctx| GpuCase::new(ctx, &shape, &x, &dy));
        let mut cpu = CpuCase::new(&shape, x, dy);
        for op in Op::ALL {
            let mut group = c.benchmark_group(format!("{}/{name}", op.name()));
            group
                .throughput(Throughput::Bytes(op.floor_bytes(numel)))
                .sampling_mode(SamplingMode::Flat);
            group.bench_function("cpu", |b| b.iter(|| cpu.run(op, &shape)));
            if let Some(gpu) = gpu.as_mut() {
                group.bench_function("gpu", |b| b.iter(|| gpu.run(op, &shape)));
            }
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = batchnorm
}
criterion_main!(benches);
