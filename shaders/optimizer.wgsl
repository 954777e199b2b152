// One optimizer step on gamma and beta: PyTorch's torch.optim.SGD (`sgd`) and
// torch.optim.Adam without amsgrad (`adam`).
//
// One invocation per channel c: updates gamma[c] and beta[c] in place, each from
// its gradient and its own optimizer state. For a parameter w with gradient g:
//   g = g + weight_decay * w                      (with OPTIMIZER_WEIGHT_DECAY)
// `sgd`, with OPTIMIZER_MOMENTUM (a momentum buffer b):
//   b = g on the first step (OPTIMIZER_FIRST_STEP), else
//   b = momentum * b + (1 - dampening) * g,
//   g = g + momentum * b (OPTIMIZER_NESTEROV) or g = b;
//   then w = w - lr * g.
// `adam` (moments m, v; bias corrections of step t computed by the host):
//   m = m + (1 - beta1) * (g - m)     v = beta2 * v + (1 - beta2) * g * g
//   w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
//
// Reads dgamma and dbeta (C f32 each); reads and writes affine = [gamma | beta] and
// state, whose segments are `padded` apart: SGD [b_gamma | b_beta] (unused without
// momentum), Adam [m_gamma | m_beta | v_gamma | v_beta].

struct OptimizerParams {
    channels: u32,
    padded: u32,
    flags: u32,              // OPTIMIZER_* bits (constants from the host)
    _pad0: u32,
    step_size: f32,          // SGD: lr; Adam: lr / (1 - beta1^t)
    weight_decay: f32,
    momentum: f32,           // SGD: momentum; Adam: beta1
    new_weight: f32,         // SGD: 1 - dampening; Adam: 1 - beta1
    beta2: f32,
    new_weight2: f32,        // 1 - beta2
    correction2_sqrt: f32,   // sqrt(1 - beta2^t)
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: OptimizerParams;
@group(0) @binding(1) var<storage, read> dgamma: array<f32>;
@group(0) @binding(2) var<storage, read> dbeta: array<f32>;
@group(0) @binding(3) var<storage, read_write> affine: array<f32>;
@group(0) @binding(4) var<storage, read_write> state: array<f32>;

// The gradient of the parameter at affine[i], with weight decay when asked.
fn decayed(grad: f32, i: u32) -> f32 {
    if (p.flags & OPTIMIZER_WEIGHT_DECAY) != 0u {
        return grad + p.weight_decay * affine[i];
    }
    return grad;
}

// SGD on the parameter at affine[i] (i = c for gamma, padded + c for beta), whose
// momentum buffer is state[i].
fn sgd_one(grad: f32, i: u32) {
    var g = decayed(grad, i);
    if (p.flags & OPTIMIZER_MOMENTUM) != 0u {
        var b = g;
        if (p.flags & OPTIMIZER_FIRST_STEP) == 0u {
            b = p.momentum * state[i] + p.new_weight * g;
        }
        state[i] = b;
        if (p.flags & OPTIMIZER_NESTEROV) != 0u {
            g = g + p.momentum * b;
        } else {
            g = b;
        }
    }
    affine[i] = affine[i] - p.step_size * g;
}

// Adam on the parameter at affine[i], whose moments are state[i] and
// state[2 * padded + i].
fn adam_one(grad: f32, i: u32) {
    let g = decayed(grad, i);
    let m = state[i] + p.new_weight * (g - state[i]);
    let v = p.beta2 * state[2u * p.padded + i] + p.new_weight2 * g * g;
    state[i] = m;
    state[2u * p.padded + i] = v;
    let denom = sqrt(v) / p.correction2_sqrt + p.eps;
    affine[i] = affine[i] - p.step_size * (m / denom);
}

@compute @workgroup_size(WG)
fn sgd(@builtin(local_invocation_index) lid: u32,
       @builtin(workgroup_id) wid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = invocation_linear(lid, wid, nwg);
    if c >= p.channels {
        return;
    }
    sgd_one(dgamma[c], c);
    sgd_one(dbeta[c], p.padded + c);
}

@compute @workgroup_size(WG)
fn adam(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = invocation_linear(lid, wid, nwg);
    if c >= p.channels {
        return;
    }
    adam_one(dgamma[c], c);
    adam_one(dbeta[c], p.padded + c);
}
