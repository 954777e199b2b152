//! What the example writes: loss and accuracy curves (SVG, drawn by hand), and the
//! results table (Markdown and CSV).

use std::fmt::Write as _;

/// The outcome of one training run.
pub struct RunResult {
    pub net: &'static str,
    pub bn: bool,
    pub lr: f32,
    pub batch: usize,
    /// (mean loss, batch accuracy) of every step, as the loss kernel logged them.
    pub history: Vec<(f32, f32)>,
    /// First step at which the batch accuracy, averaged over the `window` steps
    /// ending there, reached the target.
    pub steps_to_target: Option<usize>,
    /// Batch accuracy averaged over the last `window` steps.
    pub final_acc: f64,
    pub final_loss: f64,
    /// Test-set accuracy with the batch norms in eval mode (running statistics).
    pub eval_acc: f64,
    /// Folded inference: (samples predicted as by the eval forward, test samples).
    pub fold_agree: Option<(usize, usize)>,
    pub ms_per_step: f64,
}

/// Mean of `(loss, accuracy)` over consecutive windows of `window` steps:
/// (last step of the window, loss, accuracy); a non-finite loss stays non-finite.
pub fn windows(history: &[(f32, f32)], window: usize) -> Vec<(usize, f64, f64)> {
    history
        .chunks(window)
        .enumerate()
        .map(|(i, w)| {
            let n = w.len() as f64;
            let loss = w.iter().map(|e| f64::from(e.0)).sum::<f64>() / n;
            let acc = w.iter().map(|e| f64::from(e.1)).sum::<f64>() / n;
            (i * window + w.len(), loss, acc)
        })
        .collect()
}

/// First step (1-based) at which the trailing `window`-step mean accuracy is at
/// least `target`.
pub fn steps_to(history: &[(f32, f32)], window: usize, target: f64) -> Option<usize> {
    if history.len() < window {
        return None;
    }
    let mut sum: f64 = history[..window].iter().map(|e| f64::from(e.1)).sum();
    for end in window..=history.len() {
        if end > window {
            sum += f64::from(history[end - 1].1) - f64::from(history[end - 1 - window].1);
        }
        if sum / window as f64 >= target - 1e-9 {
            return Some(end);
        }
    }
    None
}

