// pybind11 module edkm._C: what is not an op — build facts, kernel settings, and the
// saved-tensor store class. The ops themselves live in libedkm (torch.ops.edkm).
#include <torch/python.h>

#include <ATen/Parallel.h>
#include <edkm/edkm.h>
#include <edkm/saved_tensor_store.h>

#include "settings.h"

namespace py = pybind11;

namespace {

py::dict counters_dict(const edkm::StoreCounters& c) {
  py::dict d;
  d["packed"] = c.packed;
  d["device_bytes"] = c.device_bytes;
  d["host_bytes"] = c.host_bytes;
  d["referenced_bytes"] = c.referenced_bytes;
  d["dedup_hits"] = c.dedup_hits;
  d["dedup_bytes_avoided"] = c.dedup_bytes_avoided;
  d["uniquify_bytes_avoided"] = c.uniquify_bytes_avoided;
  d["shard_bytes_avoided"] = c.shard_bytes_avoided;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "edkm native helpers (ops are under torch.ops.edkm)";
  m.def("cuda_compiled", &edkm::cuda_compiled, "True when libedkm was built with CUDA kernels");
  m.def("parallel_info", [] { return at::get_parallel_info(); },
        "ATen's description of the CPU thread pools the kernels run on");
  m.def("set_deterministic_scatter", &edkm::set_deterministic_scatter, py::arg("deterministic"),
        "CUDA backward scatter-add: True = same bits every run (default), False = float64 atomics");
  m.def("deterministic_scatter", &edkm::deterministic_scatter);

  py::class_<edkm::SavedTensorStore, std::shared_ptr<edkm::SavedTensorStore>>(
      m, "SavedTensorStore",
      "Holds what autograd saves for backward: offloaded to host, deduplicated, uniquified.")
      .def(py::init([](bool offload, bool dedup, bool uniquify, bool keep_parameters) {
             edkm::StoreOptions o;
             o.offload = offload;
             o.dedup = dedup;
             o.uniquify = uniquify;
             o.keep_parameters = keep_parameters;
             return std::make_shared<edkm::SavedTensorStore>(o);
           }),
           py::arg("offload") = true, py::arg("dedup") = true, py::arg("uniquify") = false,
           py::arg("keep_parameters") = true)
      .def("pack", &edkm::SavedTensorStore::pack, py::arg("tensor"),
           py::call_guard<py::gil_scoped_release>())
      .def("unpack", &edkm::SavedTensorStore::unpack, py::arg("handle"),
           py::call_guard<py::gil_scoped_release>())
      .def("release", &edkm::SavedTensorStore::release, py::arg("handle"))
      .def("fingerprint", &edkm::SavedTensorStore::fingerprint, py::arg("handle"))
      .def("shard", &edkm::SavedTensorStore::shard, py::arg("handle"), py::arg("rank"),
           py::arg("world"))
      .def("is_sharded", &edkm::SavedTensorStore::is_sharded, py::arg("handle"))
      .def("shard_part", &edkm::SavedTensorStore::shard_part, py::arg("handle"))
      .def("unshard", &edkm::SavedTensorStore::unshard, py::arg("handle"), py::arg("gathered"))
      .def("counters", [](const edkm::SavedTensorStore& s) { return counters_dict(s.counters()); })
      .def_property_readonly("live_handles", &edkm::SavedTensorStore::live_handles);
#ifdef EDKM_VERSION
  m.attr("__version__") = EDKM_VERSION;
#endif
}
