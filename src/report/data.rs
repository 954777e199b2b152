//! Shapes of the benchmark table, and the random inputs (a tiny xorshift PRNG: fast,
//! reproducible, no dependency).

use wgpu_batchnorm::{BatchNormConfig, BatchNormState, Layout};

/// A logical shape `[N, C, *spatial]` of the table, e.g. `32x64x112x112`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeSpec {
    pub dims: Vec<usize>,
}

impl ShapeSpec {
    pub fn new(dims: &[usize]) -> Self {
        Self {
            dims: dims.to_vec(),
        }
    }

    /// `NxCxHxW`.
    pub fn label(&self) -> String {
        let parts: Vec<String> = self.dims.iter().map(usize::to_string).collect();
        parts.join("x")
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Without spatial dims (`(N, C)`) both layouts are the same memory order.
    pub fn layouts_coincide(&self) -> bool {
        self.dims[2..].iter().product::<usize>() == 1
    }
}

impl std::str::FromStr for ShapeSpec {
    type Err = String;

    /// Parses `32x64x112x112` (2 to 5 dims, each > 0).
    fn from_str(s: &str) -> Result<Self, String> {
        let dims = s
            .trim()
            .split(['x', 'X', '*'])
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad shape {s:?} (expected e.g. 32x64x112x112): {e}"))?;
        if !(2..=5).contains(&dims.len()) || dims.contains(&0) {
            return Err(format!(
                "bad shape {s:?}: 2 to 5 non-zero dims (N, C, *spatial) expected"
            ));
        }
        Ok(Self { dims })
    }
}

/// ResNet-50's batch-norm inputs (after the stem and at each stage) at batch `n`.
fn resnet50(n: usize) -> Vec<ShapeSpec> {
    [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]
        .iter()
        .map(|&(c, hw)| ShapeSpec::new(&[n, c, hw, hw]))
        .collect()
}

/// The table of the issue: 2-D shapes, ResNet-50 at batch `resnet_batch`, a tiny
/// shape and a 3-D (5-dim) one.
pub fn table(resnet_batch: usize) -> Vec<ShapeSpec> {
    let mut shapes = vec![ShapeSpec::new(&[256, 1024]), ShapeSpec::new(&[4096, 256])];
    shapes.extend(resnet50(resnet_batch));
    shapes.push(ShapeSpec::new(&[8, 16, 8, 8]));
    shapes.push(ShapeSpec::new(&[2, 32, 16, 32, 32]));
    shapes
}

/// The shape `--quick` runs (for CI).
pub fn quick_table() -> Vec<ShapeSpec> {
    vec![ShapeSpec::new(&[8, 16, 8, 8])]
}

/// Short name of a layout, as in the `--layouts` option.
pub fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::ChannelsFirst => "cf",
        Layout::ChannelsLast => "cl",
    }
}

/// xorshift64* (Vigna): good enough for benchmark inputs, and fast.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Never zero; spread small seeds.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    /// `len` values uniform in `[lo, hi)`.
    pub fn fill(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Parameters and running statistics that are not the trivial initial ones, so
/// that gamma, beta and the running statistics all take part in the results.
pub fn random_state(config: &BatchNormConfig, rng: &mut XorShift) -> BatchNormState {
    let c = config.num_features;
    let mut state = BatchNormState::new(config);
    state.gamma = rng.fill(c, 0.5, 1.5);
    state.beta = rng.fill(c, -0.5, 0.5);
    state.running_mean = rng.fill(c, -0.5, 0.5);
    state.running_var = rng.fill(c, 0.5, 1.5);
    state.num_batches_tracked = 10;
    state
}
