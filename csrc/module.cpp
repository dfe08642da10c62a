// Entry point of the extension spnn_fast._C. Each op's translation unit exposes a register_*
// function; this file only wires them into the module. Built on pybind11 and numpy buffers, with
// no libtorch dependency, so one build serves every torch version.
#include <pybind11/pybind11.h>

#include <thread>

namespace py = pybind11;

void register_encode(py::module_& m);
void register_time_bias(py::module_& m);
void register_topk(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "spnn_fast C++ extension (batch encoder, the attention's time bias on the CPU)";
  m.def("hardware_threads", []() { return std::thread::hardware_concurrency(); },
        "Threads the hardware reports (0 when unknown).");
  register_encode(m);
  register_time_bias(m);
  register_topk(m);
}
