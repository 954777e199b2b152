//! The report's outputs: the table on stdout, `results.csv`, `results.json`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::measure::Row;
use super::BoxResult;

/// What the report says about the run, above the rows.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// The launch geometry (`--tuning`) and its parameters.
    pub tuning: String,
    /// How GPU times were taken (and the fallback rule).
    pub gpu_timing: String,
    pub timestamp_period_ns: Option<f64>,
    pub cpu_threads: usize,
    pub warmup_runs: usize,
    pub tolerance: f64,
    pub floor_bytes: String,
    pub command: String,
    /// Wall time of `GpuContext::from_env` (device and context; pipelines are
    /// built on first use).
    pub context_ms: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    header: &'a Header,
    rows: &'a [Row],
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 1.0 => format!("{v:.4}"),
        Some(v) if v < 100.0 => format!("{v:.3}"),
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

fn fixed(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn sci(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1e}"))
}

/// The header lines printed above the table.
pub fn header_lines(h: &Header) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "adapter : {}", h.adapter);
    let _ = writeln!(
        s,
        "backend : {} ({}, driver {})",
        h.backend, h.device_type, h.driver
    );
    let _ = writeln!(s, "tuning  : {}", h.tuning);
    let _ = writeln!(s, "GPU time: {}", h.gpu_timing);
    let _ = writeln!(
        s,
        "CPU     : fast CPU path (rayon, {} threads), wall time",
        h.cpu_threads
    );
    let _ = writeln!(
        s,
        "method  : median of reps after {} warm-up runs; floor bytes {}; \
         copy = vec4 copy kernel on the same tensor size (2Es), timed in turns with each op; \
         err = max |gpu-cpu|/(1+|cpu|) \
         (dgamma, dbeta: /(1+sum|terms|)), rows above {:.0e} FAILED",
        h.warmup_runs, h.floor_bytes, h.tolerance
    );
    let _ = writeln!(
        s,
        "host    : context created in {:.1} ms (pipelines built on first use); \
         disp = dispatches per op, bound/floor = bytes of the storage ranges bound \
         and of the partials read again (an upper bound of the bytes moved) over the floor bytes, rec us = CPU time \
         to check, plan and record one op; fused rows (+relu, +add+relu): vs unfused = \
         time of the unfused sequence (plain op, add, ReLU as elementwise kernels) over the \
         fused time, taking turns, B/unfused = floor bytes over the unfused sequence's",
        h.context_ms
    );
    s
}

/// With `--detail`: each dispatch of each row, timed alone.
pub fn detail(rows: &[Row]) -> String {
    let mut s = String::from("dispatches, each timed alone (GPU timestamps, median):\n");
    for r in rows.iter().filter(|r| !r.detail.is_empty()) {
        let _ = writeln!(s, "{} {} {}:", r.shape, r.layout, r.op);
        for d in &r.detail {
            let _ = writeln!(
                s,
                "    {:<48} {:>8} wg  {:>10.4} ms  read {:>9.3} MB  written {:>9.3} MB  re-read {:>8.3} MB",
                d.label,
                d.workgroups,
                d.ms,
                d.bytes_read as f64 / 1e6,
                d.bytes_written as f64 / 1e6,
                d.bytes_reread as f64 / 1e6
            );
        }
    }
    s
}

