//! Host side of `shaders/common.wgsl`: the walk every per-element kernel shares
//! (how a tensor is cut into workgroups, after the context's [`Cut`]) and the entry
//! points each of those kernels has.

use super::Module;
use super::{Access, Kernel, WORKGROUP_SIZE};
use crate::{Cut, Layout, Shape};
use std::sync::Arc;

/// Mirrors `WalkParams` in common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct WalkParams {
    pub groups: u32,
    pub splits: u32,
    pub per_channel: u32,
    pub chunk: u32,
    pub len: u32,
    pub stride: u32,
    pub tile: u32,
    pub block: u32,
    pub block_len: u32,
    pub step_n: u32,
    pub step_s: u32,
    pub padded: u32,
    pub flags: u32,
    pub count_index: u32,
    pub runs: u32,
    pub run: u32,
    pub rep: u32,
    pub eps: f32,
    pub channels: u32,
}

/// How a kernel reads the tensor: its entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// vec4 units inside one channel (channels-first, `S % 4 == 0`).
    ChannelsFirstVec4,
    /// The elementwise passes over channels-first tensors with `S % 4 == 0` on CPU
    /// adapters: the tensor as one channel unit of `N * C` runs (a flat walk, as
    /// the copy's), each lane tracking the channel of its run.
    ChannelsFirstFlat,
    /// Up to four f32 of one run as a unit (channels-first, `S % 4 != 0`).
    ChannelsFirstQuad,
    /// The backward sums over channels-first tensors with `S % 4 != 0` but `C % 4 == 0`:
    /// a channel unit is four consecutive channels, whose runs in a batch item are
    /// `S` vec4s; each element's channel follows from its place in them.
    ChannelsFirstPacked,
    /// vec4 units of four adjacent channels (channels-last, `C % 4 == 0`).
    ChannelsLastVec4,
    /// Four vec4 of sixteen adjacent channels (channels-last, `C % 16 == 0`, rows of
    /// at most `Cut::max_wide_row` bytes; not the fused forward, and in the
    /// reductions only for walks of at least [`WIDE_REDUCTION_MIN_WALK`] vec4s).
    ChannelsLastVec16,
    /// Elementwise passes over channels-first tensors with `S % 4 != 0` but
    /// `C * S % 4 == 0`: a batch item read as a channels-last row, a channel every S.
    ChannelsFirstRowsVec4,
    /// The same, 16 elements per invocation (`C * S % 16 == 0`,
    /// `S >= ROWS_VEC16_MIN_RUN`; rows of at most `Cut::max_wide_row` bytes, and in
    /// the statistics wherever that is not 0, writing partials per unit).
    ChannelsFirstRowsVec16,
    /// f32 units (channels-last, `C % 4 != 0`).
    Scalar,
}

/// A walk's launch: its parameters and entry point.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WalkPlan {
    pub params: WalkParams,
    pub variant: Variant,
}

impl WalkPlan {
    /// Workgroups of the launch: every tile of channel units, split.
    pub fn workgroups(&self) -> u32 {
        let p = &self.params;
        p.groups.div_ceil(p.tile) * p.splits
    }

    /// Partials a reduction over this walk writes per channel, consecutive: one per
    /// split, or for the statistics in the rows view one per split and element
    /// position of the channel's run (`splits * S`); in the rows view in 16-element
    /// units, per unit and channel ([`Self::unit_pairs`]).
    pub fn partials_per_channel(&self) -> u32 {
        match self.variant {
            Variant::ChannelsFirstRowsVec4 => self.params.splits * self.params.rep,
            _ => self.params.splits,
        }
    }

    /// For the statistics in the rows view in 16-element units, S: each unit writes
    /// `splits` partials for each of the two channels its elements may lie in, and
    /// `finalize` finds a channel's by its units. Else 0.
    pub fn unit_pairs(&self) -> u32 {
        match self.variant {
            Variant::ChannelsFirstRowsVec16 => self.params.rep,
            _ => 0,
        }
    }

    /// Partials a reduction over this walk writes: `C * partials_per_channel()`, or
    /// with [`Self::unit_pairs`] two per unit and split.
    pub fn partial_count(&self, channels: usize) -> u64 {
        if self.unit_pairs() != 0 {
            return 2 * u64::from(self.params.groups) * u64::from(self.params.splits);
        }
        channels as u64 * u64::from(self.partials_per_channel())
    }
}

/// Which kind of kernel walks the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// stats: partial Welford states per channel (or per element position).
    Statistics,
    /// stats' fused forward: partial states per channel, whole channels per workgroup.
    FusedForward,
    /// backward_reduce: partial sums per channel.
    Sums,
    /// apply, backward_dx: each element on its own.
    Elementwise,
}

/// Vec4s (128 rows of 16 channels) each invocation of a reduction must walk for it
/// to read channels-last rows 16 channels per invocation: its four barrier trees
/// (one per vec4 of states) cost more than the wider loads save on shorter walks
/// (on lavapipe: walks of 16 rows lost about 0.1 of a copy's speed; walks of 32 rows
/// lost on rows of 4 and 8 KiB, as on (256, 1024) and (128, 2048), and the smaller
/// tensors with narrower rows whose walks stay under 128 rows were no slower in
/// vec4s).
const WIDE_REDUCTION_MIN_WALK: u32 = 512;

