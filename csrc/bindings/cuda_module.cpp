// pyengine._cuda: the CUDA backend. Compiled with the host compiler; only csrc/cuda/*.cu go
// through nvcc. The CUDA runtime is linked statically, so this imports with no CUDA library
// and no driver on the machine; device_count() then reports 0.
#include "bindings/bind_ops.h"
#include "comm/nccl_comm.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyengine CUDA kernels";
  // The config structs are registered by _C (see bind_types.h); the same classes are
  // attributes here too, so `mod.OptimizerArgs()` works whichever backend `mod` is.
  pybind11::module_ c = pybind11::module_::import("pyengine._C");
  for (const char* name : {"OptimizerArgs", "StepScalarArgs", "LossScaleConfig"}) m.attr(name) = c.attr(name);
  PE_BIND_OPS(m, ::pyengine::cuda);
  m.def("device_count", &pyengine::cuda::device_count);
  m.def("compiled_archs", &pyengine::cuda::compiled_archs);

  // NCCL communicator (the library is found at run time; see csrc/comm/nccl_comm.cpp).
  namespace py = pybind11;
  namespace pc = pyengine::comm;
  using pyengine::bindings::Addr;
  using pyengine::bindings::dt;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("HAS_NCCL") = true;
  m.def("nccl_load", &pc::nccl_load, py::arg("path") = "", nogil);
  m.def("nccl_unique_id", [](const std::string& path) { return py::bytes(pc::nccl_unique_id(path)); },
        py::arg("path") = "");
  m.def("nccl_version", &pc::nccl_version);
  py::class_<pc::NcclComm>(m, "NcclComm")
      .def(py::init([](py::bytes id, int rank, int world, int device, double timeout) {
             std::string s = id;
             py::gil_scoped_release release;
             return new pc::NcclComm(s, rank, world, device, timeout);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("world_size"), py::arg("device"), py::arg("timeout_s"))
      .def("allreduce", [](pc::NcclComm& c, Addr buf, std::int64_t n, int d, bool avg, Addr s) {
             c.allreduce(buf, n, dt(d), avg, s);
           }, nogil)
      .def("reduce_scatter", [](pc::NcclComm& c, Addr send, Addr recv, std::int64_t count, int d, bool avg, Addr s) {
             c.reduce_scatter(send, recv, count, dt(d), avg, s);
           }, nogil)
      .def("all_gather", [](pc::NcclComm& c, Addr send, Addr recv, std::int64_t count, int d, Addr s) {
             c.all_gather(send, recv, count, dt(d), s);
           }, nogil)
      .def("broadcast", [](pc::NcclComm& c, Addr buf, std::int64_t n, int d, int root, Addr s) {
             c.broadcast(buf, n, dt(d), root, s);
           }, nogil)
      .def("sendrecv", [](pc::NcclComm& c, Addr send, std::int64_t sn, Addr recv, std::int64_t rn, int d, int peer,
                          Addr s) { c.sendrecv(send, sn, recv, rn, dt(d), peer, s); }, nogil)
      .def("check", &pc::NcclComm::check, nogil)
      .def("abort", &pc::NcclComm::abort, py::arg("why") = "", nogil)
      .def_property_readonly("aborted", &pc::NcclComm::aborted)
      .def("abort_word", &pc::NcclComm::abort_word)
      .def("abort_word_host", &pc::NcclComm::abort_word_host)
      .def_property_readonly("rank", &pc::NcclComm::rank)
      .def_property_readonly("world_size", &pc::NcclComm::world_size);
}
