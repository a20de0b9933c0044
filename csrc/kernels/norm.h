// Global-norm clipping coefficient, as torch.nn.utils.clip_grad_norm_ computes it.
#pragma once
#include "common.h"

namespace pyengine::kernels {

// max_norm <= 0 or +inf means "no clipping". The returned multiplier folds the loss-scale
// inverse and the clip coefficient, so the optimizer pass reads one scalar.
PE_HD void clip_coefficient(float sumsq, float inv_scale, float max_norm, float* out) {
  float norm = sqrt_(sumsq);
  float coef = 1.0f;
  if (max_norm > 0.0f && max_norm <= 3.4028234663852886e38f) {  // finite and positive
    coef = max_norm / (norm + 1e-6f);
    coef = coef < 1.0f ? coef : 1.0f;  // NaN norm leaves coef NaN; that step is skipped
  }
  out[0] = norm;
  out[1] = inv_scale * coef;
}

}  // namespace pyengine::kernels
