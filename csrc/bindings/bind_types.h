// The plain structs of the core API as Python classes, registered once by _C.
//
// Note: _cuda's functions take the same C++ types; pybind11 keeps one registry per process,
// so _cuda imports _C first and finds them there instead of registering them twice.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pyengine/core.h"

namespace pyengine::bindings {

namespace py = pybind11;
using Addr = std::uintptr_t;

template <class T> T* ptr(Addr a) { return reinterpret_cast<T*>(a); }
inline Addr addr(const void* p) { return reinterpret_cast<Addr>(p); }
inline DType dt(int d) {
  if (d < 0 || d > 2) throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<DType>(d);
}

// A pointer field of a struct, seen from Python as an integer address.
#define PE_ADDR_FIELD(cls, T, field)                                                   \
  def_property(#field, [](const cls& s) { return addr(s.field); },                    \
               [](cls& s, Addr a) { s.field = ptr<T>(a); })
#define PE_DTYPE_FIELD(cls, field)                                                     \
  def_property(#field, [](const cls& s) { return static_cast<int>(s.field); },       \
               [](cls& s, int d) { s.field = dt(d); })

// "exp_avg, exp_avg_sq" (a stringized list of optimizers.def) as ("exp_avg", "exp_avg_sq").
inline py::tuple name_list(const char* list) {
  py::list out;
  std::string s(list), item;
  for (char c : s + ",") {
    if (c == ',') {
      if (!item.empty()) out.append(item);
      item.clear();
    } else if (c != ' ') {
      item += c;
    }
  }
  return py::tuple(out);
}

// The fused optimizers of one backend (ns::optimizers, from optimizers.def): each bound as
// `<name>_step(args, stream)`, and the list exported as OPTIMIZERS, in registry order.
template <std::size_t N> void bind_optimizers(py::module_& m, const OptimizerInfo (&list)[N]) {
  py::list infos;
  for (const OptimizerInfo& o : list) {
    auto step = o.step;
    m.def(o.function, [step](const OptimizerArgs& a, Addr s) { step(a, s); },
          py::call_guard<py::gil_scoped_release>());
    py::dict d;
    d["name"] = o.name;
    d["function"] = o.function;
    d["states"] = name_list(o.states);
    d["hyper"] = name_list(o.hyper);
    infos.append(d);
  }
  m.attr("OPTIMIZERS") = py::tuple(infos);
}

inline void bind_types(py::module_& m) {
  py::class_<LossScaleConfig>(m, "LossScaleConfig", "Dynamic loss-scale rules (DeepSpeed hysteresis)")
      .def(py::init<>())
      .def_readwrite("growth_factor", &LossScaleConfig::growth_factor)
      .def_readwrite("backoff_factor", &LossScaleConfig::backoff_factor)
      .def_readwrite("min_scale", &LossScaleConfig::min_scale)
      .def_readwrite("max_scale", &LossScaleConfig::max_scale)
      .def_readwrite("growth_interval", &LossScaleConfig::growth_interval)
      .def_readwrite("hysteresis", &LossScaleConfig::hysteresis)
      .def_readwrite("consecutive_hysteresis", &LossScaleConfig::consecutive_hysteresis);
  py::class_<OptimizerArgs>(m, "OptimizerArgs", "Buffers and device scalars of one fused optimizer pass")
      .def(py::init<>())
      .PE_ADDR_FIELD(OptimizerArgs, float, master)
      .PE_ADDR_FIELD(OptimizerArgs, float, state1)
      .PE_ADDR_FIELD(OptimizerArgs, float, state2)
      .PE_ADDR_FIELD(OptimizerArgs, void, grad)
      .PE_DTYPE_FIELD(OptimizerArgs, grad_dtype)
      .def_readwrite("zero_grad", &OptimizerArgs::zero_grad)
      .PE_ADDR_FIELD(OptimizerArgs, void, model)
      .PE_DTYPE_FIELD(OptimizerArgs, model_dtype)
      .def_readwrite("n", &OptimizerArgs::n)
      .PE_ADDR_FIELD(OptimizerArgs, const float, grad_scale)
      .PE_ADDR_FIELD(OptimizerArgs, const float, found_inf)
      .PE_ADDR_FIELD(OptimizerArgs, std::int64_t, step)
      .PE_ADDR_FIELD(OptimizerArgs, const double, hyper)
      .def_readwrite("advance_step", &OptimizerArgs::advance_step);

  py::class_<StepScalarArgs>(m, "StepScalarArgs", "Inputs and outputs of the step's scalar work (step_scalars)")
      .def(py::init<>())
      .PE_ADDR_FIELD(StepScalarArgs, const void, grad)
      .PE_DTYPE_FIELD(StepScalarArgs, grad_dtype)
      .def_readwrite("n", &StepScalarArgs::n)
      .PE_ADDR_FIELD(StepScalarArgs, float, workspace)
      .PE_ADDR_FIELD(StepScalarArgs, const float, bucket_rows)
      .def_readwrite("buckets", &StepScalarArgs::buckets)
      .PE_ADDR_FIELD(StepScalarArgs, float, scalars)
      .PE_ADDR_FIELD(StepScalarArgs, const float, inv_scale)
      .PE_ADDR_FIELD(StepScalarArgs, float, loss_scale_state)
      .def_readwrite("max_norm", &StepScalarArgs::max_norm)
      .def_readwrite("loss_scale", &StepScalarArgs::loss_scale)
      .PE_ADDR_FIELD(StepScalarArgs, float, host_mirror)
      .PE_ADDR_FIELD(StepScalarArgs, std::int64_t, boundaries)
      .PE_ADDR_FIELD(StepScalarArgs, const std::int32_t, abort_word)
      .def_readwrite("phase", &StepScalarArgs::phase);

  py::dict step_slots;
  step_slots["found_inf"] = static_cast<int>(kFoundInf);
  step_slots["sumsq"] = static_cast<int>(kSumsq);
  step_slots["grad_norm"] = static_cast<int>(kGradNorm);
  step_slots["grad_coef"] = static_cast<int>(kGradCoef);
  m.attr("STEP_SLOTS") = step_slots;
  m.attr("STEP_SLOT_COUNT") = static_cast<int>(kStepSlots);
  py::dict ls_slots;
  ls_slots["scale"] = static_cast<int>(kScale);
  ls_slots["inv_scale"] = static_cast<int>(kInvScale);
  ls_slots["growth_tracker"] = static_cast<int>(kGrowthTracker);
  ls_slots["hysteresis_left"] = static_cast<int>(kHysteresisLeft);
  ls_slots["skipped_total"] = static_cast<int>(kSkippedTotal);
  ls_slots["consecutive_skips"] = static_cast<int>(kConsecutiveSkips);
  ls_slots["last_found_inf"] = static_cast<int>(kLastFound);
  m.attr("LOSS_SCALE_SLOTS") = ls_slots;
  m.attr("LOSS_SCALE_STATE_SIZE") = kLossScaleStateSize;
  m.attr("REDUCE_CHUNK") = kReduceChunk;
  m.attr("HYPER_SLOTS") = kHyperSlots;
  m.attr("STEP_ALL") = kStepAll;
  m.attr("STEP_LOCAL") = kStepLocal;
  m.attr("STEP_GLOBAL") = kStepGlobal;
}

}  // namespace pyengine::bindings