/// Batch items per split (at least) for the statistics pass to read channels-first
/// tensors with S % 4 != 0 as rows: it writes a 16-byte partial per element position
/// of a batch item and split, so the partials are at most a quarter of the tensor.
const STATS_ROWS_MIN_BATCH: u32 = 16;

/// The same for the rows view in 16-element units, which writes two partials per
/// unit and split (at most a sixteenth of the tensor from 8 batch items per split).
/// On lavapipe its walks gained on the quads from 8 batch items (8x2048x7x7
/// forward-train 0.66 → 0.75–0.78 of a copy, 12x1024x7x7 0.65 → 0.75–0.78) and lost below
/// (4x2048x5x5 0.59 → 0.56, 2x2048x7x7 0.56 → 0.44).
const STATS_ROWS16_MIN_BATCH: u32 = 8;

/// Most partial results a reduction writes per channel (its splits; in the rows
/// view, splits times positions): finalize.wgsl and backward_finalize.wgsl merge a
/// channel's partials with [`MERGE_LANES`] invocations, so no invocation walks more
/// than `MAX_PARTIALS / MERGE_LANES` of them, and the partials stay a small
/// fraction of the tensor (PyTorch's channels-last reductions cap their blocks per
/// channel at 128 likewise). Past this, more splits would only add merge work: a
/// launch has parallelism enough from the channels and the 256 invocations per
/// workgroup.
pub(crate) const MAX_PARTIALS: u32 = 128;

/// Fewest elements of a channel a reduction's split covers on a GPU: a partial (16
/// bytes, written and read back) then costs at most an eighth of the 256 bytes of
/// the channel it sums, about 4% of a training forward's floor bytes (3 streams) and
/// 2.5% of a backward's (5). (CPU adapters, whose cuts aim at a few long
/// workgroups per thread, split only as far as those need.)
pub(crate) const SPLIT_MIN_ELEMENTS: u32 = 64;

/// Most splits of a reduction over `elements` elements per channel with `per_split`
/// partials per channel and split.
fn max_splits(tuning: Cut, elements: u32, per_split: u32) -> u32 {
    let cap = MAX_PARTIALS / per_split.max(1);
    if tuning.lane_block == 0 {
        cap.min(elements / SPLIT_MIN_ELEMENTS)
    } else {
        cap
    }
}

/// Invocations that merge one channel's partials on a GPU (the `MERGE_LANES`
/// override of finalize.wgsl and backward_finalize.wgsl): a SIMD group, so that a
/// channel's partials, consecutive in memory, are read in one coalesced load per
/// lane step. CPU adapters (a cut with a `lane_block`) merge with one invocation per
/// channel: there a barrier costs more than a serial walk of their few partials.
pub(crate) const MERGE_LANES: u32 = 32;

/// Merge lanes for a reduction cut: [`MERGE_LANES`] on GPUs, 1 on CPU adapters.
pub(crate) fn merge_lanes(cut: Cut) -> u32 {
    if cut.lane_block == 0 {
        MERGE_LANES
    } else {
        1
    }
}

/// Elements per unit of the rows view's 16-element walks
/// ([`Variant::ChannelsFirstRowsVec16`]; `ROW_UNIT` in WGSL, where finalize.wgsl
/// finds the statistics' partials by unit).
pub(crate) const ROW_UNIT: u32 = 16;

/// Elements per channel (S) for the rows view to read [`ROW_UNIT`] elements per
/// invocation: its kernels pick each element's per-channel values between two
/// channels, and 16 consecutive elements lie in two channels at most where S ≥ 15
/// (four, from a multiple of 4, always do).
const ROWS_VEC16_MIN_RUN: u32 = ROW_UNIT - 1;

