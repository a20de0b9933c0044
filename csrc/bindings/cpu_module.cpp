// pyengine._C: the CPU backend.
#include "bindings/bind_ops.h"
#include "bindings/bind_types.h"

#ifndef PE_VERSION
#define PE_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine CPU kernels (OpenMP + SIMD)";
  pyengine::bindings::bind_types(m);
  PE_BIND_OPS(m, ::pyengine::cpu);
  m.def("set_num_threads", &pyengine::cpu::set_num_threads);
  m.def("num_threads", &pyengine::cpu::num_threads);
  m.def("simd_level", &pyengine::cpu::simd_level);
  m.attr("__version__") = PE_VERSION;
  // CommGuard's CPU test harness, defined in csrc/comm/comm_guard_probe.cpp.
  void bind_comm_guard_probe(pybind11::module_&);
  bind_comm_guard_probe(m);
}
