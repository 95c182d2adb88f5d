// lut_linear / lut_embedding: run a clustered weight straight from its file form (docs/FORMAT.md:
// bit-packed indices + LUTs [G, K, d] + optional exact outliers) without rebuilding it.
//
//   lut_linear(x, ...)    == F.linear(x, W, bias)     W = the weight the file rebuilds
//   lut_embedding(i, ...) == W[i]
//
// W [rows, cols] is the LUT value of each index (as float32), then the outliers written over it.
// Kernels: cpu/lut_linear_kernel.cpp (float32 accumulation; AVX2 GEMV for small batches, an
// unpacked row tile + BLAS for large ones), ../cuda/lut_linear_kernels.cu, and the plain ATen
// code below for every other case (float64, other devices).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace edkm {

// The weight a packed tensor stands for, as the kernels see it.
struct LutWeight {
  int64_t rows = 0, cols = 0;  // W is [rows, cols]
  int64_t bits = 0, k = 0;     // k = 2^bits
  int64_t groups = 0, cluster_dim = 0;
  int64_t group_numel = 0;  // rows * cols / groups: weights per LUT (contiguous, row-major)
};

// Argument checks shared by every backend (one clear error naming the argument). With
// check_values, also the values (with ATen ops, any device): the LUT finite, the outlier
// positions strictly increasing and in range, their values finite; O(LUT + outliers). Host
// kernels pass false and run check_lut_values_host on the data they already hold (a few ATen
// calls cost more than a small layer's whole product).
LutWeight check_lut_weight(const char* op, const at::Tensor& packed, const at::Tensor& lut, int64_t bits,
                           int64_t rows, int64_t cols, const std::optional<at::Tensor>& outlier_index,
                           const std::optional<at::Tensor>& outlier_values, bool check_values = true);
void check_lut_values_host(const char* op, const LutWeight& w, const float* lut, const int64_t* pos,
                           const float* val, int64_t n_out);

void check_lut_linear_input(const at::Tensor& input, const LutWeight& w,
                            const std::optional<at::Tensor>& bias);
void check_lut_embedding_indices(const at::Tensor& indices, const LutWeight& w);

// What every fused lut_linear kernel does around its product: input [..., cols] as the float32
// [M, cols] matrix it reads, and its float32 result y [M, rows] plus bias, back in input's
// dtype and leading shape.
at::Tensor lut_linear_rows(const at::Tensor& input, const LutWeight& w);
at::Tensor lut_linear_output(at::Tensor y, const std::optional<at::Tensor>& bias, const at::Tensor& input);

namespace generic {
// Plain ATen: rebuilds W (in the compute dtype: float64 for float64 inputs, else float32), then
// at::linear / index_select. Any device, any dtype; the oracle the fused kernels are tested on.
at::Tensor lut_dense_weight(const at::Tensor& packed, const at::Tensor& lut, const LutWeight& w,
                            const std::optional<at::Tensor>& outlier_index,
                            const std::optional<at::Tensor>& outlier_values, at::ScalarType dtype);
at::Tensor lut_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& lut, int64_t bits,
                      int64_t out_features, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& outlier_index,
                      const std::optional<at::Tensor>& outlier_values);
at::Tensor lut_embedding(const at::Tensor& indices, const at::Tensor& packed, const at::Tensor& lut,
                         int64_t bits, int64_t num_embeddings, int64_t embedding_dim,
                         const std::optional<at::Tensor>& outlier_index,
                         const std::optional<at::Tensor>& outlier_values,
                         std::optional<at::ScalarType> dtype);
}  // namespace generic

}  // namespace edkm
