//! The benchmark report: batch norm on the GPU (this crate's kernels) against the
//! fast CPU path and against a plain copy kernel, for a table of shapes, layouts
//! and operations. `cargo run --release -- --help` lists the options.
//!
//! Writes a table on stdout, `results.csv`, `results.json` and `bandwidth.svg`
//! into the output directory; progress goes to stderr.
// The report measures with blocking waits and threads: not built for the web.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

mod report;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use wgpu_batchnorm::{DType, GpuContext, Layout, Tuning};

use report::data::{quick_table, table, ShapeSpec};
use report::measure::{Case, Fuse, Op, Row, ShapeBench, TOLERANCE};
use report::output::{self, Header};
use report::timing::{GpuTimer, WARMUP};
use report::BoxResult;

/// Memory order of the input, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LayoutArg {
    /// Channels-first (NCHW, PyTorch's default).
    #[value(alias = "nchw")]
    Cf,
    /// Channels-last (NHWC / NDHWC).
    #[value(alias = "nhwc")]
    Cl,
}

/// Element type of the tensors, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    F32,
    /// Half precision (WGSL's f16 where the adapter has SHADER_F16, else two per u32).
    F16,
    /// bfloat16, two per u32.
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::Bf16,
        }
    }
}

impl From<LayoutArg> for Layout {
    fn from(l: LayoutArg) -> Self {
        match l {
            LayoutArg::Cf => Layout::ChannelsFirst,
            LayoutArg::Cl => Layout::ChannelsLast,
        }
    }
}

/// Batch-norm benchmark report: GPU (wgpu) against the fast CPU path and a copy
/// kernel.
///
/// For each shape, layout and operation it prints the CPU and GPU times (medians),
/// the GPU's speed-up, the effective bandwidths from the floor bytes (E elements of
/// 4 bytes: forward-train 3E*4, eval 2E*4, backward 5E*4), the bandwidth of a vec4
/// copy kernel on the same tensor size in the same run, the headline ratio GPU /
/// copy, and the largest error of the GPU result against the CPU result (rows above
/// 1e-4 are FAILED and get no GPU speed).
///
/// The default table: (256, 1024), (4096, 256), the ResNet-50 batch-norm shapes at
/// batch 32, a tiny (8, 16, 8, 8) and a 3-D (2, 32, 16, 32, 32), in both layouts;
/// from about 45 s (idle) to 2 minutes (busy) on a 2-core machine with a software
/// GPU. `--batch` changes the ResNet batch, `--quick` runs only the tiny shape.
#[derive(Debug, Parser)]
#[command(version, about, long_about, after_help = AFTER_HELP)]
struct Args {
    /// Shapes to run, comma-separated, dims joined by `x` (N, C, *spatial; 2 to 5
    /// dims); replaces the default table.
    #[arg(long, value_delimiter = ',', value_name = "NxC[xD][xH]xW,...")]
    shapes: Option<Vec<ShapeSpec>>,

    /// Layouts: `cf` (channels-first, NCHW) and/or `cl` (channels-last, NHWC).
    /// Shapes without spatial dims run once (`cf=cl`): both are the same memory.
    #[arg(long, value_delimiter = ',', default_values = ["cf", "cl"])]
    layouts: Vec<LayoutArg>,

    /// Operations: `train` (forward, training mode), `eval` (forward with running
    /// statistics), `backward` (of the training forward: dx, dgamma, dbeta).
    #[arg(long, value_delimiter = ',', default_values = ["train", "eval", "backward"])]
    ops: Vec<Op>,

    /// What each operation fuses: `none` (plain batch norm), `relu` (a layer
    /// with a ReLU: `relu(bn(x))`), `add-relu` (`relu(bn(x) + z)`, the `*_add`
    /// calls). A fused row is also timed against its unfused sequence on the GPU
    /// (the plain op, then the add and the ReLU as elementwise kernels; backward:
    /// the ReLU's backward, then the plain backward), taking turns, in column
    /// `vs unfused` (unfused time / fused time).
    #[arg(long, value_delimiter = ',', default_values = ["none"])]
    fuse: Vec<Fuse>,

