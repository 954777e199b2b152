//! The crate's error type. Every fallible call returns [`Result`]; bad input is
//! reported before anything is recorded or dispatched.

use crate::Layout;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU adapter could be found for the requested backends.
    #[error(
        "no GPU adapter found ({detail}). Install a Vulkan driver (on Debian/Ubuntu: \
         `apt-get install mesa-vulkan-drivers` gives the lavapipe software GPU) or use \
         the OpenGL backend through Mesa's llvmpipe with `WGPU_BACKEND=gl`"
    )]
    NoAdapter {
        /// What the adapter request reported.
        detail: String,
    },
    /// `WGPU_ADAPTER_NAME` named an adapter that does not exist.
    #[error("WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters found: {available:?}")]
    AdapterNotFound {
        /// The requested (sub)string.
        wanted: String,
        /// Names of the adapters that were found.
        available: Vec<String>,
    },
    /// The adapter refused to create a device.
    #[error("could not create a GPU device: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),
    /// The device lacks a limit the kernels need.
    #[error("device limit {name} is {actual}, the kernels need at least {required}")]
    DeviceLimit {
        /// The limit's name, as in `wgpu::Limits`.
        name: &'static str,
        /// What the device offers.
        actual: u64,
        /// What the kernels need.
        required: u64,
    },
    /// wgpu reported an error while creating a shader, pipeline or resource.
    #[error("GPU error while {context}: {message}")]
    Gpu {
        /// What the crate was doing.
        context: &'static str,
        /// wgpu's message.
        message: String,
    },
    /// Waiting for the GPU or mapping a buffer for reading failed.
    #[error("GPU readback failed: {0}")]
    Readback(String),
    /// The device was lost (destroyed, reset or removed): nothing more can run on it.
    #[error("the GPU device is lost ({0}); create a new GpuContext")]
    DeviceLost(String),
    /// The device could not allocate memory for a buffer or pipeline.
    #[error("GPU out of memory while {context}: {message}")]
    OutOfMemory {
        /// What the crate was doing.
        context: &'static str,
        /// wgpu's message.
        message: String,
    },

    /// A tensor shape has the wrong rank.
    #[error("a tensor must have 2 to 5 dims (N, C, *spatial), got {0}")]
    BadRank(usize),
    /// A tensor dimension is zero.
    #[error("dimension {dim} of shape {dims:?} is zero")]
    ZeroDim {
        /// The index of the offending dimension.
        dim: usize,
        /// The whole shape.
        dims: Vec<usize>,
    },
    /// The tensor's element count does not fit the index types.
    #[error("shape {dims:?} has more elements than the kernels can index ({max})")]
    TooManyElements {
        /// The whole shape.
        dims: Vec<usize>,
        /// Largest supported element count.
        max: u64,
    },
    /// The tensor's channel count is not the layer's `num_features`.
    #[error("input has {got} channels, the layer expects num_features = {expected}")]
    ChannelMismatch {
        /// The layer's `num_features`.
        expected: usize,
        /// The input's channel dimension.
        got: usize,
    },
    /// The saved statistics are for another channel count than the layer's.
    #[error(
        "the saved statistics hold {got} channels, the layer expects num_features = {expected}"
    )]
    SavedStatsMismatch {
        /// The layer's `num_features`.
        expected: usize,
        /// The saved statistics' channel count.
        got: usize,
    },
    /// Training needs more than one value per channel.
    #[error("expected more than 1 value per channel when training, got input shape {dims:?}")]
    SingleValuePerChannel {
        /// The input shape.
        dims: Vec<usize>,
    },
    /// A host slice has the wrong length.
    #[error("{name} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// Which argument.
        name: &'static str,
        /// Its required length.
        expected: usize,
        /// Its actual length.
        got: usize,
    },
    /// Two tensors that must agree do not.
    #[error(
        "{name} has shape {got:?} ({got_layout:?}), expected {expected:?} ({expected_layout:?})"
    )]
    ShapeMismatch {
        /// Which argument.
        name: &'static str,
        /// The shape it must have.
        expected: Vec<usize>,
        /// Its layout.
        expected_layout: Layout,
        /// The shape it has.
        got: Vec<usize>,
        /// Its layout.
        got_layout: Layout,
    },
    /// A GPU buffer is smaller than the tensor it must hold.
    #[error("buffer {name} holds {got} bytes, needs at least {needed}")]
    BufferTooSmall {
        /// Which argument.
        name: &'static str,
        /// Bytes needed.
        needed: u64,
        /// The buffer's size.
        got: u64,
    },
    /// A GPU buffer lacks a usage flag the kernels need.
    #[error("buffer {name} has usages {got:?}, needs {needed:?}")]
    BufferUsage {
        /// Which argument.
        name: &'static str,
        /// The usages it must have.
        needed: wgpu::BufferUsages,
        /// The usages it has.
        got: wgpu::BufferUsages,
    },
    /// A buffer a call writes is also one it reads (wgpu checks usages per buffer, so
    /// two ranges of one buffer count too), overlaps another written range, or is
    /// the layer's own state.
    #[error(
        "{a} and {b} are in the same buffer, and the call writes one of them; \
         in-place operation is not supported"
    )]
    AliasedBuffers {
        /// One argument.
        a: &'static str,
        /// The other.
        b: &'static str,
    },
    /// A tensor's offset in its buffer is not aligned as storage bindings need.
    #[error(
        "{name} starts at byte {offset} of its buffer, which is not a multiple of {alignment} \
         (the device's min_storage_buffer_offset_alignment, and 16)"
    )]
    MisalignedOffset {
        /// Which argument.
        name: &'static str,
        /// Its offset in bytes.
        offset: u64,
        /// The alignment needed.
        alignment: u64,
    },
    /// A tensor or buffer is larger than one storage binding can hold on this device.
    #[error(
        "{name} needs {bytes} bytes, more than this device can bind in one storage buffer \
         ({limit} bytes: the smaller of max_storage_buffer_binding_size and max_buffer_size)"
    )]
    TooLargeForDevice {
        /// Which argument.
        name: &'static str,
        /// Bytes needed.
        bytes: u64,
        /// The device's limit.
        limit: u64,
    },
    /// `eps` is not finite or is negative.
    #[error("eps must be finite and >= 0, got {0}")]
    BadEps(f32),
    /// `momentum` is not finite or outside [0, 1].
    #[error("momentum must be finite and in [0, 1], got {0}")]
    BadMomentum(f32),
    /// An optimizer hyper-parameter is outside its range.
    #[error("{name} = {value} is not allowed: {requirement}")]
    BadHyperParameter {
        /// The hyper-parameter's name.
        name: &'static str,
        /// Its value.
        value: f32,
        /// What it must satisfy.
        requirement: &'static str,
    },
    /// Objects of two different [`crate::GpuContext`]s (devices) were used together.
    #[error("{0} belongs to another GpuContext (another device)")]
    ContextMismatch(&'static str),
    /// `num_batches_tracked` past what the GPU layer's 32-bit counter holds.
    #[error("num_batches_tracked must be at most 2^32 - 1 on the GPU, got {0}")]
    BatchCountTooLarge(u64),
    /// `num_features` is zero.
    #[error("num_features must be at least 1")]
    ZeroFeatures,
    /// The layer has no such state (e.g. `gamma` with `affine = false`).
    #[error("{0}")]
    MissingState(&'static str),
    /// A backward pass asked for batch statistics that were not saved by a training
    /// forward of the same shape.
    #[error("{0}")]
    MissingSavedStats(&'static str),
    /// The backward of a layer with an activation was not given the forward's
    /// output `y` ([`crate::GradBuffers::output`]), which it masks `dy` with.
    #[error(
        "the layer's activation ({0}) needs the forward's output y for its backward: \
         pass it with GradBuffers::output"
    )]
    MissingOutput(&'static str),
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
