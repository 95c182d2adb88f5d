// optimal_kmeans_1d and optimal_kmeans_1d_grouped: argument checks and the any-device fallback (the work is a
// sequential DP over at most a few hundred thousand values: it runs on the CPU; see cpu/kmeans1d_kernel.cpp).
#include "kmeans1d.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace edkm {

void check_kmeans1d_args(const at::Tensor& values, const at::Tensor& counts, int64_t k) {
  const char* op = "optimal_kmeans_1d";
  TORCH_CHECK_VALUE(values.defined(), op, ": values must be a tensor, got None");
  TORCH_CHECK_VALUE(counts.defined(), op, ": counts must be a tensor, got None");
  TORCH_CHECK_TYPE(values.is_floating_point(), op,
                   ": values must be floating point (float64 preferred), got ", values.scalar_type());
  TORCH_CHECK_TYPE(
      counts.is_floating_point() || at::isIntegralType(counts.scalar_type(), /*includeBool=*/false), op,
      ": counts must be floating point or integer, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D [U], got shape ", values.sizes());
  TORCH_CHECK_VALUE(counts.dim() == 1, op, ": counts must be 1-D [U], got shape ", counts.sizes());
  TORCH_CHECK_VALUE(values.numel() >= 1, op, ": values must hold at least one value, got none");
  TORCH_CHECK_VALUE(counts.numel() == values.numel(), op, ": counts must have values' length ",
                    values.numel(), ", got ", counts.numel());
  TORCH_CHECK_VALUE(values.numel() < (int64_t(1) << 31), op,
                    ": values must hold fewer than 2^31 values, got ", values.numel());
  TORCH_CHECK_VALUE(counts.device() == values.device(), op, ": counts must be on values' device (",
                    values.device(), "), got ", counts.device());
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
}

void check_kmeans1d_grouped_args(const at::Tensor& weight, int64_t k,
                                 const std::optional<at::Tensor>& importance) {
  const char* op = "optimal_kmeans_1d_grouped";
  TORCH_CHECK_VALUE(weight.defined(), op, ": weight must be a tensor, got None");
  TORCH_CHECK_TYPE(weight.is_floating_point(), op,
                   ": weight must be floating point (bf16, fp16, fp32 or fp64), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [groups, group_numel], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1, op,
                    ": weight must have at least one group of at least one value, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) < (int64_t(1) << 31), op,
                    ": groups must hold fewer than 2^31 values, got ", weight.size(1));
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  if (importance.has_value() && importance->defined()) {
    const auto& imp = *importance;
    TORCH_CHECK_TYPE(imp.is_floating_point(), op, ": importance must be floating point, got ",
                     imp.scalar_type());
    TORCH_CHECK_VALUE(imp.sizes() == weight.sizes(), op, ": importance must have weight's shape ",
                      weight.sizes(), ", got ", imp.sizes());
    TORCH_CHECK_VALUE(imp.device() == weight.device(), op, ": importance must be on weight's device (",
                      weight.device(), "), got ", imp.device());
  }
}

namespace generic {

std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d(const at::Tensor& values, const at::Tensor& counts,
                                                     int64_t k) {
  check_kmeans1d_args(values, counts, k);
  static auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("edkm::optimal_kmeans_1d", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  auto [centroids, cost] = handle.call(values.cpu(), counts.cpu(), k);
  return {centroids.to(values.device()), cost.to(values.device())};
}

std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d_grouped(const at::Tensor& weight, int64_t k,
                                                             const std::optional<at::Tensor>& importance) {
  check_kmeans1d_grouped_args(weight, k, importance);
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("edkm::optimal_kmeans_1d_grouped", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                     const std::optional<at::Tensor>&)>();
  std::optional<at::Tensor> imp;
  if (importance.has_value() && importance->defined()) imp = importance->cpu();
  auto [centroids, cost] = handle.call(weight.cpu(), k, imp);
  return {centroids.to(weight.device()), cost.to(weight.device())};
}

}  // namespace generic

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("optimal_kmeans_1d", &generic::optimal_kmeans_1d);
  m.impl("optimal_kmeans_1d_grouped", &generic::optimal_kmeans_1d_grouped);
}

}  // namespace edkm
