// The privatized kernels of the slot primitives' two atomic passes (included by
// slot_kernels.cu only). A real bf16 weight matrix uses a few thousand of its 65536 bit
// patterns, so one global atomic per weight lands on a few hundred hot addresses and
// serializes (the H100 profile: 3.1 of 3.9 ms per 4096x4096 dkm call). Here:
//  - histogram: each block counts one tile of <= 32768 weights of one group in shared memory
//    (65536 16-bit counters, two per 32-bit word: a tile cannot overflow one), then adds its
//    non-zero counters to the group's global histogram;
//  - scatter-add: the lanes of a warp that hit the same slot (__match_any_sync) add their terms
//    by shuffles, and one lane does the atomic;
//  - deterministic scatter-add: the largest finite |grad| and the fixed-point scale stay on the
//    device (no host sync), and NaN/Inf terms set per-slot flags, so sums with them are the
//    IEEE sums (NaN, or the infinity) while the finite ones stay order-independent integers.
//
// OFF by default (edkm._C.set_privatized_slot_atomics): written in a session without a GPU,
// compiled but not yet run; tests/python/test_slot_privatized_cuda.py compares them with the
// global-atomic kernels on the next GPU run.
#pragma once

#include <cmath>
#include <cstdint>

#include <math_constants.h>

#include "slot_lookup.cuh"

namespace edkm {
namespace cuda {

// The fixed-point scale of the deterministic scatter-add, from the largest finite |grad| and the
// group size m: every |sum| of a slot is < m * amax <= 2^e, so terms are scaled by 2^(62 - e).
// Host and device run this same code (frexp and ldexp are exact on both), so the global-atomic
// and privatized kernels use the same scale. Extremes: an m * amax that overflows takes e from
// amax's exponent plus m's bit width; a tiny one caps the scale at 2^1023.
__host__ __device__ inline double fixed_point_scale(double amax, int64_t m) {
  if (!(amax > 0)) return 1.0;
  int e = 0;
  const double product = amax * static_cast<double>(m);
  if (isfinite(product)) {
    frexp(product, &e);
  } else {
    frexp(amax, &e);
    for (uint64_t bits = static_cast<uint64_t>(m); bits != 0; bits >>= 1) ++e;
  }
  return ldexp(1.0, 62 - e < 1023 ? 62 - e : 1023);
}

namespace privatized {
namespace {

constexpr int kHistogramThreads = 1024;
constexpr int64_t kHistogramTile = 32768;                                     // weights per block
constexpr int kHistogramWords = 32768;                                        // 65536 16-bit counters
constexpr size_t kHistogramSharedBytes = kHistogramWords * sizeof(uint32_t);  // 128 KiB
static_assert(kHistogramTile <= 65535, "a tile must not overflow a 16-bit counter");

// Block b counts tile b % tiles_per_group of group b / tiles_per_group into hist[g, 65536].
__global__ void __launch_bounds__(kHistogramThreads)
    histogram_kernel(const uint16_t* __restrict__ bits, int32_t* __restrict__ hist, int64_t group_size,
                     int64_t tiles_per_group) {
  extern __shared__ uint32_t counters[];
  const int64_t g = blockIdx.x / tiles_per_group;
  const int64_t start = (blockIdx.x % tiles_per_group) * kHistogramTile;
  const int64_t end = start + kHistogramTile < group_size ? start + kHistogramTile : group_size;
  for (int w = threadIdx.x; w < kHistogramWords; w += blockDim.x) counters[w] = 0;
  __syncthreads();
  const uint16_t* row = bits + g * group_size;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const uint32_t s = row[i];
    atomicAdd(counters + (s >> 1), 1u << ((s & 1u) * 16u));
  }
  __syncthreads();
  int32_t* out = hist + g * 65536;
  for (int w = threadIdx.x; w < kHistogramWords; w += blockDim.x) {
    const uint32_t c = counters[w];
    if (c & 0xFFFFu) atomicAdd(out + 2 * w, static_cast<int32_t>(c & 0xFFFFu));
    if (c >> 16) atomicAdd(out + 2 * w + 1, static_cast<int32_t>(c >> 16));
  }
}

// Flags of non-finite terms per slot.
constexpr int32_t kNaN = 1, kPosInf = 2, kNegInf = 4;

__device__ __forceinline__ double fixed_scale(unsigned long long amax_bits, int64_t m) {
  return fixed_point_scale(__longlong_as_double(static_cast<long long>(amax_bits)), m);
}

// Largest finite |grad[i]|, as the bits of a double (non-negative doubles order as integers).
template <typename grad_t>
__global__ void finite_amax_kernel(const grad_t* __restrict__ grad,
                                   unsigned long long* __restrict__ amax_bits, int64_t n) {
  double local = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double a = fabs(static_cast<double>(grad[i]));
    if (isfinite(a) && a > local) local = a;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    local = fmax(local, __shfl_down_sync(0xffffffffu, local, offset));
  }
  if ((threadIdx.x & 31) == 0 && local > 0) {
    atomicMax(amax_bits, static_cast<unsigned long long>(__double_as_longlong(local)));
  }
}

// Sum of `value` over the lanes of `peers` (all of which call this with the same mask), in
// lane order: the same bits whichever lane's warp runs first.
template <typename T>
__device__ __forceinline__ T sum_over_peers(unsigned peers, T value) {
  T total = 0;
  for (unsigned rest = peers; rest != 0; rest &= rest - 1) {
    total += __shfl_sync(peers, value, __ffs(rest) - 1);
  }
  return total;
}

// Deterministic scatter-add: fixed-point terms, warp-aggregated integer atomics. The loop runs
// whole warps (base is the warp's first index; blockDim.x must be a multiple of 32) so every
// lane reaches the warp intrinsics.
template <typename grad_t>
__global__ void scatter_fixed_kernel(const uint16_t* __restrict__ bits, SlotLookup lookup,
                                     const grad_t* __restrict__ grad, unsigned long long* __restrict__ sums,
                                     int32_t* __restrict__ special,
                                     const unsigned long long* __restrict__ amax_bits, int64_t m, int64_t n,
                                     int32_t* missing) {
  const double scale = fixed_scale(*amax_bits, m);
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31); base < n; base += stride) {
    const int64_t i = base + lane;
    long long u = -1, q = 0;
    if (i < n) {
      u = lookup(i, bits[i]);
      if (u < 0) {
        *missing = 1;
      } else {
        const double x = static_cast<double>(grad[i]);
        if (isfinite(x)) {
          q = __double2ll_rn(x * scale);
        } else {
          atomicOr(special + u, isnan(x) ? kNaN : (x > 0 ? kPosInf : kNegInf));
        }
      }
    }
    const unsigned peers = __match_any_sync(0xffffffffu, u);
    const long long total = sum_over_peers(peers, q);
    if (u >= 0 && total != 0 && lane == __ffs(peers) - 1) {
      atomicAdd(sums + u, static_cast<unsigned long long>(total));
    }
  }
}