fn fmt_lr(lr: f32) -> String {
    format!("{lr}")
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Loss and accuracy against step: one column per learning rate, BN solid and
/// no BN dashed, one colour per batch size.
#[allow(clippy::too_many_arguments)]
pub fn curves_svg(
    title: &str,
    subtitles: &[&str],
    runs: &[&RunResult],
    lrs: &[f32],
    batches: &[usize],
    window: usize,
    loss_max: f64,
    target: f64,
) -> String {
    let (pw, ph) = (300.0, 190.0);
    let (left, gap_x, gap_y) = (60.0, 40.0, 50.0);
    let legend_y = 44.0 + 16.0 * subtitles.len() as f64;
    let top = legend_y + 30.0;
    let cols = lrs.len().max(1) as f64;
    let width = left + cols * (pw + gap_x);
    let height = top + 2.0 * (ph + gap_y) - 10.0;
    let steps = runs
        .iter()
        .map(|r| r.history.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    // The accuracy axis starts at the lowest plotted value, rounded down to 0.1.
    let acc_min = runs
        .iter()
        .flat_map(|r| windows(&r.history, window))
        .map(|w| w.2)
        .filter(|a| a.is_finite())
        .fold(target - 0.1, f64::min);
    let acc_lo = (acc_min * 10.0).floor().max(0.0) / 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for (i, line) in subtitles.iter().enumerate() {
        let y = 38.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{y}" fill="#555" font-size="11">{}</text>"##,
            esc(line)
        );
    }
    // Legend.
    let mut lx = left;
    for (bi, b) in batches.iter().enumerate() {
        for bn in [true, false] {
            let dash = if bn { "" } else { r#" stroke-dasharray="6 4""# };
            let color = COLORS[bi % COLORS.len()];
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{} batch {b}</text>"#,
                lx + 24.0,
                lx + 28.0,
                legend_y + 4.0,
                if bn { "BN," } else { "no BN," }
            );
            lx += 130.0;
        }
    }
    for (ci, &lr) in lrs.iter().enumerate() {
        for (row, (name, y_lo, y_hi)) in [("loss", 0.0, loss_max), ("batch accuracy", acc_lo, 1.0)]
            .into_iter()
            .enumerate()
        {
            let y_span = y_hi - y_lo;
            let x0 = left + ci as f64 * (pw + gap_x);
            let y0 = top + row as f64 * (ph + gap_y);
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{name}, lr {}</text>"#,
                x0 + pw / 2.0,
                y0 - 6.0,
                fmt_lr(lr)
            );
            // Axes: 5 ticks each.
            for t in 0..=4 {
                let f = f64::from(t) / 4.0;
                let (gx, gy) = (x0 + f * pw, y0 + ph - f * ph);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{gy}" x2="{}" y2="{gy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end" font-size="10">{:.2}</text>"##,
                    x0 + pw,
                    x0 - 4.0,
                    gy + 3.0,
                    y_lo + f * y_span
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{gx}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
                    y0 + ph + 13.0,
                    (f * steps).round()
                );
            }
            if row == 1 {
                let gy = y0 + ph - (target - y_lo) / y_span * ph;
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{gy}" x2="{}" y2="{gy}" stroke="#888" stroke-dasharray="2 3"/><text x="{}" y="{}" font-size="10" fill="#666">target {target}</text>"##,
                    x0 + pw,
                    x0 + 4.0,
                    gy - 3.0
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle" font-size="11">step</text>"#,
                    x0 + pw / 2.0,
                    y0 + ph + 28.0
                );
            }
            for run in runs.iter().filter(|r| r.lr == lr) {
                let bi = batches.iter().position(|&b| b == run.batch).unwrap_or(0);
                let color = COLORS[bi % COLORS.len()];
                let dash = if run.bn {
                    ""
                } else {
                    r#" stroke-dasharray="6 4""#
                };
                let mut points = Vec::new();
                let mut diverged = None;
                for (step, loss, acc) in windows(&run.history, window) {
                    let v = if row == 0 { loss } else { acc };
                    let x = x0 + step as f64 / steps * pw;
                    if !v.is_finite() {
                        diverged = Some(x);
                        break;
                    }
                    let y = y0 + ph - ((v - y_lo) / y_span).clamp(0.0, 1.0) * ph;
                    points.push(format!("{x:.1},{y:.1}"));
                }
                if !points.is_empty() {
                    let _ = writeln!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>"#,
                        points.join(" ")
                    );
                }
                if let (Some(x), 0) = (diverged, row) {
                    let _ = writeln!(
                        s,
                        r#"<text x="{x:.1}" y="{}" fill="{color}" font-size="10">NaN</text>"#,
                        y0 + 12.0 + 12.0 * bi as f64
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1} %", 100.0 * v)
    } else {
        "NaN".into()
    }
}

/// The results table in Markdown, one row per run.
pub fn table_md(runs: &[&RunResult], target: f64, window: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| BN | lr | batch | steps to {} | final batch acc. (last {window} steps) | final loss | test acc., eval mode | folded = eval | ms/step |",
        pct(target)
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let fold = match r.fold_agree {
            Some((same, total)) => format!("{same}/{total}"),
            None => "–".into(),
        };
        let loss = if r.final_loss.is_finite() {
            format!("{:.3}", r.final_loss)
        } else {
            "NaN".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            if r.bn { "yes" } else { "no" },
            fmt_lr(r.lr),
            r.batch,
            r.steps_to_target
                .map_or("not reached".into(), |n| n.to_string()),
            pct(r.final_acc),
            loss,
            pct(r.eval_acc),
            fold,
            r.ms_per_step
        );
    }
    s
}

/// The same as CSV (accuracies as fractions; empty where not reached).
pub fn table_csv(runs: &[RunResult]) -> String {
    let mut s = String::from(
        "net,bn,lr,batch,steps,steps_to_target,final_batch_acc,final_loss,test_acc_eval,fold_agree,fold_total,ms_per_step\n",
    );
    for r in runs {
        let (agree, total) = r
            .fold_agree
            .map_or((String::new(), String::new()), |(a, t)| {
                (a.to_string(), t.to_string())
            });
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.4},{:.4},{:.4},{agree},{total},{:.2}",
            r.net,
            r.bn,
            r.lr,
            r.batch,
            r.history.len(),
            r.steps_to_target.map_or(String::new(), |n| n.to_string()),
            r.final_acc,
            r.final_loss,
            r.eval_acc,
            r.ms_per_step
        );
    }
    s
}
