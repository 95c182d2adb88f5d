// Exact optimal weighted 1-D k-means (the initializer of clustering tables).
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace edkm {

// Checks that do not read values: 1-D values (floating) and counts (floating or integer) of the
// same length U >= 1 on one device, k >= 1. One clear error naming the argument each.
void check_kmeans1d_args(const at::Tensor& values, const at::Tensor& counts, int64_t k);

namespace generic {
// Any device: runs the CPU kernel on host copies and returns the results on values' device.
std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d(const at::Tensor& values,
                                                     const at::Tensor& counts, int64_t k);
}  // namespace generic

}  // namespace edkm