/// The walk of `shape`: vec4 units where the layout allows, then [`plan_units`].
/// A channels-first tensor without spatial dims is the same memory as a
/// channels-last one, and is walked as such. One whose runs are not whole vec4s
/// (S % 4 != 0) but whose batch items are (C * S % 4 == 0) is read as rows of C * S
/// elements, a channel every S, by the elementwise passes, and by the statistics
/// pass where the batch is large enough for its partials per element position
/// ([`STATS_ROWS_MIN_BATCH`]), or for 16-element units per unit
/// ([`STATS_ROWS16_MIN_BATCH`], where `tuning.max_wide_row` is not 0); the
/// backward sums read it in vec4s where C % 4 == 0, four channels' runs (S vec4s)
/// per channel unit. Other such tensors are read in quads. On CPU adapters the
/// elementwise passes walk channels-first tensors with S % 4 == 0 flat
/// ([`flat_runs`]). Rows of at most `tuning.max_wide_row` bytes are read 16
/// elements per invocation where C % 16 == 0 (for the rows view C * S, and S ≥
/// [`ROWS_VEC16_MIN_RUN`]): by the elementwise passes always, by the reductions
/// over channels-last rows where each invocation walks at least
/// [`WIDE_REDUCTION_MIN_WALK`] vec4s, never by the fused forward (which has no
/// such kernel). `padded` is the stride of the per-channel vectors (C rounded up
/// to 4).
pub(crate) fn plan(shape: &Shape, padded: u32, tuning: Cut, pass: Pass) -> WalkPlan {
    let (n, c, s) = (
        shape.n() as u32,
        shape.c() as u32,
        shape.spatial_size() as u32,
    );
    let channels_last = shape.layout() == Layout::ChannelsLast || s == 1;
    let odd_runs = !channels_last && s % 4 != 0;
    let rows_vec16 = s >= ROWS_VEC16_MIN_RUN && (c * s) % ROW_UNIT == 0;
    // Where the cut keeps channels whole, the quads' walk needs no partials (its
    // statistics finalize in place or fuse with the normalize). The statistics' rows
    // view, which writes partials per element position and serves CPU adapters'
    // SIMD batches, is for CPU cuts (a lane block) only: on a GPU cut it would write
    // a partial per position of small batches from a few workgroups.
    let quads_whole = tuning.whole_channel_elements > 0
        && plan_units(Units::quads(c, s, n), padded, tuning).splits == 1;
    let stats_rows = tuning.lane_block != 0 && !quads_whole;
    if odd_runs && pass == Pass::Statistics && (c * s) % 4 == 0 && stats_rows {
        let (variant, units) = if rows_vec16 && tuning.max_wide_row > 0 {
            let units = Units::rows(c * s / ROW_UNIT, n, ROW_UNIT).channel_every(s);
            (Variant::ChannelsFirstRowsVec16, units)
        } else {
            let units = Units::rows(c * s / 4, n, 4).channel_every(s);
            (Variant::ChannelsFirstRowsVec4, units)
        };
        // Partials per channel and split: its positions, or the units it spans.
        let per_split = match variant {
            Variant::ChannelsFirstRowsVec16 => s.div_ceil(ROW_UNIT) + 1,
            _ => s,
        };
        let mut params = plan_units(units, padded, tuning);
        cap_splits(&mut params, max_splits(tuning, n * s, per_split));
        let min_batch = match variant {
            Variant::ChannelsFirstRowsVec16 => STATS_ROWS16_MIN_BATCH,
            _ => STATS_ROWS_MIN_BATCH,
        };
        if per_split <= MAX_PARTIALS && n >= min_batch * params.splits {
            return WalkPlan { params, variant };
        }
    }
    let wide = |row_elements: u32| 4 * u64::from(row_elements) <= u64::from(tuning.max_wide_row);
    let reduction = pass != Pass::Elementwise;
    let cut = |units: Units| {
        let mut params = plan_units(units, padded, tuning);
        if reduction {
            cap_splits(&mut params, max_splits(tuning, n * s, 1));
        }
        params
    };
    if channels_last && c % 16 == 0 && wide(c) && pass != Pass::FusedForward {
        let params = cut(Units::rows(c / 16, n * s, 16));
        let walk_vec4s = 4 * params.chunk.div_ceil(WORKGROUP_SIZE / params.tile);
        if pass == Pass::Elementwise || walk_vec4s >= WIDE_REDUCTION_MIN_WALK {
            return WalkPlan {
                params,
                variant: Variant::ChannelsLastVec16,
            };
        }
    }
    let runs_as_rows = odd_runs && pass == Pass::Elementwise;
    let (variant, units) = if runs_as_rows && rows_vec16 && wide(c * s) {
        let units = Units::rows(c * s / ROW_UNIT, n, ROW_UNIT).channel_every(s);
        (Variant::ChannelsFirstRowsVec16, units)
    } else if runs_as_rows && (c * s) % 4 == 0 {
        let units = Units::rows(c * s / 4, n, 4).channel_every(s);
        (Variant::ChannelsFirstRowsVec4, units)
    } else if channels_last {
        if c % 4 == 0 {
            (Variant::ChannelsLastVec4, Units::rows(c / 4, n * s, 4))
        } else {
            (Variant::Scalar, Units::rows(c, n * s, 1))
        }
    } else if s % 4 == 0 && pass == Pass::Elementwise && flat_runs(s / 4, tuning) {
        (Variant::ChannelsFirstFlat, Units::flat(c, s / 4, n))
    } else if s % 4 == 0 {
        (Variant::ChannelsFirstVec4, Units::runs(c, s / 4, n))
    } else if pass == Pass::Sums && c % 4 == 0 && !quads_whole {
        let units = Units::runs(c / 4, s, n).channel_every(s);
        (Variant::ChannelsFirstPacked, units)
    } else {
        (Variant::ChannelsFirstQuad, Units::quads(c, s, n))
    };
    WalkPlan {
        params: cut(units),
        variant,
    }
}

/// Channels a merged elementwise walk's workgroup merges (its tile's): at most one
/// per invocation.
pub(crate) fn merged_channels(plan: &WalkPlan) -> u32 {
    match plan.variant {
        Variant::ChannelsLastVec4 => 4 * plan.params.tile,
        _ => plan.params.tile,
    }
}

/// Channels per workgroup of a merged channels-last walk ([`plan_merged_rows`]): 64
/// bytes of an f32 row (two 32-byte memory sectors, read whole), few enough that
/// the channels alone give a launch many workgroups, so that the splits, whose
/// product the re-read partials grow with, stay few.
pub(crate) const MERGED_ROW_CHANNELS: u32 = 16;

/// The partials that every workgroup of a merged pass re-reads (those of its
/// channels, from each split of the reduction), all workgroups together, are at
/// most 1 / MERGED_REREAD of the tensor's bytes: under 2% of a training forward's
/// floor bytes (3 streams), 1.25% of a backward's (5), and reads of a few hundred
/// KiB that a GPU's L2 holds.
pub(crate) const MERGED_REREAD: u64 = 16;

