// Exact optimal weighted 1-D k-means (the initializer of clustering tables).
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace edkm {

// Checks that do not read values: 1-D values (floating) and counts (floating or integer) of the
// same length U >= 1 on one device, k >= 1. One clear error naming the argument each.
void check_kmeans1d_args(const at::Tensor& values, const at::Tensor& counts, int64_t k);

// optimal_kmeans_1d_grouped's checks that do not read values: weight 2-D [G, M] floating with
// G, M >= 1, k >= 1, importance (if given) floating, of weight's shape and device.
void check_kmeans1d_grouped_args(const at::Tensor& weight, int64_t k,
                                 const std::optional<at::Tensor>& importance);

namespace generic {
// Any device: runs the CPU kernel on host copies and returns the results on values' device.
std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d(const at::Tensor& values, const at::Tensor& counts,
                                                     int64_t k);
std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d_grouped(const at::Tensor& weight, int64_t k,
                                                             const std::optional<at::Tensor>& importance);
}  // namespace generic

}  // namespace edkm
