// The U-domain iterations on CUDA as a handful of kernels per direction (the CPU loops of
// csrc/cpu/udomain_kernel.cpp, ported): per iteration one pass over the table that writes
// per-block partial sums, and one small kernel that adds them in a fixed order, so results are
// the same bits on every run. The early stop, T and every branch on it stay on the device:
// no host sync anywhere. Attention and sums in float64, as on CPU.
//
// OFF by default (edkm._C.set_fused_udomain_cuda): written in a session without a GPU, it
// has been compiled but not yet run; tests/python/test_udomain_fused_cuda.py checks it
// against the ATen composition and the float64 reference on the next GPU run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "settings.h"
#include "udomain.h"

namespace edkm {
namespace cuda {

namespace {

constexpr int kBlock = 256;
constexpr int64_t kChunk = 2048;  // table entries per block (8 per thread)

struct Table {
  int64_t groups, width, k, chunks;
  int64_t blocks() const { return groups * chunks; }
};

// Centroid j of group g: its moments summed over the table's chunks in chunk order (the same
// bits on every run). partial holds, per (group, chunk), K numerators then K denominators.
__device__ __forceinline__ void sum_moments(const double* partial, const Table& t, int64_t g, int64_t j,
                                            double& num, double& den) {
  for (int64_t ch = 0; ch < t.chunks; ++ch) {
    const double* p = partial + (g * t.chunks + ch) * 2 * t.k;
    num += p[j];
    den += p[t.k + j];
  }
}

template <int KMAX, typename T>
__device__ __forceinline__ void attention(double v, const T* c, int k, double neg_inv_tau, bool squared,
                                          double* a) {
  double m = -INFINITY;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      const double d = v - static_cast<double>(c[j]);
      const double s = (squared ? d * d : fabs(d)) * neg_inv_tau;
      a[j] = s;
      m = fmax(m, s);
    }
  }
  double z = 0;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      a[j] = exp(a[j] - m);
      z += a[j];
    }
  }
#pragma unroll(KMAX > 16 ? 4 : KMAX)
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) a[j] /= z;
  }
}

__device__ __forceinline__ double slope_of(double diff, bool squared) {
  return squared ? diff * 2 : static_cast<double>((diff > 0) - (diff < 0));
}

// Sum of x over the block in a fixed order (tree in shared memory). Every thread must call it.
__device__ double block_sum(double x, double* sh) {
  sh[threadIdx.x] = x;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

// Per block (group g, chunk): sum_u n a_j v and sum_u n a_j at centroids c, into
// partial[(g * chunks + chunk) * 2K + {0, K} + j].
// Skipped (the whole grid) once the forward has stopped (done) or, in the reverse pass, for a
// held step (T <= step): the consumers then ignore the stale partials.
template <int KMAX, typename T>
__global__ void __launch_bounds__(kBlock)
    moments_kernel(const T* __restrict__ values, const T* __restrict__ counts, const T* __restrict__ c,
                   Table t, double neg_inv_tau, bool squared, const bool* __restrict__ done,
                   const int64_t* __restrict__ iterations, int64_t step, double* __restrict__ partial) {
  __shared__ double sh[kBlock];
  if ((done != nullptr && *done) || (iterations != nullptr && *iterations <= step)) return;
  const int64_t g = blockIdx.x / t.chunks, chunk = blockIdx.x % t.chunks;
  const int64_t lo = chunk * kChunk, hi = min(t.width, lo + kChunk);
  const int k = static_cast<int>(t.k);
  const T* cg = c + g * t.k;
  double num[KMAX], den[KMAX], a[KMAX];
#pragma unroll(KMAX > 16 ? 4 : KMAX)
  for (int j = 0; j < KMAX; ++j) num[j] = den[j] = 0;
  for (int64_t u = lo + threadIdx.x; u < hi; u += kBlock) {
    const double n = static_cast<double>(counts[g * t.width + u]);
    if (n == 0) continue;
    const double v = static_cast<double>(values[g * t.width + u]);
    attention<KMAX>(v, cg, k, neg_inv_tau, squared, a);
#pragma unroll(KMAX > 16 ? 4 : KMAX)
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) {
        const double w = n * a[j];
        num[j] += w * v;
        den[j] += w;
      }
    }
  }
  double* out = partial + blockIdx.x * 2 * t.k;
  for (int j = 0; j < k; ++j) {  // k is the same for every thread: the block stays converged
    const double sn = block_sum(num[j], sh);
    const double sd = block_sum(den[j], sh);
    if (threadIdx.x == 0) {
      out[j] = sn;
      out[t.k + j] = sd;
    }
  }
}

