//! Trains the two networks that batch norm's classic descriptions use, entirely on
//! the GPU, with and without batch norm, and checks the run against the CPU:
//!
//! - the Keras one, `Dense(3, relu) -> BatchNormalization -> Dense(2, relu) ->
//!   BatchNormalization -> Dense(1, sigmoid)`, on two moons (2 features, 2 classes);
//! - the PyTorch one, `Linear(784, 256) -> BatchNorm1d(256) -> ReLU ->
//!   Linear(256, 10)`, on procedural 28x28 digit-like images (10 classes).
//!
//! ```sh
//! cargo run --release --example train_mlp                 # full grid, writes docs/train
//! cargo run --release --example train_mlp -- --quick      # the short run CI does
//! cargo run --release --example train_mlp -- --data train-images-idx3-ubyte --limit 12000
//! ```
//!
//! Each training step is recorded into one `wgpu::CommandEncoder` and submitted:
//! the example's own kernels (`examples/train_mlp/*.wgsl`: matmul, bias + ReLU, the
//! loss and its gradient, SGD) with the crate's `BatchNorm::forward_train`,
//! `BatchNorm::backward` and `AffineOptimizer::step` (plain SGD, like the weights).
//! The loss kernel appends each step's mean loss and batch accuracy to a GPU buffer,
//! read back only when progress is printed.
//!
//! Every network is trained with and without batch norm (the same initial Linear
//! weights), at each learning rate and batch size, and the example writes into
//! `--out` (default `docs/train`) `<net>.svg` (loss and batch accuracy against step),
//! `results.md` and `results.csv` (steps until the batch accuracy, averaged over
//! the last `WINDOW` steps, reaches the target; the final batch accuracy and loss
//! over the last `WINDOW` steps; the test accuracy in eval mode, i.e. with the
//! running statistics; the folded-inference check; wall time per step, read-backs
//! included). With `--quick` the grid is one learning rate (0.1) and one batch
//! size (32), with fewer steps and samples: a few seconds on lavapipe.
//!
//! Checks, each failing the run with a non-zero exit code:
//! - **GPU against CPU.** The first `CHECK_STEPS` (20) steps of the checked
//!   configuration (learning rate 0.1, the first batch size; with and without BN)
//!   are repeated on the CPU, from the same weights and batches, with the crate's
//!   `CpuBatchNorm` and plain Rust matmuls; the losses must agree within
//!   `LOSS_TOL * (1 + |cpu loss|)`, `LOSS_TOL = 1e-4`. Both sides compute in f32 and
//!   the matmuls sum in the same order, but the batch-norm reductions and the loss
//!   sum in different orders, which changes the last bits of each step's result, and
//!   SGD carries those differences into the following steps. lavapipe stays below
//!   1e-7; the tolerance leaves a thousand times that for GPUs that round or fuse
//!   multiply-adds differently, and is still far below the loss's change from one
//!   batch to the next.
//! - **Batch norm reaches the target.** In the checked configuration the network
//!   with batch norm reaches the target batch accuracy (90 % on two moons, 95 % on
//!   the digits) within the run.
//! - **Folded inference.** After training, every batch norm is folded into a Linear
//!   (`FoldedBatchNorm`: into the Linear before it where one directly precedes it,
//!   the PyTorch network; into the Linear after it where a ReLU sits between, the
//!   Keras network), and the folded network, with no batch norm left, predicts the
//!   test set on the GPU. Its predictions must equal the eval forward's for every
//!   sample, except where the eval forward's two best logits are within
//!   `TIE_TOL * (1 + |logit|)` of each other (a tie that rounding can flip).
//!
//! `--data PATH` trains on a file of your own instead (by default the PyTorch
//! network, `--net keras` for two classes): IDX files (MNIST's format, unsigned
//! bytes scaled to [0, 1]; the labels file given with `--labels` or found by name,
//! `train-images-idx3-ubyte` -> `train-labels-idx1-ubyte`; decompress `.gz` first),
//! or CSV (one sample per line, numbers separated by commas, the label in the last
//! column or, with `--label-column first`, the first; a header line is skipped;
//! features are used as they are, so scale them). One sample in six is held out as
//! the test set. On such data missing the target accuracy is reported, and fails
//! the run only when the target was given with `--target`.

#[path = "train_mlp/data.rs"]
mod data;
#[path = "train_mlp/gpu.rs"]
mod gpu;
#[path = "train_mlp/net.rs"]
mod net;
#[path = "train_mlp/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use wgpu_batchnorm::GpuContext;

