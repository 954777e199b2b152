// bf16 tensors: two per u32 (elem1 = u32, elem4 = vec2<u32>), element e in word
// e / 2, the even one in the low half; a bf16 is the high half of an f32, rounded
// to nearest even (a NaN stays a quiet NaN). Everything is computed in f32.

fn word(e: u32) -> u32 {
    return e / 2u;
}

fn ld1(w: u32, e: u32) -> f32 {
    return bitcast<f32>((w >> (16u * (e % 2u))) << 16u);
}

fn ld4(v: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(bitcast<f32>(v.x << 16u), bitcast<f32>(v.x & 0xffff0000u),
                     bitcast<f32>(v.y << 16u), bitcast<f32>(v.y & 0xffff0000u));
}

// The 16 bits of v rounded to bf16.
fn bits16(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if (b & 0x7fffffffu) > 0x7f800000u {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn st4(v: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(bits16(v.x) | (bits16(v.y) << 16u), bits16(v.z) | (bits16(v.w) << 16u));
}
