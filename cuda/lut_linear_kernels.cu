// CUDA kernels of lut_linear / lut_embedding (contract in lut_linear.h).
//
// * Decode (up to kGemvMaxBatch input rows): one warp per output row. Each lane unpacks the
//   indices of its columns (two byte loads, a shift, a mask; consecutive lanes read consecutive
//   bytes), looks the values up in the LUT (a few KiB at most, read through the read-only
//   cache) and multiplies them into float32 accumulators for every input row; a warp shuffle
//   sums them, and the row's outliers (found by binary search on their sorted positions) add
//   their difference to the LUT value. The packed indices are read once per call.
// * Prefill (more input rows): tiles of output rows are unpacked into a float32 buffer (at most
//   64 MiB), and cuBLAS multiplies each tile (at::mm).
// * lut_embedding: the asked-for rows are unpacked straight into the output.
// Not yet run on a GPU (no task so far had one): tests/python/test_lut_linear.py's CUDA test
// runs in scripts/gpu_check.sh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "lut_linear.h"

namespace edkm {
namespace cuda {
namespace {

constexpr int kGemvMaxBatch = 8;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kTileFloats = int64_t(1) << 24;  // 64 MiB of unpacked weight per tile

struct Weight {
  const uint8_t* bytes;
  int64_t nbytes;
  const float* lut;  // [G, K, d]
  int64_t rows, cols, bits, k, d, group_numel;
  const int64_t* o_pos;
  const float* o_val;
  int64_t n_out;
};

__device__ __forceinline__ uint32_t index_at(const Weight& w, int64_t j) {
  const int64_t bit = j * w.bits;
  const int64_t byte = bit >> 3;
  uint32_t two = __ldg(w.bytes + byte);
  if (byte + 1 < w.nbytes) two |= uint32_t(__ldg(w.bytes + byte + 1)) << 8;
  return (two >> (bit & 7)) & uint32_t(w.k - 1);
}

// LUT value of flat element e (before outliers).
__device__ __forceinline__ float lut_value(const Weight& w, int64_t e) {
  const int64_t g = e / w.group_numel;
  return __ldg(w.lut + (g * w.k + index_at(w, e / w.d)) * w.d + e % w.d);
}

// First position in o_pos[a, b) that is >= v.
__device__ __forceinline__ int64_t lower_bound(const int64_t* p, int64_t a, int64_t b, int64_t v) {
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    if (p[mid] < v)
      a = mid + 1;
    else
      b = mid;
  }
  return a;
}

template <int M>
__global__ void gemv_kernel(Weight w, const float* __restrict__ x, int64_t m_rows, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= w.rows) return;
  const int64_t base = r * w.cols;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t c = lane; c < w.cols; c += 32) {
    const float v = lut_value(w, base + c);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m < m_rows) acc[m] += v * x[m * w.cols + c];
    }
  }
  if (w.n_out > 0) {
    const int64_t a = lower_bound(w.o_pos, 0, w.n_out, base);
    const int64_t b = lower_bound(w.o_pos, a, w.n_out, base + w.cols);
    for (int64_t i = a + lane; i < b; i += 32) {
      const int64_t c = w.o_pos[i] - base;
      const float delta = w.o_val[i] - lut_value(w, w.o_pos[i]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < m_rows) acc[m] += delta * x[m * w.cols + c];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float s = acc[m];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0 && m < m_rows) y[m * w.rows + r] = s;
  }
}

// out[i, :] = row rows_of[i] (or r0 + i when rows_of is null) of W, for i < n.
__global__ void unpack_rows_kernel(Weight w, const int64_t* __restrict__ rows_of, int64_t r0, int64_t n,
                                   float* __restrict__ out) {
  const int64_t total = n * w.cols;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / w.cols, c = t % w.cols;
    const int64_t r = rows_of ? rows_of[i] : r0 + i;
    const int64_t e = r * w.cols + c;
    float v = lut_value(w, e);
    if (w.n_out > 0) {
      const int64_t p = lower_bound(w.o_pos, 0, w.n_out, e);
      if (p < w.n_out && w.o_pos[p] == e) v = w.o_val[p];
    }
    out[t] = v;
  }
}

int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

