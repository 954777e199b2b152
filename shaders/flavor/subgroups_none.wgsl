// Reductions merge through workgroup memory only (devices without SUBGROUP, or
// Tuning::subgroups off): no row is merged within a subgroup.

fn subgroup_rows(t: u32, unit: u32, rows: u32) -> u32 {
    return 1u;
}

fn shuffle_xor4(v: vec4<f32>, mask: u32) -> vec4<f32> {
    return v;
}
