// pyengine._cuda: the CUDA backend. Compiled with the host compiler; only csrc/cuda/*.cu go
// through nvcc. The CUDA runtime is linked statically, so this imports with no CUDA library
// and no driver on the machine; device_count() then reports 0.
#include "bindings/bind_ops.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyengine CUDA kernels";
  PE_BIND_OPS(m, ::pyengine::cuda);
  m.def("device_count", &pyengine::cuda::device_count);
  m.def("compiled_archs", &pyengine::cuda::compiled_archs);
}
