// SGD element math, the formulas of torch.optim.SGD: on the first step the momentum buffer
// is the gradient itself (no dampening), afterwards buf = momentum*buf + (1-dampening)*g.
#pragma once
#include "common.h"
#include "pyengine/core.h"

namespace pyengine::kernels {

// Note: written with selects on loop-invariant flags instead of branches so the CPU loop
// vectorizes; g + 0*p is exact for finite weights, as torch's "skip when weight_decay == 0".
template <bool Momentum>
PE_HD void sgd_update(float& p, float& buf, float g, const SgdConfig& c, bool first_step) {
  g = g + c.weight_decay * p;
  if constexpr (Momentum) {
    float next = c.momentum * buf + (1.0f - c.dampening) * g;
    buf = first_step ? g : next;
    float nest = g + c.momentum * buf;
    g = c.nesterov ? nest : buf;
  }
  p = p - c.lr * g;
}

// One element of the fused pass: (master, momentum buffer, raw grad, model copy).
template <bool Momentum> struct SgdElem {
  SgdConfig c;
  bool first_step;
  float grad_scale;
  PE_HD void operator()(float& p, float& buf, float g, float& model) const {
    sgd_update<Momentum>(p, buf, g * grad_scale, c, first_step);
    model = p;
  }
};

}  // namespace pyengine::kernels
