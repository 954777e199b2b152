//! The kernels' host side: one module per WGSL file in `shaders/`, each with its
//! uniform parameters (mirroring the WGSL struct), its launch geometry and its
//! recording function. This module builds every pipeline once per device.

pub(crate) mod activation;
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
use std::sync::{Arc, Mutex, OnceLock};

use crate::{Activation, DType, Error, Result};

/// Invocations per workgroup of every kernel; reaches WGSL as the `WG` override.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

/// Largest workgroup count in one dispatch dimension (WebGPU's guaranteed minimum).
const MAX_GRID_DIM: u32 = 65535;

/// Most vec4s of the uniform binding through which apply.wgsl and backward_dx.wgsl
/// read their per-channel coefficients where those fit in it (`COEF_WINDOW` in WGSL):
/// 64 KiB, `wgpu::Limits::default()`'s uniform binding size. A CPU adapter loads a
/// uniform array lane by lane without the branches and bounds checks of a storage
/// load, and these loads are a sizeable part of a short walk's. A device with
/// smaller uniform bindings gets a window of its size (`Kernels::coef_window`).
pub(crate) const COEF_WINDOW: u32 = 4096;

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
            "activation.wgsl",
            include_str!("../../shaders/activation.wgsl"),
        ),
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

    /// Sizes and codes the host and the kernels share, as `(WGSL name, value)`,
    /// prepended as the flags are: the activations' codes (`ACT_*`, the values of
    /// [`crate::Activation`]) and the bindings of the fused tensors (shaders/flavor/).
    pub const SIZES: &[(&str, u32)] = &[
        ("ROW_UNIT", super::common::ROW_UNIT),
        ("COEF_WINDOW", super::COEF_WINDOW),
        ("ACT_IDENTITY", crate::Activation::Identity as u32),
        ("ACT_RELU", crate::Activation::Relu as u32),
        ("ACT_RELU6", crate::Activation::Relu6 as u32),
        ("RESIDUAL_BINDING", super::RESIDUAL_BINDING),
        ("OUTPUT_BINDING", super::OUTPUT_BINDING),
        ("RESIDUAL_GRAD_BINDING", super::RESIDUAL_GRAD_BINDING),
    ];

    /// The pieces that define the fused epilogue and prologue of the kernels that
    /// have them (`(file name, source)`): the forward's output with or without a
    /// residual z (stats.wgsl and apply.wgsl), the backward's gradient with or
    /// without the activation's mask from y, and with or without writing dz
    /// (backward_reduce.wgsl; backward_dx.wgsl has the mask only).
    pub const PIECES: &[(&str, &str)] = &[
        (
            "flavor/residual.wgsl",
            include_str!("../../shaders/flavor/residual.wgsl"),
        ),
        (
            "flavor/residual_none.wgsl",
            include_str!("../../shaders/flavor/residual_none.wgsl"),
        ),
        (
            "flavor/mask.wgsl",
            include_str!("../../shaders/flavor/mask.wgsl"),
        ),
        (
            "flavor/mask_none.wgsl",
            include_str!("../../shaders/flavor/mask_none.wgsl"),
        ),
        (
            "flavor/dz.wgsl",
            include_str!("../../shaders/flavor/dz.wgsl"),
        ),
        (
            "flavor/subgroups.wgsl",
            include_str!("../../shaders/flavor/subgroups.wgsl"),
        ),
        (
            "flavor/subgroups_none.wgsl",
            include_str!("../../shaders/flavor/subgroups_none.wgsl"),
        ),
        (
            "flavor/dz_none.wgsl",
            include_str!("../../shaders/flavor/dz_none.wgsl"),
        ),
        (
            "flavor/dz_packed.wgsl",
            include_str!("../../shaders/flavor/dz_packed.wgsl"),
        ),
        (
            "flavor/elem.wgsl",
            include_str!("../../shaders/flavor/elem.wgsl"),
        ),
        (
            "flavor/elem_f16_packed.wgsl",
            include_str!("../../shaders/flavor/elem_f16_packed.wgsl"),
        ),
        (
            "flavor/elem_bf16.wgsl",
            include_str!("../../shaders/flavor/elem_bf16.wgsl"),
        ),
        (
            "flavor/store.wgsl",
            include_str!("../../shaders/flavor/store.wgsl"),
        ),
        (
            "flavor/store_packed.wgsl",
            include_str!("../../shaders/flavor/store_packed.wgsl"),
        ),
    ];

    /// Full source of a kernel file (plain batch norm): the flag and size
    /// constants, the shared piece, the flavor pieces the file uses, the kernel.
    pub fn full(file: &str) -> String {
        module(file, super::Flavor::NONE, super::COEF_WINDOW)
    }

    /// [`full`] for every element type, fused activation and residual:
    /// `(description, source)`.
    pub fn fused_variants(file: &str) -> Vec<(String, String)> {
        super::Flavor::all()
            .map(|f| {
                let name = format!(
                    "{} {} residual={} subgroups={}",
                    f.elem.name(),
                    f.act.name(),
                    f.residual,
                    f.subgroups
                );
                (name, module(file, f, super::COEF_WINDOW))
            })
            .collect()
    }

    fn piece(name: &str) -> &'static str {
        PIECES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    fn kernel(file: &str) -> &'static str {
        KERNELS
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    /// A kernel file's module for `flavor` on a device with a coefficient window of
    /// `coef_window` vec4s.
    pub(crate) fn module(file: &str, flavor: super::Flavor, coef_window: u32) -> String {
        let pieces: String = flavor
            .pieces(file)
            .iter()
            .map(|(name, _)| piece(name))
            .collect::<Vec<_>>()
            .join("\n");
        let consts: String = FLAGS
            .iter()
            .chain(SIZES)
            .map(|&(name, value)| match name {
                "COEF_WINDOW" => (name, coef_window),
                _ => (name, value),
            })
            .chain([("ACT", flavor.act as u32)])
            .chain(scalar_out_binding(file).map(|b| ("SCALAR_OUT_BINDING", b)))
            .map(|(name, value)| format!("const {name}: u32 = {value}u;\n"))
            .collect();
        // The tensors' storage (`enable` opens the module): one element per f32 or
        // f16, or two per u32. The subgroup functions need no `enable` in naga
        // (which does not take `enable subgroups` yet): the device's SUBGROUP
        // feature admits them.
        let elem = match flavor.elem {
            super::Elem::F32 => "alias elem1 = f32;\nalias elem4 = vec4<f32>;\n",
            super::Elem::F16 => "enable f16;\nalias elem1 = f16;\nalias elem4 = vec4<f16>;\n",
            super::Elem::F16Packed | super::Elem::Bf16 => {
                "alias elem1 = u32;\nalias elem4 = vec2<u32>;\n"
            }
        };
        format!("{elem}{consts}\n{COMMON}\n{pieces}\n{}", kernel(file))
    }

    /// The binding of a kernel file's output tensor (y; dx in the backward's), which
    /// the flavor's `store` piece binds as single elements.
    fn scalar_out_binding(file: &str) -> Option<u32> {
        match file {
            "stats.wgsl" | "apply.wgsl" => Some(2),
            "backward_dx.wgsl" => Some(3),
            "backward_reduce.wgsl" => Some(4),
            _ => None,
        }
    }
}

