// CUDA drivers: the fused optimizer passes, one per line of optimizers.def.
//
// Note: one pass reads the gradient in any dtype, multiplies it by the device-resident
// factor (1/loss_scale x clip coefficient), updates the fp32 master weights and state and
// writes the half model copy. The non-finite flag, the int64 step count and the hyper block
// are read on the device, once per thread, and the functor's per-launch constants (bias
// corrections in double, kernels/adam.h) made there (kernels/prologue.h, the same rules as
// the CPU); a flagged step returns before touching memory, and the step count is advanced
// by a one-thread kernel queued behind the pass, so the host never waits.
#include <string>

#include "cuda/launch.cuh"
#include "kernels/optimizers.h"
#include "kernels/prologue.h"

namespace pyengine::cuda {
namespace {

namespace k = pyengine::kernels;

// The per-thread prologue of R's pass: skip on the device flag (then only the gradient is
// cleared, if asked), else R's functor with this step's constants.
template <class R> struct StepPrologue {
  using Elem = typename R::elem;
  OptimizerArgs a;
  __device__ Plan<Elem> operator()() const {
    k::OptimizerPrologue pro = k::optimizer_prologue(a);
    if (pro.skip) return {false, a.zero_grad, Elem{}};
    return {true, false, Elem::template make<typename R::hyper>(a.hyper, pro.next_step, pro.grad_scale)};
  }
};

__global__ void advance_step(std::int64_t* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1;
}

// The gradient array of a pass: cleared in the same pass when asked.
template <class G, class F> void with_grad(const OptimizerArgs& a, F&& f) {
  if (a.zero_grad) f(in_zero(static_cast<G*>(a.grad)));
  else f(in(static_cast<const G*>(a.grad)));
}

// The state arrays of R's pass, in order; none() for each when they may be absent and are.
template <class R, class F> void with_states(const OptimizerArgs& a, F&& f) {
  constexpr int kStates = R::states::kCount;
  if constexpr (k::StatesOptional<typename R::elem>::value) {
    if (a.state1 == nullptr) {
      if constexpr (kStates == 1) return f(none());
      else return f(none(), none());
    }
  }
  if constexpr (kStates == 1) f(inout(a.state1));
  else f(inout(a.state1), inout(a.state2));
}

template <class R> void optimizer_pass(const OptimizerArgs& a, Stream s) {
  // Checked on the host: the kernel dereferences hyper and step on the device.
  if (const char* err = k::optimizer_args_error(a, R::states::kCount, k::StatesOptional<typename R::elem>::value))
    throw std::invalid_argument(std::string(R::function) + ": " + err);
  with_dtype(a.grad_dtype, [&](auto gtag) {
    with_optional_dtype(a.model, a.model_dtype, [&](auto mtag) {
      using G = decltype(gtag);
      using M = decltype(mtag);
      with_grad<G>(a, [&](auto grad) {
        with_states<R>(a, [&](auto... states) {
          launch_elementwise(StepPrologue<R>{a}, a.n, s, R::function, inout(a.master), states..., grad,
                             optional_out<M>(a.model));
        });
      });
    });
  });
  if (a.advance_step) {
    advance_step<<<1, 1, 0, as_stream(s)>>>(a.step, a.found_inf);
    check_launch(R::function);
  }
}

}  // namespace

#define PE_OPTIMIZER(name, elem, states, hyper) \
  void name##_step(const OptimizerArgs& a, Stream s) { optimizer_pass<k::registry::name>(a, s); }
#include "optimizers.def"
#undef PE_OPTIMIZER

}  // namespace pyengine::cuda
