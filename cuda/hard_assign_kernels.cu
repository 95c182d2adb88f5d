// CUDA kernels of assign (nearest centroid, linear scan in float64 with the group's centroids
// in shared memory; ties to the lower index, as argmin) and dequantize (one look-up per weight).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "hard_assign.h"
#include "slot_lookup.cuh"

namespace edkm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedCentroids = 4096;  // doubles of centroids cached per block (32 KiB)

template <typename scalar_t, typename index_t>
__global__ void assign_kernel(const scalar_t* __restrict__ weight, const double* __restrict__ centroids,
                              index_t* __restrict__ out, int64_t n, int64_t group_size, int64_t groups,
                              int64_t k, int32_t* bad) {
  __shared__ double cache[kSharedCentroids];
  const bool cached = groups * k <= kSharedCentroids;
  if (cached) {
    for (int64_t j = threadIdx.x; j < groups * k; j += blockDim.x) cache[j] = centroids[j];
    __syncthreads();
  }
  const double* table = cached ? cache : centroids;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double x = static_cast<double>(weight[i]);
    if (!isfinite(x)) {
      *bad = 1;
      continue;
    }
    const double* row = table + (i / group_size) * k;
    int64_t best = 0;
    double best_d = fabs(x - row[0]);
    for (int64_t j = 1; j < k; ++j) {
      const double d = fabs(x - row[j]);
      if (d < best_d) {
        best_d = d;
        best = j;
      }
    }
    out[i] = static_cast<index_t>(best);
  }
}

template <typename out_t, typename index_t>
__global__ void dequantize_kernel(const index_t* __restrict__ indices, const out_t* __restrict__ centroids,
                                  out_t* __restrict__ out, int64_t n, int64_t group_size, int64_t k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = centroids[(i / group_size) * k + static_cast<int64_t>(indices[i])];
  }
}

at::Tensor assign_cuda(const at::Tensor& weight, const at::Tensor& centroids) {
  const auto index_dtype = check_assign_args(weight, centroids);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous();
  auto c = centroids.to(at::kDouble).contiguous();
  const int64_t groups = c.size(0), k = c.size(1), n = w.numel();
  auto out = at::empty(w.sizes(), w.options().dtype(index_dtype));
  auto bad = at::zeros({}, w.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "assign", [&] {
    if (index_dtype == at::kByte) {
      assign_kernel<scalar_t, uint8_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), c.const_data_ptr<double>(), out.mutable_data_ptr<uint8_t>(), n,
          n / groups, groups, k, bad.mutable_data_ptr<int32_t>());
    } else {
      assign_kernel<scalar_t, int32_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), c.const_data_ptr<double>(), out.mutable_data_ptr<int32_t>(), n,
          n / groups, groups, k, bad.mutable_data_ptr<int32_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  TORCH_CHECK_VALUE(bad.item<int32_t>() == 0, "assign: weight contains NaN or Inf");
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& indices, const at::Tensor& centroids,
                           c10::optional<at::ScalarType> dtype) {
  const auto out_dtype = check_dequantize_args(indices, centroids, dtype);
  const c10::cuda::CUDAGuard guard(indices.device());
  auto idx = indices.contiguous();
  auto c = centroids.to(out_dtype).contiguous();
  auto out = at::empty(idx.sizes(), c.options());
  const int64_t n = idx.numel();
  if (n == 0) return out;
  const int64_t groups = c.size(0), k = c.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(idx.scalar_type(), "dequantize_index", [&] {
      dequantize_kernel<out_t, scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          idx.const_data_ptr<scalar_t>(), c.const_data_ptr<out_t>(), out.mutable_data_ptr<out_t>(), n,
          n / groups, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CUDA, m) {
  m.impl("assign", &assign_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace cuda
}  // namespace edkm