/// Binding of the residual z in the forward kernels of a fused module (above every
/// kernel's own bindings).
const RESIDUAL_BINDING: u32 = 10;
/// Binding of the forward's output y in the backward kernels of a fused module.
const OUTPUT_BINDING: u32 = 11;
/// Binding of dz in backward_reduce.wgsl's kernels of a module with a residual.
const RESIDUAL_GRAD_BINDING: u32 = 12;

/// How the kernels store a tensor's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Elem {
    /// f32, one per element.
    F32,
    /// f16 as WGSL's f16 (devices with SHADER_F16).
    F16,
    /// f16, two per u32 (devices without SHADER_F16, or asked for).
    F16Packed,
    /// bf16, two per u32.
    Bf16,
}

impl Elem {
    const ALL: [Elem; 4] = [Elem::F32, Elem::F16, Elem::F16Packed, Elem::Bf16];

    /// The storage of `dtype` tensors: f16 native where `native_f16`.
    pub fn of(dtype: DType, native_f16: bool) -> Elem {
        match dtype {
            DType::F32 => Elem::F32,
            DType::F16 if native_f16 => Elem::F16,
            DType::F16 => Elem::F16Packed,
            DType::Bf16 => Elem::Bf16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::F16Packed => "f16x2",
            Elem::Bf16 => "bf16x2",
        }
    }