use data::{Dataset, LabelColumn};
use gpu::{Batch, BoxResult, GpuNet, Kernels};
use net::{CpuNet, Loss, NetSpec};
use report::RunResult;

/// The learning rate of the checked configuration (with the first batch size).
const CHECKED_LR: f32 = 0.1;
/// Steps of the GPU run repeated on the CPU.
const CHECK_STEPS: usize = 20;
/// Largest GPU-CPU loss difference, relative to 1 + |CPU loss| (see the docs above).
const LOSS_TOL: f64 = 1e-4;
/// Decision margins below this (relative to 1 + |logit|) count as ties in the
/// folded-inference check.
const TIE_TOL: f64 = 1e-4;
/// Steps averaged for the batch accuracy of the table and the target.
const WINDOW: usize = 50;
/// Rows per eval dispatch sequence.
const EVAL_CHUNK: usize = 1024;
const DATA_SEED: u64 = 0x5EED_DA7A;
const INIT_SEED: u64 = 0x5EED_1417;
const ORDER_SEED: u64 = 0x5EED_0DE2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Keras,
    Pytorch,
    Both,
}

/// Train the Keras and the PyTorch batch-norm MLPs on the GPU, with and without
/// batch norm, checked against the CPU.
#[derive(Parser, Debug)]
struct Args {
    /// Short run for CI: one learning rate (0.1) and batch size (32), fewer steps
    /// and samples.
    #[arg(long)]
    quick: bool,
    /// Folder for the curves and the tables.
    #[arg(long, default_value = "docs/train")]
    out: PathBuf,
    /// Which networks to train (default: both; with --data: pytorch).
    #[arg(long, value_enum)]
    net: Option<Which>,
    /// Your own data: a CSV file or an IDX (MNIST format) images file.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The IDX labels file of --data (default: found by name).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The CSV column that holds the label.
    #[arg(long, value_enum, default_value = "last")]
    label_column: LabelColumn,
    /// Use only the first N samples of --data.
    #[arg(long)]
    limit: Option<usize>,
    /// Learning rates (comma-separated; the one nearest 0.1 is checked against the
    /// CPU and for the target accuracy).
    #[arg(long, value_delimiter = ',')]
    lr: Option<Vec<f32>>,
    /// Batch sizes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    batch: Option<Vec<usize>>,
    /// Training steps per run.
    #[arg(long)]
    steps: Option<usize>,
    /// Target batch accuracy (default 0.9 for the Keras network, 0.95 for the
    /// PyTorch one); with --data, missing it fails the run only when given.
    #[arg(long)]
    target: Option<f64>,
}

