// What one fused optimizer launch does, decided once from its device scalars. Shared by the
// CPU driver (read on the host, where device memory is host memory) and the CUDA kernels
// (read once per thread on the device), so both backends skip, scale and count alike.
#pragma once
#include "common.h"
#include "pyengine/core.h"

namespace pyengine::kernels {

struct OptimizerPrologue {
  bool skip;         // the non-finite flag is set: touch nothing but the gradient to clear
  float grad_scale;  // 1/loss_scale x clip coefficient
  float next_step;   // 1-based index of the step being taken
};

// The config with its float fields from device memory when OptimizerArgs::hyper is set.
PE_HD AdamConfig hyper_config(AdamConfig c, const float* h) {
  if (h != nullptr) {
    c.lr = h[0];
    c.beta1 = h[1];
    c.beta2 = h[2];
    c.eps = h[3];
    c.weight_decay = h[4];
  }
  return c;
}
PE_HD SgdConfig hyper_config(SgdConfig c, const float* h) {
  if (h != nullptr) {
    c.lr = h[0];
    c.momentum = h[1];
    c.dampening = h[2];
    c.weight_decay = h[3];
  }
  return c;
}

PE_HD OptimizerPrologue optimizer_prologue(const OptimizerArgs& a) {
  OptimizerPrologue p;
  p.skip = a.found_inf != nullptr && *a.found_inf != 0.0f;  // NaN != 0: skipped too
  p.grad_scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  p.next_step = *a.step + 1.0f;
  return p;
}

}  // namespace pyengine::kernels