/// The two walks of a channels-last operation (`(N, C)` too) in two dispatches where
/// the elementwise cut is a GPU's (no `lane_block`): the reduction's (`Statistics` or
/// `Sums`, writing partials) and the elementwise pass's that merges them in its
/// prologue (apply.wgsl's and backward_dx.wgsl's `merged_*`). Both take tiles of
/// [`MERGED_ROW_CHANNELS`] channels (vec4 units where `C % 4 == 0`, else f32), so
/// that a workgroup of the elementwise pass merges only its tile's partials, and
/// splits chosen together: their product bounds the partials re-read (every
/// workgroup of the elementwise pass reads its channels' partials of every split
/// of the reduction) to [`MERGED_REREAD`]; within that, as even as each pass's own
/// bounds allow (at most [`MAX_PARTIALS`] reduction splits, and `min_units` per
/// invocation). `None` for channels-first tensors with spatial dims, and for an
/// elementwise cut with a `lane_block` (a CPU adapter's).
pub(crate) fn plan_merged_rows(
    shape: &Shape,
    padded: u32,
    reduce: Cut,
    elementwise: Cut,
) -> Option<(WalkPlan, WalkPlan)> {
    let (n, c, s) = (
        shape.n() as u32,
        shape.c() as u32,
        shape.spatial_size() as u32,
    );
    let channels_last = shape.layout() == Layout::ChannelsLast || s == 1;
    if !channels_last || elementwise.lane_block != 0 {
        return None;
    }
    let (variant, elements) = if c % 4 == 0 {
        (Variant::ChannelsLastVec4, 4)
    } else {
        (Variant::Scalar, 1)
    };
    let groups = c / elements;
    let units = Units::rows(groups, n * s, elements);
    let tile = (MERGED_ROW_CHANNELS / elements).min(groups.next_power_of_two());
    let rows = n * s;
    let rows_per_step = WORKGROUP_SIZE / tile;
    let tiles = groups.div_ceil(tile);
    // Splits of a pass: at most one per `min_units` units per invocation, and no
    // more than its target of workgroups asks for.
    let most = |cut: Cut| {
        let per_invocation = (4 * cut.min_units.clamp(1, 1 << 20)).div_ceil(elements);
        rows.div_ceil(rows_per_step.saturating_mul(per_invocation))
            .min(cut.target_workgroups.div_ceil(tiles))
            .max(1)
    };
    let reread_unit = u64::from(tiles * tile * elements) * 16 * MERGED_REREAD;
    let budget = (shape.bytes() / reread_unit).clamp(1, u64::from(u32::MAX)) as u32;
    let reduce_splits = most(reduce).min(MAX_PARTIALS).min(budget.isqrt().max(1));
    let elementwise_splits = most(elementwise).min(budget / reduce_splits).max(1);
    let walk = |splits: u32| WalkPlan {
        params: rows_walk(units, padded, tile, splits),
        variant,
    };
    Some((walk(reduce_splits), walk(elementwise_splits)))
}

/// The walk of channels-last `units` on a GPU in tiles of `tile` channel units and
/// `splits` chunks of rows (a block spanning the workgroup's rows, as
/// [`plan_units`] gives without a lane block).
fn rows_walk(units: Units, padded: u32, tile: u32, splits: u32) -> WalkParams {
    walk_params(units, padded, tile, splits, WORKGROUP_SIZE / tile)
}

/// The parameters of a walk of `units` in tiles of `tile` channel units, each cut
/// into about `splits` chunks (as many as equal chunks give), lane blocks of
/// `block` rows.
fn walk_params(units: Units, padded: u32, tile: u32, splits: u32, block: u32) -> WalkParams {
    let per_channel = units.per_channel;
    let rows_per_step = WORKGROUP_SIZE / tile;
    let chunk = per_channel.div_ceil(splits.max(1)).max(1);
    WalkParams {
        groups: units.groups,
        splits: per_channel.div_ceil(chunk).max(1),
        per_channel,
        chunk,
        len: units.len,
        stride: units.stride,
        tile,
        block,
        block_len: chunk.div_ceil(rows_per_step / block),
        step_n: block / units.len,
        step_s: block % units.len,
        padded,
        flags: 0,
        count_index: 0,
        runs: u32::from(!units.interleaved),
        run: units.run,
        rep: units.rep,
        eps: 0.0,
        channels: units.channels,
    }
}

/// Fewer, longer splits where a walk has more than `max` (at least 1).
fn cap_splits(params: &mut WalkParams, max: u32) {
    let max = max.max(1);
    if params.splits <= max {
        return;
    }
    let rows_per_step = WORKGROUP_SIZE / params.tile;
    let chunk = params.per_channel.div_ceil(max);
    params.chunk = chunk;
    params.splits = params.per_channel.div_ceil(chunk);
    params.block_len = chunk.div_ceil(rows_per_step / params.block);
}

/// Whether an elementwise pass walks channels-first runs of `len` vec4s flat: on CPU
/// adapters (a SIMD batch per lane block), where each batch then streams through
/// contiguous memory across run ends instead of jumping to the channel's next run;
/// with runs at least a block long, so that a step enters at most one new run.
fn flat_runs(len: u32, tuning: Cut) -> bool {
    tuning.lane_block != 0 && len >= tuning.lane_block
}

/// The walk of a copy of `vec4s` vec4s: one channel unit of one run.
pub(crate) fn plan_flat(vec4s: u32, tuning: Cut) -> WalkPlan {
    WalkPlan {
        params: plan_units(Units::runs(1, vec4s, 1), 4, tuning),
        variant: Variant::ChannelsFirstVec4,
    }
}

