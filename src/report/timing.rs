//! The timing loops: one for the CPU (wall time), one for the GPU (timestamp queries
//! around the compute pass where the device has them, and wall time around submit +
//! wait always). Each takes a closure for the work of one repetition, so every
//! operation goes through the same loop.

use std::time::Instant;

use wgpu_batchnorm::GpuContext;

use super::BoxResult;

/// Median of the samples (`NaN` when there are none).
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

/// How many untimed runs precede the timed ones.
pub const WARMUP: usize = 2;

/// Runs `work(i)` for `WARMUP` untimed and then `reps` timed repetitions; returns
/// the times of the timed ones in milliseconds. `i` counts all runs (to rotate inputs).
pub fn time_cpu(reps: usize, mut work: impl FnMut(usize) -> BoxResult<()>) -> BoxResult<Vec<f64>> {
    let mut samples = Vec::with_capacity(reps);
    for i in 0..WARMUP + reps {
        let start = Instant::now();
        work(i)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i >= WARMUP {
            samples.push(ms);
        }
    }
    Ok(samples)
}

/// Times of one GPU measurement, in milliseconds.
#[derive(Clone, Debug)]
pub struct GpuSamples {
    /// Wall time around `queue.submit` + `device.poll(wait)` of each repetition.
    pub wall: Vec<f64>,
    /// Time between the pass's beginning and end timestamps, when the device has
    /// timestamp queries (`NaN` for a repetition whose timestamps went backwards).
    pub timestamps: Option<Vec<f64>>,
}

/// Which clock gave a GPU time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    Timestamp,
    Wall,
}

impl Clock {
    pub fn name(self) -> &'static str {
        match self {
            Clock::Timestamp => "timestamp",
            Clock::Wall => "wall",
        }
    }
}

/// A GPU time with the clock it came from.
#[derive(Clone, Copy, Debug)]
pub struct GpuTime {
    /// The time used for speeds: the timestamp median when plausible, else wall.
    pub ms: f64,
    pub clock: Clock,
    pub wall_ms: f64,
    pub timestamp_ms: Option<f64>,
}

impl GpuSamples {
    /// Medians, and the choice between the two clocks: timestamps are used when
    /// every repetition has a positive, finite duration and their median is not
    /// longer than the wall time around the same submission (they bracket part of
    /// it, so a longer one means the clock is not to be trusted).
    pub fn summarize(&self) -> GpuTime {
        let wall_ms = median(&self.wall);
        let timestamp_ms = self.timestamps.as_ref().map(|t| median(t));
        let plausible = self.timestamps.as_ref().is_some_and(|t| {
            t.iter().all(|&v| v.is_finite() && v > 0.0) && median(t) <= 1.05 * wall_ms + 0.02
        });
        let (ms, clock) = match timestamp_ms {
            Some(ts) if plausible => (ts, Clock::Timestamp),
            _ => (wall_ms, Clock::Wall),
        };
        GpuTime {
            ms,
            clock,
            wall_ms,
            timestamp_ms,
        }
    }
}

