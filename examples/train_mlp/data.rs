//! The example's data: two generated sets (two moons for the Keras network, 28x28
//! digit-like images for the PyTorch one), a loader for a user's CSV or IDX (MNIST
//! format) file, and the seeded shuffles the GPU and CPU runs share.

use std::error::Error;
use std::path::{Path, PathBuf};

/// A classification set split into training and test rows; features row-major.
pub struct Dataset {
    pub name: String,
    pub features: usize,
    pub classes: usize,
    pub train_x: Vec<f32>,
    pub train_y: Vec<u32>,
    pub test_x: Vec<f32>,
    pub test_y: Vec<u32>,
}

impl Dataset {
    pub fn train_rows(&self) -> usize {
        self.train_y.len()
    }

    pub fn test_rows(&self) -> usize {
        self.test_y.len()
    }

    /// The training set in the order of `order` (one epoch's shuffle).
    pub fn ordered_train(&self, order: &[usize]) -> (Vec<f32>, Vec<u32>) {
        let d = self.features;
        let mut x = Vec::with_capacity(order.len() * d);
        let mut y = Vec::with_capacity(order.len());
        for &i in order {
            x.extend_from_slice(&self.train_x[i * d..(i + 1) * d]);
            y.push(self.train_y[i]);
        }
        (x, y)
    }
}

/// SplitMix64: a small seeded generator, so the data and the initial weights are
/// the same on every machine and for both the GPU and the CPU runs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// The order of the training rows in epoch `epoch` (a fresh shuffle per epoch).
pub fn epoch_order(rows: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    Rng::new(seed ^ (0xE90C_u64 << 32) ^ epoch as u64).shuffle(&mut order);
    order
}

/// scikit-learn's `make_moons`: two interleaved half circles, label 0 the upper one,
/// with Gaussian noise of standard deviation `noise`.
pub fn moons(train: usize, test: usize, noise: f64, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let mut sample = |n: usize| {
        let mut x = Vec::with_capacity(2 * n);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let label = (i % 2) as u32;
            let t = rng.range(0.0, std::f64::consts::PI);
            let (px, py) = if label == 0 {
                (t.cos(), t.sin())
            } else {
                (1.0 - t.cos(), 0.5 - t.sin())
            };
            x.push((px + noise * rng.normal()) as f32);
            x.push((py + noise * rng.normal()) as f32);
            y.push(label);
        }
        (x, y)
    };
    let (train_x, train_y) = sample(train);
    let (test_x, test_y) = sample(test);
    Dataset {
        name: format!("two moons (noise {noise})"),
        features: 2,
        classes: 2,
        train_x,
        train_y,
        test_x,
        test_y,
    }
}

/// Strokes of the ten digits, as polylines in a unit box (x right, y down).
fn glyph(digit: usize) -> Vec<Vec<(f64, f64)>> {
    let ellipse = |cx: f64, cy: f64, rx: f64, ry: f64, from: f64, to: f64, n: usize| {
        (0..=n)
            .map(|i| {
                let a = (from + (to - from) * i as f64 / n as f64).to_radians();
                (cx + rx * a.cos(), cy + ry * a.sin())
            })
            .collect::<Vec<_>>()
    };
    match digit {
        0 => vec![ellipse(0.5, 0.5, 0.28, 0.4, 0.0, 360.0, 16)],
        1 => vec![vec![(0.32, 0.28), (0.55, 0.1), (0.55, 0.92)]],
        2 => vec![vec![
            (0.2, 0.3),
            (0.35, 0.12),
            (0.62, 0.1),
            (0.78, 0.27),
            (0.72, 0.47),
            (0.22, 0.9),
            (0.82, 0.9),
        ]],
        3 => vec![vec![
            (0.2, 0.14),
            (0.75, 0.12),
            (0.45, 0.45),
            (0.72, 0.55),
            (0.78, 0.76),
            (0.55, 0.92),
            (0.2, 0.86),
        ]],
        4 => vec![vec![(0.62, 0.92), (0.62, 0.1), (0.15, 0.66), (0.85, 0.66)]],
        5 => vec![vec![
            (0.78, 0.1),
            (0.28, 0.1),
            (0.23, 0.45),
            (0.58, 0.4),
            (0.8, 0.6),
            (0.7, 0.85),
            (0.45, 0.93),
            (0.2, 0.85),
        ]],
        6 => {
            let mut s = vec![(0.7, 0.08), (0.42, 0.25), (0.26, 0.55)];
            s.extend(ellipse(0.5, 0.7, 0.24, 0.22, 180.0, 540.0, 12));
            vec![s]
        }
        7 => vec![vec![(0.18, 0.1), (0.82, 0.1), (0.42, 0.92)]],
        8 => vec![
            ellipse(0.5, 0.29, 0.21, 0.19, 0.0, 360.0, 12),
            ellipse(0.5, 0.71, 0.26, 0.21, 0.0, 360.0, 12),
        ],
        _ => {
            let mut s = ellipse(0.5, 0.32, 0.24, 0.22, 0.0, 360.0, 12);
            s.extend([(0.72, 0.5), (0.62, 0.92)]);
            vec![s]
        }
    }
}