    fn packed(self) -> bool {
        matches!(self, Elem::F16Packed | Elem::Bf16)
    }
}

/// What a set of kernels is built for: the tensors' storage, the activation fused
/// after batch norm, whether the forward adds a residual (and the backward writes
/// its gradient), and whether the reductions merge within subgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Flavor {
    pub elem: Elem,
    pub act: Activation,
    pub residual: bool,
    pub subgroups: bool,
}

/// Number of flavors (storages x activations x residual or not x subgroups or not).
const FLAVORS: usize = 4 * 3 * 2 * 2;

impl Flavor {
    /// Plain batch norm on f32 tensors, without subgroups.
    pub const NONE: Flavor = Flavor {
        elem: Elem::F32,
        act: Activation::Identity,
        residual: false,
        subgroups: false,
    };

    /// Every flavor, plain f32 first.
    pub fn all() -> impl Iterator<Item = Flavor> {
        (0..FLAVORS).map(|i| Flavor {
            elem: Elem::ALL[i / 12],
            act: Activation::ALL[i / 4 % 3],
            residual: i / 2 % 2 == 1,
            subgroups: i % 2 == 1,
        })
    }

    fn index(self) -> usize {
        12 * self.elem as usize
            + 4 * self.act as usize
            + 2 * usize::from(self.residual)
            + usize::from(self.subgroups)
    }

    /// Whether the backward masks the gradient with the forward's output.
    pub fn masks(self) -> bool {
        self.act != Activation::Identity
    }

    /// The pieces a kernel file takes, each with the binding it adds (if any).
    fn pieces(self, file: &str) -> Vec<(&'static str, Option<(u32, Access)>)> {
        let residual = if self.residual {
            (
                "flavor/residual.wgsl",
                Some((RESIDUAL_BINDING, Access::Read)),
            )
        } else {
            ("flavor/residual_none.wgsl", None)
        };
        let mask = if self.masks() {
            ("flavor/mask.wgsl", Some((OUTPUT_BINDING, Access::Read)))
        } else {
            ("flavor/mask_none.wgsl", None)
        };
        let dz = if self.residual {
            let file = if self.elem.packed() {
                "flavor/dz_packed.wgsl"
            } else {
                "flavor/dz.wgsl"
            };
            (file, Some((RESIDUAL_GRAD_BINDING, Access::ReadWrite)))
        } else {
            ("flavor/dz_none.wgsl", None)
        };
        let subgroups = if self.subgroups {
            ("flavor/subgroups.wgsl", None)
        } else {
            ("flavor/subgroups_none.wgsl", None)
        };
        let (elem, store) = if self.elem.packed() {
            let elem = if self.elem == Elem::Bf16 {
                "flavor/elem_bf16.wgsl"
            } else {
                "flavor/elem_f16_packed.wgsl"
            };
            ((elem, None), ("flavor/store_packed.wgsl", None))
        } else {
            (("flavor/elem.wgsl", None), ("flavor/store.wgsl", None))
        };
        match file {
            "stats.wgsl" => vec![elem, store, residual, subgroups],
            "apply.wgsl" => vec![elem, store, residual],
            "backward_reduce.wgsl" => vec![elem, store, mask, dz, subgroups],
            // The dx pass after a residual's sums reads dz, already masked.
            "backward_dx.wgsl" if !self.residual => vec![elem, store, mask],
            "backward_dx.wgsl" => vec![elem, store, ("flavor/mask_none.wgsl", None)],
            "activation.wgsl" | "copy.wgsl" => vec![elem],
            _ => vec![],
        }
    }

