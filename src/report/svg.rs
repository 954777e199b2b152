//! `bandwidth.svg`, written by hand: one panel per operation, a group of bars per
//! shape and layout (CPU, GPU, copy kernel; effective GB/s from the floor bytes),
//! with the GPU/copy ratio of each group in a row above the panel.

use std::fmt::Write as _;

use super::measure::Row;
use super::output::Header;

const BAR: f64 = 14.0;
const GROUP_GAP: f64 = 18.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const PANEL_H: f64 = 220.0;
const LABEL_H: f64 = 110.0;
const PANEL_TOP: f64 = 46.0;
const TITLE_H: f64 = 64.0;

const SERIES: [(&str, &str); 3] = [
    ("CPU", "#4c72b0"),
    ("GPU", "#dd8452"),
    ("copy kernel", "#8c8c8c"),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round axis maximum and tick step for values up to `max`.
fn ticks(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The plot of every row, grouped by operation (in the order they first appear).
pub fn plot(header: &Header, rows: &[Row]) -> String {
    let mut ops: Vec<&str> = Vec::new();
    for r in rows {
        if !ops.contains(&r.op.as_str()) {
            ops.push(&r.op);
        }
    }
    let groups = ops
        .iter()
        .map(|op| rows.iter().filter(|r| r.op == *op).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let group_w = 3.0 * BAR + GROUP_GAP;
    let width = LEFT + RIGHT + groups as f64 * group_w;
    let width = width.max(640.0);
    let panel_total = PANEL_TOP + PANEL_H + LABEL_H;
    let height = TITLE_H + panel_total * ops.len().max(1) as f64 + 10.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">Batch norm: effective bandwidth (floor bytes / time), GB/s</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="38" fill="#444">{} | GPU time: {}</text>"##,
        esc(&header.adapter_short()),
        esc(header.clock_short())
    );
    // Legend.
    for (i, (name, color)) in SERIES.iter().enumerate() {
        let x = LEFT + i as f64 * 110.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="46" width="12" height="12" fill="{color}"/><text x="{}" y="56">{name}</text>"#,
            x + 16.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="56" fill="#444">numbers above a panel: GPU bandwidth / copy bandwidth</text>"##,
        LEFT + 3.0 * 110.0
    );

    for (p, op) in ops.iter().enumerate() {
        let top = TITLE_H + p as f64 * panel_total;
        let plot_top = top + PANEL_TOP;
        let base = plot_top + PANEL_H;
        let panel: Vec<&Row> = rows.iter().filter(|r| r.op == *op).collect();
        let max = panel
            .iter()
            .flat_map(|r| [r.cpu_gbs, r.gpu_gbs, r.copy_gbs])
            .flatten()
            .fold(0.0, f64::max);
        let (axis_max, step) = ticks(max);
        let y_of = |v: f64| base - PANEL_H * (v / axis_max).min(1.0);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
            top + 20.0,
            esc(op)
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end" font-size="10" fill="#b05a1e">GPU/copy</text>"##,
            LEFT - 6.0,
            top + 38.0
        );
        // Grid and y axis.
        let mut v = 0.0;
        while v <= axis_max * 1.0001 {
            let y = y_of(v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                width - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                tick_label(v, step)
            );
            v += step;
        }
        let _ = writeln!(
            s,
            r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">GB/s</text>"#,
            plot_top + PANEL_H / 2.0
        );
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{plot_top:.1}" x2="{LEFT}" y2="{base:.1}" stroke="#333"/><line x1="{LEFT}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#333"/>"##,
            width - RIGHT
        );
        for (g, r) in panel.iter().enumerate() {
            let x0 = LEFT + GROUP_GAP / 2.0 + g as f64 * group_w;
            for (i, value) in [r.cpu_gbs, r.gpu_gbs, r.copy_gbs].iter().enumerate() {
                let x = x0 + i as f64 * BAR;
                match value {
                    Some(v) => {
                        let y = y_of(*v);
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {} {}: {v:.2} GB/s</title></rect>"#,
                            BAR - 1.0,
                            base - y,
                            SERIES[i].1,
                            esc(&r.shape),
                            esc(&r.layout),
                            SERIES[i].0
                        );
                    }
                    None if i == 1 => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" fill="#c00" font-size="9" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
                            x + BAR * 0.7,
                            base - 4.0,
                            x + BAR * 0.7,
                            base - 4.0,
                            if r.status == "FAILED" {
                                "FAILED"
                            } else {
                                "no result"
                            }
                        );
                    }
                    None => {}
                }
            }
            let ratio = r.gpu_over_copy.map_or("-".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#b05a1e">{ratio}</text>"##,
                x0 + 1.5 * BAR,
                top + 38.0
            );
            let lx = x0 + 1.5 * BAR;
            let ly = base + 12.0;
            let _ = writeln!(
                s,
                r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="end" transform="rotate(-40 {lx:.1} {ly:.1})">{} {}</text>"#,
                esc(&r.shape),
                esc(&r.layout)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

impl Header {
    /// The adapter's name and backend, for the plot's subtitle.
    fn adapter_short(&self) -> String {
        let name = self.adapter.split(" (").next().unwrap_or(&self.adapter);
        format!("{name} ({} backend)", self.backend)
    }

    /// The first clause of the timing description.
    fn clock_short(&self) -> &str {
        self.gpu_timing
            .split(';')
            .next()
            .unwrap_or(&self.gpu_timing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::data::ShapeSpec;
    use crate::report::measure::{Op, Row};

    fn header() -> Header {
        Header {
            adapter: "test adapter (Cpu)".into(),
            backend: "Vulkan".into(),
            device_type: "Cpu".into(),
            driver: "none".into(),
            tuning: "gpu".into(),
            gpu_timing: "wall time; details".into(),
            timestamp_period_ns: None,
            cpu_threads: 1,
            warmup_runs: 2,
            tolerance: 1e-4,
            floor_bytes: String::new(),
            command: String::new(),
            context_ms: 0.0,
        }
    }

    #[test]
    fn round_axis() {
        assert_eq!(ticks(13.2), (15.0, 5.0));
        assert_eq!(ticks(0.0), (1.0, 0.2));
        assert_eq!(ticks(830.0), (1000.0, 200.0));
    }

    #[test]
    fn plots_measured_and_failed_rows() {
        let spec = ShapeSpec::new(&[8, 16, 8, 8]);
        let ok = Row {
            cpu_gbs: Some(10.0),
            gpu_gbs: Some(2.0),
            copy_gbs: Some(4.0),
            gpu_over_copy: Some(0.5),
            ..Row::new(&spec, "cf", Op::Eval, 5, 1)
        };
        let failed = Row {
            cpu_gbs: Some(10.0),
            status: "FAILED".into(),
            ..Row::new(&spec, "cl", Op::Eval, 5, 1)
        };
        let svg = plot(&header(), &[ok, failed]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">FAILED<"));
        assert!(svg.contains(">0.50<"));
        assert_eq!(svg.matches("<rect").count(), 1 + 3 + 3 + 1);
    }
}
