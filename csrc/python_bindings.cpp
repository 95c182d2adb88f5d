// pybind11 module edkm._C: what is not an op — build facts, kernel settings, and the
// saved-tensor store class. The ops themselves live in libedkm (torch.ops.edkm).
#include <torch/python.h>

#include <ATen/Parallel.h>
#include <edkm/edkm.h>
#include <edkm/format.h>
#include <edkm/saved_tensor_store.h>
#include <pybind11/stl.h>

#include "ndomain.h"
#include "cpu/attention_avx2.h"
#include "settings.h"
#include "udomain.h"

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

py::dict clustered_dict(const edkm::ClusteredTensor& c) {
  py::dict d;
  d["lut"] = c.lut;
  d["packed"] = c.packed;
  d["bits"] = c.bits;
  d["shape"] = c.shape;
  d["dtype"] = c.dtype;
  d["groups"] = c.groups;
  d["cluster_dim"] = c.cluster_dim;
  return d;
}

edkm::ClusteredTensor clustered_from(const std::string& name, const py::handle& h) {
  if (!py::isinstance<py::dict>(h)) {
    throw py::type_error("_save_compressed: clustered[" + name + "] must be a dict");
  }
  auto d = py::reinterpret_borrow<py::dict>(h);
  for (const char* key : {"lut", "packed", "bits", "shape", "dtype", "groups", "cluster_dim"}) {
    if (!d.contains(key)) {
      throw py::value_error("_save_compressed: clustered[" + name + "] has no '" + key + "'");
    }
  }
  edkm::ClusteredTensor c;
  c.lut = d["lut"].cast<at::Tensor>();
  c.packed = d["packed"].cast<at::Tensor>();
  c.bits = d["bits"].cast<int64_t>();
  c.shape = d["shape"].cast<std::vector<int64_t>>();
  c.dtype = d["dtype"].cast<at::ScalarType>();
  c.groups = d["groups"].cast<int64_t>();
  c.cluster_dim = d["cluster_dim"].cast<int64_t>();
  return c;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "edkm native helpers (ops are under torch.ops.edkm)";
  m.def("cuda_compiled", &edkm::cuda_compiled, "True when libedkm was built with CUDA kernels");
  m.def(
      "parallel_info", [] { return at::get_parallel_info(); },
      "ATen's description of the CPU thread pools the kernels run on");
  m.def("set_deterministic_scatter", &edkm::set_deterministic_scatter, py::arg("deterministic"),
        "CUDA backward scatter-add: True = same bits every run (default), False = float64 atomics");
  m.def("set_fused_udomain", &edkm::set_fused_udomain, py::arg("fused"),
        "CPU U-domain iterations: fused loops (True, default) or the ATen composition every device runs");
  m.def("set_fused_udomain_cuda", &edkm::set_fused_udomain_cuda, py::arg("fused"),
        "CUDA U-domain iterations: the fused kernels (True) or the ATen composition (False, default)");
  m.def("fused_udomain_cuda", &edkm::fused_udomain_cuda);
  m.def("set_privatized_slot_atomics", &edkm::set_privatized_slot_atomics, py::arg("privatized"),
        "CUDA slot histogram and scatter-add: shared-memory histograms and warp-aggregated "
        "atomics (True) or one global atomic per weight (False, default)");
  m.def("privatized_slot_atomics", &edkm::privatized_slot_atomics);
  m.def("udomain_cuda_registered", &edkm::udomain_cuda_registered,
        "True when the CUDA U-domain kernels are compiled in and registered");
  m.def("fused_udomain", &edkm::fused_udomain);
  m.def(
      "set_ndomain",
      [](const std::string& mode) {
        if (mode == "auto")
          edkm::set_ndomain_mode(edkm::NDomainMode::kAuto);
        else if (mode == "always")
          edkm::set_ndomain_mode(edkm::NDomainMode::kAlways);
        else if (mode == "never")
          edkm::set_ndomain_mode(edkm::NDomainMode::kNever);
        else
          throw py::value_error("set_ndomain: mode must be 'auto', 'always' or 'never', got '" + mode + "'");
      },
      py::arg("mode"),
      "CPU dkm / dkm_linear: 'auto' (default: iterate over each group's weights, the N-domain, "
      "for groups of at most ndomain_max_group(dtype) weights, over distinct values otherwise), "
      "'always' the N-domain, 'never' the U-domain");
  m.def("ndomain", [] {
    switch (edkm::ndomain_mode()) {
      case edkm::NDomainMode::kAlways:
        return std::string("always");
      case edkm::NDomainMode::kNever:
        return std::string("never");
      default:
        return std::string("auto");
    }
  });
  m.def("set_simd_attention", &edkm::set_simd_attention, py::arg("simd"),
        "CPU dkm attention passes (N-domain and fused U-domain) for float32/bfloat16/float16 "
        "weights: float32 AVX2 kernels (True, default; used where simd_attention_available()) or "
        "the scalar float64 loops (False)");
  m.def("simd_attention", &edkm::simd_attention);
  m.def("simd_attention_available", &edkm::attention_avx2::available,
        "True when this CPU runs the AVX2 attention kernels (AVX2 and FMA)");
  m.def(
      "ndomain_max_group",
      [](py::object dtype) {
        return edkm::ndomain_max_group(torch::python::detail::py_object_to_dtype(dtype));
      },
      py::arg("dtype"),
      "Largest group (weights per LUT) that takes the N-domain under set_ndomain('auto') for a "
      "weight of this dtype (under the current set_simd_attention; 2**63 - 1: every size)");
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
      .def("pack", &edkm::SavedTensorStore::pack, py::arg("tensor"), py::call_guard<py::gil_scoped_release>())
      .def("unpack", &edkm::SavedTensorStore::unpack, py::arg("handle"),
           py::call_guard<py::gil_scoped_release>())
      .def("release", &edkm::SavedTensorStore::release, py::arg("handle"))
      .def("fingerprint", &edkm::SavedTensorStore::fingerprint, py::arg("handle"))
      .def("shard", &edkm::SavedTensorStore::shard, py::arg("handle"), py::arg("rank"), py::arg("world"))
      .def("is_sharded", &edkm::SavedTensorStore::is_sharded, py::arg("handle"))
      .def("shard_part", &edkm::SavedTensorStore::shard_part, py::arg("handle"))
      .def("unshard", &edkm::SavedTensorStore::unshard, py::arg("handle"), py::arg("gathered"))
      .def("counters", [](const edkm::SavedTensorStore& s) { return counters_dict(s.counters()); })
      .def_property_readonly("live_handles", &edkm::SavedTensorStore::live_handles);
  // The C++ reader/writer of the compressed-model file (docs/FORMAT.md), for cross-checks
  // against the Python one and the safetensors package.
  m.def(
      "_load_compressed",
      [](const std::string& path) {
        edkm::CompressedFile f;
        {
          py::gil_scoped_release release;
          f = edkm::load_compressed(path);
        }
        py::dict clustered;
        for (const auto& [name, c] : f.clustered) clustered[py::str(name)] = clustered_dict(c);
        py::dict out;
        out["tensors"] = f.tensors;
        out["clustered"] = clustered;
        out["aliases"] = f.aliases;
        out["metadata"] = f.metadata;
        return out;
      },
      py::arg("path"),
      "edkm::load_compressed: {tensors, clustered: {name: {lut, packed, bits, shape, dtype, "
      "groups, cluster_dim}}, aliases, metadata}");
  m.def(
      "_load_compressed_state_dict",
      [](const std::string& path) { return edkm::load_compressed(path).state_dict(); }, py::arg("path"),
      py::call_guard<py::gil_scoped_release>(),
      "edkm::load_compressed(path).state_dict(): every tensor, clustered ones rebuilt");
  m.def(
      "_save_compressed",
      [](const std::string& path, std::map<std::string, at::Tensor> tensors, const py::dict& clustered,
         std::map<std::string, std::string> aliases, std::map<std::string, std::string> metadata) {
        edkm::CompressedFile f;
        f.tensors = std::move(tensors);
        f.aliases = std::move(aliases);
        f.metadata = std::move(metadata);
        for (const auto& item : clustered) {
          const auto name = item.first.cast<std::string>();
          f.clustered.emplace(name, clustered_from(name, item.second));
        }
        py::gil_scoped_release release;
        edkm::save_compressed(path, f);
      },
      py::arg("path"), py::arg("tensors"), py::arg("clustered") = py::dict(),
      py::arg("aliases") = std::map<std::string, std::string>(),
      py::arg("metadata") = std::map<std::string, std::string>(),
      "edkm::save_compressed (clustered: {name: {lut, packed, bits, shape, dtype, groups, "
      "cluster_dim}})");
#ifdef EDKM_VERSION
  m.attr("__version__") = EDKM_VERSION;
#endif
}