// One block: next = num / den (or c where nothing attends), history[step + 1] = done ? c : next,
// then T += !done and done |= max |next - c| <= epsilon.
template <typename T>
__global__ void update_kernel(const double* __restrict__ partial, Table t, T* __restrict__ history,
                              int64_t step, double epsilon, bool* __restrict__ done,
                              int64_t* __restrict__ iterations) {
  __shared__ double sh[kBlock];
  const int64_t gk = t.groups * t.k;
  const T* c = history + step * gk;
  T* next_row = history + (step + 1) * gk;
  const bool was_done = *done;
  double move = 0;
  for (int64_t i = threadIdx.x; i < gk; i += kBlock) {
    const int64_t g = i / t.k, j = i % t.k;
    double num = 0, den = 0;
    sum_moments(partial, t, g, j, num, den);
    const T ci = c[i];
    const T nx = den > 0 ? static_cast<T>(num / den) : ci;
    const T diff = nx > ci ? nx - ci : ci - nx;
    move = fmax(move, static_cast<double>(diff));
    next_row[i] = was_done ? ci : nx;
  }
  sh[threadIdx.x] = move;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (!was_done) *iterations += 1;
    *done = was_done || sh[0] <= epsilon;
  }
}

// F_u = sum_j a_uj c_j for every entry, c = history[T] (T read on the device).
template <int KMAX, typename T>
__global__ void __launch_bounds__(kBlock)
    soft_kernel(const T* __restrict__ values, const T* __restrict__ history,
                const int64_t* __restrict__ iterations, Table t, double neg_inv_tau, bool squared,
                T* __restrict__ soft) {
  const T* c = history + (*iterations) * t.groups * t.k;
  const int k = static_cast<int>(t.k);
  double a[KMAX];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < t.groups * t.width;
       i += int64_t(gridDim.x) * blockDim.x) {
    const T* cg = c + (i / t.width) * t.k;
    attention<KMAX>(static_cast<double>(values[i]), cg, k, neg_inv_tau, squared, a);
    double f = 0;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) f += a[j] * static_cast<double>(cg[j]);
    }
    soft[i] = static_cast<T>(f);
  }
}

// Backward at c_T: direct[u] = dF/dv, and per block sum_u (G_u a_j + G_u a_j (c_j - F) s_j / tau).
template <int KMAX, typename T>
__global__ void __launch_bounds__(kBlock)
    final_kernel(const T* __restrict__ values, const T* __restrict__ history,
                 const int64_t* __restrict__ iterations, const T* __restrict__ grad_soft, Table t,
                 double inv_tau, bool squared, T* __restrict__ direct, double* __restrict__ partial) {
  __shared__ double sh[kBlock];
  const int64_t g = blockIdx.x / t.chunks, chunk = blockIdx.x % t.chunks;
  const int64_t lo = chunk * kChunk, hi = min(t.width, lo + kChunk);
  const int k = static_cast<int>(t.k);
  const T* c = history + (*iterations) * t.groups * t.k + g * t.k;
  double acc[KMAX], a[KMAX];
#pragma unroll(KMAX > 16 ? 4 : KMAX)
  for (int j = 0; j < KMAX; ++j) acc[j] = 0;
  for (int64_t u = lo + threadIdx.x; u < hi; u += kBlock) {
    const int64_t i = g * t.width + u;
    const double v = static_cast<double>(values[i]);
    attention<KMAX>(v, c, k, -inv_tau, squared, a);
    double f = 0;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) f += a[j] * static_cast<double>(c[j]);
    }
    const double gu = static_cast<double>(grad_soft[i]);
    double d = 0;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) {
        const double s = slope_of(v - static_cast<double>(c[j]), squared);
        const double sg = a[j] * (static_cast<double>(c[j]) - f);
        d += sg * s;
        if (gu != 0) acc[j] += gu * a[j] + gu * sg * s * inv_tau;
      }
    }
    direct[i] = static_cast<T>(-d * inv_tau);
  }
  double* out = partial + blockIdx.x * t.k;
  for (int j = 0; j < k; ++j) {
    const double s = block_sum(acc[j], sh);
    if (threadIdx.x == 0) out[j] = s;
  }
}

