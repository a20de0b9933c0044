// Dynamic loss-scale update, run on the device from the step's non-finite flag.
//
// Note: the hysteresis follows DeepSpeed's DynamicLossScaler: an overflow first spends one
// unit of hysteresis and only backs the scale off once the count reaches 1 (it then stays at
// 1, so further overflows back off each time) until a growth, which restores it. With
// consecutive_hysteresis a clean step restores it at once. Growth happens after
// growth_interval consecutive clean steps. The scale never leaves [min_scale, max_scale].
#pragma once
#include "common.h"
#include "pyengine/core.h"

namespace pyengine::kernels {

PE_HD void update_loss_scale(float* s, float found_inf, const LossScaleConfig& c) {
  s[kLastFound] = found_inf != 0.0f ? 1.0f : 0.0f;
  if (found_inf != 0.0f) {
    s[kSkippedTotal] += 1.0f;
    s[kConsecutiveSkips] += 1.0f;
    s[kGrowthTracker] = 0.0f;
    if (c.hysteresis <= 1 || s[kHysteresisLeft] <= 1.0f) {
      float next = s[kScale] * c.backoff_factor;
      s[kScale] = next > c.min_scale ? next : c.min_scale;
    } else {
      s[kHysteresisLeft] -= 1.0f;
    }
  } else {
    s[kConsecutiveSkips] = 0.0f;
    if (c.consecutive_hysteresis) s[kHysteresisLeft] = (float)c.hysteresis;
    s[kGrowthTracker] += 1.0f;
    if (s[kGrowthTracker] >= (float)c.growth_interval) {
      s[kGrowthTracker] = 0.0f;
      s[kHysteresisLeft] = (float)c.hysteresis;
      float next = s[kScale] * c.growth_factor;
      s[kScale] = next < c.max_scale ? next : c.max_scale;
    }
  }
  s[kInvScale] = 1.0f / s[kScale];
}

}  // namespace pyengine::kernels
