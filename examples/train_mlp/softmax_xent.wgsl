// Softmax cross-entropy over a batch of logits (rows x classes, row-major) with
// integer labels: the gradient with respect to the logits, (softmax - one_hot) / rows,
// and one history entry (mean loss, fraction of rows whose largest logit is the label).
//
// One workgroup of WG invocations for the whole batch: invocation i takes rows i,
// i + WG, ...; the per-row losses and hits are summed in workgroup memory, and
// invocation 0 appends the entry at history.count, so a training loop records every step
// with no read-back and reads the history when it reports. Reads logits and labels
// (from label_off); writes grad and the history.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    classes: u32,
    label_off: u32,
    _pad: u32,
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
        let base = r * p.classes;
        let label = labels[p.label_off + r];
        var top = logits[base];
        var arg = 0u;
        for (var j = 1u; j < p.classes; j++) {
            let z = logits[base + j];
            if (z > top) {
                top = z;
                arg = j;
            }
        }
        var total = 0.0;
        for (var j = 0u; j < p.classes; j++) {
            total += exp(logits[base + j] - top);
        }
        for (var j = 0u; j < p.classes; j++) {
            let prob = exp(logits[base + j] - top) / total;
            grad[base + j] = (prob - select(0.0, 1.0, j == label)) * inv_rows;
        }
        let loss = log(total) + top - logits[base + label];
        acc += vec2<f32>(loss, select(0.0, 1.0, arg == label));
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
