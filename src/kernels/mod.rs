//! The kernels' host side: one module per WGSL file in `shaders/`, each with its
//! uniform parameters (mirroring the WGSL struct), its launch geometry and its
//! recording function. This module builds every pipeline once per device.

pub(crate) mod apply;
pub(crate) mod backward_dx;
pub(crate) mod backward_finalize;
pub(crate) mod backward_reduce;
pub(crate) mod common;
pub(crate) mod copy;
pub(crate) mod finalize;
pub(crate) mod optimizer;
pub(crate) mod stats;

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Mutex;

use crate::{Error, Result};

/// Invocations per workgroup of every kernel; reaches WGSL as the `WG` override.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

/// Largest workgroup count in one dispatch dimension (WebGPU's guaranteed minimum).
const MAX_GRID_DIM: u32 = 65535;

/// vec4s of the uniform binding through which apply.wgsl and backward_dx.wgsl read
/// their per-channel coefficients where those fit in it (`COEF_WINDOW` in WGSL):
/// 64 KiB, `wgpu::Limits::default()`'s uniform binding size. A CPU adapter loads a
/// uniform array lane by lane without the branches and bounds checks of a storage
/// load, and these loads are a sizeable part of a short walk's.
pub(crate) const COEF_WINDOW: u32 = 4096;

/// Bytes of that binding.
pub(crate) const COEF_WINDOW_BYTES: u64 = 16 * COEF_WINDOW as u64;

/// Whether `segments` per-channel segments of `padded` floats each (the layout of the
/// coefficients) fit in the uniform window.
pub(crate) fn coefficients_fit(segments: u32, padded: u32) -> bool {
    u64::from(segments) * u64::from(padded) <= 4 * u64::from(COEF_WINDOW)
}

/// The shader sources: the shared piece followed by one kernel file.
pub mod sources {
    /// Shared declarations prepended to every kernel.
    pub const COMMON: &str = include_str!("../../shaders/common.wgsl");
    /// Every kernel as `(file name, source without the shared piece)`.
    pub const KERNELS: &[(&str, &str)] = &[
        ("stats.wgsl", include_str!("../../shaders/stats.wgsl")),
        ("finalize.wgsl", include_str!("../../shaders/finalize.wgsl")),
        ("apply.wgsl", include_str!("../../shaders/apply.wgsl")),
        (
            "backward_reduce.wgsl",
            include_str!("../../shaders/backward_reduce.wgsl"),
        ),
        (
            "backward_finalize.wgsl",
            include_str!("../../shaders/backward_finalize.wgsl"),
        ),
        (
            "backward_dx.wgsl",
            include_str!("../../shaders/backward_dx.wgsl"),
        ),
        ("copy.wgsl", include_str!("../../shaders/copy.wgsl")),
        (
            "optimizer.wgsl",
            include_str!("../../shaders/optimizer.wgsl"),
        ),
    ];

    /// The flag bits the host sets in the kernels' parameters, as `(WGSL name,
    /// value)`: the host's constants are the only definition, and reach WGSL as
    /// `const` declarations prepended to every kernel (see [`full`]).
    pub const FLAGS: &[(&str, u32)] = &[
        ("STATS_COUNT_BATCH", super::stats::COUNT_BATCH),
        ("FINALIZE_AFFINE", super::finalize::AFFINE),
        ("FINALIZE_UPDATE_RUNNING", super::finalize::UPDATE_RUNNING),
        ("FINALIZE_CUMULATIVE", super::finalize::CUMULATIVE),
        ("FINALIZE_UNBIASED", super::finalize::UNBIASED),
        ("APPLY_AFFINE", super::apply::AFFINE),
        ("BACKWARD_AFFINE", super::backward_finalize::AFFINE),
        (
            "BACKWARD_WANT_DGAMMA",
            super::backward_finalize::WANT_DGAMMA,
        ),
        ("BACKWARD_WANT_DBETA", super::backward_finalize::WANT_DBETA),
        (
            "BACKWARD_BATCH_STATS",
            super::backward_finalize::BATCH_STATS,
        ),
        ("BACKWARD_ACCUMULATE", super::backward_finalize::ACCUMULATE),
        ("OPTIMIZER_WEIGHT_DECAY", super::optimizer::WEIGHT_DECAY),
        ("OPTIMIZER_MOMENTUM", super::optimizer::MOMENTUM),
        ("OPTIMIZER_FIRST_STEP", super::optimizer::FIRST_STEP),
        ("OPTIMIZER_NESTEROV", super::optimizer::NESTEROV),
    ];

