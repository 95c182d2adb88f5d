#include "dkm_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace edkm {
namespace ops {

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkm_forward(
    const at::Tensor& weight, const at::Tensor& centroids, double temperature, int64_t max_iter,
    double epsilon, c10::string_view distance) {
  static auto h =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, double, int64_t, double, c10::string_view)>(
          "edkm::_dkm_forward");
  return h.call(weight, centroids, temperature, max_iter, epsilon, distance);
}

std::tuple<at::Tensor, at::Tensor> dkm_backward(const at::Tensor& grad_clustered,
                                                const at::Tensor& grad_centroids, const at::Tensor& weight,
                                                const at::Tensor& lookup, const at::Tensor& values,
                                                const at::Tensor& counts, const at::Tensor& history,
                                                const at::Tensor& iterations, double temperature,
                                                c10::string_view distance, at::ScalarType centroids_dtype) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor>(
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
      c10::string_view, at::ScalarType)>("edkm::_dkm_backward");
  return h.call(grad_clustered, grad_centroids, weight, lookup, values, counts, history, iterations,
                temperature, distance, centroids_dtype);
}

at::Tensor dkm_backward_(const at::Tensor& grad_clustered, const at::Tensor& grad_centroids,
                         const at::Tensor& weight, const at::Tensor& lookup, const at::Tensor& values,
                         const at::Tensor& counts, const at::Tensor& history, const at::Tensor& iterations,
                         double temperature, c10::string_view distance, at::ScalarType centroids_dtype) {
  static auto h =
      op<at::Tensor(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                    c10::string_view, at::ScalarType)>("edkm::_dkm_backward_");
  return h.call(grad_clustered, grad_centroids, weight, lookup, values, counts, history, iterations,
                temperature, distance, centroids_dtype);
}

at::Tensor dkm_recompute(const at::Tensor& weight, const at::Tensor& lookup, const at::Tensor& values,
                         const at::Tensor& counts, const at::Tensor& history, const at::Tensor& iterations,
                         double temperature, c10::string_view distance) {
  static auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, double, c10::string_view)>("edkm::_dkm_recompute");
  return h.call(weight, lookup, values, counts, history, iterations, temperature, distance);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ndomain_forward(const at::Tensor& weight,
                                                                           const at::Tensor& centroids,
                                                                           double temperature,
                                                                           int64_t max_iter, double epsilon,
                                                                           c10::string_view distance) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, double, int64_t, double, c10::string_view)>(
      "edkm::_ndomain_forward");
  return h.call(weight, centroids, temperature, max_iter, epsilon, distance);
}

std::tuple<at::Tensor, at::Tensor> ndomain_backward(const at::Tensor& grad_clustered,
                                                    const at::Tensor& grad_centroids,
                                                    const at::Tensor& weight, const at::Tensor& history,
                                                    const at::Tensor& iterations, double temperature,
                                                    c10::string_view distance,
                                                    at::ScalarType centroids_dtype) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor>(
      const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, double, c10::string_view, at::ScalarType)>(
      "edkm::_ndomain_backward");
  return h.call(grad_clustered, grad_centroids, weight, history, iterations, temperature, distance,
                centroids_dtype);
}

at::Tensor ndomain_recompute(const at::Tensor& weight, const at::Tensor& history,
                             const at::Tensor& iterations, double temperature, c10::string_view distance) {
  static auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, c10::string_view)>(
          "edkm::_ndomain_recompute");
  return h.call(weight, history, iterations, temperature, distance);
}

}  // namespace ops
}  // namespace edkm