/// One network's experiment: data, sizes and the target accuracy.
struct Task {
    spec: NetSpec,
    data: Dataset,
    steps: usize,
    lrs: Vec<f32>,
    batches: Vec<usize>,
    target: f64,
    /// Whether missing the target fails the run (the generated data, or a target
    /// given with --target).
    enforce_target: bool,
    log_every: usize,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> BoxResult<bool> {
    let args = Args::parse();
    let which = args.net.unwrap_or(if args.data.is_some() {
        Which::Pytorch
    } else {
        Which::Both
    });
    // Load a user's file before the GPU starts, so a bad file fails fast.
    let user_data = match &args.data {
        Some(path) => Some(data::load(
            path,
            args.labels.as_deref(),
            args.label_column,
            args.limit,
            DATA_SEED,
        )?),
        None => None,
    };
    let ctx = GpuContext::from_env()?;
    let adapter = ctx.describe();
    println!("adapter: {adapter}");
    let kernels = Kernels::new(&ctx);

    let mut tasks = Vec::new();
    let mut user_data = user_data;
    if matches!(which, Which::Keras | Which::Both) {
        let data = match user_data.take() {
            Some(d) if d.classes != 2 => {
                return Err(format!(
                    "--net keras needs two classes; {} has {}",
                    d.name, d.classes
                )
                .into())
            }
            Some(d) => d,
            None => data::moons(if args.quick { 1024 } else { 2048 }, 1024, 0.15, DATA_SEED),
        };
        tasks.push(Task {
            spec: NetSpec::keras(data.features),
            data,
            steps: if args.quick { 400 } else { 800 },
            lrs: vec![0.01, 0.1, 1.0],
            batches: vec![32, 128],
            target: 0.9,
            enforce_target: true,
            log_every: 100,
        });
    }
    if matches!(which, Which::Pytorch | Which::Both) {
        let data = match user_data.take() {
            Some(d) => d,
            None => {
                let (train, test) = if args.quick {
                    (2000, 500)
                } else {
                    (6000, 1000)
                };
                data::digits(train, test, DATA_SEED)
            }
        };
        tasks.push(Task {
            spec: NetSpec::pytorch(data.features, data.classes),
            data,
            steps: if args.quick { 150 } else { 300 },
            lrs: vec![0.01, 0.1, 1.0],
            batches: vec![32, 128],
            target: 0.95,
            enforce_target: true,
            log_every: 100,
        });
    }
    for task in &mut tasks {
        if args.quick {
            task.lrs = vec![CHECKED_LR];
            task.batches.truncate(1);
        }
        if let Some(lrs) = &args.lr {
            task.lrs = lrs.clone();
        }
        if let Some(b) = &args.batch {
            task.batches = b.clone();
        }
        if let Some(s) = args.steps {
            task.steps = s;
        }
        // A user's data may not allow the default target: it is then reported only.
        task.enforce_target = args.data.is_none() || args.target.is_some();
        if let Some(t) = args.target {
            task.target = t;
        }
        if task.lrs.is_empty() || task.batches.is_empty() || task.steps == 0 {
            return Err("--lr, --batch and --steps need at least one value above zero".into());
        }
        if !(0.0..=1.0).contains(&task.target) {
            return Err(format!("--target {}: an accuracy between 0 and 1", task.target).into());
        }
        if let Some(&b) = task
            .batches
            .iter()
            .find(|&&b| b < 2 || b > task.data.train_rows())
        {
            return Err(format!(
                "batch size {b}: between 2 and the {} training samples",
                task.data.train_rows()
            )
            .into());
        }
    }

    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    let mut ok = true;
    let mut all = Vec::new();
    let mut md = format!("Adapter: {adapter}\n\n");
    for task in &tasks {
        let (runs, task_ok) = run_task(&ctx, &kernels, task)?;
        ok &= task_ok;
        let refs: Vec<&RunResult> = runs.iter().collect();
        let spec = &task.spec;
        let title = spec.describe();
        let plot_window = (task.steps / 40).max(5);
        let data_line = format!(
            "{}, {} training samples; plain SGD; loss and batch accuracy averaged over {plot_window}-step windows",
            task.data.name,
            task.data.train_rows()
        );
        let adapter_line = format!("adapter: {adapter}");
        // Above the loss of a uniform guess, ln(classes), rounded up to 0.5.
        let loss_max = (2.4 * (task.data.classes as f64).ln()).ceil() / 2.0;
        let svg = report::curves_svg(
            &title,
            &[&data_line, &adapter_line],
            &refs,
            &task.lrs,
            &task.batches,
            plot_window,
            loss_max,
            task.target,
        );
        write(&args.out.join(format!("{}.svg", spec.key)), &svg)?;
        md += &format!(
            "### {}\n\n`{}` on {} ({} training / {} test samples), {} steps per run, \
             plain SGD on every parameter.\n\n",
            match spec.flavor {
                net::Flavor::Keras => "Keras network",
                net::Flavor::PyTorch => "PyTorch network",
            },
            spec.describe(),
            task.data.name,
            task.data.train_rows(),
            task.data.test_rows(),
            task.steps
        );
        md += &report::table_md(&refs, task.target, WINDOW);
        md += "\n";
        all.extend(runs);
    }
    write(&args.out.join("results.md"), &md)?;
    write(&args.out.join("results.csv"), &report::table_csv(&all))?;
    println!("wrote {}", args.out.display());
    if ok {
        println!("all checks passed");
    } else {
        println!("some checks FAILED");
    }
    Ok(ok)
}

fn write(path: &Path, text: &str) -> BoxResult<()> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()).into())
}

/// Predicted class of each row of logits.
fn predictions(loss: Loss, logits: &[f32], outputs: usize) -> Vec<usize> {
    logits
        .chunks(outputs)
        .map(|z| match loss {
            Loss::Bce => usize::from(z[0] > 0.0),
            Loss::SoftmaxCe => {
                let mut arg = 0;
                for (j, &v) in z.iter().enumerate() {
                    if v > z[arg] {
                        arg = j;
                    }
                }
                arg
            }
        })
        .collect()
}

