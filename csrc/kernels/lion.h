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
  float lr, beta1, beta2, decay_mul, grad_scale;

  template <class H> static PE_HD LionElem make(const float* h, std::int64_t, float grad_scale) {
    const float lr = h[H::lr];
    // lion-pytorch: p.data.mul_(1. - lr * wd), the product in double
    const float decay_mul = static_cast<float>(1.0 - static_cast<double>(lr) * static_cast<double>(h[H::weight_decay]));
    return {lr, h[H::beta1], h[H::beta2], decay_mul, signed_grad_scale(grad_scale, h[H::maximize])};
  }

  PE_HD void operator()(float& p, float& m, float g, float& model) const {
    g = g * grad_scale;
    p = p * decay_mul;
    float c = beta1 * m + (1.0f - beta1) * g;
    float sign = (c > 0.0f ? 1.0f : 0.0f) - (c < 0.0f ? 1.0f : 0.0f);  // 0 for 0 (and NaN, as torch.sign on CPU)
    p = p - lr * sign;
    m = beta2 * m + (1.0f - beta2) * g;
    model = p;
  }
};

}  // namespace pyengine::kernels
