// What one fused optimizer launch does, decided once from its device scalars. Shared by the
// CPU driver (read on the host, where device memory is host memory) and the CUDA kernels
// (read once per thread on the device), so both backends skip, scale and count alike.
#pragma once
#include <cstdint>

#include "common.h"
#include "pyengine/core.h"

namespace pyengine::kernels {

struct OptimizerPrologue {
  bool skip;               // the non-finite flag is set: touch nothing but the gradient to clear
  float grad_scale;        // 1/loss_scale x clip coefficient
  std::int64_t next_step;  // 1-based index of the step being taken
};

PE_HD OptimizerPrologue optimizer_prologue(const OptimizerArgs& a) {
  OptimizerPrologue p;
  p.skip = a.found_inf != nullptr && *a.found_inf != 0.0f;  // NaN != 0: skipped too
  p.grad_scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  p.next_step = *a.step + 1;
  return p;
}

// The gradient multiplier with torch.optim's `maximize` folded in: the gradient is negated
// before anything else reads it, and -(g x s) == g x (-s) bitwise, so it costs nothing.
PE_HD float signed_grad_scale(float grad_scale, float maximize) {
  return maximize != 0.0f ? -grad_scale : grad_scale;
}

// What is wrong with the arguments of a pass over `states` state buffers (null: nothing).
// Checked on the host by both backends before any work is queued.
inline const char* optimizer_args_error(const OptimizerArgs& a, int states, bool states_optional) {
  if (a.n < 0) return "n must be >= 0";
  if (a.hyper == nullptr) return "hyper is required (the device block of hyper-parameters)";
  if (a.step == nullptr) return "step is required (the device int64 step counter)";
  if (a.n == 0) return nullptr;
  if (a.master == nullptr) return "master is null";
  if (a.grad == nullptr) return "grad is null";
  if (!states_optional) {
    if (states >= 1 && a.state1 == nullptr) return "state1 is null";
    if (states >= 2 && a.state2 == nullptr) return "state2 is null";
  } else if (states >= 2 && (a.state1 == nullptr) != (a.state2 == nullptr)) {
    return "state1 and state2 must both be given or both be null";
  }
  return nullptr;
}

}  // namespace pyengine::kernels
