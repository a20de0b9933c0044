// CUDA drivers: the fused optimizer passes (Adam/AdamW, SGD).
//
// Note: one pass reads the gradient in any dtype, multiplies it by the device-resident
// factor (1/loss_scale x clip coefficient), updates the fp32 master weights and state and
// writes the half model copy. The non-finite flag and the step count are read on the
// device (kernels/prologue.h, the same rules as the CPU); a flagged step returns before
// touching memory, and the step count is advanced by a one-thread kernel queued behind
// the pass, so the host never waits.
#include "cuda/launch.cuh"
#include "kernels/adam.h"
#include "kernels/prologue.h"
#include "kernels/sgd.h"

namespace pyengine::cuda {
namespace {

namespace k = pyengine::kernels;

// Note: every load of an element group is issued before any store. Clearing the gradient
// (a store to one array) ahead of the master/state loads made each thread wait for its
// store before it could load again: the loads in flight per thread dropped and the pass
// with zero_grad ran at a third of the bandwidth of the pass without it.
template <int W, class G> __device__ __forceinline__ void clear(G* g, std::int64_t i) {
  float z[W] = {};
  store<W>(g, i, z);
}

// A skipped step (found_inf set) only clears the gradient, when asked to.
template <class G, class M> struct AdamOp {
  OptimizerArgs a;
  AdamConfig cfg;
  k::AdamElem elem;
  bool skipped;
  __device__ bool prepare() {
    k::OptimizerPrologue pro = k::optimizer_prologue(a);
    skipped = pro.skip;
    if (skipped) return a.zero_grad;
    elem = {k::adam_coeffs(k::hyper_config(cfg, a.hyper), pro.next_step), pro.grad_scale};
    return true;
  }
  template <int W> __device__ void apply(std::int64_t i) const {
    G* g = static_cast<G*>(a.grad);
    if (skipped) return clear<W>(g, i);
    float pp[W], mm[W], vv[W], gg[W], out[W];
    load<W>(g, i, gg);
    load<W>(a.master, i, pp);
    load<W>(a.state1, i, mm);
    load<W>(a.state2, i, vv);
#pragma unroll
    for (int j = 0; j < W; ++j) elem(pp[j], mm[j], vv[j], gg[j], out[j]);
    if (a.zero_grad) clear<W>(g, i);
    store<W>(a.master, i, pp);
    store<W>(a.state1, i, mm);
    store<W>(a.state2, i, vv);
    store<W>(static_cast<M*>(a.model), i, out);
  }
};

template <class G, class M, bool Momentum> struct SgdOp {
  OptimizerArgs a;
  SgdConfig cfg;
  k::SgdElem<Momentum> elem;
  bool skipped;
  __device__ bool prepare() {
    k::OptimizerPrologue pro = k::optimizer_prologue(a);
    skipped = pro.skip;
    if (skipped) return a.zero_grad;
    elem = {k::hyper_config(cfg, a.hyper), pro.next_step == 1.0f, pro.grad_scale};
    return true;
  }
  template <int W> __device__ void apply(std::int64_t i) const {
    G* g = static_cast<G*>(a.grad);
    if (skipped) return clear<W>(g, i);
    float pp[W], bb[W] = {}, gg[W], out[W];
    load<W>(g, i, gg);
    load<W>(a.master, i, pp);
    if constexpr (Momentum) load<W>(a.state1, i, bb);
#pragma unroll
    for (int j = 0; j < W; ++j) elem(pp[j], bb[j], gg[j], out[j]);
    if (a.zero_grad) clear<W>(g, i);
    store<W>(a.master, i, pp);
    if constexpr (Momentum) store<W>(a.state1, i, bb);
    store<W>(static_cast<M*>(a.model), i, out);
  }
};

__global__ void advance_step(float* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1.0f;
}

void finish(const OptimizerArgs& a, Stream s, const char* op) {
  advance_step<<<1, 1, 0, as_stream(s)>>>(a.step, a.found_inf);
  check_launch(op);
}

template <class G, class M> bool vector_ok(const OptimizerArgs& a) {
  return aligned(a.master, 4) && (a.state1 == nullptr || aligned(a.state1, 4)) &&
         (a.state2 == nullptr || aligned(a.state2, 4)) && aligned(a.grad, sizeof(G)) &&
         (a.model == nullptr || aligned(a.model, sizeof(M)));
}

}  // namespace

void adam_step(const OptimizerArgs& a, const AdamConfig& cfg, Stream s) {
  with_dtype(a.grad_dtype, [&](auto gtag) {
    with_model_dtype(a.model, a.model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      launch_elementwise(AdamOp<G, M>{a, cfg, {}, false}, a.n, vector_ok<G, M>(a), s, "adam_step");
    });
  });
  finish(a, s, "adam_step");
}

void sgd_step(const OptimizerArgs& a, const SgdConfig& cfg, Stream s) {
  with_dtype(a.grad_dtype, [&](auto gtag) {
    with_model_dtype(a.model, a.model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      if (a.state1 != nullptr)
        launch_elementwise(SgdOp<G, M, true>{a, cfg, {}, false}, a.n, vector_ok<G, M>(a), s, "sgd_step");
      else
        launch_elementwise(SgdOp<G, M, false>{a, cfg, {}, false}, a.n, vector_ok<G, M>(a), s, "sgd_step");
    });
  });
  finish(a, s, "sgd_step");
}

}  // namespace pyengine::cuda