/// How a tensor's units are arranged: `groups` channel units of `per_channel`
/// units each, in runs of `len`, `stride` apart.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Units {
    groups: u32,
    per_channel: u32,
    len: u32,
    stride: u32,
    /// Elements per run of a quad walk (0 otherwise).
    run: u32,
    /// Elements per unit: 1 (f32), 4 (vec4, quad) or 16 (four vec4).
    elements: u32,
    /// Consecutive elements per channel in a run or row (S for channels-first
    /// tensors read as rows or packed; else 1).
    rep: u32,
    /// Channel units side by side in memory (channels-last rows).
    interleaved: bool,
    /// Flat walks: C, whose runs follow each other (0 otherwise).
    channels: u32,
}

impl Units {
    /// Channels-last: `rows` rows of `groups` units of `elements` elements.
    fn rows(groups: u32, rows: u32, elements: u32) -> Self {
        Self {
            groups,
            per_channel: rows,
            len: 1,
            stride: groups,
            run: 0,
            elements,
            rep: 1,
            interleaved: true,
            channels: 0,
        }
    }

    /// Channels-first: `n` batch items of `groups` runs of `len` vec4 units.
    fn runs(groups: u32, len: u32, n: u32) -> Self {
        Self {
            groups,
            per_channel: n * len,
            len,
            stride: groups * len,
            run: 0,
            elements: 4,
            rep: 1,
            interleaved: false,
            channels: 0,
        }
    }

    /// Channels-first, walked flat: the `n * c` runs of `len` vec4 units as one
    /// channel unit, run `r` belonging to channel `r % c`.
    fn flat(c: u32, len: u32, n: u32) -> Self {
        Self {
            channels: c,
            ..Self::runs(1, len, n * c)
        }
    }

    /// The same units with a channel every `rep` elements of a run or row
    /// (channels-first tensors with S % 4 != 0 read as rows or packed: rep = S).
    fn channel_every(self, rep: u32) -> Self {
        Self { rep, ..self }
    }

    /// Channels-first in quads: `n` batch items of `groups` runs of `s` elements,
    /// each run ceil(s / 4) units.
    fn quads(groups: u32, s: u32, n: u32) -> Self {
        Self {
            stride: groups * s,
            run: s,
            ..Self::runs(groups, s.div_ceil(4), n)
        }
    }
}

/// Fewest bytes of a row a channels-last tile narrows to for whole channels (one
/// 32-byte memory sector of f32: 8 channels).
const WHOLE_ROW_MIN_BYTES: u32 = 32;

/// A channels-last tile of a reduction: `wide` (the usual), or, where a channel of
/// `per_channel` units of `elements` fits a workgroup (`whole_channel_elements`)
/// and a narrower tile (down to [`WHOLE_ROW_MIN_BYTES`] of a row, and no narrower
/// than `needed`) makes the tiles alone `min_workgroups`, the widest such tile:
/// then every workgroup holds whole channels (no partials; the training forward
/// and the backward fuse into one dispatch where they may), as channels-first
/// small planes do.
fn whole_row_tile(
    wide: u32,
    needed: u32,
    groups: u32,
    per_channel: u32,
    elements: u32,
    tuning: Cut,
) -> u32 {
    let fits =
        u64::from(per_channel) * u64::from(elements) <= u64::from(tuning.whole_channel_elements);
    if !fits || groups.div_ceil(wide) >= tuning.min_workgroups.max(1) {
        return wide;
    }
    let narrowest = (WHOLE_ROW_MIN_BYTES / (4 * elements)).max(needed).max(1);
    let mut tile = wide;
    while tile / 2 >= narrowest && groups.div_ceil(tile) < tuning.min_workgroups.max(1) {
        tile /= 2;
    }
    if groups.div_ceil(tile) >= tuning.min_workgroups.max(1) {
        tile
    } else {
        wide
    }
}