    /// The bindings a kernel file's fused module adds, in the order its dispatches
    /// pass them after the kernel's own.
    fn extra_bindings(self, file: &str) -> Vec<(u32, Access)> {
        self.pieces(file)
            .into_iter()
            .filter_map(|(_, b)| b)
            .collect()
    }
}

/// How a shader binding is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Uniform,
    Read,
    ReadWrite,
}

/// A shader module built on first use: a context builds only what its calls need.
pub(crate) struct Module {
    label: String,
    source: String,
    /// Bindings of the fused tensors its pieces declare, after every kernel's own.
    extra: Vec<(u32, Access)>,
    /// The context's pipeline cache, where the backend has one.
    cache: Option<wgpu::PipelineCache>,
    built: Mutex<Option<wgpu::ShaderModule>>,
}

impl Module {
    pub(crate) fn new(
        label: String,
        source: String,
        extra: Vec<(u32, Access)>,
        cache: Option<wgpu::PipelineCache>,
    ) -> Arc<Self> {
        Arc::new(Self {
            label,
            source,
            extra,
            cache,
            built: Mutex::new(None),
        })
    }

    /// The module, created on the first call (inside the caller's error scopes).
    fn get(&self, device: &wgpu::Device) -> wgpu::ShaderModule {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built
            .get_or_insert_with(|| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&self.label),
                    source: wgpu::ShaderSource::Wgsl(self.source.as_str().into()),
                })
            })
            .clone()
    }

    /// Drops a module whose creation may have failed, so that the next build tries
    /// again rather than keeping an invalid one for the context's life.
    fn forget(&self) {
        *self.built.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// One compute pipeline with its explicit bind group layout, built on first use
/// ([`Self::build`]) and kept for the context's life.
pub(crate) struct Kernel {
    module: Arc<Module>,
    label: String,
    entry: String,
    bindings: &'static [Access],
    overrides: Vec<(String, f64)>,
    built: OnceLock<Built>,
}

struct Built {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Kernel {
    fn new(
        module: &Arc<Module>,
        label: impl Into<String>,
        entry: &str,
        bindings: &'static [Access],
    ) -> Self {
        Self::with_overrides(module, label, entry, bindings, &[])
    }

    /// As [`Self::new`], with values for the module's `override` declarations
    /// besides `WG`.
    fn with_overrides(
        module: &Arc<Module>,
        label: impl Into<String>,
        entry: &str,
        bindings: &'static [Access],
        overrides: &[(&str, f64)],
    ) -> Self {
        Self {
            module: module.clone(),
            label: label.into(),
            entry: entry.to_string(),
            bindings,
            overrides: overrides
                .iter()
                .map(|&(name, value)| (name.to_string(), value))
                .collect(),
            built: OnceLock::new(),
        }
    }

    /// Every binding of the kernel: its own (from 0), then its module's fused
    /// tensors.
    fn slots(&self) -> impl Iterator<Item = (u32, Access)> + '_ {
        (0u32..)
            .zip(self.bindings.iter().copied())
            .chain(self.module.extra.iter().copied())
    }

    /// Storage buffers the kernel binds.
    fn storage_buffers(&self) -> u32 {
        self.slots()
            .filter(|(_, a)| !matches!(a, Access::Uniform))
            .count() as u32
    }

    /// Whether the device can bind the kernel's storage buffers.
    pub(crate) fn fits(&self, device: &wgpu::Device) -> bool {
        self.storage_buffers() <= device.limits().max_storage_buffers_per_shader_stage
    }

    /// Builds the pipeline unless it is built: [`Error::DeviceLimit`] when the device
    /// cannot bind the kernel's storage buffers, [`Error::Gpu`] for any error wgpu
    /// raises (inside error scopes, so nothing reaches the device's handler).
    pub(crate) fn build(&self, device: &wgpu::Device) -> Result<()> {
        if self.built.get().is_some() {
            return Ok(());
        }
        let limit = device.limits().max_storage_buffers_per_shader_stage;
        if !self.fits(device) {
            return Err(Error::DeviceLimit {
                name: "max_storage_buffers_per_shader_stage",
                actual: u64::from(limit),
                required: u64::from(self.storage_buffers()),
            });
        }
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let built = self.create(device);
        // On the web this cannot wait: a failure is reported later (crate::scopes), and
        // the pipeline is kept.
        let (invalid, oom) = crate::scopes::pop(device, "building a pipeline", oom, invalid);
        if let Some(e) = oom {
            self.module.forget();
            return Err(Error::OutOfMemory {
                context: "building a pipeline",
                message: format!("{}: {e}", self.label),
            });
        }
        if let Some(e) = invalid {
            self.module.forget();
            return Err(Error::Gpu {
                context: "building a pipeline",
                message: format!("{}: {e}", self.label),
            });
        }
        // Another thread may have built it meanwhile: either is the same pipeline.
        let _ = self.built.set(built);
        Ok(())
    }

    fn create(&self, device: &wgpu::Device) -> Built {
        let label = &self.label;
        let entries: Vec<wgpu::BindGroupLayoutEntry> = self
            .slots()
            .map(|(i, access)| wgpu::BindGroupLayoutEntry {
                binding: i,
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
            label: Some(label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants: Vec<(&str, f64)> = [("WG", WORKGROUP_SIZE as f64)]
            .into_iter()
            .chain(self.overrides.iter().map(|(n, v)| (n.as_str(), *v)))
            .collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&pipeline_layout),
            module: &self.module.get(device),
            entry_point: Some(&self.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: self.module.cache.as_ref(),
        });
        Built { pipeline, layout }
    }

    /// Adds one dispatch of `workgroups` workgroups over `resources` (bound in order
    /// from binding 0, then the module's fused tensors) to `recipe`; nothing is
    /// recorded until the recipe is.
    pub(crate) fn dispatch<'k>(
        &'k self,
        recipe: &mut Recipe<'k>,
        resources: &[wgpu::BufferBinding<'_>],
        workgroups: u32,
    ) {
        recipe.push(self, resources, workgroups, 0);
    }

    /// [`Self::dispatch`] for a kernel whose workgroups read some of its bindings
    /// more than once: `reread` bytes (the merged passes' partials) beyond one read
    /// of each binding, counted in [`DispatchInfo::bytes_reread`].
    pub(crate) fn dispatch_merging<'k>(
        &'k self,
        recipe: &mut Recipe<'k>,
        resources: &[wgpu::BufferBinding<'_>],
        workgroups: u32,
        reread: u64,
    ) {
        recipe.push(self, resources, workgroups, reread);
    }

    /// Records one dispatch of `workgroups` workgroups (folded into two dimensions
    /// when needed; the kernels recover the linear index) over `resources`, bound
    /// in order from binding 0; its bind group taken from `cache` where that has
    /// one for the same ranges, else made (and kept there). The pipeline must be
    /// built ([`Self::build`]); one that could not be is not dispatched.
    pub(crate) fn record(
        &self,
        device: &wgpu::Device,
        pass: &mut wgpu::ComputePass<'_>,
        resources: &[wgpu::BufferBinding<'_>],
        workgroups: u32,
        cache: Option<&BindGroups>,
    ) {
        if self.built.get().is_none() && self.build(device).is_err() {
            return;
        }
        let Some(built) = self.built.get() else {
            return;
        };
        let make = || {
            let entries: Vec<wgpu::BindGroupEntry> = resources
                .iter()
                .zip(self.slots())
                .map(|(r, (i, _))| wgpu::BindGroupEntry {
                    binding: i,
                    resource: wgpu::BindingResource::Buffer(r.clone()),
                })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&self.label),
                layout: &built.layout,
                entries: &entries,
            })
        };
        let bind_group = match cache {
            Some(cache) => cache.get_or_make(&built.layout, resources, make),
            None => make(),
        };
        let (x, y) = grid(workgroups);
        pass.set_pipeline(&built.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
}

/// The bind groups a layer has made, by pipeline layout and bound ranges, when it
/// is asked to keep them ([`BindGroups::set_capacity`]; none by default):
/// recording a dispatch again on the same buffer ranges (a training loop's next
/// step on the same tensors) then makes none. Each entry keeps its buffers alive
/// until the cache starts over (past its capacity), is cleared, or is dropped with
/// its layer.
#[derive(Default)]
pub(crate) struct BindGroups {
    map: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    capacity: usize,
    groups: HashMap<BindKey, wgpu::BindGroup>,
}

/// A bind group's layout and the ranges it binds, in binding order.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    layout: wgpu::BindGroupLayout,
    ranges: Vec<(wgpu::Buffer, u64, Option<NonZeroU64>)>,
}

impl BindGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bind group of `layout` over `resources`: the cached one, or `make`'s
    /// (then cached, if the cache keeps any).
    fn get_or_make(
        &self,
        layout: &wgpu::BindGroupLayout,
        resources: &[wgpu::BufferBinding<'_>],
        make: impl FnOnce() -> wgpu::BindGroup,
    ) -> wgpu::BindGroup {
        let mut cache = self.lock();
        if cache.capacity == 0 {
            return make();
        }
        let key = BindKey {
            layout: layout.clone(),
            ranges: resources
                .iter()
                .map(|r| (r.buffer.clone(), r.offset, r.size))
                .collect(),
        };
        if let Some(group) = cache.groups.get(&key) {
            return group.clone();
        }
        if cache.groups.len() >= cache.capacity {
            cache.groups.clear();
        }
        cache.groups.entry(key).or_insert_with(make).clone()
    }

    /// Keeps up to `capacity` bind groups (0: none), dropping those past it.
    pub(crate) fn set_capacity(&self, capacity: usize) {
        let mut cache = self.lock();
        cache.capacity = capacity;
        if cache.groups.len() > capacity {
            cache.groups.clear();
        }
    }

    /// Drops every cached bind group (and with them the cache's hold on their
    /// buffers).
    pub(crate) fn clear(&self) {
        self.lock().groups.clear();
    }

    /// Bind groups cached.
    pub(crate) fn len(&self) -> usize {
        self.lock().groups.len()
    }
}

/// A buffer range a recipe binds (owning its buffer handle).
struct Resource {
    buffer: wgpu::Buffer,
    offset: u64,
    size: Option<NonZeroU64>,
}

impl Resource {
    fn bytes(&self) -> u64 {
        self.size.map_or(
            self.buffer.size().saturating_sub(self.offset),
            NonZeroU64::get,
        )
    }
}

/// One dispatch of a recipe.
struct Step<'k> {
    kernel: &'k Kernel,
    resources: Vec<Resource>,
    workgroups: u32,
    reread: u64,
}