// gc[i] = sum over chunks of partial (+ grad_centroids, added in T's precision as on CPU).
template <typename T>
__global__ void reduce_gc_kernel(const double* __restrict__ partial, Table t, const T* __restrict__ extra,
                                 double* __restrict__ gc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < t.groups * t.k;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / t.k, j = i % t.k;
    double s = 0;
    for (int64_t ch = 0; ch < t.chunks; ++ch) s += partial[(g * t.chunks + ch) * t.k + j];
    if (extra != nullptr) s = static_cast<double>(static_cast<T>(s)) + static_cast<double>(extra[i]);
    gc[i] = s;
  }
}

// Coefficients of step t of the reverse pass, from that step's moments and gc:
// coef = [g_num, g_den, g_keep], each [G, K].
__global__ void coef_kernel(const double* __restrict__ partial, Table t, const double* __restrict__ gc,
                            double* __restrict__ coef) {
  const int64_t gk = t.groups * t.k;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < gk;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / t.k, j = i % t.k;
    double num = 0, den = 0;
    sum_moments(partial, t, g, j, num, den);
    const bool attended = den > 0;
    const double safe = attended ? den : 1.0;
    const double next = num / safe;
    coef[i] = attended ? gc[i] / safe : 0.0;
    coef[gk + i] = attended ? -gc[i] * next / safe : 0.0;
    coef[2 * gk + i] = attended ? 0.0 : gc[i];
  }
}

// Step t of the reverse pass (skipped on the device when t >= T): indirect[u] gains what reaches
// v_u through this step's centroid update; per block, this step's dL/dc_t.
template <int KMAX, typename T>
__global__ void __launch_bounds__(kBlock)
    step_kernel(const T* __restrict__ values, const T* __restrict__ counts, const T* __restrict__ c,
                const double* __restrict__ coef, const int64_t* __restrict__ iterations, int64_t step,
                Table t, double inv_tau, bool squared, T* __restrict__ indirect,
                double* __restrict__ partial) {
  __shared__ double sh[kBlock];
  if (*iterations <= step) return;  // the same for the whole grid
  const int64_t g = blockIdx.x / t.chunks, chunk = blockIdx.x % t.chunks;
  const int64_t lo = chunk * kChunk, hi = min(t.width, lo + kChunk);
  const int k = static_cast<int>(t.k);
  const int64_t gk = t.groups * t.k;
  const T* cg = c + g * t.k;
  const double* gn = coef + g * t.k;
  const double* gd = coef + gk + g * t.k;
  double acc[KMAX], a[KMAX], grad_a[KMAX];
#pragma unroll(KMAX > 16 ? 4 : KMAX)
  for (int j = 0; j < KMAX; ++j) acc[j] = 0;
  for (int64_t u = lo + threadIdx.x; u < hi; u += kBlock) {
    const int64_t i = g * t.width + u;
    const double n = static_cast<double>(counts[i]);
    if (n == 0) continue;
    const double v = static_cast<double>(values[i]);
    attention<KMAX>(v, cg, k, -inv_tau, squared, a);
    double through = 0, sum_ag = 0;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) {
        through += n * a[j] * gn[j];
        grad_a[j] = n * (v * gn[j] + gd[j]);
        sum_ag += a[j] * grad_a[j];
      }
    }
    double back = 0;
#pragma unroll(KMAX > 16 ? 4 : KMAX)
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) {
        const double term = a[j] * (grad_a[j] - sum_ag) * slope_of(v - static_cast<double>(cg[j]), squared);
        back += term;
        acc[j] += term * inv_tau;
      }
    }
    indirect[i] = static_cast<T>(static_cast<double>(indirect[i]) + through - back * inv_tau);
  }
  double* out = partial + blockIdx.x * t.k;
  for (int j = 0; j < k; ++j) {
    const double s = block_sum(acc[j], sh);
    if (threadIdx.x == 0) out[j] = s;
  }
}

