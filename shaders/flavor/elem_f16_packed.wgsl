// f16 tensors on devices without SHADER_F16: two halves per u32 (elem1 = u32, elem4 =
// vec2<u32>), element e in word e / 2, the even one in the low half, through WGSL's
// pack2x16float and unpack2x16float. Everything is computed in f32.

fn word(e: u32) -> u32 {
    return e / 2u;
}

fn ld1(w: u32, e: u32) -> f32 {
    let v = unpack2x16float(w);
    return select(v.x, v.y, (e & 1u) != 0u);
}

fn ld4(v: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

// The 16 bits of v rounded to f16.
fn bits16(v: f32) -> u32 {
    return pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu;
}

fn st4(v: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw));
}