/// What one dispatch of an operation does: its pipeline, its launch, the bytes of
/// the storage ranges it binds (an upper bound of what it reads and writes once: a
/// kernel may read only part of a binding, e.g. a per-channel buffer padded or
/// grown for larger tensors) and the bytes its workgroups read again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchInfo {
    /// The pipeline's label (`bn.{kernel}.{entry point}`).
    pub label: String,
    /// Workgroups launched.
    pub workgroups: u32,
    /// Bytes of the read-only storage ranges it binds.
    pub bytes_read: u64,
    /// Bytes of the read-write storage ranges it binds.
    pub bytes_written: u64,
    /// Bytes read more than once, beyond the bound ranges: in the merged normalize
    /// and dx passes every workgroup reads its channels' partials, so a channel's
    /// partials are read once per workgroup of its tile; 0 elsewhere.
    pub bytes_reread: u64,
}

/// The dispatches of one operation, in order: built first (so that every pipeline
/// exists, or the operation fails with a typed error before anything is recorded),
/// then recorded.
#[derive(Default)]
pub(crate) struct Recipe<'k> {
    steps: Vec<Step<'k>>,
}

impl<'k> Recipe<'k> {
    pub(crate) fn new() -> Self {
        Self { steps: Vec::new() }
    }

    fn push(
        &mut self,
        kernel: &'k Kernel,
        resources: &[wgpu::BufferBinding<'_>],
        workgroups: u32,
        reread: u64,
    ) {
        let resources = resources
            .iter()
            .map(|r| Resource {
                buffer: r.buffer.clone(),
                offset: r.offset,
                size: r.size,
            })
            .collect();
        self.steps.push(Step {
            kernel,
            resources,
            workgroups,
            reread,
        });
    }

    /// Number of dispatches.
    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }

