// Tensors of a native float type (the host's aliases: elem1 = f32 or f16, elem4 its
// vec4): element e sits at index e. Everything is computed in f32: ld* widen a
// loaded value, st* round a result (to nearest even).

fn word(e: u32) -> u32 {
    return e;
}

fn ld1(v: elem1, e: u32) -> f32 {
    return f32(v);
}

fn ld4(v: elem4) -> vec4<f32> {
    return vec4<f32>(v);
}

fn st1(v: f32) -> elem1 {
    return elem1(v);
}

fn st4(v: vec4<f32>) -> elem4 {
    return elem4(v);
}