    /// Sizes the host and the kernels share, as `(WGSL name, value)`, prepended as
    /// the flags are.
    pub const SIZES: &[(&str, u32)] = &[
        ("ROW_UNIT", super::common::ROW_UNIT),
        ("COEF_WINDOW", super::COEF_WINDOW),
    ];

    /// Full source of a kernel file: the flag and size constants, the shared piece,
    /// the kernel.
    pub fn full(kernel: &str) -> String {
        let flags: String = FLAGS
            .iter()
            .chain(SIZES)
            .map(|(name, value)| format!("const {name}: u32 = {value}u;\n"))
            .collect();
        format!("{flags}\n{COMMON}\n{kernel}")
    }
}

/// How a shader binding is used.
#[derive(Clone, Copy)]
pub(crate) enum Access {
    Uniform,
    Read,
    ReadWrite,
}

/// One compute pipeline with its explicit bind group layout.
pub(crate) struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    label: String,
}

impl Kernel {
    fn new(
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        label: impl Into<String>,
        entry: &str,
        bindings: &[Access],
    ) -> Self {
        Self::with_overrides(device, module, label, entry, bindings, &[])
    }

    /// As [`Self::new`], with values for the module's `override` declarations
    /// besides `WG`.
    fn with_overrides(
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        label: impl Into<String>,
        entry: &str,
        bindings: &[Access],
        overrides: &[(&str, f64)],
    ) -> Self {
        let label = label.into();
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, access)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match access {
                        Access::Uniform => wgpu::BufferBindingType::Uniform,
                        Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants: Vec<(&str, f64)> = [("WG", WORKGROUP_SIZE as f64)]
            .into_iter()
            .chain(overrides.iter().copied())
            .collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Self {
            pipeline,
            layout,
            label,
        }
    }

    /// Records one dispatch of `workgroups` workgroups (folded into two dimensions
    /// when needed; the kernels recover the linear index) over `resources`, bound
    /// in order from binding 0.
    pub(crate) fn dispatch(
        &self,
        device: &wgpu::Device,
        pass: &mut wgpu::ComputePass<'_>,
        resources: &[wgpu::BufferBinding<'_>],
        workgroups: u32,
    ) {
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(r.clone()),
            })
            .collect();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.label),
            layout: &self.layout,
            entries: &entries,
        });
        let (x, y) = grid(workgroups);
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
}

/// Folds a workgroup count into `(x, y)` with `x * y >= workgroups`, each at most
/// [`MAX_GRID_DIM`].
pub(crate) fn grid(workgroups: u32) -> (u32, u32) {
    let x = workgroups.clamp(1, MAX_GRID_DIM);
    (x, workgroups.div_ceil(x).max(1))
}

/// A binding of the first `bytes` bytes of `buffer`.
pub(crate) fn binding(buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: NonZeroU64::new(bytes.max(4)),
    }
}

/// A binding of the whole buffer.
pub(crate) fn whole(buffer: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
    buffer.as_entire_buffer_binding()
}

