// Unscale / non-finite check / sum of squares, and the accumulate and cast element math.
#pragma once
#include "common.h"

namespace pyengine::kernels {

// Note: `nonfinite += y * 0` stays exactly 0 for finite y and turns NaN for inf or NaN, so
// the non-finite check costs one multiply-add per element and vectorizes like the sum of
// squares beside it, with no branch and no per-element flag write.
struct SumsqAcc {
  float sumsq = 0.0f, nonfinite = 0.0f;
  PE_HD void add(float y) {
    sumsq += y * y;
    nonfinite += y * 0.0f;
  }
  PE_HD void merge(const SumsqAcc& o) {
    sumsq += o.sumsq;
    nonfinite += o.nonfinite;
  }
};

PE_HD float accumulate_value(float dst, float src, float alpha) { return dst + alpha * src; }
PE_HD float scale_value(float src, float alpha) { return alpha * src; }

// dst += alpha * src
struct AccumulateElem {
  float alpha;
  PE_HD void operator()(float& dst, float src) const { dst = accumulate_value(dst, src, alpha); }
};

// dst = value
struct FillElem {
  float value;
  PE_HD void operator()(float& dst) const { dst = value; }
};

// dst = alpha * src (the cast happens when the driver stores dst in its own dtype)
struct ScaleElem {
  float alpha;
  PE_HD void operator()(float& dst, float src) const { dst = scale_value(src, alpha); }
};

}  // namespace pyengine::kernels
