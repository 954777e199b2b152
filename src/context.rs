//! The GPU context: a device and queue (chosen from the environment or given by the
//! caller) and the kernels' pipelines, each built on its first use and kept.

use std::sync::{Arc, Mutex};

use crate::kernels::Kernels;
use crate::{Error, Result, TensorBuffer, Tuning};

/// An elementwise step of the unfused sequence ([`GpuContext::elementwise_in_pass`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elementwise {
    /// `out = act(a)`.
    Activation(crate::Activation),
    /// `out = a + b` (a residual add).
    Add,
    /// `out = a` where the activation passes the gradient at its output `b`, else 0.
    ActivationBackward(crate::Activation),
}

/// A `wgpu` device and queue with this crate's pipelines, built on it as calls first
/// need them.
///
/// Cheap to clone (shared). Build it with [`GpuContext::from_env`] to let the
/// environment choose the adapter, or with [`GpuContext::from_device`] to run on a
/// device your application already has.
#[derive(Clone)]
pub struct GpuContext {
    inner: Arc<Inner>,
    tuning: Tuning,
}

struct Inner {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    kernels: Kernels,
    /// Why the device was lost, once its device-lost callback has run.
    lost: Arc<Mutex<Option<String>>>,
}

/// Optional device features the crate knows how to use or report.
pub const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::PIPELINE_CACHE);