/// Every pipeline of the crate, built once per device.
pub(crate) struct Kernels {
    pub stats: stats::StatsKernels,
    pub finalize: finalize::FinalizeKernels,
    pub apply: common::SwitchedWalkKernels,
    pub backward_reduce: common::SwitchedWalkKernels,
    pub backward_finalize: backward_finalize::BackwardFinalizeKernels,
    pub backward_dx: common::SwitchedWalkKernels,
    pub copy: Kernel,
    pub optimizer: optimizer::OptimizerKernels,
    uniforms: Mutex<HashMap<Vec<u8>, wgpu::Buffer>>,
}

/// Beyond this many cached uniform buffers the cache starts over.
const MAX_CACHED_UNIFORMS: usize = 4096;

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device) -> Result<Self> {
        let limits = device.limits();
        for (name, actual, required) in [
            (
                "max_compute_invocations_per_workgroup",
                limits.max_compute_invocations_per_workgroup as u64,
                WORKGROUP_SIZE as u64,
            ),
            (
                "max_compute_workgroup_size_x",
                limits.max_compute_workgroup_size_x as u64,
                WORKGROUP_SIZE as u64,
            ),
            (
                "max_storage_buffers_per_shader_stage",
                limits.max_storage_buffers_per_shader_stage as u64,
                6,
            ),
            (
                "max_compute_workgroup_storage_size",
                limits.max_compute_workgroup_storage_size as u64,
                3 * 16 * WORKGROUP_SIZE as u64,
            ),
            (
                "max_uniform_buffer_binding_size",
                limits.max_uniform_buffer_binding_size,
                COEF_WINDOW_BYTES,
            ),
            (
                "max_compute_workgroups_per_dimension",
                limits.max_compute_workgroups_per_dimension as u64,
                MAX_GRID_DIM as u64,
            ),
        ] {
            if actual < required {
                return Err(Error::DeviceLimit {
                    name,
                    actual,
                    required,
                });
            }
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = |name: &'static str, kernel: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(sources::full(kernel).into()),
            })
        };
        let src = |file: &str| {
            sources::KERNELS
                .iter()
                .find(|(f, _)| *f == file)
                .map(|(_, s)| *s)
                .unwrap_or_default()
        };
        let kernels = Self {
            stats: stats::StatsKernels::new(device, &module("bn.stats", src("stats.wgsl"))),
            finalize: finalize::FinalizeKernels::new(
                device,
                &module("bn.finalize", src("finalize.wgsl")),
            ),
            apply: apply::kernels(device, &module("bn.apply", src("apply.wgsl"))),
            backward_reduce: backward_reduce::kernels(
                device,
                &module("bn.backward_reduce", src("backward_reduce.wgsl")),
            ),
            backward_finalize: backward_finalize::BackwardFinalizeKernels::new(
                device,
                &module("bn.backward_finalize", src("backward_finalize.wgsl")),
            ),
            backward_dx: backward_dx::kernels(
                device,
                &module("bn.backward_dx", src("backward_dx.wgsl")),
            ),
            copy: copy::kernel(device, &module("bn.copy", src("copy.wgsl"))),
            optimizer: optimizer::OptimizerKernels::new(
                device,
                &module("bn.optimizer", src("optimizer.wgsl")),
            ),
            uniforms: Mutex::new(HashMap::new()),
        };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu {
                context: "building the pipelines",
                message: e.to_string(),
            });
        }
        Ok(kernels)
    }

    /// An immutable uniform buffer holding `value`, shared by every call with the
    /// same parameters. Contents never change after creation, so calls recorded into
    /// one encoder cannot see each other's parameters (as they would with
    /// `Queue::write_buffer` on a shared buffer).
    pub(crate) fn uniform<T: bytemuck::Pod>(
        &self,
        device: &wgpu::Device,
        value: &T,
    ) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        let bytes = bytemuck::bytes_of(value).to_vec();
        let mut map = self.uniforms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(&bytes) {
            return b.clone();
        }
        if map.len() >= MAX_CACHED_UNIFORMS {
            map.clear();
        }
        let buffer = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bn.params"),
            contents: &bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        map.insert(bytes, buffer.clone());
        buffer
    }
}