/// Distance from `p` to the segment `a`-`b`.
fn segment_distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (qx, qy) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    (qx * qx + qy * qy).sqrt()
}

/// One 28x28 image of `digit`: the glyph's points jittered, the whole glyph rotated,
/// scaled, sheared and shifted, its strokes drawn anti-aliased with a random width,
/// plus pixel noise; values in [0, 1], like MNIST scaled by 1/255.
fn draw_digit(digit: usize, rng: &mut Rng) -> Vec<f32> {
    const SIDE: usize = 28;
    let angle = rng.range(-0.25, 0.25);
    let (sx, sy) = (rng.range(0.7, 1.05), rng.range(0.8, 1.05));
    let shear = rng.range(-0.25, 0.25);
    let (tx, ty) = (rng.range(-2.0, 2.0), rng.range(-2.0, 2.0));
    let width = rng.range(1.0, 2.4);
    let (cos, sin) = (angle.cos(), angle.sin());
    let strokes: Vec<Vec<(f64, f64)>> = glyph(digit)
        .into_iter()
        .map(|stroke| {
            stroke
                .into_iter()
                .map(|(x, y)| {
                    let (x, y) = (x + 0.03 * rng.normal() - 0.5, y + 0.03 * rng.normal() - 0.5);
                    let (x, y) = ((x + shear * y) * sx, y * sy);
                    let (x, y) = (x * cos - y * sin, x * sin + y * cos);
                    (14.0 + 20.0 * x + tx, 14.0 + 20.0 * y + ty)
                })
                .collect()
        })
        .collect();
    let mut image = vec![0f32; SIDE * SIDE];
    for (i, pixel) in image.iter_mut().enumerate() {
        let p = ((i % SIDE) as f64 + 0.5, (i / SIDE) as f64 + 0.5);
        let d = strokes
            .iter()
            .flat_map(|s| s.windows(2).map(|w| segment_distance(p, w[0], w[1])))
            .fold(f64::INFINITY, f64::min);
        let ink = (width / 2.0 + 0.5 - d).clamp(0.0, 1.0);
        let noise = 0.08 * rng.normal();
        *pixel = (ink + noise).clamp(0.0, 1.0) as f32;
    }
    image
}

/// Procedural digit-like images: 784 features, 10 classes, balanced.
pub fn digits(train: usize, test: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let mut sample = |n: usize| {
        let mut x = Vec::with_capacity(n * 784);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let digit = i % 10;
            x.extend(draw_digit(digit, &mut rng));
            y.push(digit as u32);
        }
        (x, y)
    };
    let (train_x, train_y) = sample(train);
    let (test_x, test_y) = sample(test);
    Dataset {
        name: "procedural 28x28 digits".to_string(),
        features: 784,
        classes: 10,
        train_x,
        train_y,
        test_x,
        test_y,
    }
}

/// Which CSV column holds the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelColumn {
    First,
    Last,
}

type BoxResult<T> = Result<T, Box<dyn Error>>;

/// Loads a user's file: IDX (MNIST format: an idx3 images file, unsigned bytes
/// scaled to [0, 1], with its idx1 labels file given or found by name) or CSV
/// (numbers separated by commas, one sample per line, the label in the first or
/// last column, a header line skipped). `limit` keeps the first rows only. One row
/// in six (at least one) is held out as the test set, after a seeded shuffle.
pub fn load(
    path: &Path,
    labels: Option<&Path>,
    column: LabelColumn,
    limit: Option<usize>,
    seed: u64,
) -> BoxResult<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(format!(
            "{} is gzip-compressed; decompress it first (gunzip -k)",
            path.display()
        )
        .into());
    }
    let (x, y, features) = if bytes.len() >= 4 && bytes[0] == 0 && bytes[1] == 0 {
        let labels = match labels {
            Some(p) => p.to_path_buf(),
            None => idx_labels_path(path)?,
        };
        read_idx_pair(path, &bytes, &labels)?
    } else {
        read_csv(path, &bytes, column)?
    };
    let (mut x, mut y) = (x, y);
    if let Some(limit) = limit {
        y.truncate(limit);
        x.truncate(limit * features);
    }
    let rows = y.len();
    if rows < 4 {
        return Err(format!("{}: {rows} samples, at least 4 needed", path.display()).into());
    }
    let classes = y.iter().max().map_or(0, |&m| m as usize + 1);
    if classes < 2 {
        return Err(format!("{}: only one class", path.display()).into());
    }
    let mut order: Vec<usize> = (0..rows).collect();
    Rng::new(seed).shuffle(&mut order);
    let test = (rows / 6).max(1);
    let take = |idx: &[usize]| {
        let mut xs = Vec::with_capacity(idx.len() * features);
        let mut ys = Vec::with_capacity(idx.len());
        for &i in idx {
            xs.extend_from_slice(&x[i * features..(i + 1) * features]);
            ys.push(y[i]);
        }
        (xs, ys)
    };
    let (test_x, test_y) = take(&order[..test]);
    let (train_x, train_y) = take(&order[test..]);
    Ok(Dataset {
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        features,
        classes,
        train_x,
        train_y,
        test_x,
        test_y,
    })
}

