// The public C++ API: thin calls into the dispatcher (schemas in registration.cpp).
#include <edkm/edkm.h>
#include <edkm/format.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace edkm {

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
using DkmSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    double, int64_t, double,
                                                                    c10::string_view);
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm(const at::Tensor& weight, const at::Tensor& centroids,
                                                   double temperature, int64_t max_iter, double epsilon,
                                                   const std::string& distance) {
  static auto handle = op<DkmSignature>("edkm::dkm");
  return handle.call(weight, centroids, temperature, max_iter, epsilon, distance);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_reference(const at::Tensor& weight,
                                                             const at::Tensor& centroids, double temperature,
                                                             int64_t max_iter, double epsilon,
                                                             const std::string& distance) {
  static auto handle = op<DkmSignature>("edkm::dkm_reference");
  return handle.call(weight, centroids, temperature, max_iter, epsilon, distance);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_linear(const at::Tensor& input, const at::Tensor& weight,
                                                          const at::Tensor& centroids,
                                                          const c10::optional<at::Tensor>& bias,
                                                          double temperature, int64_t max_iter,
                                                          double epsilon, const std::string& distance) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double,
      int64_t, double, c10::string_view)>("edkm::dkm_linear");
  return handle.call(input, weight, centroids, bias, temperature, max_iter, epsilon, distance);
}

at::Tensor assign(const at::Tensor& weight, const at::Tensor& centroids) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("edkm::assign");
  return handle.call(weight, centroids);
}

at::Tensor dequantize(const at::Tensor& indices, const at::Tensor& centroids,
                      c10::optional<at::ScalarType> dtype) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::optional<at::ScalarType>)>("edkm::dequantize");
  return handle.call(indices, centroids, dtype);
}

at::Tensor pack_indices(const at::Tensor& indices, int64_t bits) {
  static auto handle = op<at::Tensor(const at::Tensor&, int64_t)>("edkm::pack_indices");
  return handle.call(indices, bits);
}

namespace {
// The LUT as the rebuilt weight holds it (the file's fp16 rounded to the weight's dtype).
at::Tensor weight_lut(const ClusteredTensor& w) { return w.lut.to(w.dtype).to(at::kFloat); }

void check_2d(const char* op, const ClusteredTensor& w) {
  TORCH_CHECK_VALUE(w.shape.size() == 2, op, ": the clustered weight must be 2-D, got ", w.shape.size(),
                    " dimensions");
}
}  // namespace

at::Tensor lut_linear(const at::Tensor& input, const ClusteredTensor& weight,
                      const std::optional<at::Tensor>& bias) {
  check_2d("edkm::lut_linear", weight);
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&)>("edkm::lut_linear");
  std::optional<at::Tensor> oi, ov;
  if (weight.num_outliers() > 0) {
    oi = weight.outlier_index;
    ov = weight.outlier_values;
  }
  return handle.call(input, weight.packed, weight_lut(weight), weight.bits, weight.shape[0], bias, oi, ov);
}

at::Tensor lut_embedding(const at::Tensor& indices, const ClusteredTensor& weight) {
  check_2d("edkm::lut_embedding", weight);
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    std::optional<at::ScalarType>)>("edkm::lut_embedding");
  std::optional<at::Tensor> oi, ov;
  if (weight.num_outliers() > 0) {
    oi = weight.outlier_index;
    ov = weight.outlier_values;
  }
  return handle.call(indices, weight.packed, weight_lut(weight), weight.bits, weight.shape[0],
                     weight.shape[1], oi, ov, weight.dtype);
}

at::Tensor unpack_indices(const at::Tensor& packed, int64_t bits, int64_t count) {
  static auto handle = op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("edkm::unpack_indices");
  return handle.call(packed, bits, count);
}

std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d(const at::Tensor& values, const at::Tensor& counts,
                                                     int64_t k) {
  static auto handle = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>(
      "edkm::optimal_kmeans_1d");
  return handle.call(values, counts, k);
}

bool cuda_compiled() {
#ifdef EDKM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace edkm