    /// Builds every pipeline the recipe dispatches.
    pub(crate) fn build(&self, device: &wgpu::Device) -> Result<()> {
        self.steps.iter().try_for_each(|s| s.kernel.build(device))
    }

    /// Records every dispatch into `pass`, bind groups from `cache`.
    pub(crate) fn record(
        &self,
        device: &wgpu::Device,
        pass: &mut wgpu::ComputePass<'_>,
        cache: &BindGroups,
    ) {
        (0..self.steps.len()).for_each(|i| self.record_step(i, device, pass, cache));
    }

    /// Records dispatch `i` into `pass`.
    pub(crate) fn record_step(
        &self,
        i: usize,
        device: &wgpu::Device,
        pass: &mut wgpu::ComputePass<'_>,
        cache: &BindGroups,
    ) {
        let step = &self.steps[i];
        let bindings: Vec<wgpu::BufferBinding<'_>> = step
            .resources
            .iter()
            .map(|r| wgpu::BufferBinding {
                buffer: &r.buffer,
                offset: r.offset,
                size: r.size,
            })
            .collect();
        step.kernel
            .record(device, pass, &bindings, step.workgroups, Some(cache));
    }

    /// What each dispatch does.
    pub(crate) fn info(&self) -> Vec<DispatchInfo> {
        self.steps
            .iter()
            .map(|s| {
                let (mut read, mut written) = (0, 0);
                for (r, (_, access)) in s.resources.iter().zip(s.kernel.slots()) {
                    match access {
                        Access::Uniform => {}
                        Access::Read => read += r.bytes(),
                        Access::ReadWrite => written += r.bytes(),
                    }
                }
                DispatchInfo {
                    label: s.kernel.label.clone(),
                    workgroups: s.workgroups,
                    bytes_read: read,
                    bytes_written: written,
                    bytes_reread: s.reread,
                }
            })
            .collect()
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
    pub apply_merged: common::VariantKernels,
    pub backward_reduce: backward_reduce::BackwardReduceKernels,
    pub backward_finalize: backward_finalize::BackwardFinalizeKernels,
    pub backward_dx: common::SwitchedWalkKernels,
    pub backward_dx_merged: common::VariantKernels,
    pub copy: Kernel,
    pub activation: activation::ActivationKernels,
    pub optimizer: optimizer::OptimizerKernels,
    /// Uniform buffers by content, one cache for every flavor's set.
    uniforms: Arc<Mutex<HashMap<Vec<u8>, wgpu::Buffer>>>,
    coef_window: u32,
    /// What this set fuses around batch norm.
    flavor: Flavor,
    /// The sets of the other flavors (of the plain set only), made on first use.
    fused: [OnceLock<Box<Kernels>>; FLAVORS],
    /// The pipeline cache every set builds its pipelines with, where the backend has
    /// one.
    cache: Option<wgpu::PipelineCache>,
}

/// Beyond this many cached uniform buffers the cache starts over.
const MAX_CACHED_UNIFORMS: usize = 4096;

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device, cache: Option<wgpu::PipelineCache>) -> Result<Self> {
        Self::with_flavor(device, Flavor::NONE, cache, Arc::default())
    }

    /// The pipeline cache's contents, to give [`Kernels::new`] in a later run.
    pub(crate) fn cache_data(&self) -> Option<Vec<u8>> {
        self.cache.as_ref().and_then(wgpu::PipelineCache::get_data)
    }

    /// The pipelines of `flavor` (made on first use; plain batch norm's on f32 are
    /// `self`). WGSL's f16 needs a device with `SHADER_F16`, subgroups one with
    /// `SUBGROUP` (`GpuContext` picks flavors the device has).
    pub(crate) fn fused(&self, device: &wgpu::Device, flavor: Flavor) -> Result<&Kernels> {
        if flavor == self.flavor {
            return Ok(self);
        }
        if flavor.elem == Elem::F16 && !device.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::DeviceLimit {
                name: "wgpu::Features::SHADER_F16",
                actual: 0,
                required: 1,
            });
        }
        if flavor.subgroups && !device.features().contains(wgpu::Features::SUBGROUP) {
            return Err(Error::DeviceLimit {
                name: "wgpu::Features::SUBGROUP",
                actual: 0,
                required: 1,
            });
        }
        let slot = &self.fused[flavor.index()];
        if let Some(k) = slot.get() {
            return Ok(k);
        }
        let made = Box::new(Self::with_flavor(
            device,
            flavor,
            self.cache.clone(),
            self.uniforms.clone(),
        )?);
        Ok(slot.get_or_init(|| made))
    }

    fn with_flavor(
        device: &wgpu::Device,
        flavor: Flavor,
        cache: Option<wgpu::PipelineCache>,
        uniforms: Arc<Mutex<HashMap<Vec<u8>, wgpu::Buffer>>>,
    ) -> Result<Self> {
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
                "max_compute_workgroup_storage_size",
                limits.max_compute_workgroup_storage_size as u64,
                3 * 16 * WORKGROUP_SIZE as u64,
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
        // A window of what the device can bind as one uniform buffer, up to 64 KiB.
        let coef_window = u32::try_from(limits.max_uniform_buffer_binding_size / 16)
            .unwrap_or(u32::MAX)
            .clamp(1, COEF_WINDOW);
        let module = |name: &'static str, file: &str| {
            let label = if flavor == Flavor::NONE {
                name.to_string()
            } else {
                let residual = if flavor.residual { ".add" } else { "" };
                let subgroups = if flavor.subgroups { ".subgroups" } else { "" };
                format!(
                    "{name}.{}.{}{residual}{subgroups}",
                    flavor.elem.name(),
                    flavor.act.name()
                )
            };
            let source = sources::module(file, flavor, coef_window);
            Module::new(label, source, flavor.extra_bindings(file), cache.clone())
        };
        let src = |file: &'static str| file;
        let apply_module = module("bn.apply", src("apply.wgsl"));
        let dx_module = module("bn.backward_dx", src("backward_dx.wgsl"));
        let kernels = Self {
            stats: stats::StatsKernels::new(&module("bn.stats", src("stats.wgsl"))),
            finalize: finalize::FinalizeKernels::new(&module("bn.finalize", src("finalize.wgsl"))),
            apply: apply::kernels(&apply_module),
            apply_merged: apply::merged(&apply_module),
            backward_reduce: backward_reduce::BackwardReduceKernels::new(&module(
                "bn.backward_reduce",
                src("backward_reduce.wgsl"),
            )),
            backward_finalize: backward_finalize::BackwardFinalizeKernels::new(&module(
                "bn.backward_finalize",
                src("backward_finalize.wgsl"),
            )),
            backward_dx: backward_dx::kernels(&dx_module),
            backward_dx_merged: backward_dx::merged(&dx_module),
            copy: copy::kernel(&module("bn.copy", src("copy.wgsl"))),
            activation: activation::ActivationKernels::new(&module(
                "bn.activation",
                src("activation.wgsl"),
            )),
            optimizer: optimizer::OptimizerKernels::new(&module(
                "bn.optimizer",
                src("optimizer.wgsl"),
            )),
            uniforms,
            coef_window,
            flavor,
            fused: std::array::from_fn(|_| OnceLock::new()),
            cache,
        };
        Ok(kernels)
    }

    /// Bytes of that window.
    pub(crate) fn coef_window_bytes(&self) -> u64 {
        16 * u64::from(self.coef_window)
    }

    /// Whether `segments` per-channel segments of `padded` floats each (the layout of
    /// the coefficients) fit in the uniform window.
    pub(crate) fn coefficients_fit(&self, segments: u32, padded: u32) -> bool {
        u64::from(segments) * u64::from(padded) <= 4 * u64::from(self.coef_window)
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
