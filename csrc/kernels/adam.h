// Adam / AdamW element math, the formulas of torch.optim.Adam(W): eps is added after the
// bias-corrected square root, the decay is decoupled (AdamW) or added to the gradient (Adam).
#pragma once
#include <cstdint>

#include "common.h"
#include "prologue.h"

namespace pyengine::kernels {

// Per-launch constants, derived once from the hyper block and the step count.
// Note: the decay is folded into two coefficients (p *= decay_mul; g += l2 * p) so the
// element loop has no branch and vectorizes; for finite weights x*1 and g+0*p are exact,
// so this equals torch's "skip when weight_decay == 0".
struct AdamCoeffs {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay_mul, l2;
};

// Note: torch computes bias_correction1 = 1 - beta1**step, step_size = lr / bc1 and
// sqrt(1 - beta2**step) in Python floats (double) and hands them to the kernels as floats.
// So do we, from the exact int64 step: fp32 `1 - powf(beta, step)` loses most of its digits
// to the cancellation (at beta2 = 0.999, step 2, it is 1.5e-5 relative off).
struct BiasCorrection {
  float step_size, bias_correction2_sqrt;
};
PE_HD BiasCorrection bias_correction(double lr, double beta1, double beta2, std::int64_t step) {
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - pow(beta1, t);
  const double bc2 = 1.0 - pow(beta2, t);
  return {static_cast<float>(lr / bc1), static_cast<float>(sqrt(bc2))};
}

// g: the gradient already multiplied by the unscale/clip factor (and negated for maximize).
PE_HD void adam_update(float& p, float& m, float& v, float g, const AdamCoeffs& k) {
  p = p * k.decay_mul;
  g = g + k.l2 * p;
  m = k.beta1 * m + k.one_minus_beta1 * g;
  v = k.beta2 * v + k.one_minus_beta2 * g * g;
  float denom = sqrt_(v) / k.bias_correction2_sqrt + k.eps;
  p = p - k.step_size * (m / denom);
}

// One element of the fused pass: (master, exp_avg, exp_avg_sq, raw grad, model copy).
// Decoupled: AdamW (the weights decay by lr x weight_decay); else Adam (L2 on the gradient).
template <bool Decoupled> struct AdamFamilyElem {
  AdamCoeffs k;
  float grad_scale;

  template <class H> static PE_HD AdamFamilyElem make(const double* h, std::int64_t step, float grad_scale) {
    const double lr = h[H::lr], wd = h[H::weight_decay];
    const BiasCorrection bc = bias_correction(lr, h[H::beta1], h[H::beta2], step);
    AdamCoeffs k;
    k.beta1 = static_cast<float>(h[H::beta1]);
    k.beta2 = static_cast<float>(h[H::beta2]);
    // torch: lerp_(grad, 1 - beta1), addcmul_(..., value=1 - beta2): 1 - beta in double, rounded once
    k.one_minus_beta1 = static_cast<float>(1.0 - h[H::beta1]);
    k.one_minus_beta2 = static_cast<float>(1.0 - h[H::beta2]);
    k.eps = static_cast<float>(h[H::eps]);
    k.step_size = bc.step_size;
    k.bias_correction2_sqrt = bc.bias_correction2_sqrt;
    // torch: param.mul_(1 - lr * weight_decay), the product in double
    k.decay_mul = Decoupled ? static_cast<float>(1.0 - lr * wd) : 1.0f;
    k.l2 = Decoupled ? 0.0f : static_cast<float>(wd);
    return {k, signed_grad_scale(grad_scale, static_cast<float>(h[H::maximize]))};
  }

  PE_HD void operator()(float& p, float& m, float& v, float g, float& model) const {
    adam_update(p, m, v, g * grad_scale, k);
    model = p;
  }
};
using AdamWElem = AdamFamilyElem<true>;
using AdamElem = AdamFamilyElem<false>;

}  // namespace pyengine::kernels