/// Cuts `units` into workgroups: `tile` channel units per workgroup, the fewest that
/// still give each invocation `tuning.min_units` vec4s' worth of units (channels-last tiles are at
/// least a row segment wide, for contiguous loads; channels-first ones at least
/// enough that the tiles are no more than `tuning.target_workgroups`); then each tile
/// split into chunks until the launch has about `tuning.target_workgroups` workgroups
/// (walks of 16 elements per unit: chunks of at least `tuning.wide_min_units` vec4s
/// per invocation; channels-last: of at least `tuning.min_row_span` bytes of rows;
/// either only as long as the launch keeps `tuning.min_workgroups`).
pub(crate) fn plan_units(units: Units, padded: u32, tuning: Cut) -> WalkParams {
    let wg = WORKGROUP_SIZE;
    let Units {
        groups,
        per_channel,
        stride,
        elements,
        interleaved,
        ..
    } = units;
    // Any Cut is accepted: the walk needs powers of two, which these round down to.
    let floor_pow2 = |v: u32| 1u32 << (31 - v.clamp(1, wg).leading_zeros());
    let max_row_tile = floor_pow2(tuning.max_row_tile);
    let lane_block = if tuning.lane_block == 0 {
        0
    } else {
        floor_pow2(tuning.lane_block)
    };
    let units_of = |vec4s: u32| (4 * vec4s.min(1 << 20)).div_ceil(elements).max(1);
    let min_units = units_of(tuning.min_units);
    // Channel units per tile that give each invocation `units` units.
    let needed_for = |units: u32| {
        (wg * units)
            .div_ceil(per_channel.max(1))
            .next_power_of_two()
            .min(wg)
    };
    let needed = needed_for(min_units);
    let runs_units = if !interleaved && tuning.runs_min_units > 0 {
        units_of(tuning.runs_min_units)
    } else {
        0
    };
    // Channels-first tiles also grow until the tiles alone are about the target
    // (without splits), so that many small channels are not cut into more, shorter
    // workgroups than the launch aims for; at most as many channels as leave each
    // a SIMD batch (or, on a GPU, 32 consecutive invocations) of rows.
    let spread = groups
        .div_ceil(tuning.target_workgroups.max(1))
        .next_power_of_two()
        .min(wg / if lane_block == 0 { 32 } else { lane_block });
    // With `runs_min_units`, channels-first tiles grow further for it, but only as
    // long as the launch keeps `min_workgroups` tiles (where there are channels
    // enough).
    let longer = if runs_units > 0 {
        let cap = floor_pow2((groups / tuning.min_workgroups.max(1)).max(1));
        needed_for(runs_units).min(cap)
    } else {
        0
    };
    let tile = if interleaved {
        let wide = needed.max(groups.next_power_of_two().min(max_row_tile));
        whole_row_tile(wide, needed, groups, per_channel, elements, tuning)
    } else {
        needed
            .max(spread)
            .max(longer)
            .min(groups.next_power_of_two())
    };
    let tiles = groups.div_ceil(tile);
    let rows_per_step = wg / tile;
    let max_splits = per_channel.div_ceil(rows_per_step * min_units).max(1);
    // Longer walks where the cut asks for them (channels-first: `runs_min_units`;
    // 16-element units: `wide_min_units`; channels-last: `min_row_span` bytes of
    // rows), unless that leaves fewer than `min_workgroups` workgroups (a bound on
    // the splits only, so that tiles stay as they are).
    let wide_units = if elements == 16 {
        units_of(tuning.wide_min_units)
    } else {
        0
    };
    let span_units = if interleaved && tuning.min_row_span > 0 {
        let row_bytes = 4 * u64::from(stride) * u64::from(elements);
        u64::from(tuning.min_row_span)
            .div_ceil(row_bytes)
            .min(1 << 20) as u32
    } else {
        0
    };
    let long_units = wide_units.max(span_units).max(runs_units);
    let max_splits = if long_units > 0 {
        per_channel
            .div_ceil(rows_per_step * long_units.max(min_units))
            .max(1)
            .max(tuning.min_workgroups.div_ceil(tiles))
            .min(max_splits)
    } else {
        max_splits
    };
    let whole_channels = u64::from(per_channel) * u64::from(elements)
        <= u64::from(tuning.whole_channel_elements)
        && tiles >= tuning.min_workgroups.max(1);
    let splits = if whole_channels {
        1
    } else {
        tuning
            .target_workgroups
            .div_ceil(tiles)
            .clamp(1, max_splits)
    };
    // A SIMD batch of `lane_block` consecutive invocations spans that many rows of
    // one channel unit (runs), or lane_block / tile rows (interleaved).
    let block = match (lane_block, interleaved) {
        (0, _) => rows_per_step,
        (b, true) => (b / tile).clamp(1, rows_per_step),
        (b, false) => b.min(rows_per_step),
    };
    walk_params(units, padded, tile, splits, block)
}

/// A kernel's [`WalkKernels`] built once for each listed setting of boolean
/// `override`s of its module: choices fixed per pipeline, so that no set carries
/// another's code, nor a branch on it in its loops (which a CPU adapter runs on
/// every step).
pub(crate) struct SwitchedWalkKernels {
    sets: Vec<(Vec<bool>, WalkKernels)>,
}

impl SwitchedWalkKernels {
    /// One set per entry of `settings` (a value for each of `switches`, in order),
    /// labelled `{name}.{entry}`, with the names of the switches set true between
    /// (`{name}.{switch}.{entry}`).
    pub(crate) fn new(
        module: &Arc<Module>,
        name: &str,
        bindings: &'static [Access],
        pass: Pass,
        switches: &[&str],
        settings: &[&[bool]],
    ) -> Self {
        let sets = settings
            .iter()
            .map(|setting| {
                let pairs = || switches.iter().copied().zip(setting.iter().copied());
                let overrides: Vec<(&str, f64)> = pairs()
                    .map(|(switch, on)| (switch, f64::from(u8::from(on))))
                    .collect();
                let on = pairs().filter(|&(_, on)| on).map(|(switch, _)| switch);
                let label = std::iter::once(name)
                    .chain(on)
                    .collect::<Vec<_>>()
                    .join(".");
                let kernels =
                    WalkKernels::with_overrides(module, &label, bindings, pass, &overrides);
                (setting.to_vec(), kernels)
            })
            .collect();
        Self { sets }
    }

    /// The pipelines built with `setting`; one that was not built is a bug of the
    /// caller.
    pub(crate) fn get(&self, setting: &[bool]) -> &WalkKernels {
        self.sets
            .iter()
            .find(|(s, _)| s.as_slice() == setting)
            .map(|(_, kernels)| kernels)
            .expect("the kernel's host module builds every setting it asks for")
    }
}

/// Entry points of a module for some walks only, one pipeline each (`{prefix}.{entry}`),
/// built with the same bindings and overrides.
pub(crate) struct VariantKernels {
    kernels: Vec<(Variant, Kernel)>,
}

