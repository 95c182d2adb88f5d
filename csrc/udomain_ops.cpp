// The U-domain as ops (_udomain_forward / _udomain_backward): DKM over tables of distinct values
// with counts that the caller built, e.g. per-rank histograms all-reduced across a process
// group so a sharded weight is clustered without gathering it (python/edkm/distributed.py).
#include <cmath>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "udomain.h"

namespace edkm {

namespace {

void check_tables(const char* op, const at::Tensor& values, const at::Tensor& counts, int64_t groups) {
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == groups, op,
                    ": values must be [G, U] with G = ", groups, ", got shape ", values.sizes());
  TORCH_CHECK_VALUE(counts.sizes() == values.sizes(), op, ": counts must have values' shape ", values.sizes(),
                    ", got ", counts.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
                   ": values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK_TYPE(counts.scalar_type() == values.scalar_type(), op, ": counts must have values' dtype (",
                   values.scalar_type(), "), got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.device() == values.device(), op, ": counts must be on values' device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> udomain_forward_op(
    const at::Tensor& values, const at::Tensor& counts, const at::Tensor& centroids, double temperature,
    int64_t max_iter, double epsilon, c10::string_view distance) {
  const char* op = "_udomain_forward";
  const Distance dist = parse_distance(op, distance);
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(1) >= 2, op,
                    ": centroids must be [G, K] with K >= 2, got shape ", centroids.sizes());
  check_tables(op, values, counts, centroids.size(0));
  TORCH_CHECK_TYPE(centroids.scalar_type() == values.scalar_type(), op,
                   ": centroids must have values' dtype (", values.scalar_type(), "), got ",
                   centroids.scalar_type());
  TORCH_CHECK_VALUE(centroids.device() == values.device(), op, ": centroids must be on values' device");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op,
                    ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(max_iter >= 1, op, ": max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK_VALUE(epsilon >= 0, op, ": epsilon must be >= 0, got ", epsilon);
  check_finite_centroids(op, centroids);
  auto fwd = udomain_forward(values, counts, centroids, temperature, max_iter, epsilon, dist);
  return {fwd.centroids, fwd.soft, fwd.history, fwd.iterations};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> udomain_backward_op(
    const at::Tensor& values, const at::Tensor& counts, const at::Tensor& history,
    const at::Tensor& iterations, double temperature, c10::string_view distance, const at::Tensor& grad_soft,
    const c10::optional<at::Tensor>& grad_centroids) {
  const char* op = "_udomain_backward";
  const Distance dist = parse_distance(op, distance);
  TORCH_CHECK_VALUE(history.dim() == 3, op, ": history must be [T + 1, G, K], got ", history.sizes());
  check_tables(op, values, counts, history.size(1));
  TORCH_CHECK_VALUE(grad_soft.sizes() == values.sizes(), op, ": grad_soft must have values' shape ",
                    values.sizes(), ", got ", grad_soft.sizes());
  const int64_t t = iterations.item<int64_t>();
  TORCH_CHECK_VALUE(t >= 1 && t < history.size(0), op, ": iterations out of range: ", t);
  at::Tensor gc;
  if (grad_centroids.has_value() && grad_centroids->defined()) {
    TORCH_CHECK_VALUE(grad_centroids->sizes() == history[0].sizes(), op,
                      ": grad_centroids must be [G, K], got ", grad_centroids->sizes());
    gc = grad_centroids->to(values.scalar_type());
  }
  auto bwd = udomain_backward(values, counts, history.to(values.scalar_type()),
                              iterations.to(values.device(), at::kLong), temperature, dist,
                              grad_soft.to(values.scalar_type()), gc);
  return {bwd.direct, bwd.indirect, bwd.centroids};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("_udomain_forward", &udomain_forward_op);
  m.impl("_udomain_backward", &udomain_backward_op);
}

}  // namespace edkm
