// CUDA drivers: the fused optimizer passes (Adam/AdamW, SGD).
//
// Note: one pass reads the gradient in any dtype, multiplies it by the device-resident
// factor (1/loss_scale x clip coefficient), updates the fp32 master weights and state and
// writes the half model copy. The non-finite flag and the step count are read on the
// device; a flagged step returns before touching memory, and the step count is advanced
// by a one-thread kernel queued behind the pass, so the host never waits.
#include "cuda/launch.cuh"
#include "kernels/adam.h"
#include "kernels/sgd.h"

namespace pyengine::cuda {
namespace {

namespace k = pyengine::kernels;

struct DeviceScalars {
  const float* grad_scale;
  const float* found_inf;
  const float* step;
  __device__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }
  __device__ float scale() const { return grad_scale ? *grad_scale : 1.0f; }
};

template <class G, class M> struct AdamOp {
  float *p, *m, *v;
  const G* g;
  M* out;
  DeviceScalars dev;
  AdamConfig cfg;
  k::AdamCoeffs kc;
  float gs;
  __device__ bool prepare() {
    if (dev.skip()) return false;
    kc = k::adam_coeffs(cfg, *dev.step + 1.0f);
    gs = dev.scale();
    return true;
  }
  template <int W> __device__ void apply(std::int64_t i) const {
    float pp[W], mm[W], vv[W], gg[W];
    load<W>(p, i, pp);
    load<W>(m, i, mm);
    load<W>(v, i, vv);
    load<W>(g, i, gg);
#pragma unroll
    for (int j = 0; j < W; ++j) k::adam_update(pp[j], mm[j], vv[j], gg[j] * gs, kc);
    store<W>(p, i, pp);
    store<W>(m, i, mm);
    store<W>(v, i, vv);
    store<W>(out, i, pp);
  }
};

template <class G, class M> struct SgdOp {
  float *p, *buf;
  const G* g;
  M* out;
  DeviceScalars dev;
  SgdConfig cfg;
  bool first;
  float gs;
  __device__ bool prepare() {
    if (dev.skip()) return false;
    first = *dev.step == 0.0f;
    gs = dev.scale();
    return true;
  }
  template <int W> __device__ void apply(std::int64_t i) const {
    float pp[W], bb[W] = {}, gg[W];
    load<W>(p, i, pp);
    if (buf) load<W>(buf, i, bb);
    load<W>(g, i, gg);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      if (buf) k::sgd_update<true>(pp[j], bb[j], gg[j] * gs, cfg, first);
      else k::sgd_update<false>(pp[j], bb[j], gg[j] * gs, cfg, first);
    }
    store<W>(p, i, pp);
    if (buf) store<W>(buf, i, bb);
    store<W>(out, i, pp);
  }
};

__global__ void advance_step(float* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1.0f;
}

void finish(float* step, const float* found_inf, Stream s, const char* op) {
  advance_step<<<1, 1, 0, as_stream(s)>>>(step, found_inf);
  check_launch(op);
}

}  // namespace

void adam_step(float* master, float* exp_avg, float* exp_avg_sq, const void* grad, DType grad_dtype, void* model,
               DType model_dtype, std::int64_t n, const float* grad_scale, const float* found_inf, float* step,
               const AdamConfig& cfg, Stream s) {
  with_dtype(grad_dtype, [&](auto gtag) {
    with_model_dtype(model, model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      bool vec = aligned(master, 4) && aligned(exp_avg, 4) && aligned(exp_avg_sq, 4) && aligned(grad, sizeof(G)) &&
                 (model == nullptr || aligned(model, sizeof(M)));
      AdamOp<G, M> op{master, exp_avg, exp_avg_sq, static_cast<const G*>(grad), static_cast<M*>(model),
                      {grad_scale, found_inf, step}, cfg, {}, 1.0f};
      launch_elementwise(op, n, vec, s, "adam_step");
    });
  });
  finish(step, found_inf, s, "adam_step");
}

void sgd_step(float* master, float* momentum_buf, const void* grad, DType grad_dtype, void* model, DType model_dtype,
              std::int64_t n, const float* grad_scale, const float* found_inf, float* step, const SgdConfig& cfg,
              Stream s) {
  with_dtype(grad_dtype, [&](auto gtag) {
    with_model_dtype(model, model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      bool vec = aligned(master, 4) && (momentum_buf == nullptr || aligned(momentum_buf, 4)) &&
                 aligned(grad, sizeof(G)) && (model == nullptr || aligned(model, sizeof(M)));
      SgdOp<G, M> op{master, momentum_buf, static_cast<const G*>(grad), static_cast<M*>(model),
                     {grad_scale, found_inf, step}, cfg, false, 1.0f};
      launch_elementwise(op, n, vec, s, "sgd_step");
    });
  });
  finish(step, found_inf, s, "sgd_step");
}

}  // namespace pyengine::cuda
