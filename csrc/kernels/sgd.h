// SGD element math, the formulas of torch.optim.SGD: on the first step the momentum buffer
// is the gradient itself (no dampening), afterwards buf = momentum*buf + (1-dampening)*g;
// with momentum == 0 the buffer is left untouched and the plain gradient is used.
#pragma once
#include <cstdint>

#include "common.h"
#include "prologue.h"

namespace pyengine::kernels {

// One element of the fused pass: (master, momentum buffer, raw grad, model copy).
//
// Note: written with selects on loop-invariant flags instead of branches so the CPU loop
// vectorizes; g + 0*p is exact for finite weights, as torch's "skip when weight_decay == 0".
// The momentum is read from the hyper block when the pass runs, so momentum == 0 is a value
// like any other here: the selects then keep the buffer and step along the plain gradient.
// Without a buffer (state1 null, kOptionalStates) the driver hands in 0 and drops the write;
// the caller guarantees momentum == 0 then.
struct SgdElem {
  static constexpr bool kOptionalStates = true;
  float lr, momentum, one_minus_dampening, weight_decay, grad_scale;
  bool use_momentum, first_step, nesterov;

  template <class H> static PE_HD SgdElem make(const double* h, std::int64_t step, float grad_scale) {
    const double momentum = h[H::momentum];
    // torch: buf.mul_(momentum).add_(grad, alpha=1 - dampening): 1 - dampening in double
    return {static_cast<float>(h[H::lr]), static_cast<float>(momentum), static_cast<float>(1.0 - h[H::dampening]),
            static_cast<float>(h[H::weight_decay]), signed_grad_scale(grad_scale, static_cast<float>(h[H::maximize])),
            momentum != 0.0, step == 1, h[H::nesterov] != 0.0};
  }

  PE_HD void operator()(float& p, float& buf, float g, float& model) const {
    g = g * grad_scale;
    g = g + weight_decay * p;
    float next = momentum * buf + one_minus_dampening * g;
    float b = first_step ? g : next;
    float d = nesterov ? g + momentum * b : b;
    // Note: one select per output on use_momentum, last: chaining it after first_step's
    // select (b = use ? b : buf) made GCC 12's vectorized loop 3x slower.
    buf = use_momentum ? b : buf;
    p = p - lr * (use_momentum ? d : g);
    model = p;
  }
};

}  // namespace pyengine::kernels
