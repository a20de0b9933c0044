// Adam / AdamW element math, the formulas of torch.optim.Adam(W): eps is added after the
// bias-corrected square root, the decay is decoupled (AdamW) or added to the gradient (Adam).
#pragma once
#include "common.h"
#include "pyengine/core.h"

namespace pyengine::kernels {

// Per-launch constants, derived once from the (device-resident) step count.
// Note: the decay is folded into two coefficients (p *= decay_mul; g += l2 * p) so the
// element loop has no branch and vectorizes; for finite weights x*1 and g+0*p are exact,
// so this equals torch's "skip when weight_decay == 0".
struct AdamCoeffs {
  float beta1, beta2, eps, step_size, bias_correction2_sqrt, decay_mul, l2;
};

// `step` is the 1-based index of the step being taken.
PE_HD AdamCoeffs adam_coeffs(const AdamConfig& c, float step) {
  float bc1 = 1.0f - powf(c.beta1, step);
  float bc2 = 1.0f - powf(c.beta2, step);
  float decay_mul = c.decoupled ? 1.0f - c.lr * c.weight_decay : 1.0f;
  float l2 = c.decoupled ? 0.0f : c.weight_decay;
  return {c.beta1, c.beta2, c.eps, c.lr / bc1, sqrt_(bc2), decay_mul, l2};
}

// g: the gradient already multiplied by the unscale/clip factor.
PE_HD void adam_update(float& p, float& m, float& v, float g, const AdamCoeffs& k) {
  p = p * k.decay_mul;
  g = g + k.l2 * p;
  m = k.beta1 * m + (1.0f - k.beta1) * g;
  v = k.beta2 * v + (1.0f - k.beta2) * g * g;
  float denom = sqrt_(v) / k.bias_correction2_sqrt + k.eps;
  p = p - k.step_size * (m / denom);
}

// One element of the fused pass: (master, exp_avg, exp_avg_sq, raw grad, model copy).
struct AdamElem {
  AdamCoeffs k;
  float grad_scale;
  PE_HD void operator()(float& p, float& m, float& v, float g, float& model) const {
    adam_update(p, m, v, g * grad_scale, k);
    model = p;
  }
};

}  // namespace pyengine::kernels
