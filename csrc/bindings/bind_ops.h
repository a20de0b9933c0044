// The op bindings shared by the _C (cpu) and _cuda modules: same names, same arguments.
// Addresses, dtypes and streams cross as Python ints; every call releases the GIL.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "pyengine/core.h"

namespace pyengine::bindings {

namespace py = pybind11;
using Addr = std::uintptr_t;

template <class T> T* ptr(Addr a) { return reinterpret_cast<T*>(a); }
inline DType dt(int d) {
  if (d < 0 || d > 2) throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<DType>(d);
}

#define PE_BIND_OPS(m, ns)                                                                                    \
  do {                                                                                                        \
    using namespace ::pyengine::bindings;                                                                    \
    using ::pyengine::AdamConfig;                                                                             \
    using ::pyengine::LossScaleConfig;                                                                        \
    using ::pyengine::SgdConfig;                                                                              \
    auto nogil = py::call_guard<py::gil_scoped_release>();                                                    \
    m.def("accumulate", [](Addr dst, Addr src, int sdt, std::int64_t n, float alpha, Addr s) {                \
      ns::accumulate(ptr<float>(dst), ptr<const void>(src), dt(sdt), n, alpha, s);                          \
    }, nogil);                                                                                                \
    m.def("cast_scale", [](Addr dst, int ddt, Addr src, int sdt, std::int64_t n, float alpha, Addr s) {      \
      ns::cast_scale(ptr<void>(dst), dt(ddt), ptr<const void>(src), dt(sdt), n, alpha, s);                  \
    }, nogil);                                                                                                \
    m.def("unscale_check_sumsq", [](Addr src, int sdt, Addr dst, int ddt, std::int64_t n, Addr inv_scale,    \
                                    Addr found_inf, Addr sumsq, Addr workspace, Addr s) {                    \
      ns::unscale_check_sumsq(ptr<const void>(src), dt(sdt), ptr<void>(dst), dt(ddt), n,                    \
                              ptr<const float>(inv_scale), ptr<float>(found_inf), ptr<float>(sumsq),        \
                              ptr<float>(workspace), s);                                                     \
    }, nogil);                                                                                                \
    m.def("clip_coef", [](Addr sumsq, Addr inv_scale, float max_norm, Addr out, Addr s) {                     \
      ns::clip_coef(ptr<const float>(sumsq), ptr<const float>(inv_scale), max_norm, ptr<float>(out), s);    \
    }, nogil);                                                                                                \
    m.def("adam_step", [](Addr p, Addr m1, Addr m2, Addr g, int gdt, bool zero_grad, Addr model, int mdt,     \
                          std::int64_t n,                                                                    \
                          Addr grad_scale, Addr found_inf, Addr step, float lr, float beta1, float beta2,   \
                          float eps, float wd, bool decoupled, Addr s) {                                     \
      AdamConfig c{lr, beta1, beta2, eps, wd, decoupled};                                                    \
      ns::adam_step(ptr<float>(p), ptr<float>(m1), ptr<float>(m2), ptr<void>(g), dt(gdt), zero_grad,         \
                    ptr<void>(model), dt(mdt), n, ptr<const float>(grad_scale),                             \
                    ptr<const float>(found_inf), ptr<float>(step), c, s);                                   \
    }, nogil);                                                                                                \
    m.def("sgd_step", [](Addr p, Addr buf, Addr g, int gdt, bool zero_grad, Addr model, int mdt,              \
                         std::int64_t n,                                                                     \
                         Addr grad_scale, Addr found_inf, Addr step, float lr, float momentum,               \
                         float dampening, float wd, bool nesterov, Addr s) {                                 \
      SgdConfig c{lr, momentum, dampening, wd, nesterov};                                                    \
      ns::sgd_step(ptr<float>(p), ptr<float>(buf), ptr<void>(g), dt(gdt), zero_grad, ptr<void>(model), dt(mdt), \
                   n, ptr<const float>(grad_scale), ptr<const float>(found_inf), ptr<float>(step), c, s);   \
    }, nogil);                                                                                                \
    m.def("update_loss_scale", [](Addr state, Addr found_inf, float growth, float backoff, float min_scale,  \
                                  float max_scale, int interval, int hysteresis, bool consecutive, Addr s) { \
      LossScaleConfig c{growth, backoff, min_scale, max_scale, interval, hysteresis, consecutive};          \
      ns::update_loss_scale(ptr<float>(state), ptr<const float>(found_inf), c, s);                           \
    }, nogil);                                                                                                \
    m.def("multi_copy", [](const std::vector<Addr>& tensors, const std::vector<std::int64_t>& numels,        \
                           int tdt, Addr flat, int fdt, float alpha, bool to_flat, Addr s) {                 \
      if (tensors.size() != numels.size()) throw std::invalid_argument("multi_copy: tensors/numels length"); \
      ns::multi_copy(tensors.data(), numels.data(), static_cast<int>(tensors.size()), dt(tdt),              \
                     ptr<void>(flat), dt(fdt), alpha, to_flat, s);                                           \
    }, nogil);                                                                                                \
    m.attr("LOSS_SCALE_STATE_SIZE") = ::pyengine::kLossScaleStateSize;                                       \
    m.attr("REDUCE_CHUNK") = ::pyengine::kReduceChunk;                                                        \
  } while (0)

}  // namespace pyengine::bindings
