// Reductions merge within subgroups first (prepended to
// stats.wgsl and backward_reduce.wgsl on devices with SUBGROUP): the rows of a
// channel unit that one subgroup holds exchange their states by shuffles, the
// smallest row distance first, with no barrier; the workgroup tree then merges one
// state per subgroup. The order is fixed for a given subgroup size (the same bits on
// every run). It relies on subgroups being runs of consecutive invocations of one
// size dividing the workgroup, which every invocation checks: where any subgroup of
// the workgroup is not, the whole workgroup merges through workgroup memory only.

var<workgroup> sg_fits: atomic<u32>;
var<workgroup> sg_size_seen: atomic<u32>;
var<workgroup> sg_span: u32;

// Rows of each channel unit that one subgroup merges itself: `unit` is the
// invocation distance of consecutive rows (1 when a unit's rows are consecutive
// invocations, the tile otherwise), `rows` the unit's rows. 1 where subgroups
// cannot serve (then the tree does everything). Uniform over the workgroup.
fn subgroup_rows(t: u32, unit: u32, rows: u32) -> u32 {
    let size = subgroupAdd(1u);
    let lane = subgroupExclusiveAdd(1u);
    let fits = lane == t % size && (size & (size - 1u)) == 0u && WG % size == 0u;
    let all_fit = subgroupAll(fits);
    if t == 0u {
        atomicStore(&sg_fits, 1u);
        atomicStore(&sg_size_seen, size);
    }
    workgroupBarrier();
    if !all_fit || atomicLoad(&sg_size_seen) != size {
        atomicStore(&sg_fits, 0u);
    }
    workgroupBarrier();
    if t == 0u {
        sg_span = select(1u, clamp(size / unit, 1u, rows), atomicLoad(&sg_fits) != 0u);
    }
    return workgroupUniformLoad(&sg_span);
}

// The value of the invocation `mask` away in the subgroup.
fn shuffle_xor4(v: vec4<f32>, mask: u32) -> vec4<f32> {
    return subgroupShuffleXor(v, mask);
}
