// The hard path used at export: nearest-centroid indices and their look-up.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace edkm {

// Shared checks; return the index dtype (uint8 for K <= 256, else int32) / output dtype.
at::ScalarType check_assign_args(const at::Tensor& weight, const at::Tensor& centroids);
at::ScalarType check_dequantize_args(const at::Tensor& indices, const at::Tensor& centroids,
                                     c10::optional<at::ScalarType> dtype);

namespace generic {
at::Tensor assign(const at::Tensor& weight, const at::Tensor& centroids);
at::Tensor dequantize(const at::Tensor& indices, const at::Tensor& centroids,
                      c10::optional<at::ScalarType> dtype);
}  // namespace generic

}  // namespace edkm