/// Distance of each row's decision from a tie, and the size of its logits.
fn margins(loss: Loss, logits: &[f32], outputs: usize) -> Vec<(f64, f64)> {
    logits
        .chunks(outputs)
        .map(|z| {
            let big = z.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
            match loss {
                Loss::Bce => (f64::from(z[0]).abs(), big),
                Loss::SoftmaxCe => {
                    let mut sorted: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    (
                        sorted[0] - sorted.get(1).copied().unwrap_or(f64::NEG_INFINITY),
                        big,
                    )
                }
            }
        })
        .collect()
}

/// The GPU buffers of a dataset: the training set (rewritten in each epoch's
/// order) and the test set.
struct DataBuffers {
    train_x: wgpu::Buffer,
    train_y: wgpu::Buffer,
    test_x: wgpu::Buffer,
}

fn run_task(ctx: &GpuContext, kernels: &Kernels, task: &Task) -> BoxResult<(Vec<RunResult>, bool)> {
    let spec = &task.spec;
    let d = &task.data;
    println!(
        "\n== {} on {} ({} features, {} classes; {} training / {} test samples)",
        spec.describe(),
        d.name,
        d.features,
        d.classes,
        d.train_rows(),
        d.test_rows()
    );
    for (name, bytes) in [
        ("training set", d.train_x.len() * 4),
        ("test set", d.test_x.len() * 4),
    ] {
        if bytes as u64 > ctx.max_binding_size() {
            return Err(format!(
                "the {name} ({bytes} bytes) is larger than one storage binding on this device ({}); \
                 use fewer samples (--limit)",
                ctx.max_binding_size()
            )
            .into());
        }
    }
    let buffers = DataBuffers {
        train_x: ctx.storage_buffer("train.data.x", (d.train_x.len() * 4) as u64)?,
        train_y: ctx.storage_buffer("train.data.y", (d.train_y.len() * 4) as u64)?,
        test_x: ctx.upload("test.data.x", &d.test_x)?,
    };
    let params = spec.init(INIT_SEED);
    let mut ok = true;
    let mut runs = Vec::new();
    // The checked configuration: the learning rate nearest CHECKED_LR (by ratio),
    // the first batch size.
    let distance = |lr: f32| (lr / CHECKED_LR).ln().abs();
    let checked_lr = task
        .lrs
        .iter()
        .copied()
        .min_by(|a, b| distance(*a).total_cmp(&distance(*b)));
    for &lr in &task.lrs {
        for (bi, &batch) in task.batches.iter().enumerate() {
            for bn in [true, false] {
                let net_spec = if bn { spec.clone() } else { spec.without_bn() };
                let checked = Some(lr) == checked_lr && bi == 0;
                let (result, run_ok) = run_one(
                    ctx, kernels, task, &net_spec, &params, &buffers, lr, batch, checked,
                )?;
                ok &= run_ok;
                runs.push(result);
            }
        }
    }
    Ok((runs, ok))
}