/// Times compute passes recorded by a closure.
pub struct GpuTimer {
    ctx: GpuContext,
    /// Two timestamp slots (pass begin, pass end), when the device has them.
    queries: Option<wgpu::QuerySet>,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

/// Records one repetition (`i` counts all runs, warm-up included) into a pass.
pub type Recorder<'a> =
    dyn FnMut(&mut wgpu::ComputePass<'_>, usize) -> wgpu_batchnorm::Result<()> + 'a;

/// Resolved timestamps of repetition `i` go at `i * RESOLVE_STRIDE` bytes.
const RESOLVE_STRIDE: u64 = wgpu::QUERY_RESOLVE_BUFFER_ALIGNMENT;

impl GpuTimer {
    pub fn new(ctx: &GpuContext) -> Self {
        let queries = ctx.has_timestamps().then(|| {
            ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench.timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        Self {
            ctx: ctx.clone(),
            queries,
            period_ns: f64::from(ctx.queue().get_timestamp_period()),
        }
    }

    /// Nanoseconds per timestamp tick, when timestamps are in use.
    pub fn timestamp_period_ns(&self) -> Option<f64> {
        self.queries.as_ref().map(|_| self.period_ns)
    }

    /// Runs each recorder's `record(pass, i)` in a compute pass of its own
    /// submission, `WARMUP` untimed and then `reps` timed times, the recorders
    /// taking turns repetition by repetition, so that a slow spell of the machine
    /// hits all of them alike and their ratio stays meaningful. Validation errors
    /// of the recorded work come back as errors rather than panics.
    pub fn time_interleaved(
        &self,
        reps: usize,
        recorders: &mut [&mut Recorder<'_>],
    ) -> BoxResult<Vec<GpuSamples>> {
        let device = self.ctx.device();
        let queue = self.ctx.queue();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let resolves: Vec<Option<wgpu::Buffer>> = recorders
            .iter()
            .map(|_| {
                self.queries.as_ref().map(|_| {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("bench.timestamps.resolve"),
                        size: RESOLVE_STRIDE * reps.max(1) as u64,
                        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    })
                })
            })
            .collect();
        let mut walls = vec![Vec::with_capacity(reps); recorders.len()];
        for i in 0..WARMUP + reps {
            let timed = i >= WARMUP;
            for (j, record) in recorders.iter_mut().enumerate() {
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bench"),
                });
                let timestamp_writes = match &self.queries {
                    Some(query_set) if timed => Some(wgpu::ComputePassTimestampWrites {
                        query_set,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }),
                    _ => None,
                };
                {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("bench"),
                        timestamp_writes,
                    });
                    record(&mut pass, i)?;
                }
                if let (Some(query_set), Some(resolve), true) = (&self.queries, &resolves[j], timed)
                {
                    let offset = RESOLVE_STRIDE * (i - WARMUP) as u64;
                    encoder.resolve_query_set(query_set, 0..2, resolve, offset);
                }
                let commands = encoder.finish();
                let start = Instant::now();
                let index = queue.submit([commands]);
                device.poll(wgpu::PollType::Wait {
                    submission_index: Some(index),
                    timeout: None,
                })?;
                let ms = start.elapsed().as_secs_f64() * 1e3;
                if timed {
                    walls[j].push(ms);
                }
            }
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("GPU validation error: {e}").into());
        }
        walls
            .into_iter()
            .zip(resolves)
            .map(|(wall, resolve)| {
                let timestamps = resolve.map(|r| self.read_durations(&r, reps)).transpose()?;
                Ok(GpuSamples { wall, timestamps })
            })
            .collect()
    }

    /// The pass durations (ms) of `reps` resolved repetitions; `NaN` where the end
    /// timestamp precedes the beginning.
    fn read_durations(&self, resolve: &wgpu::Buffer, reps: usize) -> BoxResult<Vec<f64>> {
        let words = (RESOLVE_STRIDE / 8) as usize;
        let ticks: Vec<u64> = self.ctx.read_buffer(resolve, words * reps)?;
        Ok((0..reps)
            .map(|r| {
                let (begin, end) = (ticks[r * words], ticks[r * words + 1]);
                end.checked_sub(begin)
                    .map_or(f64::NAN, |d| d as f64 * self.period_ns * 1e-6)
            })
            .collect())
    }

    /// Runs `record` once (submits and waits), e.g. to produce results to check.
    /// Times each dispatch of `plan` alone: every repetition records the dispatches
    /// in order, each in a compute pass of its own with timestamp writes, in one
    /// submission. Median GPU ms per dispatch; `None` without timestamp queries.
    pub fn time_dispatches(
        &self,
        reps: usize,
        plan: &wgpu_batchnorm::Plan<'_>,
    ) -> BoxResult<Option<Vec<f64>>> {
        let n = plan.len();
        if self.queries.is_none() || n == 0 {
            return Ok(None);
        }
        let device = self.ctx.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let count = 2 * n as u32;
        let query_set = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench.dispatch_timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let stride = (8 * u64::from(count)).next_multiple_of(RESOLVE_STRIDE);
        let resolve = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench.dispatch_timestamps.resolve"),
            size: stride * reps.max(1) as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        for i in 0..WARMUP + reps {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bench.detail"),
            });
            for k in 0..n as u32 {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("bench.detail"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &query_set,
                        beginning_of_pass_write_index: Some(2 * k),
                        end_of_pass_write_index: Some(2 * k + 1),
                    }),
                });
                plan.record_dispatch(k as usize, &mut pass);
            }
            if i >= WARMUP {
                let offset = stride * (i - WARMUP) as u64;
                encoder.resolve_query_set(&query_set, 0..count, &resolve, offset);
            }
            self.ctx.submit_and_wait(encoder)?;
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("GPU validation error: {e}").into());
        }
        let words = (stride / 8) as usize;
        let ticks: Vec<u64> = self.ctx.read_buffer(&resolve, words * reps)?;
        let per_dispatch = (0..n)
            .map(|k| {
                let samples: Vec<f64> = (0..reps)
                    .map(|r| {
                        let (begin, end) = (ticks[r * words + 2 * k], ticks[r * words + 2 * k + 1]);
                        end.checked_sub(begin)
                            .map_or(f64::NAN, |d| d as f64 * self.period_ns * 1e-6)
                    })
                    .collect();
                median(&samples)
            })
            .collect();
        Ok(Some(per_dispatch))
    }

    pub fn run_once(
        &self,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>) -> wgpu_batchnorm::Result<()>,
    ) -> BoxResult<()> {
        let device = self.ctx.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bench.once"),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench.once"),
                timestamp_writes: None,
            });
            record(&mut pass)?;
        }
        self.ctx.submit_and_wait(encoder)?;
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("GPU validation error: {e}").into());
        }
        Ok(())
    }
}