// gc = g_keep + sum of this step's partials, when the step was not held (t < T).
__global__ void step_gc_kernel(const double* __restrict__ partial, Table t, const double* __restrict__ coef,
                               const int64_t* __restrict__ iterations, int64_t step,
                               double* __restrict__ gc) {
  if (*iterations <= step) return;
  const int64_t gk = t.groups * t.k;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < gk;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / t.k, j = i % t.k;
    double s = coef[2 * gk + i];
    for (int64_t ch = 0; ch < t.chunks; ++ch) s += partial[(g * t.chunks + ch) * t.k + j];
    gc[i] = s;
  }
}

Table table_of(const at::Tensor& values, int64_t k) {
  const int64_t g = values.size(0), w = values.size(1);
  return {g, w, k, std::max<int64_t>(1, (w + kChunk - 1) / kChunk)};
}

int grid_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kBlock - 1) / kBlock, 4096)));
}

// KMAX: per-thread arrays sized for K <= 16 (registers), <= 64, or <= 256 (local memory:
// three 256-entry double arrays per thread, which the driver reserves for every resident thread).
#define EDKM_DISPATCH_KMAX(k, ...) \
  if ((k) <= 16) {                 \
    constexpr int KMAX = 16;       \
    __VA_ARGS__();                 \
  } else if ((k) <= 64) {          \
    constexpr int KMAX = 64;       \
    __VA_ARGS__();                 \
  } else {                         \
    constexpr int KMAX = 256;      \
    __VA_ARGS__();                 \
  }