impl VariantKernels {
    pub(crate) fn new(
        module: &Arc<Module>,
        prefix: &str,
        entries: &[(Variant, &str)],
        bindings: &'static [Access],
        overrides: &[(&str, f64)],
    ) -> Self {
        let kernels = entries
            .iter()
            .map(|&(variant, entry)| {
                let label = format!("{prefix}.{entry}");
                let kernel = Kernel::with_overrides(module, label, entry, bindings, overrides);
                (variant, kernel)
            })
            .collect();
        Self { kernels }
    }

    /// The pipeline for `variant`, if the module has that walk.
    pub(crate) fn get(&self, variant: Variant) -> Option<&Kernel> {
        self.kernels
            .iter()
            .find(|(v, _)| *v == variant)
            .map(|(_, kernel)| kernel)
    }
}

/// The entry points of a kernel that walks the tensor, one per [`Variant`].
pub(crate) struct WalkKernels {
    channels_first_vec4: Kernel,
    channels_first_quad: Kernel,
    /// Elementwise kernels only.
    flat: Option<Kernel>,
    channels_last_vec4: Kernel,
    channels_last_vec16: Kernel,
    scalar: Kernel,
    /// Backward sums only.
    packed: Option<Kernel>,
    /// Elementwise kernels and statistics.
    rows_vec4: Option<Kernel>,
    /// Elementwise kernels only.
    rows_vec16: Option<Kernel>,
}

impl WalkKernels {
    /// Pipelines for the entry points `channels_first_vec4`, `channels_first_quad`,
    /// `channels_last_vec4`, `channels_last_vec16` and `scalar` of `module`; for the
    /// backward sums also `channels_first_packed`, for the statistics
    /// `channels_first_rows_vec4` and `channels_first_rows_vec16`, for an elementwise
    /// pass those and `channels_first_flat`; labelled
    /// `{name}.{entry}`.
    pub(crate) fn new(
        module: &Arc<Module>,
        name: &str,
        bindings: &'static [Access],
        pass: Pass,
    ) -> Self {
        Self::with_overrides(module, name, bindings, pass, &[])
    }

    /// As [`Self::new`], with values for the module's `override` declarations.
    pub(crate) fn with_overrides(
        module: &Arc<Module>,
        name: &str,
        bindings: &'static [Access],
        pass: Pass,
        overrides: &[(&str, f64)],
    ) -> Self {
        let k = |entry: &str| {
            let label = format!("{name}.{entry}");
            Kernel::with_overrides(module, label, entry, bindings, overrides)
        };
        Self {
            channels_first_vec4: k("channels_first_vec4"),
            channels_first_quad: k("channels_first_quad"),
            channels_last_vec4: k("channels_last_vec4"),
            channels_last_vec16: k("channels_last_vec16"),
            scalar: k("scalar"),
            flat: (pass == Pass::Elementwise).then(|| k("channels_first_flat")),
            packed: (pass == Pass::Sums).then(|| k("channels_first_packed")),
            rows_vec4: matches!(pass, Pass::Elementwise | Pass::Statistics)
                .then(|| k("channels_first_rows_vec4")),
            rows_vec16: matches!(pass, Pass::Elementwise | Pass::Statistics)
                .then(|| k("channels_first_rows_vec16")),
        }
    }