/// `train-images-idx3-ubyte` -> `train-labels-idx1-ubyte` (also `.idx3-ubyte`).
fn idx_labels_path(images: &Path) -> BoxResult<PathBuf> {
    let name = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let guess = name.replace("images", "labels").replace("idx3", "idx1");
    if guess == name {
        return Err(format!(
            "{}: an IDX file; give its labels file with --labels",
            images.display()
        )
        .into());
    }
    let path = images.with_file_name(guess);
    if !path.exists() {
        return Err(format!(
            "{}: its labels file {} does not exist; give it with --labels",
            images.display(),
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// An IDX header: element type byte and dims.
fn idx_header<'a>(path: &Path, bytes: &'a [u8]) -> BoxResult<(u8, Vec<usize>, &'a [u8])> {
    let bad = |why: &str| format!("{}: not an IDX file ({why})", path.display());
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("magic").into());
    }
    let (kind, ndim) = (bytes[2], bytes[3] as usize);
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(bad("header").into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let size = match kind {
        0x08 | 0x09 => 1,
        0x0D => 4,
        _ => return Err(bad("element type other than unsigned byte, byte or f32").into()),
    };
    match count.and_then(|c| c.checked_mul(size)) {
        Some(n) if bytes.len() >= header + n => Ok((kind, dims, &bytes[header..header + n])),
        _ => Err(bad("shorter than its header says").into()),
    }
}

fn read_idx_pair(
    path: &Path,
    bytes: &[u8],
    labels_path: &Path,
) -> BoxResult<(Vec<f32>, Vec<u32>, usize)> {
    let (kind, dims, body) = idx_header(path, bytes)?;
    let rows = dims[0];
    let features: usize = dims[1..].iter().product::<usize>().max(1);
    let x: Vec<f32> = match kind {
        0x08 => body.iter().map(|&b| f32::from(b) / 255.0).collect(),
        0x09 => body.iter().map(|&b| f32::from(b as i8) / 127.0).collect(),
        _ => body
            .chunks_exact(4)
            .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let label_bytes = std::fs::read(labels_path)
        .map_err(|e| format!("reading {}: {e}", labels_path.display()))?;
    let (lkind, ldims, lbody) = idx_header(labels_path, &label_bytes)?;
    if lkind != 0x08 || ldims.len() != 1 || ldims[0] != rows {
        return Err(format!(
            "{}: expected {rows} unsigned-byte labels (one per image of {})",
            labels_path.display(),
            path.display()
        )
        .into());
    }
    Ok((x, lbody.iter().map(|&b| u32::from(b)).collect(), features))
}

fn read_csv(
    path: &Path,
    bytes: &[u8],
    column: LabelColumn,
) -> BoxResult<(Vec<f32>, Vec<u32>, usize)> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    let mut x = Vec::new();
    let mut raw_labels: Vec<String> = Vec::new();
    let mut features = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 2 {
            return Err(format!(
                "{}:{}: one column; a label and features needed",
                path.display(),
                n + 1
            )
            .into());
        }
        let label = match column {
            LabelColumn::First => fields.remove(0),
            LabelColumn::Last => fields.pop().unwrap_or_default(),
        };
        let values: Result<Vec<f32>, _> = fields.iter().map(|f| f.parse::<f32>()).collect();
        let values = match values {
            Ok(v) => v,
            // A header line.
            Err(_) if features.is_none() && raw_labels.is_empty() => continue,
            Err(e) => return Err(format!("{}:{}: {e}", path.display(), n + 1).into()),
        };
        match features {
            None => features = Some(values.len()),
            Some(d) if d != values.len() => {
                return Err(format!(
                    "{}:{}: {} features, the lines before have {d}",
                    path.display(),
                    n + 1,
                    values.len()
                )
                .into())
            }
            Some(_) => {}
        }
        x.extend(values);
        raw_labels.push(label.to_string());
    }
    let features = features.ok_or_else(|| format!("{}: no samples", path.display()))?;
    // Classes: the distinct labels, numerically sorted when they are all numbers.
    let mut distinct: Vec<&String> = raw_labels.iter().collect();
    distinct.sort();
    distinct.dedup();
    let numeric: Option<Vec<f64>> = distinct.iter().map(|s| s.parse::<f64>().ok()).collect();
    if let Some(values) = numeric {
        let mut pairs: Vec<(f64, &String)> = values.into_iter().zip(distinct).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        distinct = pairs.into_iter().map(|(_, s)| s).collect();
    }
    let y = raw_labels
        .iter()
        .map(|l| distinct.iter().position(|d| *d == l).unwrap_or(0) as u32)
        .collect();
    Ok((x, y, features))
}
