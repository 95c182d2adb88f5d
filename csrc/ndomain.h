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

// Groups of at most this many weights take the N-domain on CPU (settings.h's ndomain_mode()
// "auto"). A group's U-domain costs a slot histogram or sort, a gather and a scatter over its
// M weights plus the iterations over its U distinct values; the N-domain costs iterations over
// all M weights and nothing else. Below a few thousand weights a 16-bit group has nearly as many
// distinct values as weights (U ~ M), so the N-domain does the same iterations without the
// table work. Measured on a 1536 x 576 bf16 matrix, K = 8, dkm forward + backward on 2 cores:
// one LUT per row (M = 576) N-domain 6.0 s vs U-domain 9.2 s; per 4 rows (M = 2304) 7.0 vs
// 5.9 s; per 16 rows 6.0 vs 3.0 s. So rows of up to 2048 weights (a LLaMA row of d_model or
// d_ff up to 2048) take the N-domain when each row has its own LUT.
constexpr int64_t kNDomainMaxGroup = 2048;

// Whether dkm / dkm_linear run the N-domain for this weight and centroids (CPU only; decided
// from shapes and the setting alone, so fake tensors under torch.compile decide the same).
bool ndomain_applies(const at::Tensor& weight, const at::Tensor& centroids);

}  // namespace edkm
