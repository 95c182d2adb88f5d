// pybind11 module edkm._C: what is not an op (build facts now; classes such as the saved-tensor
// store later). The ops themselves live in libedkm and are reached through torch.ops.edkm.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>
#include <edkm/edkm.h>

#include "settings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "edkm native helpers (ops are under torch.ops.edkm)";
  m.def("cuda_compiled", &edkm::cuda_compiled, "True when libedkm was built with CUDA kernels");
  m.def("parallel_info", [] { return at::get_parallel_info(); },
        "ATen's description of the CPU thread pools the kernels run on");
  m.def("set_deterministic_scatter", &edkm::set_deterministic_scatter, py::arg("deterministic"),
        "CUDA backward scatter-add: True = same bits every run (default), False = float64 atomics");
  m.def("deterministic_scatter", &edkm::deterministic_scatter);
#ifdef EDKM_VERSION
  m.attr("__version__") = EDKM_VERSION;
#endif
}