    pub(crate) fn get(&self, variant: Variant) -> &Kernel {
        match variant {
            Variant::ChannelsFirstVec4 => &self.channels_first_vec4,
            Variant::ChannelsFirstQuad => &self.channels_first_quad,
            Variant::ChannelsLastVec4 => &self.channels_last_vec4,
            Variant::ChannelsLastVec16 => &self.channels_last_vec16,
            Variant::Scalar => &self.scalar,
            Variant::ChannelsFirstFlat => self
                .flat
                .as_ref()
                .expect("plan() gives flat walks to elementwise passes only"),
            Variant::ChannelsFirstPacked => self
                .packed
                .as_ref()
                .expect("plan() gives the packed variant to the backward sums only"),
            Variant::ChannelsFirstRowsVec4 => self
                .rows_vec4
                .as_ref()
                .expect("plan() gives rows of vec4 to elementwise passes and statistics only"),
            Variant::ChannelsFirstRowsVec16 => self
                .rows_vec16
                .as_ref()
                .expect("plan() gives rows of vec16 to elementwise passes and statistics only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Shape, Tuning};

    /// Partials a channel's merge reads: its splits (times positions in the rows
    /// view), or in 16-element units the units it spans times the splits.
    fn merged_per_channel(plan: &WalkPlan, s: u32) -> u32 {
        match plan.unit_pairs() {
            0 => plan.partials_per_channel(),
            _ => (s.div_ceil(ROW_UNIT) + 1) * plan.params.splits,
        }
    }

    #[test]
    fn reductions_write_at_most_max_partials_per_channel_and_few_bytes() {
        let finest = Cut {
            target_workgroups: 4096,
            min_units: 1,
            lane_block: 4,
            max_row_tile: 4,
            runs_min_units: 0,
            max_wide_row: u32::MAX,
            wide_min_units: 1,
            min_row_span: 0,
            min_workgroups: 0,
            whole_channel_elements: 0,
        };
        let mut most = 0;
        for cut in [Tuning::gpu().reduce, Tuning::cpu(8).reduce, finest] {
            for dims in [
                &[256, 1024][..],
                &[4096, 256],
                &[1 << 16, 3],
                &[32, 64, 112, 112],
                &[16, 64, 7, 7],
                &[32, 2048, 7, 7],
                &[256, 16, 15],
                &[16, 8, 30, 30],
                &[2, 4, 5],
                &[4096, 4, 11, 13],
            ] {
                for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                    let shape = Shape::new(dims, layout).unwrap();
                    let padded = (shape.c() as u32).next_multiple_of(4);
                    let s = shape.spatial_size() as u32;
                    for pass in [Pass::Statistics, Pass::Sums] {
                        let plan = plan(&shape, padded, cut, pass);
                        let per_channel = merged_per_channel(&plan, s);
                        most = most.max(per_channel);
                        assert!(
                            per_channel <= MAX_PARTIALS,
                            "{dims:?} {layout:?} {pass:?} {cut:?}: {per_channel} partials a channel"
                        );
                        let partial_bytes = 16 * plan.partial_count(shape.c());
                        assert!(
                            8 * partial_bytes <= shape.bytes().max(16 * 1024),
                            "{dims:?} {layout:?} {pass:?}: {partial_bytes} bytes of partials"
                        );
                    }
                }
            }
        }
        // The merges run with more partials than lanes somewhere (each lane then
        // merges several), so the GPU tests' tunings reach that path.
        assert!(most > MERGE_LANES, "{most}");
    }

    /// On the GPU cut, a channels-last reduction narrows its tiles (to 32 bytes of a
    /// row at least) where that gives whole channels in 256 workgroups: ResNet-50's
    /// 7x7 stage at batch 32 (2048 channels, 8 per tile); 14x14 (1024 channels would
    /// need 16-byte tiles) keeps its wide tiles and splits.
    #[test]
    fn channels_last_reductions_take_whole_channels_where_they_fit() {
        let cut = Tuning::gpu().reduce;
        let shape = Shape::channels_last(&[32, 2048, 7, 7]).unwrap();
        for pass in [Pass::Statistics, Pass::FusedForward, Pass::Sums] {
            let plan = plan(&shape, 2048, cut, pass);
            assert_eq!(plan.variant, Variant::ChannelsLastVec4);
            assert_eq!((plan.params.tile, plan.params.splits), (2, 1), "{pass:?}");
            assert_eq!(plan.workgroups(), 256);
        }
        let shape = Shape::channels_last(&[32, 1024, 14, 14]).unwrap();
        let plan = plan(&shape, 1024, cut, Pass::Statistics);
        assert_eq!(plan.params.tile, 64);
        assert!(plan.params.splits > 1);
        // The elementwise cut keeps wide tiles.
        let shape = Shape::channels_last(&[32, 2048, 7, 7]).unwrap();
        let plan = super::plan(&shape, 2048, Tuning::gpu().elementwise, Pass::Elementwise);
        assert_eq!(plan.params.tile, 64);
    }

    /// The merged channels-last walks re-read at most 1 / MERGED_REREAD of the
    /// tensor in partials, keep the reduction's splits under the cap, and give the
    /// large tensors of the default table hundreds of workgroups in both passes.
    #[test]
    fn merged_rows_walks_bound_their_rereads() {
        let t = Tuning::gpu();
        for dims in [
            &[256usize, 1024][..],
            &[4096, 256],
            &[1000, 255],
            &[32, 64, 112, 112],
            &[32, 256, 56, 56],
            &[32, 512, 28, 28],
            &[32, 1024, 14, 14],
            &[32, 2048, 7, 7],
            &[2, 32, 16, 32, 32],
            &[3, 7, 5, 5],
            &[1, 1, 1, 1],
        ] {
            let shape = Shape::channels_last(dims).unwrap();
            let c = shape.c() as u32;
            let padded = c.next_multiple_of(4);
            let (r, e) = plan_merged_rows(&shape, padded, t.reduce, t.elementwise).unwrap();
            assert_eq!((r.variant, r.params.tile), (e.variant, e.params.tile));
            assert!(r.params.splits <= MAX_PARTIALS, "{dims:?}");
            let channels = u64::from(e.params.groups.div_ceil(e.params.tile) * e.params.tile)
                * if e.variant == Variant::Scalar { 1 } else { 4 };
            let reread = channels * u64::from(e.params.splits) * u64::from(r.params.splits) * 16;
            assert!(
                reread <= (shape.bytes() / MERGED_REREAD).max(channels * 16),
                "{dims:?}: {reread} bytes re-read"
            );
            if shape.bytes() >= 64 << 20 {
                assert!(
                    r.workgroups() >= 256 && e.workgroups() >= 256,
                    "{dims:?}: {r:?} {e:?}"
                );
            }
            println!(
                "{dims:?}: tile {} reduce {} x {} wg, elementwise {} x {} wg, reread {:.4}",
                r.params.tile,
                r.params.splits,
                r.workgroups(),
                e.params.splits,
                e.workgroups(),
                reread as f64 / shape.bytes() as f64
            );
        }
        let cf = Shape::channels_first(&[8, 16, 4, 4]).unwrap();
        assert!(plan_merged_rows(&cf, 16, t.reduce, t.elementwise).is_none());
        let cpu = Tuning::cpu(8);
        let cl = Shape::channels_last(&[8, 16, 4, 4]).unwrap();
        assert!(plan_merged_rows(&cl, 16, cpu.reduce, cpu.elementwise).is_none());
    }
}
