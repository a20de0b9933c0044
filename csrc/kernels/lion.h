// Lion element math (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), the
// formulas of the reference lion-pytorch package:
//   p = p * (1 - lr * weight_decay)
//   p = p - lr * sign(beta1 * m + (1 - beta1) * g)      sign(0) = 0, as torch.sign
//   m = beta2 * m + (1 - beta2) * g
// with `maximize` meaning what it means in torch.optim (g negated first).
#pragma once
#include <cstdint>

#include "common.h"
#include "prologue.h"

namespace pyengine::kernels {

// One element of the fused pass: (master, exp_avg, raw grad, model copy).
struct LionElem {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay_mul, grad_scale;

  template <class H> static PE_HD LionElem make(const double* h, std::int64_t, float grad_scale) {
    // lion-pytorch: p.data.mul_(1. - lr * wd), add(grad, alpha=1 - beta1): scalars from Python
    // floats, in double, rounded once
    const double lr = h[H::lr];
    return {static_cast<float>(lr), static_cast<float>(h[H::beta1]), static_cast<float>(h[H::beta2]),
            static_cast<float>(1.0 - h[H::beta1]), static_cast<float>(1.0 - h[H::beta2]),
            static_cast<float>(1.0 - lr * h[H::weight_decay]), signed_grad_scale(grad_scale, static_cast<float>(h[H::maximize]))};
  }

  PE_HD void operator()(float& p, float& m, float g, float& model) const {
    g = g * grad_scale;
    p = p * decay_mul;
    float c = beta1 * m + one_minus_beta1 * g;
    float sign = (c > 0.0f ? 1.0f : 0.0f) - (c < 0.0f ? 1.0f : 0.0f);  // 0 for 0 (and NaN, as torch.sign on CPU)
    p = p - lr * sign;
    m = beta2 * m + one_minus_beta2 * g;
    model = p;
  }
};

}  // namespace pyengine::kernels
