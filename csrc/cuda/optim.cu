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

// Reads W gradients and, with zero_grad, clears them in the same pass.
template <int W, class G> __device__ __forceinline__ void take_grad(G* g, std::int64_t i, bool zero, float (&x)[W]) {
  load<W>(g, i, x);
  if (zero) {
    float z[W] = {};
    store<W>(g, i, z);
  }
}

// A skipped step (found_inf set) only clears the gradient, when asked to.
template <class G, class M> struct AdamOp {
  float *p, *m, *v;
  G* g;
  bool zero;
  M* out;
  DeviceScalars dev;
  AdamConfig cfg;
  k::AdamCoeffs kc;
  float gs;
  bool skipped;
  __device__ bool prepare() {
    skipped = dev.skip();
    if (skipped) return zero;
    kc = k::adam_coeffs(cfg, *dev.step + 1.0f);
    gs = dev.scale();
    return true;
  }
  template <int W> __device__ void apply(std::int64_t i) const {
    float pp[W], mm[W], vv[W], gg[W];
    take_grad<W>(g, i, zero, gg);
    if (skipped) return;
    load<W>(p, i, pp);
    load<W>(m, i, mm);
    load<W>(v, i, vv);
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
  G* g;
  bool zero;
  M* out;
  DeviceScalars dev;
  SgdConfig cfg;
  bool first;
  float gs;
  bool skipped;
  __device__ bool prepare() {
    skipped = dev.skip();
    if (skipped) return zero;
    first = *dev.step == 0.0f;
    gs = dev.scale();
    return true;
  }
  template <int W> __device__ void apply(std::int64_t i) const {
    float pp[W], bb[W] = {}, gg[W];
    take_grad<W>(g, i, zero, gg);
    if (skipped) return;
    load<W>(p, i, pp);
    if (buf) load<W>(buf, i, bb);
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

void adam_step(float* master, float* exp_avg, float* exp_avg_sq, void* grad, DType grad_dtype, bool zero_grad,
               void* model,
               DType model_dtype, std::int64_t n, const float* grad_scale, const float* found_inf, float* step,
               const AdamConfig& cfg, Stream s) {
  with_dtype(grad_dtype, [&](auto gtag) {
    with_model_dtype(model, model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      bool vec = aligned(master, 4) && aligned(exp_avg, 4) && aligned(exp_avg_sq, 4) && aligned(grad, sizeof(G)) &&
                 (model == nullptr || aligned(model, sizeof(M)));
      AdamOp<G, M> op{master, exp_avg, exp_avg_sq, static_cast<G*>(grad), zero_grad, static_cast<M*>(model),
                      {grad_scale, found_inf, step}, cfg, {}, 1.0f, false};
      launch_elementwise(op, n, vec, s, "adam_step");
    });
  });
  finish(step, found_inf, s, "adam_step");
}

void sgd_step(float* master, float* momentum_buf, void* grad, DType grad_dtype, bool zero_grad, void* model,
              DType model_dtype,
              std::int64_t n, const float* grad_scale, const float* found_inf, float* step, const SgdConfig& cfg,
              Stream s) {
  with_dtype(grad_dtype, [&](auto gtag) {
    with_model_dtype(model, model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      bool vec = aligned(master, 4) && (momentum_buf == nullptr || aligned(momentum_buf, 4)) &&
                 aligned(grad, sizeof(G)) && (model == nullptr || aligned(model, sizeof(M)));
      SgdOp<G, M> op{master, momentum_buf, static_cast<G*>(grad), zero_grad, static_cast<M*>(model),
                     {grad_scale, found_inf, step}, cfg, false, 1.0f, false};
      launch_elementwise(op, n, vec, s, "sgd_step");
    });
  });
  finish(step, found_inf, s, "sgd_step");
}

}  // namespace pyengine::cuda
