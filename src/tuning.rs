//! How the kernels cut a tensor into workgroups: chosen per adapter, adjustable.

use crate::kernels::WORKGROUP_SIZE;

/// How one kind of pass is cut into workgroups (see [`Tuning`]). Any values are
/// accepted: zero and non-powers of two are rounded to what the kernels can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Workgroups a launch aims for, when the tensor is large enough.
    pub target_workgroups: u32,
    /// Work each invocation should get, in vec4s (16 bytes) of the tensor, before a
    /// channel is split over more workgroups.
    pub min_units: u32,
    /// Work each invocation of a channels-first walk should get, in vec4s, in place
    /// of `min_units` (0: `min_units`); the channels of a workgroup grow for it only
    /// as long as the launch keeps `min_workgroups` workgroups.
    pub runs_min_units: u32,
    /// Invocations that an adapter runs as one SIMD batch (a power of two), or 0 for
    /// a GPU. With a batch size, each batch walks a contiguous block of its own
    /// (in the elementwise passes over channels-first tensors, a block of the flat
    /// tensor, across channel runs); with 0, each step of a workgroup reads one
    /// contiguous row.
    pub lane_block: u32,
    /// Widest channels-last tile, in channel units (a power of two).
    pub max_row_tile: u32,
    /// Widest row, in bytes, read 16 elements (four vec4) per invocation instead of
    /// 4 (channels-last tensors with `C % 16 == 0` and, in the elementwise passes,
    /// channels-first ones read as rows, `C * S % 16 == 0`), so that a SIMD batch
    /// reads 512 contiguous bytes of a row per step rather than 128; 0 for none.
    /// The statistics read channels-first tensors as rows 16 elements per
    /// invocation whatever the row's width, unless this is 0.
    pub max_wide_row: u32,
    /// Work each invocation of such a 16-element walk should get, in vec4s, where
    /// that is more than `min_units`, as long as the launch keeps `min_workgroups`.
    pub wide_min_units: u32,
    /// Channels-last walks: bytes of rows (rows times the row's bytes) each
    /// invocation should span at least, raising `min_units` where rows are narrow,
    /// as long as the launch keeps `min_workgroups`; 0 for no such bound. On a CPU
    /// adapter a SIMD batch reads a row segment and steps to the next row, and
    /// longer walks pay better for its start.
    pub min_row_span: u32,
    /// A floor on the splits that `wide_min_units` and `min_row_span` leave: they
    /// lengthen walks only as long as the launch may still have this many
    /// workgroups (where the tensor has the rows for them, and `target_workgroups`
    /// asks for as many); on a CPU adapter, enough to keep its threads busy.
    pub min_workgroups: u32,
    /// Reductions keep each channel in one workgroup (no splits, so no partial
    /// results: the statistics finalize in place or fuse with the normalize) while
    /// a channel has at most this many elements and the launch still has
    /// `min_workgroups` workgroups; 0 for never.
    pub whole_channel_elements: u32,
}

