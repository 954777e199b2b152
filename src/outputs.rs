//! Host-side results of the convenience (slices in, vectors out) calls, shared by
//! the GPU layer and the fast CPU path.

/// Batch statistics saved by a forward pass for its backward (PyTorch's
/// `save_mean`, `save_invstd`), on the host.
///
/// `mean` is the f32 nearest the batch mean; `mean_lo` is what is left over
/// (`mean + mean_lo` carries about twice f32's precision), so that inputs with a
/// large mean and a tiny spread still normalize and differentiate exactly. Code that
/// only has PyTorch's `save_mean` can pass zeros for `mean_lo`.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedStatsHost {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// `1 / sqrt(var + eps)` per channel (0 where `var + eps == 0`).
    pub invstd: Vec<f32>,
    /// Low part of the batch mean.
    pub mean_lo: Vec<f32>,
}

/// Output of a training forward on the host: `y` (of the input's element type)
/// and the batch statistics it saved for the backward.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutput<T = f32> {
    /// The normalized tensor, same shape and layout as `x`.
    pub y: Vec<T>,
    /// The batch statistics (PyTorch's `save_mean`, `save_invstd`).
    pub saved: SavedStatsHost,
}

/// Output of an eval forward on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardOutput<T = f32> {
    /// The normalized tensor, same shape and layout as `x`.
    pub y: Vec<T>,
    /// Batch statistics, when the pass used them (training, or eval without running
    /// statistics); `None` when it used the running statistics.
    pub saved: Option<SavedStatsHost>,
}

/// Gradients of a backward pass on the host; an entry is `None` when it was not
/// asked for (or, for `dgamma`/`dbeta`, when the layer is not affine).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Gradients<T = f32> {
    /// Gradient with respect to the input (of the input's element type).
    pub dx: Option<Vec<T>>,
    /// Gradient with respect to `gamma`.
    pub dgamma: Option<Vec<f32>>,
    /// Gradient with respect to `beta`.
    pub dbeta: Option<Vec<f32>>,
    /// Gradient with respect to the residual `z` (the `*_add` backward only).
    pub dz: Option<Vec<T>>,
}

/// An element type of host tensors: `f32`, `half::f16` or `half::bf16`. The host calls take slices of it and return vectors of it;
/// statistics and dgamma/dbeta stay f32.
pub trait Element: bytemuck::Pod + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// Its [`crate::DType`].
    const DTYPE: crate::DType;
    /// Widens to f32 (exactly).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to the nearest value of this type (ties to even).
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: crate::DType = crate::DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for half::bf16 {
    const DTYPE: crate::DType = crate::DType::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Element for half::f16 {
    const DTYPE: crate::DType = crate::DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
