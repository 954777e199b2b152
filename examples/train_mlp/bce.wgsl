// Binary cross-entropy on one logit per row (the sigmoid output of the Keras network
// folded into the loss, as Keras' from_logits and PyTorch's BCEWithLogitsLoss do, so
// large logits do not overflow), with 0/1 labels: the gradient with respect to the
// logit, (sigmoid(z) - y) / rows, and one history entry (mean loss, fraction of rows with
// (z > 0) == y).
//
// One workgroup of WG invocations for the whole batch, reduced and logged as in
// softmax_xent.wgsl. Reads logits and labels (from label_off); writes grad and the
// history.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    label_off: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Log {
    count: u32,
    _pad: u32,
    entries: array<vec2<f32>>,   // (mean loss, accuracy) per step
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> history: Log;

var<workgroup> sums: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    let inv_rows = 1.0 / f32(p.rows);
    var acc = vec2<f32>(0.0, 0.0);
    for (var r = lid; r < p.rows; r += WG) {
        let z = logits[r];
        let y = f32(labels[p.label_off + r]);
        // max(z, 0) - z y + log(1 + exp(-|z|)) = -(y log s + (1 - y) log(1 - s))
        let loss = max(z, 0.0) - z * y + log(1.0 + exp(-abs(z)));
        let s = 1.0 / (1.0 + exp(-z));
        grad[r] = (s - y) * inv_rows;
        acc += vec2<f32>(loss, select(0.0, 1.0, (z > 0.0) == (y > 0.5)));
    }
    sums[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sums[lid] += sums[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let i = history.count;
        if (i < arrayLength(&history.entries)) {
            history.entries[i] = sums[0] * inv_rows;
            history.count = i + 1u;
        }
    }
}
