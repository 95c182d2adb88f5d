// DKM over each group's weights directly (the N-domain, csrc/cpu/ndomain_kernel.cpp), and the
// rule that picks it over the U-domain inside dkm and dkm_linear.
#pragma once

#include <ATen/core/Tensor.h>

namespace edkm {

struct NDomainForward {
  at::Tensor clustered;   // weight's shape and dtype
  at::Tensor centroids;   // c_T [G, K], compute dtype
  at::Tensor history;     // [max_iter + 1, G, K]: c_0..c_T, rows past T repeat c_T
  at::Tensor iterations;  // T, int64 scalar
};

// Largest group (weights per LUT) that takes the N-domain on CPU under settings.h's
// ndomain_mode() "auto", for a weight of this dtype under the current settings. A group's
// U-domain costs a slot histogram (16-bit weights) or a sort (32/64-bit), a gather and a scatter
// over its M weights plus the iterations over its U distinct values; the N-domain costs the
// iterations over all M weights (16-bit weights: a one-pass map of the group's distinct values,
// then the iterations over those). Measured on a 1536 x 576 weight, K = 8,
// dkm forward + backward, one thread, both on the AVX2 attention kernels
// (benchmarks/results/ndomain_simd_cpu.md):
// - float32: N-domain 85-113 ms at every group size from one row to the whole matrix, U-domain
//   168-271 ms (a float32 weight has about as many distinct values as weights): no limit.
// - bfloat16 / float16: the N-domain runs over each group's distinct values (at most 65,535
//   weights per group, ndomain_kernel.cpp's DistinctGroup): 88 ms per row, 58 per 4 rows, 34 per
//   8, 24 per 16, 18 per 64 rows (36,864 weights), against the U-domain's 160 / 119 / 95 / 97 /
//   34 ms; a whole matrix is the U-domain's (12 ms against 112 ms): groups of up to 65,535.
// - the scalar float64 loops (float64 weights, or no AVX2): groups of up to 2,048 weights
//   (measured before the AVX2 kernels on a bf16 weight: per row 6.0 vs 9.2 s, per 4 rows 7.0 vs
//   5.9 s on 2 cores).
constexpr int64_t kNDomainMaxGroup = 2048;
constexpr int64_t kNDomainMaxGroup16Simd = 65535;
int64_t ndomain_max_group(at::ScalarType dtype);

// Whether dkm / dkm_linear run the N-domain for this weight and centroids (CPU only; decided
// from shapes and the setting alone, so fake tensors under torch.compile decide the same).
bool ndomain_applies(const at::Tensor& weight, const at::Tensor& centroids);

}  // namespace edkm