/// The table: one line per row.
pub fn table(rows: &[Row]) -> String {
    let head = [
        "shape",
        "layout",
        "op",
        "dtype",
        "reps",
        "cpu ms",
        "gpu ms",
        "clock",
        "speedup",
        "cpu GB/s",
        "gpu GB/s",
        "copy GB/s",
        "gpu/copy",
        "vs unfused",
        "B/unfused",
        "max err",
        "disp",
        "bound/floor",
        "rec us",
        "status",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.shape.clone(),
                r.layout.clone(),
                r.op.clone(),
                r.dtype.clone(),
                r.reps.to_string(),
                ms(r.cpu_ms),
                ms(r.gpu_ms),
                r.gpu_clock.clone().unwrap_or_else(|| "-".into()),
                fixed(r.speedup, 2),
                fixed(r.cpu_gbs, 2),
                fixed(r.gpu_gbs, 2),
                fixed(r.copy_gbs, 2),
                fixed(r.gpu_over_copy, 2),
                fixed(r.fused_speedup, 2),
                fixed(r.unfused_bytes.map(|u| r.floor_bytes as f64 / u as f64), 2),
                sci(r.max_err),
                r.dispatches.map_or("-".into(), |d| d.to_string()),
                fixed(r.bound_over_floor, 2),
                fixed(r.record_us, 0),
                r.status.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for line in &cells {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.len());
        }
    }
    // Text columns left-aligned, numbers right-aligned; the status runs free.
    let left = [0, 1, 2, 3, 7, 19];
    let fmt_line = |line: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in line.iter().zip(&widths).enumerate() {
            if i == line.len() - 1 {
                s.push_str(cell);
            } else if left.contains(&i) {
                let _ = write!(s, "{cell:<w$}  ");
            } else {
                let _ = write!(s, "{cell:>w$}  ");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    let mut out = fmt_line(&head);
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total.min(160)));
    out.push('\n');
    let mut last_shape = None;
    for (row, line) in rows.iter().zip(&cells) {
        if last_shape.is_some_and(|s| s != &row.shape) {
            out.push('\n');
        }
        last_shape = Some(&row.shape);
        out.push_str(&fmt_line(line));
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v}"))
}

/// `results.csv`: one line per row, empty cells for missing values.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "shape,layout,op,dtype,numel,floor_bytes,reps,input_copies,cpu_ms,cpu_gbs,gpu_ms,gpu_clock,\
         gpu_wall_ms,gpu_timestamp_ms,gpu_gbs,copy_ms,copy_gbs,gpu_over_copy,speedup,max_err,status,\
         dispatches,bytes_bound,bound_over_floor,record_us,unfused_ms,unfused_bytes,fused_speedup\n",
    );
    for r in rows {
        let fields = [
            r.shape.clone(),
            r.layout.clone(),
            r.op.clone(),
            r.dtype.clone(),
            r.numel.to_string(),
            r.floor_bytes.to_string(),
            r.reps.to_string(),
            r.input_copies.to_string(),
            opt(r.cpu_ms),
            opt(r.cpu_gbs),
            opt(r.gpu_ms),
            r.gpu_clock.clone().unwrap_or_default(),
            opt(r.gpu_wall_ms),
            opt(r.gpu_timestamp_ms),
            opt(r.gpu_gbs),
            opt(r.copy_ms),
            opt(r.copy_gbs),
            opt(r.gpu_over_copy),
            opt(r.speedup),
            opt(r.max_err),
            r.status.clone(),
            r.dispatches.map_or_else(String::new, |d| d.to_string()),
            r.bytes_bound.map_or_else(String::new, |b| b.to_string()),
            opt(r.bound_over_floor),
            opt(r.record_us),
            opt(r.unfused_ms),
            r.unfused_bytes.map_or_else(String::new, |b| b.to_string()),
            opt(r.fused_speedup),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Writes `results.csv`, `results.json` and `bandwidth.svg` into `dir`.
pub fn write_all(dir: &Path, header: &Header, rows: &[Row]) -> BoxResult<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.csv"), csv(rows))?;
    let json = serde_json::to_string_pretty(&Report { header, rows })?;
    std::fs::write(dir.join("results.json"), json + "\n")?;
    std::fs::write(dir.join("bandwidth.svg"), super::svg::plot(header, rows))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::data::ShapeSpec;
    use crate::report::measure::Op;

    #[test]
    fn csv_quotes_and_leaves_missing_values_empty() {
        let spec = ShapeSpec::new(&[4, 8]);
        let row = Row {
            cpu_ms: Some(1.5),
            status: "ERROR: a, \"b\"".into(),
            ..Row::new(&spec, "cf=cl", Op::Backward, 3, 2)
        };
        let text = csv(&[row]);
        let line = text.lines().nth(1).unwrap();
        assert!(line.starts_with("4x8,cf=cl,backward,f32,32,640,3,2,1.5,,"));
        assert!(line.ends_with(",\"ERROR: a, \"\"b\"\"\",,,,,,,"));
        assert_eq!(
            text.lines().next().unwrap().split(',').count(),
            line.split(',').count() - 1
        );
    }
}
