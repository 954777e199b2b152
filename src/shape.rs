//! Tensor shapes and memory layouts.

use crate::{Error, Result};

/// Memory order of a `(N, C, *spatial)` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Contiguous `N, C, *spatial` (PyTorch's default, NCHW).
    #[default]
    ChannelsFirst,
    /// Contiguous `N, *spatial, C`: the channel moves fastest (NHWC / NDHWC; Keras'
    /// default and PyTorch's `channels_last`).
    ChannelsLast,
}

/// Element type of the tensors (x, y, dy, dx, z, dz). Statistics, parameters,
/// running statistics, dgamma/dbeta and all arithmetic stay f32 (PyTorch AMP's
/// convention): a tensor's values are widened to f32 when loaded and rounded (to
/// nearest even) when stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// IEEE single precision.
    #[default]
    F32,
    /// IEEE half precision (`half::f16`): WGSL's f16 on devices with
    /// `wgpu::Features::SHADER_F16`, else two per u32 (`pack2x16float`).
    F16,
    /// bfloat16 (`half::bf16`, the high half of an f32), two per u32.
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// Largest element count the kernels index (u32 indices on the GPU).
pub const MAX_ELEMENTS: u64 = u32::MAX as u64;

/// The shape of a batch-norm input: `(N, C)`, `(N, C, L)`, `(N, C, H, W)` or
/// `(N, C, D, H, W)`, always given in that logical order, plus its memory layout.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: Vec<usize>,
    layout: Layout,
    dtype: DType,
}

impl Shape {
    /// Checks and builds a shape from logical dims `[N, C, *spatial]`.
    ///
    /// ```
    /// use wgpu_batchnorm::{Layout, Shape};
    /// let s = Shape::new(&[32, 64, 56, 56], Layout::ChannelsLast).unwrap();
    /// assert_eq!((s.n(), s.c(), s.spatial_size(), s.per_channel()), (32, 64, 3136, 100352));
    /// assert!(Shape::new(&[8, 0, 4], Layout::ChannelsFirst).is_err());
    /// ```
    pub fn new(dims: &[usize], layout: Layout) -> Result<Self> {
        if !(2..=5).contains(&dims.len()) {
            return Err(Error::BadRank(dims.len()));
        }
        if let Some(dim) = dims.iter().position(|&d| d == 0) {
            return Err(Error::ZeroDim {
                dim,
                dims: dims.to_vec(),
            });
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&n| n <= MAX_ELEMENTS);
        if numel.is_none() {
            return Err(Error::TooManyElements {
                dims: dims.to_vec(),
                max: MAX_ELEMENTS,
            });
        }
        Ok(Self {
            dims: dims.to_vec(),
            layout,
            dtype: DType::F32,
        })
    }

    /// The same shape with tensors of `dtype` (f32 by default).
    ///
    /// ```
    /// use wgpu_batchnorm::{DType, Shape};
    /// let s = Shape::channels_last(&[8, 3, 5, 5])?.with_dtype(DType::F16);
    /// assert_eq!((s.dtype(), s.bytes()), (DType::F16, 1200));
    /// assert_eq!(Shape::channels_first(&[1, 3])?.with_dtype(DType::F16).bytes(), 8);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Element type of the tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A channels-first (NCHW-style) shape.
    pub fn channels_first(dims: &[usize]) -> Result<Self> {
        Self::new(dims, Layout::ChannelsFirst)
    }

    /// A channels-last (NHWC-style) shape.
    pub fn channels_last(dims: &[usize]) -> Result<Self> {
        Self::new(dims, Layout::ChannelsLast)
    }

    /// Logical dims `[N, C, *spatial]`.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Batch size `N`.
    pub fn n(&self) -> usize {
        self.dims[0]
    }

    /// Channel count `C`.
    pub fn c(&self) -> usize {
        self.dims[1]
    }

    /// The spatial dims (possibly none).
    pub fn spatial(&self) -> &[usize] {
        &self.dims[2..]
    }

    /// Product of the spatial dims (1 when there are none).
    pub fn spatial_size(&self) -> usize {
        self.spatial().iter().product()
    }

    /// Total element count.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Elements per channel, `m = N * prod(spatial)`.
    pub fn per_channel(&self) -> usize {
        self.n() * self.spatial_size()
    }

    /// Flat memory index of element `(n, c, s)` where `s` is the flattened spatial index.
    #[inline]
    pub fn index(&self, n: usize, c: usize, s: usize) -> usize {
        let (cc, ss) = (self.c(), self.spatial_size());
        match self.layout {
            Layout::ChannelsFirst => (n * cc + c) * ss + s,
            Layout::ChannelsLast => (n * ss + s) * cc + c,
        }
    }

    /// Channel of the element at flat memory index `i`.
    #[inline]
    pub fn channel_of(&self, i: usize) -> usize {
        match self.layout {
            Layout::ChannelsFirst => (i / self.spatial_size()) % self.c(),
            Layout::ChannelsLast => i % self.c(),
        }
    }

    /// Size in bytes of a tensor of this shape and element type, rounded up to a
    /// multiple of 4 (what a storage binding of it takes).
    pub fn bytes(&self) -> u64 {
        (self.numel() as u64 * self.dtype.size()).next_multiple_of(4)
    }
}