impl GpuContext {
    /// Opens the adapter the environment asks for and creates a device on it.
    ///
    /// `WGPU_BACKEND` (`vulkan`, `metal`, `dx12`, `gl`) limits the backends,
    /// `WGPU_ADAPTER_NAME` picks an adapter whose name contains the given text, and
    /// `WGPU_POWER_PREF` (`low`/`high`) the default choice (a discrete GPU unless told
    /// otherwise). Blocks until the device is ready; see [`Self::from_env_async`]
    /// (the only form on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_env() -> Result<Self> {
        pollster::block_on(Self::from_env_async())
    }

    /// Async form of [`Self::from_env`].
    pub async fn from_env_async() -> Result<Self> {
        // SAFETY: no cache data is given.
        unsafe { Self::from_env_with_pipeline_cache_async(None) }.await
    }

    /// [`Self::from_env`] with its pipelines built through a pipeline cache that
    /// starts from `data`: the contents of [`Self::pipeline_cache_data`] saved by an
    /// earlier run, so that pipelines that run built need not be compiled again
    /// (Vulkan; other backends ignore it). Data of another adapter, driver or wgpu
    /// version is not used (the cache starts empty).
    ///
    /// # Safety
    ///
    /// `data` must be what [`Self::pipeline_cache_data`] returned (wgpu's
    /// `Device::create_pipeline_cache` requirement: the driver reads it as it is).
    #[cfg(not(target_arch = "wasm32"))]
    pub unsafe fn from_env_with_pipeline_cache(data: Option<&[u8]>) -> Result<Self> {
        // SAFETY: the caller's.
        pollster::block_on(unsafe { Self::from_env_with_pipeline_cache_async(data) })
    }

    /// Async form of [`Self::from_env_with_pipeline_cache`].
    ///
    /// # Safety
    ///
    /// As [`Self::from_env_with_pipeline_cache`].
    pub async unsafe fn from_env_with_pipeline_cache_async(data: Option<&[u8]>) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = select_adapter(&instance).await?;
        let features = adapter.features() & OPTIONAL_FEATURES;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("bn.device"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await?;
        // SAFETY: the caller's.
        unsafe { Self::from_device_with_pipeline_cache(device, queue, data) }
    }

    /// A context on a device the caller already has (its pipelines are built as
    /// calls first need them).
    ///
    /// The context sets the device's device-lost callback (replacing one set
    /// before), so that every call after a loss returns [`Error::DeviceLost`]
    /// instead of reaching wgpu's error handler; a callback set afterwards replaces
    /// it, and calls then report the loss as [`Error::Gpu`] or [`Error::Readback`].
    ///
    /// The device needs compute shaders with 256 invocations per workgroup (12 KiB
    /// of workgroup memory) and 65535 workgroups per dispatch dimension; less is
    /// [`Error::DeviceLimit`]. Beyond that, what a device binds decides what runs:
    /// `wgpu::Limits::default()` (8 storage buffers per stage, 64 KiB uniform
    /// bindings) runs everything; `wgpu::Limits::downlevel_defaults()` (4 storage
    /// buffers, 16 KiB uniform bindings) runs eval forwards, and a call whose kernels
    /// need more storage buffers is [`Error::DeviceLimit`], before anything is
    /// recorded. Tensors and per-channel buffers must fit in one storage binding
    /// ([`Self::max_binding_size`]); request the adapter's limits
    /// (`adapter.limits()`) for tensors past WebGPU's default of 128 MiB.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        // SAFETY: no cache data is given.
        unsafe { Self::from_device_with_pipeline_cache(device, queue, None) }
    }

    /// [`Self::from_device`] building pipelines through a pipeline cache where the
    /// device has `wgpu::Features::PIPELINE_CACHE`, starting from `data` (see
    /// [`Self::from_env_with_pipeline_cache`]).
    ///
    /// # Safety
    ///
    /// `data` must be what [`Self::pipeline_cache_data`] returned.
    pub unsafe fn from_device_with_pipeline_cache(
        device: wgpu::Device,
        queue: wgpu::Queue,
        data: Option<&[u8]>,
    ) -> Result<Self> {
        let cache = device
            .features()
            .contains(wgpu::Features::PIPELINE_CACHE)
            .then(|| {
                // SAFETY: `data` is the caller's (from `pipeline_cache_data`), or none;
                // with `fallback` a cache that cannot use it starts empty.
                unsafe {
                    device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                        label: Some("bn.pipeline_cache"),
                        data,
                        fallback: true,
                    })
                }
            });
        let lost = Arc::new(Mutex::new(None));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            let mut lost = flag.lock().unwrap_or_else(|e| e.into_inner());
            *lost = Some(format!("{reason:?}: {message}"));
        });
        let info = device.adapter_info();
        let kernels = Kernels::new(&device, cache)?;
        Ok(Self {
            tuning: Tuning::for_adapter(&info),
            inner: Arc::new(Inner {
                device,
                queue,
                info,
                kernels,
                lost,
            }),
        })
    }

    /// Fails with [`Error::DeviceLost`] once the device is lost. On the web it also
    /// returns, once, an error that a synchronous call caught after it returned
    /// (see the crate docs on the web).
    pub fn check_device(&self) -> Result<()> {
        if let Some(e) = crate::scopes::take_deferred(&self.inner.device) {
            return Err(e);
        }
        match &*self.inner.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(Error::DeviceLost(why.clone())),
            None => Ok(()),
        }
    }

    /// Runs `f` (which creates, writes or submits on the device) inside error scopes:
    /// a loss of the device, before or during, is [`Error::DeviceLost`], an
    /// allocation failure [`Error::OutOfMemory`], any other error wgpu raised
    /// [`Error::Gpu`] (naming `context`), instead of reaching the device's handler.
    pub(crate) fn guarded<T>(
        &self,
        context: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.check_device()?;
        let device = &self.inner.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = f();
        // On the web this cannot wait: what the scopes catch comes back later.
        let (invalid, oom) = crate::scopes::pop(device, context, oom, invalid);
        if invalid.is_some() || oom.is_some() {
            // A destroyed device reports its loss at the next poll: an error here
            // may be the first sign of it.
            let _ = device.poll(wgpu::PollType::Poll);
        }
        self.check_device()?;
        if let Some(e) = oom {
            return Err(Error::OutOfMemory {
                context,
                message: e.to_string(),
            });
        }
        if let Some(e) = invalid {
            return Err(Error::Gpu {
                context,
                message: e.to_string(),
            });
        }
        result
    }

    /// This context with another launch geometry (sharing device and pipelines).
    /// Layers built on the result use it; the default is [`Tuning::for_adapter`].
    pub fn with_tuning(&self, tuning: Tuning) -> Self {
        Self {
            inner: self.inner.clone(),
            tuning,
        }
    }

    /// The launch geometry the kernels use.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// The adapter this context runs on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.inner.info
    }

    /// The optional features enabled on the device (of [`OPTIONAL_FEATURES`]).
    pub fn optional_features(&self) -> wgpu::Features {
        self.inner.device.features() & OPTIONAL_FEATURES
    }

    /// Whether GPU time can be measured with timestamp queries.
    pub fn has_timestamps(&self) -> bool {
        self.optional_features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// One line naming the adapter, the API it runs through, its type and driver
    /// (`llvmpipe (LLVM 15.0.6, 256 bits) on Vulkan, CPU, driver llvmpipe: Mesa 22.3.6`),
    /// and the optional features enabled.
    pub fn describe(&self) -> String {
        let i = &self.inner.info;
        let api = match i.backend {
            wgpu::Backend::Vulkan => "Vulkan",
            wgpu::Backend::Metal => "Metal",
            wgpu::Backend::Dx12 => "DirectX 12",
            wgpu::Backend::Gl => "OpenGL",
            wgpu::Backend::BrowserWebGpu => "WebGPU",
            wgpu::Backend::Noop => "no backend",
        };
        let kind = match i.device_type {
            wgpu::DeviceType::Cpu => "CPU",
            wgpu::DeviceType::IntegratedGpu => "integrated GPU",
            wgpu::DeviceType::DiscreteGpu => "discrete GPU",
            wgpu::DeviceType::VirtualGpu => "virtual GPU",
            wgpu::DeviceType::Other => "unknown device type",
        };
        let driver = match (i.driver.trim(), i.driver_info.trim()) {
            ("", "") => "not reported".to_string(),
            (name, "") | ("", name) => name.to_string(),
            (name, version) => format!("{name}: {version}"),
        };
        let features: Vec<&str> = [
            (wgpu::Features::TIMESTAMP_QUERY, "timestamps"),
            (wgpu::Features::SUBGROUP, "subgroups"),
            (wgpu::Features::SHADER_F16, "f16"),
        ]
        .into_iter()
        .filter(|(f, _)| self.optional_features().contains(*f))
        .map(|(_, name)| name)
        .collect();
        format!(
            "{} on {api}, {kind}, driver {driver}; optional features: {}",
            i.name,
            if features.is_empty() {
                "none".to_string()
            } else {
                features.join(", ")
            }
        )
    }

    /// Records a plain vec4 copy of the first `bytes` bytes of `src` into `dst`
    /// (vec4s of `dtype`), the bandwidth yardstick of the benchmarks.
    /// `bytes` must be a non-zero multiple of a vec4 (16 bytes of f32, 8 of f16);
    /// the buffers need `STORAGE`.
    pub fn copy_in_pass(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        dtype: crate::DType,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<()> {
        let vec4s = vec4s("copy bytes (a non-zero multiple of a vec4)", dtype, bytes)?;
        self.check_storage("src", src, bytes)?;
        self.check_storage("dst", dst, bytes)?;
        if src == dst {
            return Err(Error::AliasedBuffers { a: "src", b: "dst" });
        }
        let plan = crate::kernels::common::plan_flat(vec4s, self.tuning.elementwise);
        let flavor = crate::kernels::Flavor {
            elem: self.elem(dtype),
            ..crate::kernels::Flavor::NONE
        };
        let kernels = self.kernels().fused(self.device(), flavor)?;
        kernels.copy.build(self.device())?;
        let params = kernels.uniform(self.device(), &plan.params);
        kernels.copy.record(
            self.device(),
            pass,
            &[
                crate::kernels::whole(&params),
                crate::kernels::binding(src, bytes),
                crate::kernels::binding(dst, bytes),
            ],
            plan.workgroups(),
            None,
        );
        Ok(())
    }

    /// Records one elementwise step of the sequence that a fused batch norm
    /// ([`crate::Activation`], the `*_add` forwards) replaces, over the first
    /// `bytes` bytes of f32 tensors: `out = act(a)`, `out = a + b`, or the
    /// activation's backward `out = a` where it passes the gradient at its output
    /// `b` (`a` = dy, `b` = y), else 0, on tensors of `dtype`. The benchmarks
    /// time the fused calls against these. `bytes` must be a non-zero multiple of
    /// a vec4; `out` must not be `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    pub fn elementwise_in_pass(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        op: Elementwise,
        dtype: crate::DType,
        a: &wgpu::Buffer,
        b: Option<&wgpu::Buffer>,
        out: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<()> {
        let vec4s = vec4s(
            "elementwise bytes (a non-zero multiple of a vec4)",
            dtype,
            bytes,
        )?;
        let (act, needs_b) = match op {
            Elementwise::Activation(act) => (act, false),
            Elementwise::Add => (crate::Activation::Identity, true),
            Elementwise::ActivationBackward(act) => (act, true),
        };
        let b = match (b, needs_b) {
            (Some(b), true) => b,
            (None, true) => return Err(Error::MissingState("this elementwise step reads b")),
            // Bound but not read.
            (_, false) => a,
        };
        self.check_storage("a", a, bytes)?;
        self.check_storage("b", b, bytes)?;
        self.check_storage("out", out, bytes)?;
        if out == a || out == b {
            return Err(Error::AliasedBuffers {
                a: "out",
                b: "a or b",
            });
        }
        let flavor = crate::kernels::Flavor {
            elem: self.elem(dtype),
            act,
            ..crate::kernels::Flavor::NONE
        };
        let kernels = self.kernels().fused(self.device(), flavor)?;
        let kernel = match op {
            Elementwise::Activation(_) => &kernels.activation.act,
            Elementwise::Add => &kernels.activation.add,
            Elementwise::ActivationBackward(_) => &kernels.activation.backward,
        };
        kernel.build(self.device())?;
        let plan = crate::kernels::common::plan_flat(vec4s, self.tuning.elementwise);
        let params = kernels.uniform(self.device(), &plan.params);
        kernel.record(
            self.device(),
            pass,
            &[
                crate::kernels::whole(&params),
                crate::kernels::binding(a, bytes),
                crate::kernels::binding(b, bytes),
                crate::kernels::binding(out, bytes),
            ],
            plan.workgroups(),
            None,
        );
        Ok(())
    }

    /// The contents of the context's pipeline cache (the pipelines built so far),
    /// to save and give [`Self::from_env_with_pipeline_cache`] in a later run; `None`
    /// where the device has no pipeline cache (every backend but Vulkan).
    pub fn pipeline_cache_data(&self) -> Option<Vec<u8>> {
        self.kernels().cache_data()
    }

    /// How the kernels store `dtype` tensors here: f16 as WGSL's f16 where the
    /// device has SHADER_F16 and the tuning allows it, else two per u32.
    pub(crate) fn elem(&self, dtype: crate::DType) -> crate::kernels::Elem {
        let native = self.tuning.native_f16
            && self
                .device()
                .features()
                .contains(wgpu::Features::SHADER_F16);
        crate::kernels::Elem::of(dtype, native)
    }

    /// Checks that the first `bytes` of `buffer` can be bound as a storage buffer on
    /// this device: within the binding limit, inside the buffer, with `STORAGE`.
    pub(crate) fn check_storage(
        &self,
        name: &'static str,
        buffer: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<()> {
        self.check_tensor(name, buffer.into(), bytes)
    }

    /// Checks that the first `bytes` of `tensor` can be bound as a storage buffer on
    /// this device: within the binding limit, its offset aligned, inside its range and
    /// its buffer, with `STORAGE`.
    pub(crate) fn check_tensor(
        &self,
        name: &'static str,
        tensor: TensorBuffer<'_>,
        bytes: u64,
    ) -> Result<()> {
        self.check_size(name, bytes)?;
        let alignment = u64::from(
            self.inner
                .device
                .limits()
                .min_storage_buffer_offset_alignment,
        )
        .max(16);
        let offset = tensor.offset();
        if !offset.is_multiple_of(alignment) {
            return Err(Error::MisalignedOffset {
                name,
                offset,
                alignment,
            });
        }
        let buffer = tensor.buffer();
        let available = tensor.size().min(buffer.size().saturating_sub(offset));
        if available < bytes {
            return Err(Error::BufferTooSmall {
                name,
                needed: bytes,
                got: available,
            });
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::BufferUsage {
                name,
                needed: wgpu::BufferUsages::STORAGE,
                got: buffer.usage(),
            });
        }
        Ok(())
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.inner.kernels
    }

    /// Fails with [`Error::TooLargeForDevice`] (naming `name`) unless a storage
    /// buffer of `bytes` bytes can be created and bound on this device.
    pub fn check_size(&self, name: &'static str, bytes: u64) -> Result<()> {
        let limit = self.max_binding_size();
        if bytes > limit {
            return Err(Error::TooLargeForDevice { name, bytes, limit });
        }
        Ok(())
    }

    /// Largest storage buffer this device can both create and bind whole: the
    /// smaller of its `max_storage_buffer_binding_size` and `max_buffer_size`.
    pub fn max_binding_size(&self) -> u64 {
        let limits = self.inner.device.limits();
        limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
    }

    /// Submits the encoder and waits for the GPU to finish it (not on the web: see
    /// [`Self::submit_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.check_device()?;
        let index = self.inner.queue.submit([encoder.finish()]);
        self.wait(Some(index))
    }

    /// Waits for the submission `index` (or all work); a failure is
    /// [`Error::DeviceLost`] when the device is lost, else [`Error::Readback`].
    #[cfg(not(target_arch = "wasm32"))]
    fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let waited = self.inner.device.poll(wgpu::PollType::Wait {
            submission_index: index,
            timeout: None,
        });
        self.check_device()?;
        waited.map_err(|e| Error::Readback(e.to_string()))?;
        Ok(())
    }

    /// Copies the first `len` values of type `T` in `buffer` to the host. The buffer
    /// needs `COPY_SRC` and the 4-byte words that hold them (an odd number of f16
    /// reads one word more). Blocks; not on the web (see [`Self::read_buffer_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_buffer<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        len: usize,
    ) -> Result<Vec<T>> {
        pollster::block_on(self.read_buffer_async(buffer, len))
    }

    /// Creates a storage buffer holding `data` (usable as input, output and copy
    /// source/destination; written through the queue, so it holds `data` from the
    /// next submission on).
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let contents: &[u8] = bytemuck::cast_slice(data);
        let buffer = self.storage_buffer(label, contents.len().next_multiple_of(4) as u64)?;
        // Copies move whole 4-byte words (e.g. an odd number of f16): pad the last.
        let padded;
        let words = if contents.len().is_multiple_of(4) {
            contents
        } else {
            padded = [contents, &[0; 3][..4 - contents.len() % 4]].concat();
            &padded[..]
        };
        self.write(&buffer, words)?;
        Ok(buffer)
    }

    /// Writes `bytes` at the start of `buffer` through the queue (see
    /// [`Self::guarded`] for the errors).
    pub(crate) fn write(&self, buffer: &wgpu::Buffer, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.guarded("writing a buffer", || {
            self.inner.queue.write_buffer(buffer, 0, bytes);
            Ok(())
        })
    }

    /// Creates a zeroed storage buffer of `bytes` bytes (at least 4). Larger than
    /// the device can create is [`Error::TooLargeForDevice`]; a failed allocation
    /// [`Error::OutOfMemory`].
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.create_buffer(label, bytes, storage_usages())
    }

    /// A zeroed storage buffer of `bytes` bytes that the kernels also bind as the
    /// uniform window of their coefficients (`Kernels::coef_window_bytes`, so at least
    /// that long).
    pub(crate) fn coefficient_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let bytes = bytes.max(self.kernels().coef_window_bytes());
        self.create_buffer(label, bytes, storage_usages() | wgpu::BufferUsages::UNIFORM)
    }

    fn create_buffer(
        &self,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let size = bytes.max(4).next_multiple_of(4);
        let limit = self.inner.device.limits().max_buffer_size;
        if size > limit {
            return Err(Error::TooLargeForDevice {
                name: "buffer",
                bytes: size,
                limit,
            });
        }
        self.guarded("creating a buffer", || {
            Ok(self.inner.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            }))
        })
    }
}