UDomainForward forward_cuda(const at::Tensor& values_in, const at::Tensor& counts_in,
                            const at::Tensor& centroids, double temperature, int64_t max_iter, double epsilon,
                            Distance distance) {
  const c10::cuda::CUDAGuard guard(values_in.device());
  TORCH_CHECK_VALUE(centroids.size(1) <= 256, "dkm: at most 256 centroids per group on CUDA, got ",
                    centroids.size(1));
  TORCH_CHECK_VALUE(values_in.size(0) > 0, "dkm: no groups");
  auto values = values_in.contiguous();
  auto counts = counts_in.to(values.device()).contiguous();
  const Table t = table_of(values, centroids.size(1));
  const bool squared = distance == Distance::kSquared;
  const double neg_inv_tau = -1.0 / temperature;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto history = at::empty({max_iter + 1, t.groups, t.k}, values.options());
  history[0].copy_(centroids);
  auto partial = at::empty({t.blocks() * 2 * t.k}, values.options().dtype(at::kDouble));
  auto done = at::zeros({}, values.options().dtype(at::kBool));
  auto iterations = at::zeros({}, values.options().dtype(at::kLong));
  auto soft = at::empty_like(values);
  const int64_t gk = t.groups * t.k;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "udomain_forward_cuda", [&] {
    EDKM_DISPATCH_KMAX(t.k, [&] {
      for (int64_t step = 0; step < max_iter; ++step) {
        moments_kernel<KMAX, scalar_t><<<t.blocks(), kBlock, 0, stream>>>(
            values.const_data_ptr<scalar_t>(), counts.const_data_ptr<scalar_t>(),
            history.const_data_ptr<scalar_t>() + step * gk, t, neg_inv_tau, squared,
            done.const_data_ptr<bool>(), nullptr, 0, partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        update_kernel<scalar_t><<<1, kBlock, 0, stream>>>(
            partial.const_data_ptr<double>(), t, history.mutable_data_ptr<scalar_t>(), step, epsilon,
            done.mutable_data_ptr<bool>(), iterations.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      soft_kernel<KMAX, scalar_t><<<grid_for(t.groups * t.width), kBlock, 0, stream>>>(
          values.const_data_ptr<scalar_t>(), history.const_data_ptr<scalar_t>(),
          iterations.const_data_ptr<int64_t>(), t, neg_inv_tau, squared, soft.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Rows past T repeat c_T (held), so the last row is c_T.
  return {history[max_iter].clone(), soft, history, iterations};
}

UDomainBackward backward_cuda(const at::Tensor& values_in, const at::Tensor& counts_in,
                              const at::Tensor& history_in, const at::Tensor& iterations_in,
                              double temperature, Distance distance, const at::Tensor& grad_soft_in,
                              const at::Tensor& grad_centroids) {
  const c10::cuda::CUDAGuard guard(values_in.device());
  auto values = values_in.contiguous();
  // Everything the kernels dereference on the table's device and dtype.
  auto counts = counts_in.to(values.device(), values.scalar_type()).contiguous();
  auto history = history_in.to(values.device(), values.scalar_type()).contiguous();
  auto grad_soft = grad_soft_in.to(values.device(), values.scalar_type()).contiguous();
  auto iterations = iterations_in.to(values.device(), at::kLong).contiguous();
  at::Tensor extra;
  if (grad_centroids.defined()) {
    extra = grad_centroids.to(values.device(), values.scalar_type()).contiguous();
  }
  const Table t = table_of(values, history.size(2));
  TORCH_CHECK_VALUE(t.k <= 256, "dkm backward: at most 256 centroids per group on CUDA, got ", t.k);
  TORCH_CHECK_VALUE(t.groups > 0 && history.size(1) == t.groups && counts.sizes() == values.sizes() &&
                        grad_soft.sizes() == values.sizes() &&
                        (!extra.defined() || extra.numel() == t.groups * t.k),
                    "dkm backward: U-domain tables of inconsistent shapes");
  const int64_t steps = history.size(0) - 1, gk = t.groups * t.k;
  const bool squared = distance == Distance::kSquared;
  const double inv_tau = 1.0 / temperature;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto dbl = values.options().dtype(at::kDouble);
  auto moments = at::zeros({t.blocks() * 2 * t.k}, dbl);  // read (and ignored) for held steps
  auto partial = at::empty({t.blocks() * t.k}, dbl);
  auto gc = at::empty({gk}, dbl);
  auto coef = at::empty({3 * gk}, dbl);
  auto direct = at::empty_like(values);
  auto indirect = at::zeros_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "udomain_backward_cuda", [&] {
    EDKM_DISPATCH_KMAX(t.k, [&] {
      const scalar_t* v = values.const_data_ptr<scalar_t>();
      const scalar_t* n = counts.const_data_ptr<scalar_t>();
      const scalar_t* h = history.const_data_ptr<scalar_t>();
      const int64_t* it = iterations.const_data_ptr<int64_t>();
      final_kernel<KMAX, scalar_t><<<t.blocks(), kBlock, 0, stream>>>(
          v, h, it, grad_soft.const_data_ptr<scalar_t>(), t, inv_tau, squared,
          direct.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_gc_kernel<scalar_t><<<grid_for(gk), kBlock, 0, stream>>>(
          partial.const_data_ptr<double>(), t, extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr,
          gc.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (int64_t step = steps - 1; step >= 0; --step) {
        moments_kernel<KMAX, scalar_t><<<t.blocks(), kBlock, 0, stream>>>(
            v, n, h + step * gk, t, -inv_tau, squared, nullptr, it, step, moments.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        coef_kernel<<<grid_for(gk), kBlock, 0, stream>>>(moments.const_data_ptr<double>(), t,
                                                         gc.const_data_ptr<double>(),
                                                         coef.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        step_kernel<KMAX, scalar_t><<<t.blocks(), kBlock, 0, stream>>>(
            v, n, h + step * gk, coef.const_data_ptr<double>(), it, step, t, inv_tau, squared,
            indirect.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        step_gc_kernel<<<grid_for(gk), kBlock, 0, stream>>>(partial.const_data_ptr<double>(), t,
                                                            coef.const_data_ptr<double>(), it, step,
                                                            gc.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {direct, indirect, gc.view({t.groups, t.k}).to(values.scalar_type())};
}

// Hands the kernels to udomain.cpp when the library loads.
const bool registered = [] {
  register_udomain_cuda(&forward_cuda, &backward_cuda);
  return true;
}();

}  // namespace

}  // namespace cuda
}  // namespace edkm