/// Trains one configuration on the GPU and runs its checks.
#[allow(clippy::too_many_arguments)]
fn run_one(
    ctx: &GpuContext,
    kernels: &Kernels,
    task: &Task,
    spec: &NetSpec,
    params: &[net::LinearParams],
    buffers: &DataBuffers,
    lr: f32,
    batch: usize,
    checked: bool,
) -> BoxResult<(RunResult, bool)> {
    let d = &task.data;
    let bn = spec.has_bn();
    let label = format!(
        "{} BN, lr {lr}, batch {batch}",
        if bn { "with" } else { "without" }
    );
    println!("-- {label}");
    let mut net = GpuNet::new(ctx, kernels, spec, params, batch, lr, task.steps)?;
    let per_epoch = d.train_rows() / batch;
    let mut history = Vec::with_capacity(task.steps);
    let start = Instant::now();
    for step in 0..task.steps {
        let (epoch, b) = (step / per_epoch, step % per_epoch);
        if b == 0 {
            let (x, y) = d.ordered_train(&data::epoch_order(d.train_rows(), ORDER_SEED, epoch));
            ctx.queue()
                .write_buffer(&buffers.train_x, 0, bytemuck::cast_slice(&x));
            ctx.queue()
                .write_buffer(&buffers.train_y, 0, bytemuck::cast_slice(&y));
        }
        let mut encoder = ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("train.step"),
            });
        let rows = Batch {
            x: &buffers.train_x,
            labels: &buffers.train_y,
            first: b * batch,
            rows: batch,
            features: d.features,
        };
        net.record_step(&mut encoder, rows)?;
        ctx.queue().submit([encoder.finish()]);
        if (step + 1) % task.log_every == 0 || step + 1 == task.steps {
            history.extend(net.new_history()?);
            let recent = &history[history.len().saturating_sub(WINDOW)..];
            let n = recent.len().max(1) as f64;
            let loss = recent.iter().map(|e| f64::from(e.0)).sum::<f64>() / n;
            let acc = recent.iter().map(|e| f64::from(e.1)).sum::<f64>() / n;
            println!(
                "   step {:>4}: loss {loss:.4}, batch accuracy {:.1} %",
                step + 1,
                100.0 * acc
            );
        }
    }
    let ms_per_step = start.elapsed().as_secs_f64() * 1e3 / task.steps as f64;
    if history.len() != task.steps {
        return Err(format!("{} history entries for {} steps", history.len(), task.steps).into());
    }

    // Test accuracy, batch norms in eval mode.
    let outputs = spec.outputs();
    let logits = net.eval_logits(&buffers.test_x, d.test_rows(), d.features, EVAL_CHUNK)?;
    let predicted = predictions(spec.loss, &logits, outputs);
    let hits = predicted
        .iter()
        .zip(&d.test_y)
        .filter(|(p, &y)| **p == y as usize)
        .count();
    let eval_acc = hits as f64 / d.test_rows() as f64;

    let tail = &history[history.len().saturating_sub(WINDOW)..];
    let final_acc = tail.iter().map(|e| f64::from(e.1)).sum::<f64>() / tail.len() as f64;
    let final_loss = tail.iter().map(|e| f64::from(e.0)).sum::<f64>() / tail.len() as f64;
    let steps_to_target = report::steps_to(&history, WINDOW, task.target);
    println!(
        "   {:.1} ms/step; steps to {:.0} %: {}; test accuracy (eval mode): {:.1} %",
        ms_per_step,
        100.0 * task.target,
        steps_to_target.map_or("not reached".into(), |n| n.to_string()),
        100.0 * eval_acc
    );
    let mut ok = true;

    // Folded inference against the eval forward.
    let finite = history.iter().all(|e| e.0.is_finite());
    let mut fold_agree = None;
    if bn && finite {
        let folded = net::fold(spec, &net.linear_params()?, &net.bn_states()?)?;
        let mut folded_net = GpuNet::new(ctx, kernels, &folded.spec, &folded.params, 0, lr, 1)?;
        let folded_logits =
            folded_net.eval_logits(&buffers.test_x, d.test_rows(), d.features, EVAL_CHUNK)?;
        let folded_pred = predictions(spec.loss, &folded_logits, outputs);
        let margin = margins(spec.loss, &logits, outputs);
        let max_diff = logits
            .iter()
            .zip(&folded_logits)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        let mut same = 0;
        let mut bad = 0;
        for ((p, q), (m, big)) in predicted.iter().zip(&folded_pred).zip(&margin) {
            if p == q {
                same += 1;
            } else if *m > TIE_TOL * (1.0 + big) {
                bad += 1;
            }
        }
        for note in &folded.notes {
            println!("   fold: {note}");
        }
        println!(
            "   folded network ({}): {same}/{} predictions as the eval forward, largest logit difference {max_diff:.2e}",
            folded.spec.describe(),
            d.test_rows()
        );
        if bad > 0 {
            println!(
                "   FAIL: {bad} folded predictions differ from the eval forward's away from a tie"
            );
            ok = false;
        }
        fold_agree = Some((same, d.test_rows()));
    }

    if checked {
        // The first steps again on the CPU, from the same weights and batches.
        let mut cpu = CpuNet::new(spec, params, lr)?;
        let steps = CHECK_STEPS.min(task.steps);
        let mut worst: f64 = 0.0;
        let mut epoch_data = (Vec::new(), Vec::new());
        for (step, gpu) in history.iter().take(steps).enumerate() {
            let (epoch, b) = (step / per_epoch, step % per_epoch);
            if b == 0 {
                epoch_data = d.ordered_train(&data::epoch_order(d.train_rows(), ORDER_SEED, epoch));
            }
            let x = &epoch_data.0[b * batch * d.features..(b + 1) * batch * d.features];
            let y = &epoch_data.1[b * batch..(b + 1) * batch];
            let (loss, _) = cpu.step(x, y)?;
            let gpu = f64::from(gpu.0);
            // Both diverged (NaN or inf) is agreement; one alone is not.
            let diff = if !gpu.is_finite() && !loss.is_finite() {
                0.0
            } else {
                (gpu - loss).abs() / (1.0 + loss.abs())
            };
            if diff.is_nan() || diff > worst {
                worst = diff;
            }
        }
        let pass = worst <= LOSS_TOL;
        println!(
            "   GPU vs CPU, first {steps} steps: largest loss difference {worst:.2e} (relative to 1 + |loss|; tolerance {LOSS_TOL:.0e}){}",
            if pass { "" } else { " FAIL" }
        );
        ok &= pass;
        if bn {
            let reached = steps_to_target.is_some();
            let verdict = match (reached, task.enforce_target) {
                (true, _) => "yes",
                (false, true) => "no FAIL",
                (false, false) => "no (not a failure on --data without --target)",
            };
            println!(
                "   batch norm reaches {:.0} %: {verdict}",
                100.0 * task.target
            );
            ok &= reached || !task.enforce_target;
        }
    }

    Ok((
        RunResult {
            net: spec.key,
            bn,
            lr,
            batch,
            history,
            steps_to_target,
            final_acc,
            final_loss,
            eval_acc,
            fold_agree,
            ms_per_step,
        },
        ok,
    ))
}

