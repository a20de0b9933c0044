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

// The per-thread prologue of an optimizer pass (kernels/prologue.h): skip on the device flag
// (then only the gradient is cleared, if asked), else the functor with this step's coefficients.
template <class Elem, class Make> struct StepPrologue {
  OptimizerArgs a;
  Make make;
  __device__ Plan<Elem> operator()() const {
    k::OptimizerPrologue pro = k::optimizer_prologue(a);
    if (pro.skip) return {false, a.zero_grad, Elem{}};
    return {true, false, make(pro)};
  }
};

struct MakeAdam {
  AdamConfig cfg;
  const float* hyper;
  __device__ k::AdamElem operator()(const k::OptimizerPrologue& pro) const {
    return {k::adam_coeffs(k::hyper_config(cfg, hyper), pro.next_step), pro.grad_scale};
  }
};

template <bool Momentum> struct MakeSgd {
  SgdConfig cfg;
  const float* hyper;
  __device__ k::SgdElem<Momentum> operator()(const k::OptimizerPrologue& pro) const {
    return {k::hyper_config(cfg, hyper), pro.next_step == 1.0f, pro.grad_scale};
  }
};

__global__ void advance_step(float* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1.0f;
}

void finish(const OptimizerArgs& a, Stream s, const char* op) {
  if (!a.advance_step) return;
  advance_step<<<1, 1, 0, as_stream(s)>>>(a.step, a.found_inf);
  check_launch(op);
}

// The gradient array of a pass: cleared in the same pass when asked.
template <class G, class F> void with_grad(const OptimizerArgs& a, F&& f) {
  if (a.zero_grad) f(in_zero(static_cast<G*>(a.grad)));
  else f(in(static_cast<const G*>(a.grad)));
}

}  // namespace

void adam_step(const OptimizerArgs& a, const AdamConfig& cfg, Stream s) {
  with_dtype(a.grad_dtype, [&](auto gtag) {
    with_optional_dtype(a.model, a.model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      with_grad<G>(a, [&](auto grad) {
        StepPrologue<k::AdamElem, MakeAdam> pro{a, {cfg, a.hyper}};
        launch_elementwise(pro, a.n, s, "adam_step", inout(a.master), inout(a.state1), inout(a.state2), grad,
                           optional_out<M>(a.model));
      });
    });
  });
  finish(a, s, "adam_step");
}

void sgd_step(const OptimizerArgs& a, const SgdConfig& cfg, Stream s) {
  with_dtype(a.grad_dtype, [&](auto gtag) {
    with_optional_dtype(a.model, a.model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      with_grad<G>(a, [&](auto grad) {
        if (a.state1 != nullptr) {
          StepPrologue<k::SgdElem<true>, MakeSgd<true>> pro{a, {cfg, a.hyper}};
          launch_elementwise(pro, a.n, s, "sgd_step", inout(a.master), inout(a.state1), grad, optional_out<M>(a.model));
        } else {
          StepPrologue<k::SgdElem<false>, MakeSgd<false>> pro{a, {cfg, a.hyper}};
          launch_elementwise(pro, a.n, s, "sgd_step", inout(a.master), none(), grad, optional_out<M>(a.model));
        }
      });
    });
  });
  finish(a, s, "sgd_step");
}

}  // namespace pyengine::cuda
