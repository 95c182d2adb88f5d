// edkm public C++ API: every function calls the PyTorch dispatcher, so C++ callers get the
// same CPU/CUDA kernels and autograd as Python's torch.ops.edkm.*.
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace edkm {

// Soft clustering (Differentiable K-Means) of `weight` viewed as [G, M] with G = centroids.size(0)
// tables of K = centroids.size(1) centroids each. Returns the soft-clustered weight (shape and
// dtype of `weight`), the final centroids (shape and dtype of `centroids`) and the number of
// iterations run (int64 scalar tensor). Differentiable w.r.t. weight and centroids.
//   temperature > 0; max_iter >= 1; stops early when the largest centroid move <= epsilon;
//   distance: "squared" (squared Euclidean) or "absolute".
// Dtypes: weight bf16/fp16/fp32/fp64; centroids of weight's dtype, or fp32 for 16-bit weights.
// Computed exactly over the weight's distinct values (docs/DESIGN.md section 2).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm(const at::Tensor& weight, const at::Tensor& centroids,
                                                   double temperature, int64_t max_iter = 3,
                                                   double epsilon = 0.0,
                                                   const std::string& distance = "squared");

// linear(input, dkm(weight, centroids, ...).clustered, bias) that keeps no clustered weight for
// backward (it is rebuilt there from the U-domain tables), so a clustered layer's train-time
// memory is that of a plain linear. weight: [out_features, in_features]. Returns
// (output, final centroids, iterations).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_linear(const at::Tensor& input, const at::Tensor& weight,
                                                          const at::Tensor& centroids,
                                                          const c10::optional<at::Tensor>& bias,
                                                          double temperature, int64_t max_iter = 3,
                                                          double epsilon = 0.0,
                                                          const std::string& distance = "squared");

// The naive N x K DKM with plain ATen ops and autograd: the oracle and the baseline.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_reference(const at::Tensor& weight,
                                                             const at::Tensor& centroids, double temperature,
                                                             int64_t max_iter = 3, double epsilon = 0.0,
                                                             const std::string& distance = "squared");

// Index of the nearest centroid for every weight (shape of weight; uint8 when K <= 256, else
// int32). Ties go to the lower index.
at::Tensor assign(const at::Tensor& weight, const at::Tensor& centroids);

// centroids[g, indices[i]] for every index, in `dtype` (default: centroids' dtype).
at::Tensor dequantize(const at::Tensor& indices, const at::Tensor& centroids,
                      c10::optional<at::ScalarType> dtype = c10::nullopt);

// Bit packing of cluster indices as the file format stores them (docs/FORMAT.md): index j takes
// bits [j*bits, (j+1)*bits) of a little-endian bit stream (bit k is bit k % 8 of byte k / 8);
// the unused high bits of the last byte are zero. `indices`: any shape, uint8/int8/int16/int32/
// int64, values in [0, 2^bits); bits in 1..8. Returns uint8 [ceil(numel * bits / 8)] (row-major
// order of `indices`). CPU has a dedicated kernel; other devices run a generic ATen version.
at::Tensor pack_indices(const at::Tensor& indices, int64_t bits);

// The inverse: uint8 [count] from `packed` (uint8 1-D of exactly ceil(count * bits / 8) bytes,
// unused high bits of the last byte zero).
at::Tensor unpack_indices(const at::Tensor& packed, int64_t bits, int64_t count);

// Exact optimal weighted 1-D k-means: minimizes sum_i counts[i] * (values[i] - c(i))^2 over k
// centroids. values: 1-D, finite, sorted strictly increasing (floating, computed in float64);
// counts: same length, finite and > 0 (floating or integer); k >= 1. Returns (centroids, cost):
// float64 [k] ascending and the optimal cost (0-d float64). When k >= U the centroids are the
// values padded by repeating the last one (cost 0). O(k U log U) time (divide-and-conquer DP)
// and (k - 1) * (U - k + 1) int32 of memory; runs on the CPU (other devices copy there and back).
std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d(const at::Tensor& values, const at::Tensor& counts,
                                                     int64_t k);

// True when this build of libedkm has CUDA kernels.
bool cuda_compiled();

}  // namespace edkm