/// Checks that need no GPU: `cargo test --release --example train_mlp`.
#[cfg(test)]
mod tests {
    use super::*;
    use net::{Layer, LinearParams};
    use wgpu_batchnorm::cpu::fast::CpuBatchNorm;
    use wgpu_batchnorm::{BatchNormState, Shape};

    #[test]
    fn shaders_validate() {
        for (name, source) in gpu::SOURCES {
            let module = naga::front::wgsl::parse_str(source)
                .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(source)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {e:?}"));
        }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("train_mlp_test_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn csv_with_header_and_label_first() {
        let mut text = String::from("label,a,b\n");
        for i in 0..12 {
            text += &format!("{},{}.5,{}\n", ["cat", "dog", "eel"][i % 3], i, -(i as i32));
        }
        let path = temp_file("first.csv", text.as_bytes());
        let d = data::load(&path, None, LabelColumn::First, None, 1).unwrap();
        assert_eq!(
            (d.features, d.classes, d.train_rows() + d.test_rows()),
            (2, 3, 12)
        );
        assert_eq!(d.test_rows(), 2);
        // Every row keeps its label: the feature sum tells the row apart.
        for (x, y) in d.train_x.chunks(2).zip(&d.train_y) {
            let i = (x[0] - 0.5) as usize;
            assert_eq!(*y as usize, i % 3);
            assert_eq!(x[1], -(i as f32));
        }
    }

    #[test]
    fn bad_files_are_errors() {
        let path = temp_file("ragged.csv", b"1,2,0\n3,1\n");
        let e = data::load(&path, None, LabelColumn::Last, None, 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains(":2:"), "{e}");
        let path = temp_file("text.csv", b"1,2,0\n3,x,1\n");
        assert!(data::load(&path, None, LabelColumn::Last, None, 1).is_err());
        let path = temp_file("x.gz", &[0x1f, 0x8b, 8, 0]);
        assert!(data::load(&path, None, LabelColumn::Last, None, 1)
            .err()
            .unwrap()
            .to_string()
            .contains("gunzip"));
        let missing = Path::new("/nonexistent/train_mlp.csv");
        assert!(data::load(missing, None, LabelColumn::Last, None, 1).is_err());
        // An IDX file whose labels file cannot be found by name.
        let path = temp_file("data.idx", &[0, 0, 8, 1, 0, 0, 0, 1, 7]);
        assert!(data::load(&path, None, LabelColumn::Last, None, 1)
            .err()
            .unwrap()
            .to_string()
            .contains("--labels"));
    }

    #[test]
    fn idx_pair_by_name() {
        let (n, side) = (12u32, 2u32);
        let mut images = vec![0, 0, 8, 3];
        for d in [n, side, side] {
            images.extend(d.to_be_bytes());
        }
        images.extend((0..n * side * side).map(|i| (i % 256) as u8));
        let mut labels = vec![0, 0, 8, 1];
        labels.extend(n.to_be_bytes());
        labels.extend((0..n).map(|i| (i % 2) as u8));
        temp_file("t-labels-idx1-ubyte", &labels);
        let path = temp_file("t-images-idx3-ubyte", &images);
        let d = data::load(&path, None, LabelColumn::Last, Some(10), 1).unwrap();
        assert_eq!(
            (d.features, d.classes, d.train_rows() + d.test_rows()),
            (4, 2, 10)
        );
        for (x, y) in d.train_x.chunks(4).zip(&d.train_y) {
            let i = (x[0] * 255.0).round() as u32 / 4;
            assert_eq!(*y, i % 2);
        }
    }

    #[test]
    fn without_bn_keeps_the_linears() {
        let keras = NetSpec::keras(2).without_bn();
        assert_eq!(
            keras.describe(),
            "Dense(3, relu) -> Dense(2, relu) -> Dense(1, sigmoid)"
        );
        let torch = NetSpec::pytorch(784, 10).without_bn();
        assert_eq!(
            torch.describe(),
            "Linear(784, 256) -> ReLU -> Linear(256, 10)"
        );
        assert_eq!(torch.init(3), NetSpec::pytorch(784, 10).init(3));
    }

    /// The eval forward on the CPU: Linear layers and `CpuBatchNorm::forward_eval`.
    fn cpu_eval(
        spec: &NetSpec,
        params: &[LinearParams],
        states: &[BatchNormState],
        x: &[f32],
        rows: usize,
    ) -> Vec<f32> {
        let (mut li, mut bi) = (0, 0);
        let mut h = x.to_vec();
        for layer in &spec.layers {
            h = match *layer {
                Layer::Linear {
                    inputs,
                    outputs,
                    relu,
                } => {
                    let p = &params[li];
                    li += 1;
                    (0..rows * outputs)
                        .map(|i| {
                            let (r, j) = (i / outputs, i % outputs);
                            let z = p.b[j]
                                + (0..inputs)
                                    .map(|k| h[r * inputs + k] * p.w[k * outputs + j])
                                    .sum::<f32>();
                            if relu {
                                z.max(0.0)
                            } else {
                                z
                            }
                        })
                        .collect()
                }
                Layer::BatchNorm { channels, relu } => {
                    let mut bn =
                        CpuBatchNorm::with_state(spec.bn_config(channels), states[bi].clone())
                            .unwrap();
                    bi += 1;
                    let shape = Shape::channels_last(&[rows, channels]).unwrap();
                    let y = bn.forward_eval(&shape, &h).unwrap().y;
                    if relu {
                        y.into_iter().map(|v| v.max(0.0)).collect()
                    } else {
                        y
                    }
                }
            };
        }
        h
    }

    #[test]
    fn folding_keeps_the_eval_forward() {
        let mut rng = data::Rng::new(9);
        for spec in [NetSpec::keras(2), NetSpec::pytorch(20, 4)] {
            let params = spec.init(5);
            let states: Vec<BatchNormState> = spec
                .layers
                .iter()
                .filter_map(|l| match *l {
                    Layer::BatchNorm { channels, .. } => {
                        let config = spec.bn_config(channels);
                        let mut v = |lo: f64, hi: f64| {
                            (0..channels)
                                .map(|_| rng.range(lo, hi) as f32)
                                .collect::<Vec<_>>()
                        };
                        Some(
                            BatchNormState::from_parts(
                                &config,
                                v(0.5, 2.0),
                                v(-1.0, 1.0),
                                v(-1.0, 1.0),
                                v(0.1, 3.0),
                                50,
                            )
                            .unwrap(),
                        )
                    }
                    Layer::Linear { .. } => None,
                })
                .collect();
            let features = match spec.layers[0] {
                Layer::Linear { inputs, .. } => inputs,
                Layer::BatchNorm { .. } => unreachable!(),
            };
            let rows = 64;
            let x: Vec<f32> = (0..rows * features)
                .map(|_| rng.range(-2.0, 2.0) as f32)
                .collect();
            let want = cpu_eval(&spec, &params, &states, &x, rows);
            let folded = net::fold(&spec, &params, &states).unwrap();
            assert!(!folded.spec.has_bn());
            assert_eq!(folded.notes.len(), states.len());
            let got = cpu_eval(&folded.spec, &folded.params, &[], &x, rows);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{} folded {g} eval {w}",
                    spec.key
                );
            }
        }
    }
}