// sums[j] = fixed[j] / scale, or NaN / +-Inf where non-finite terms were added.
__global__ void fixed_to_double_kernel(const unsigned long long* __restrict__ fixed,
                                       const int32_t* __restrict__ special,
                                       const unsigned long long* __restrict__ amax_bits, int64_t m,
                                       double* __restrict__ sums, int64_t count) {
  const double scale = fixed_scale(*amax_bits, m);
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < count;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int32_t s = special[j];
    double v = static_cast<double>(static_cast<long long>(fixed[j])) / scale;
    if (s != 0) {
      const bool nan = (s & kNaN) != 0 || ((s & kPosInf) != 0 && (s & kNegInf) != 0);
      v = nan ? CUDART_NAN : ((s & kPosInf) != 0 ? CUDART_INF : -CUDART_INF);
    }
    sums[j] = v;
  }
}

// Fast scatter-add: float64 terms, warp-aggregated float atomics (order-dependent rounding).
template <typename grad_t>
__global__ void scatter_float_kernel(const uint16_t* __restrict__ bits, SlotLookup lookup,
                                     const grad_t* __restrict__ grad, double* __restrict__ sums, int64_t n,
                                     int32_t* missing) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31); base < n; base += stride) {
    const int64_t i = base + lane;
    long long u = -1;
    double x = 0.0;
    if (i < n) {
      u = lookup(i, bits[i]);
      if (u < 0)
        *missing = 1;
      else
        x = static_cast<double>(grad[i]);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, u);
    const double total = sum_over_peers(peers, x);
    if (u >= 0 && lane == __ffs(peers) - 1) atomicAdd(sums + u, total);
  }
}

}  // namespace
}  // namespace privatized
}  // namespace cuda
}  // namespace edkm