/// The launch geometry of the kernels: one [`Cut`] for the reductions (batch
/// statistics, backward sums: every workgroup ends in a barrier tree and writes
/// partial results that a second pass merges) and one for the elementwise passes
/// (normalize, dx, and the copy kernel the benchmarks compare with).
///
/// Results do not depend on the tuning beyond float rounding (each tuning is
/// deterministic on its own). [`GpuContext`](crate::GpuContext) picks
/// [`Tuning::for_adapter`]; [`GpuContext::with_tuning`](crate::GpuContext::with_tuning)
/// overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Cut of the reductions.
    pub reduce: Cut,
    /// Cut of the elementwise passes.
    pub elementwise: Cut,
    /// A forward with batch statistics on a tensor of at most this many elements
    /// runs as one dispatch (statistics, finalize and normalize; `stats.wgsl`'s
    /// fused kernel) where the reduction's cut gives every workgroup whole
    /// channels; so does a backward of batch statistics that wants dx
    /// (`backward_reduce.wgsl`'s fused kernel: sums, dgamma/dbeta, dx). Larger ones (every one when 0) run as two where the statistics
    /// walk does so in a variant that `stats.wgsl`'s `finalized_*` kernels have
    /// (the statistics finalized in place, then normalize) and as three elsewhere
    /// (statistics, finalize, normalize); an update of the running statistics as a
    /// cumulative average always takes the three (it reads the batch count that the
    /// statistics pass increments). The fused kernel saves two launches and re-reads a
    /// workgroup's channels from cache, but normalizes along the reduction's walk,
    /// after its barriers.
    pub fused_forward_max_elements: u64,
    /// An eval forward (running statistics) of at most this many elements runs as
    /// one dispatch, each invocation computing its channels' coefficients from the
    /// running statistics; larger ones, and every one when 0, fold them once per
    /// channel in a dispatch of their own first (`finalize`'s `eval`), since many
    /// short invocations would repeat that work.
    pub fused_eval_max_elements: u64,
    /// The reductions (statistics, backward sums) first merge the rows a subgroup
    /// holds by shuffles, without barriers, then one state per subgroup through
    /// workgroup memory, where the device has `wgpu::Features::SUBGROUP` (and its
    /// subgroups are runs of consecutive invocations, which the kernels check);
    /// `false`: through workgroup memory only, as on devices without subgroups.
    /// Both orders are fixed (the same bits on every run), not the same as each
    /// other.
    pub subgroups: bool,
    /// f16 tensors as WGSL's f16 where the device has `wgpu::Features::SHADER_F16`;
    /// `false` (or a device without it): two per u32, packed and unpacked by the
    /// kernels, as bf16 always is. Both round the same way.
    pub native_f16: bool,
    /// Where the reduction of a training forward or of a backward writes partials
    /// and the elementwise cut is a GPU's (no `lane_block`), the normalize or dx
    /// pass merges them itself: two dispatches instead of three (statistics or
    /// sums, finalize, then the elementwise pass); channels-last in tiles of 16
    /// channels whose re-read of partials is bounded. `false`: the three, e.g. to
    /// time one against the other (the report's `--unfused`).
    pub merge_partials: bool,
}

impl Tuning {
    /// For a GPU: many workgroups in flight (about 2048 per launch), at least 8
    /// units per invocation, each step of a workgroup on one contiguous row. The
    /// reductions keep channels of up to 32768 elements (128 KiB) whole in a
    /// workgroup where that still launches 256 workgroups (two per SM of a large
    /// GPU): then a training forward of up to 2^23 elements (32 MiB, within a large
    /// GPU's L2 cache, where the fused kernel's second read of its channels finds
    /// them) is one fused dispatch, and a larger one two (the statistics finalized
    /// in place, then normalize). Eval forwards are one dispatch at any size. These
    /// thresholds follow from cache and SM counts, not from timings.
    pub fn gpu() -> Self {
        let cut = Cut {
            target_workgroups: 2048,
            min_units: 8,
            lane_block: 0,
            max_row_tile: 64,
            runs_min_units: 0,
            max_wide_row: 0,
            wide_min_units: 8,
            min_row_span: 0,
            min_workgroups: 1,
            whole_channel_elements: 0,
        };
        Self {
            reduce: Cut {
                whole_channel_elements: 32768,
                min_workgroups: 256,
                ..cut
            },
            elementwise: cut,
            fused_forward_max_elements: 1 << 23,
            // An eval forward is one dispatch at any size: each invocation folds its
            // channels' running statistics (a square root per walk, not per element)
            // instead of waiting for a dispatch that does.
            fused_eval_max_elements: u64::MAX,
            subgroups: true,
            native_f16: true,
            merge_partials: true,
        }
    }