    /// Element types of the tensors (x, y, dy, dx, z): `f32`, `f16`, `bf16`
    /// (statistics, parameters and arithmetic stay f32). Floor bytes, the copy
    /// kernel and the unfused sequence are in the same type; f16 and bf16 rows are
    /// checked against the CPU's f32 result rounded to the type (tolerance 2e-3 and
    /// 1.6e-2: one ulp), the CPU running in f32 on the same (rounded) values.
    #[arg(long, value_delimiter = ',', default_values = ["f32"])]
    dtype: Vec<DTypeArg>,

    /// Timed repetitions per measurement (after 2 warm-up runs). Default: by size,
    /// 11 for tensors of 4M elements or more, up to 101 for tiny ones.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    reps: Option<u64>,

    /// wgpu backend (`vulkan`, `gl`, `metal`, `dx12`): sets WGPU_BACKEND before the
    /// device is created. Default: WGPU_BACKEND if set, else wgpu's choice.
    #[arg(long)]
    backend: Option<String>,

    /// Directory for results.csv, results.json and bandwidth.svg.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,

    /// Batch size of the ResNet-50 shapes of the default table.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,

    /// Only the tiny shape 8x16x8x8 (for CI).
    #[arg(long, conflicts_with = "shapes")]
    quick: bool,

    /// Launch geometry: `adapter` (the default for the adapter), `gpu` or `cpu`
    /// (Tuning::gpu / Tuning::cpu with the adapter's subgroup size), whatever the
    /// adapter.
    #[arg(long, value_enum, default_value_t = TuningArg::Adapter)]
    tuning: TuningArg,

    /// Operations as separate dispatches: a forward with batch statistics as three
    /// (statistics, finalize, normalize), or two where the statistics finalize in
    /// place; with the running statistics two (finalize, normalize); a backward as
    /// three (sums, finalize, dx) (Tuning::fused_forward_max_elements and
    /// fused_eval_max_elements = 0, merge_partials = false). To time the fused and
    /// merged dispatches against what they replace.
    #[arg(long)]
    unfused: bool,

    /// Inputs are generated in several copies, rotated between repetitions, so
    /// that together they span at least this many MiB (at most 8 copies; 0: one
    /// copy) and repeated runs do not just hit the caches.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    rotate_mib: u64,

    /// A file holding the pipeline cache (Vulkan): read, when it exists, into the
    /// context's cache, and written with its contents at the end, so that a second
    /// run finds its pipelines compiled. The report prints the time spent planning
    /// each op for the first time (building its pipelines) over the run.
    #[arg(long, value_name = "FILE")]
    pipeline_cache: Option<PathBuf>,

    /// Also time each dispatch of every operation alone (its own compute pass with
    /// timestamp writes; adapters with timestamp queries), listed after the table
    /// and in results.json.
    #[arg(long)]
    detail: bool,
}

const AFTER_HELP: &str = "\
Environment: WGPU_BACKEND, WGPU_ADAPTER_NAME, WGPU_POWER_PREF pick the adapter \
(see GpuContext::from_env). On a software adapter (lavapipe, llvmpipe) the GPU \
times are CPU times: compare ratios within one run, never absolute speeds.

Examples:
  cargo run --release                                   # the default table
  cargo run --release -- --batch 8 --out bench-results/b8
  cargo run --release -- --shapes 32x64x112x112,256x1024 --layouts cl --ops train --reps 10
  cargo run --release -- --quick --backend gl";

/// `--tuning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TuningArg {
    /// Tuning::for_adapter.
    Adapter,
    /// Tuning::gpu.
    Gpu,
    /// Tuning::cpu.
    Cpu,
}

/// Repetitions by tensor size: fewer for big tensors (each run is long), more for
/// small ones (short, noisy runs); odd, so that the median is one run.
fn default_reps(numel: usize) -> usize {
    match numel {
        n if n >= 4 << 20 => 11,
        n if n >= 256 << 10 => 21,
        n if n >= 16 << 10 => 41,
        _ => 101,
    }
}

/// The requested layouts for a shape: one when both are the same memory order.
fn layouts_for(spec: &ShapeSpec, requested: &[LayoutArg]) -> Vec<Layout> {
    let mut layouts: Vec<Layout> = Vec::new();
    for &l in requested {
        let l = Layout::from(l);
        if !layouts.contains(&l) {
            layouts.push(l);
        }
    }
    if spec.layouts_coincide() {
        layouts.truncate(1);
    }
    layouts
}