/// Usages of the buffers the crate creates: bindable, and copyable both ways.
pub fn storage_usages() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
}

/// Honours `WGPU_ADAPTER_NAME` (a case-insensitive substring of the adapter name),
/// else asks for the default adapter with `WGPU_POWER_PREF` (high performance unless
/// set). Unlike `wgpu::util::initialize_adapter_from_env`, a name that matches
/// nothing is an error rather than a panic.
async fn select_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter> {
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let needle = wanted.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&needle))
            .ok_or(Error::AdapterNotFound {
                wanted,
                available: names,
            });
    }
    let power_preference =
        wgpu::PowerPreference::from_env().unwrap_or(wgpu::PowerPreference::HighPerformance);
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference,
            compatible_surface: None,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::NoAdapter {
            detail: e.to_string(),
        })
}

/// The vec4 count of `bytes` of `dtype` tensors: an error named `name` unless
/// they are a non-zero whole number of vec4s.
fn vec4s(name: &'static str, dtype: crate::DType, bytes: u64) -> Result<u32> {
    let unit = 4 * dtype.size();
    match u32::try_from(bytes / unit) {
        Ok(n) if n > 0 && bytes.is_multiple_of(unit) => Ok(n),
        _ => Err(Error::LengthMismatch {
            name,
            expected: bytes.next_multiple_of(unit).max(unit) as usize,
            got: bytes as usize,
        }),
    }
}
