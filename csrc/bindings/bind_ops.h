// The op bindings shared by the _C (cpu) and _cuda modules: same names, same arguments.
// Addresses, dtypes and streams cross as Python ints, configs as the structs of
// bind_types.h; every call releases the GIL. The optimizers come from optimizers.def through
// ns::optimizers (bind_optimizers), so a new one needs nothing here.
#pragma once
#include <pybind11/stl.h>

#include <vector>

#include "bindings/bind_types.h"

#define PE_BIND_OPS(m, ns)                                                                                    \
  do {                                                                                                        \
    using namespace ::pyengine::bindings;                                                                    \
    using ::pyengine::LossScaleConfig;                                                                        \
    using ::pyengine::OptimizerArgs;                                                                          \
    auto nogil = py::call_guard<py::gil_scoped_release>();                                                    \
    m.def("accumulate", [](Addr dst, Addr src, int sdt, std::int64_t n, float alpha, Addr s) {                \
      ns::accumulate(ptr<float>(dst), ptr<const void>(src), dt(sdt), n, alpha, s);                          \
    }, nogil);                                                                                                \
    m.def("fill", [](Addr dst, int d, std::int64_t n, float value, Addr s) {                                 \
      ns::fill(ptr<void>(dst), dt(d), n, value, s);                                                          \
    }, nogil);                                                                                                \
    m.def("set_hyper", [](Addr dst, const std::vector<double>& values, Addr s) {                             \
      ns::set_hyper(ptr<double>(dst), values.data(), static_cast<int>(values.size()), s);                   \
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
    m.def("chunk_sumsq", [](Addr src, int sdt, std::int64_t rows, std::int64_t chunk, Addr inv_scale, Addr out,  \
                            Addr s) {                                                                    \
      ns::chunk_sumsq(ptr<const void>(src), dt(sdt), rows, chunk, ptr<const float>(inv_scale),             \
                      ptr<double>(out), s);                                                                \
    }, nogil);                                                                                                \
    m.def("clip_coef", [](Addr sumsq, Addr inv_scale, float max_norm, Addr out, Addr s) {                     \
      ns::clip_coef(ptr<const float>(sumsq), ptr<const float>(inv_scale), max_norm, ptr<float>(out), s);    \
    }, nogil);                                                                                                \
    bind_optimizers(m, ns::optimizers);                                                                      \
    m.def("update_loss_scale", [](Addr state, Addr found_inf, const LossScaleConfig& c, Addr s) {            \
      ns::update_loss_scale(ptr<float>(state), ptr<const float>(found_inf), c, s);                           \
    }, nogil);                                                                                                \
    m.def("step_scalars", [](const ::pyengine::StepScalarArgs& a, Addr s) { ns::step_scalars(a, s); }, nogil); \
    m.def("multi_copy", [](const std::vector<Addr>& tensors, const std::vector<std::int64_t>& numels,        \
                           int tdt, Addr flat, int fdt, float alpha, bool to_flat, Addr s) {                 \
      if (tensors.size() != numels.size()) throw std::invalid_argument("multi_copy: tensors/numels length"); \
      ns::multi_copy(tensors.data(), numels.data(), static_cast<int>(tensors.size()), dt(tdt),              \
                     ptr<void>(flat), dt(fdt), alpha, to_flat, s);                                           \
    }, nogil);                                                                                                \
  } while (0)