fn header(ctx: &GpuContext, timer: &GpuTimer, tuning: TuningArg) -> Header {
    let info = ctx.adapter_info();
    let gpu_timing = match timer.timestamp_period_ns() {
        Some(period) => format!(
            "timestamp queries at the beginning and end of the compute pass ({period} ns/tick); \
             a row falls back to wall time (submit + wait) when its timestamps or the copy's \
             are implausible (non-positive, or longer than the wall time); column `clock`"
        ),
        None => "wall time around queue.submit + device.poll(wait) \
                 (the adapter has no timestamp queries)"
            .into(),
    };
    Header {
        adapter: ctx.describe(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info),
        tuning: format!("{tuning:?} {:?}", ctx.tuning()).to_lowercase(),
        gpu_timing,
        timestamp_period_ns: timer.timestamp_period_ns(),
        cpu_threads: rayon::current_num_threads(),
        warmup_runs: WARMUP,
        tolerance: TOLERANCE,
        floor_bytes: "forward-train 3Es, eval 2Es, backward 5Es (s = 4); fused: +Es for z \
                      (add), +2Es for y (backward)"
            .into(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        context_ms: 0.0,
    }
}

/// Rows saying that a shape or layout could not be set up.
fn error_rows(spec: &ShapeSpec, layout: &str, ops: &[Case], error: &str) -> Vec<Row> {
    ops.iter()
        .map(|&op| Row {
            status: format!("ERROR: {error}"),
            ..Row::new(spec, layout, op, 0, 0)
        })
        .collect()
}

/// One line of progress for a finished row.
fn progress(done: usize, total: usize, row: &Row) -> String {
    let gpu = match (row.gpu_ms, &row.gpu_clock) {
        (Some(ms), Some(clock)) => format!(
            "gpu {ms:.3} ms ({clock}; wall {:.3}), copy {} GB/s, gpu/copy {}",
            row.gpu_wall_ms.unwrap_or(f64::NAN),
            row.copy_gbs.map_or("-".into(), |v| format!("{v:.2}")),
            row.gpu_over_copy.map_or("-".into(), |v| format!("{v:.2}"))
        ),
        _ => "gpu -".into(),
    };
    format!(
        "[{done:>3}/{total}] {} {} {}: cpu {} ms, {gpu}, err {}  {}",
        row.shape,
        row.layout,
        row.op,
        row.cpu_ms.map_or("-".into(), |v| format!("{v:.3}")),
        row.max_err.map_or("-".into(), |v| format!("{v:.1e}")),
        row.status
    )
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    if let Some(backend) = &args.backend {
        // Before any thread or device exists.
        std::env::set_var("WGPU_BACKEND", backend);
    }
    let started = Instant::now();
    let shapes = match (&args.shapes, args.quick) {
        (Some(s), _) => s.clone(),
        (None, true) => quick_table(),
        (None, false) => table(args.batch as usize),
    };
    let mut ops: Vec<Case> = Vec::new();
    for &dtype in &args.dtype {
        for &fuse in &args.fuse {
            for &op in &args.ops {
                let dtype = DType::from(dtype);
                let case = Case { op, fuse, dtype };
                if !ops.contains(&case) {
                    ops.push(case);
                }
            }
        }
    }
    let mut dtypes: Vec<DType> = Vec::new();
    for case in &ops {
        if !dtypes.contains(&case.dtype) {
            dtypes.push(case.dtype);
        }
    }
    let fused = ops.iter().any(|c| c.fuse != Fuse::None);
    let total: usize = shapes
        .iter()
        .map(|s| layouts_for(s, &args.layouts).len() * ops.len())
        .sum();

    let cache_in = match &args.pipeline_cache {
        Some(path) if path.exists() => Some(std::fs::read(path)?),
        _ => None,
    };
    let created = Instant::now();
    // SAFETY: the file is one this report wrote from `pipeline_cache_data` (a run
    // with another adapter, driver or wgpu finds it unusable and starts empty).
    let ctx = unsafe { GpuContext::from_env_with_pipeline_cache(cache_in.as_deref())? };
    let context_ms = created.elapsed().as_secs_f64() * 1e3;
    let ctx = match args.tuning {
        TuningArg::Adapter => ctx,
        TuningArg::Gpu => ctx.with_tuning(Tuning::gpu()),
        TuningArg::Cpu => {
            let simd = ctx.adapter_info().subgroup_min_size;
            ctx.with_tuning(Tuning::cpu(simd))
        }
    };
    let ctx = if args.unfused {
        let tuning = ctx.tuning();
        ctx.with_tuning(Tuning {
            fused_forward_max_elements: 0,
            fused_eval_max_elements: 0,
            merge_partials: false,
            ..tuning
        })
    } else {
        ctx
    };
    let timer = GpuTimer::new(&ctx);
    let header = Header {
        context_ms,
        ..header(&ctx, &timer, args.tuning)
    };
    print!("{}", output::header_lines(&header));
    println!();

    let mut rows: Vec<Row> = Vec::new();
    for spec in &shapes {
        let reps = args.reps.map_or(default_reps(spec.numel()), |r| r as usize);
        let layouts = layouts_for(spec, &args.layouts);
        for &dtype in &dtypes {
            let cases: Vec<Case> = ops.iter().copied().filter(|c| c.dtype == dtype).collect();
            let setup = ShapeBench::new(&ctx, spec, args.rotate_mib << 20, fused, dtype);
            let mut bench = match setup {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{} {}: cannot set up: {e}", spec.label(), dtype.name());
                    for l in &layouts {
                        let name = report::data::layout_name(*l);
                        rows.extend(error_rows(spec, name, &cases, &e.to_string()));
                    }
                    continue;
                }
            };
            eprintln!(
                "        {} {}: {} input copies, {reps} reps",
                spec.label(),
                dtype.name(),
                bench.copies()
            );
            for &layout in &layouts {
                let mut case = match bench.layout(layout, &timer) {
                    Ok(case) => case,
                    Err(e) => {
                        let name = report::data::layout_name(layout);
                        eprintln!("{} {name}: cannot set up: {e}", spec.label());
                        rows.extend(error_rows(spec, name, &cases, &e.to_string()));
                        continue;
                    }
                };
                for &op in &cases {
                    let row = case.measure(op, &timer, reps, args.detail);
                    eprintln!("{}", progress(rows.len() + 1, total, &row));
                    rows.push(row);
                }
            }
        }
    }

    println!("{}", output::table(&rows));
    if args.detail {
        println!("{}", output::detail(&rows));
    }
    let on_timestamps = rows
        .iter()
        .filter(|r| r.gpu_clock.as_deref() == Some("timestamp"))
        .count();
    let timed = rows.iter().filter(|r| r.gpu_ms.is_some()).count();
    println!(
        "GPU clock: {on_timestamps} of {timed} timed rows on timestamps, the rest on wall time"
    );
    let bad = rows.iter().filter(|r| r.status != "ok").count();
    if bad > 0 {
        println!("{bad} row(s) FAILED or in ERROR (see status)");
    }
    let planning: f64 = rows.iter().filter_map(|r| r.first_plan_ms).sum();
    let cache = match (&args.pipeline_cache, &cache_in) {
        (None, _) => "no pipeline cache file".to_string(),
        (Some(p), None) => format!("pipeline cache {} absent: started empty", p.display()),
        (Some(p), Some(d)) => format!("pipeline cache {} read: {} bytes", p.display(), d.len()),
    };
    println!(
        "first plan of each row (pipelines built on first use): {planning:.1} ms in all ({cache})"
    );
    if let Some(path) = &args.pipeline_cache {
        match ctx.pipeline_cache_data() {
            Some(data) => {
                std::fs::write(path, &data)?;
                println!("wrote {} ({} bytes)", path.display(), data.len());
            }
            None => println!(
                "this device has no pipeline cache: {} not written",
                path.display()
            ),
        }
    }
    output::write_all(&args.out, &header, &rows)?;
    println!(
        "wrote {0}/results.csv, {0}/results.json, {0}/bandwidth.svg",
        args.out.display()
    );
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
