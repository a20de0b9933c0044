// Every optimizer of csrc/optimizers.def as a type: its element functor, the slot numbers of
// its hyper block and the count of its state buffers, for the drivers of both backends.
//
//   registry::adamw::elem          the functor (kernels/adam.h: AdamWElem)
//   registry::adamw::hyper::beta2  2, the slot of beta2 in OptimizerArgs::hyper
//   registry::adamw::states::kCount  2 (state1 = exp_avg, state2 = exp_avg_sq)
//
// An element functor provides
//   template <class H> static Elem make(const double* hyper, std::int64_t next_step, float grad_scale)
//       the per-launch constants (run once per launch on the CPU, once per thread on CUDA)
//   void operator()(float& master, float& state..., float grad, float& model) const
//       one element: grad is the raw gradient, model receives the new master weight
// and optionally `static constexpr bool kOptionalStates = true` when its states may be absent
// (null pointers: the functor then reads 0 for them and its writes to them are dropped).
#pragma once
#include <type_traits>

#include "pyengine/core.h"  // first: it reads optimizers.def's list, not its headers

#define PE_OPTIMIZER_HEADERS
#include "optimizers.def"
#undef PE_OPTIMIZER_HEADERS

namespace pyengine::kernels {

namespace registry {
#define PE_STATES(...) struct states { enum : int { __VA_ARGS__, kCount }; };
#define PE_HYPER(...) struct hyper { enum : int { __VA_ARGS__, kCount }; };
#define PE_OPTIMIZER(name_, elem_, states_, hyper_)                                        \
  struct name_ {                                                                           \
    using elem = elem_;                                                                    \
    states_ hyper_                                                                         \
    static constexpr const char* function = #name_ "_step";                                \
    static_assert(hyper::kCount <= kHyperSlots, #name_ ": more hyper-parameters than kHyperSlots"); \
    static_assert(states::kCount >= 1 && states::kCount <= 2, #name_ ": OptimizerArgs holds 1 or 2 states"); \
  };
#include "optimizers.def"
#undef PE_OPTIMIZER
#undef PE_STATES
#undef PE_HYPER
}  // namespace registry

template <class E, class = void> struct StatesOptional : std::false_type {};
template <class E> struct StatesOptional<E, std::void_t<decltype(E::kOptionalStates)>>
    : std::bool_constant<E::kOptionalStates> {};

}  // namespace pyengine::kernels