    /// For a CPU that runs the shaders (lavapipe, llvmpipe, WARP) in SIMD batches
    /// of `simd_width` invocations: it has a few threads, runs a workgroup one batch
    /// after another and pays for every barrier. Its reductions get few, long
    /// workgroups (about 32, at least 64 vec4s per invocation, channels-first 256
    /// while the launch keeps a workgroup per thread); channels-last rows of
    /// up to 8 KiB are read 16 channels per invocation there, aiming at 512 rows per
    /// invocation while the launch keeps a workgroup per thread, and only where the
    /// walks reach 128 rows. Its elementwise passes get about 1024 workgroups of at
    /// least 32 vec4s per invocation, with wide channels-last tiles read 16 channels
    /// per invocation over at least 32 KiB of rows, keeping 4 workgroups per thread;
    /// and each batch streams through a block of memory of its own. Training
    /// forwards of up to 2^16 elements run as one fused dispatch: past that,
    /// normalizing after a barrier (which such adapters run as coroutines) costs more
    /// than the two launches it saves. Eval forwards of up to 2^19 elements run as
    /// one: past that, computing the coefficients in every invocation costs more
    /// than the launch it saves (both crossovers measured on lavapipe).
    ///
    /// The adapter's threads are taken from `LP_NUM_THREADS` where it is a plain
    /// decimal number (Mesa's lavapipe and llvmpipe read it; 0 runs them on the
    /// calling thread, counted as one), else to be this machine's logical CPUs
    /// (`std::thread::available_parallelism`, their default). Mesa also caps its
    /// threads at `LP_MAX_THREADS` (16 or 32, by release), which is not counted
    /// here: past it, the cut asks for more workgroups than the adapter has
    /// threads. So the cut, and with it the float rounding of the statistics, can
    /// differ from one machine to another (each is deterministic).
    pub fn cpu(simd_width: u32) -> Self {
        let lane_block = simd_width.clamp(1, WORKGROUP_SIZE).next_power_of_two();
        let logical_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = adapter_threads(
            std::env::var("LP_NUM_THREADS").ok().as_deref(),
            u32::try_from(logical_cpus).unwrap_or(u32::MAX),
        );
        Self {
            reduce: Cut {
                target_workgroups: 32,
                min_units: 64,
                lane_block,
                max_row_tile: 64,
                runs_min_units: 256,
                max_wide_row: 8 << 10,
                wide_min_units: 2048,
                min_row_span: 0,
                min_workgroups: threads,
                whole_channel_elements: 0,
            },
            elementwise: Cut {
                target_workgroups: 1024,
                min_units: 32,
                lane_block,
                max_row_tile: 256,
                runs_min_units: 0,
                max_wide_row: u32::MAX,
                wide_min_units: 32,
                min_row_span: 32 << 10,
                min_workgroups: 4 * threads,
                whole_channel_elements: 0,
            },
            fused_forward_max_elements: 1 << 16,
            fused_eval_max_elements: 1 << 19,
            subgroups: true,
            native_f16: true,
            merge_partials: true,
        }
    }

    /// [`Tuning::cpu`] for CPU adapters (their SIMD width is the subgroup size),
    /// [`Tuning::gpu`] for every other adapter.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        match info.device_type {
            wgpu::DeviceType::Cpu => Self::cpu(info.subgroup_min_size),
            _ => Self::gpu(),
        }
    }
}

/// The threads a CPU adapter runs workgroups on: `lp_num_threads` (the value of
/// `LP_NUM_THREADS`) where it is a number, at least one; else `logical_cpus`.
fn adapter_threads(lp_num_threads: Option<&str>, logical_cpus: u32) -> u32 {
    lp_num_threads
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(logical_cpus)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::adapter_threads;

    #[test]
    fn lp_num_threads_sets_the_adapter_threads() {
        assert_eq!(adapter_threads(None, 8), 8);
        assert_eq!(adapter_threads(Some("3"), 8), 3);
        assert_eq!(adapter_threads(Some(" 12 "), 2), 12);
        // 0: Mesa runs the shaders on the calling thread.
        assert_eq!(adapter_threads(Some("0"), 8), 1);
        // Not a number: Mesa's default, one per logical CPU.
        assert_eq!(adapter_threads(Some("many"), 8), 8);
        assert_eq!(adapter_threads(Some(""), 4), 4);
        assert_eq!(adapter_threads(None, 0), 1);
    }
}
