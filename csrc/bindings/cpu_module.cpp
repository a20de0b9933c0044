// pyengine._C: the CPU backend.
#include "bindings/bind_ops.h"
#include "bindings/bind_types.h"
#include "pyengine/launch_shape.h"

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
  // The CUDA launch shape's host decisions, for tests (pyengine/launch_shape.h).
  m.def("_grid_blocks", &pyengine::grid_blocks, pybind11::arg("work_threads"), pybind11::arg("block"),
        pybind11::arg("sms"), pybind11::arg("blocks_per_sm"));
  m.def("_vector_plan", [](const std::vector<std::uintptr_t>& addrs, const std::vector<int>& elem_bytes,
                           std::int64_t n, int vec) {
    if (addrs.size() != elem_bytes.size()) throw std::invalid_argument("_vector_plan: addrs/elem_bytes length");
    auto plan = pyengine::vector_plan(addrs.data(), elem_bytes.data(), static_cast<int>(addrs.size()), n, vec);
    return pybind11::make_tuple(plan.head, plan.mask);
  }, pybind11::arg("addrs"), pybind11::arg("elem_bytes"), pybind11::arg("n"), pybind11::arg("vec"));
  // CommGuard's CPU test harness, defined in csrc/comm/comm_guard_probe.cpp.
  void bind_comm_guard_probe(pybind11::module_&);
  bind_comm_guard_probe(m);
}