Weight make_weight(const at::Tensor& packed, const at::Tensor& lut, const LutWeight& lw,
                   const std::optional<at::Tensor>& oi, const std::optional<at::Tensor>& ov,
                   std::vector<at::Tensor>& keep) {
  Weight w{};
  keep.push_back(packed.contiguous());
  w.bytes = keep.back().const_data_ptr<uint8_t>();
  w.nbytes = keep.back().numel();
  keep.push_back(lut.to(at::kFloat).contiguous());
  w.lut = keep.back().const_data_ptr<float>();
  w.rows = lw.rows;
  w.cols = lw.cols;
  w.bits = lw.bits;
  w.k = lw.k;
  w.d = lw.cluster_dim;
  w.group_numel = lw.group_numel;
  if (oi.has_value() && oi->defined() && oi->numel() > 0) {
    keep.push_back(oi->to(at::kLong).contiguous());
    w.o_pos = keep.back().const_data_ptr<int64_t>();
    keep.push_back(ov->to(at::kFloat).contiguous());
    w.o_val = keep.back().const_data_ptr<float>();
    w.n_out = oi->numel();
  }
  return w;
}

at::Tensor lut_linear_cuda(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& lut,
                           int64_t bits, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& outlier_index,
                           const std::optional<at::Tensor>& outlier_values) {
  TORCH_CHECK_VALUE(input.defined(), "lut_linear: input must be a tensor, got None");
  if (input.scalar_type() == at::kDouble) {
    return generic::lut_linear(input, packed, lut, bits, out_features, bias, outlier_index, outlier_values);
  }
  const auto lw = check_lut_weight("lut_linear", packed, lut, bits, out_features,
                                   input.dim() >= 1 ? input.size(-1) : 0, outlier_index, outlier_values);
  check_lut_linear_input(input, lw, bias);
  TORCH_CHECK_VALUE(input.device() == packed.device(),
                    "lut_linear: input must be on packed's "
                    "device (",
                    packed.device(), "), got ", input.device());
  c10::cuda::CUDAGuard guard(input.device());
  std::vector<at::Tensor> keep;
  const Weight w = make_weight(packed, lut, lw, outlier_index, outlier_values, keep);
  auto x = lut_linear_rows(input, lw);
  const int64_t m = x.size(0);
  auto y = at::empty({m, lw.rows}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (m > 0 && m <= kGemvMaxBatch) {
    const int blocks = static_cast<int>((lw.rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    gemv_kernel<kGemvMaxBatch><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(w, x.const_data_ptr<float>(), m,
                                                                           y.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (m > 0) {
    const int64_t tile = std::clamp<int64_t>(kTileFloats / lw.cols, 1, lw.rows);
    auto buf = at::empty({tile, lw.cols}, x.options());
    for (int64_t r0 = 0; r0 < lw.rows; r0 += tile) {
      const int64_t n = std::min(tile, lw.rows - r0);
      unpack_rows_kernel<<<blocks_for(n * lw.cols, 256), 256, 0, stream>>>(w, nullptr, r0, n,
                                                                           buf.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      y.narrow(1, r0, n).copy_(at::mm(x, buf.narrow(0, 0, n).t()));
    }
  }
  return lut_linear_output(y, bias, input);
}

at::Tensor lut_embedding_cuda(const at::Tensor& indices, const at::Tensor& packed, const at::Tensor& lut,
                              int64_t bits, int64_t num_embeddings, int64_t embedding_dim,
                              const std::optional<at::Tensor>& outlier_index,
                              const std::optional<at::Tensor>& outlier_values,
                              std::optional<at::ScalarType> dtype) {
  const auto out_t = dtype.value_or(lut.scalar_type());
  if (out_t == at::kDouble) {
    return generic::lut_embedding(indices, packed, lut, bits, num_embeddings, embedding_dim, outlier_index,
                                  outlier_values, dtype);
  }
  const auto lw = check_lut_weight("lut_embedding", packed, lut, bits, num_embeddings, embedding_dim,
                                   outlier_index, outlier_values);
  TORCH_CHECK_TYPE(out_t == at::kFloat || out_t == at::kHalf || out_t == at::kBFloat16,
                   "lut_embedding: dtype must be a floating type, got ", out_t);
  check_lut_embedding_indices(indices, lw);
  c10::cuda::CUDAGuard guard(packed.device());
  std::vector<at::Tensor> keep;
  const Weight w = make_weight(packed, lut, lw, outlier_index, outlier_values, keep);
  auto ids = indices.reshape(-1).to(packed.device(), at::kLong).contiguous();
  const int64_t n = ids.numel();
  auto out = at::empty({n, lw.cols}, lut.options().dtype(at::kFloat));
  if (n > 0) {
    unpack_rows_kernel<<<blocks_for(n * lw.cols, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        w, ids.const_data_ptr<int64_t>(), 0, n, out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sizes = indices.sizes().vec();
  sizes.push_back(lw.cols);
  return out.to(out_t).view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CUDA, m) {
  m.impl("lut_linear", &lut_linear_cuda);
  m.impl("lut_embedding", &lut_embedding_cuda);
}

}  // namespace cuda
}  // namespace edkm
