// The N-domain's per-group passes in float32, eight weights at a time (AVX2 + FMA), for
// float32 / bfloat16 / float16 weights (compute dtype float32). ndomain_kernel.cpp calls them
// instead of its scalar float64 loops when available() and settings.h's ndomain_simd() hold.
//
// Arithmetic: the attention's exponents, exp (a Cephes-style polynomial, about 1 ulp) and the
// per-weight products are float32; every sum over a group's weights is float32 within a block of
// kFlushWeights weights and float64 across blocks, so a group of any size keeps float32-level
// relative error (measured against the float64 path in tests/python/test_ndomain.py). A group
// is always one thread's sequential work, so results do not depend on the thread count. On
// x86-64 without AVX2/FMA, or on other architectures, available() is false.
#pragma once

#include <cstdint>

namespace edkm::ndomain_avx2 {

// Whether this CPU runs the kernels (AVX2 and FMA, checked once).
bool available();

// Weights a block of the cache and of the scratch covers (one AVX2 register of floats).
constexpr int64_t kLanes = 8;

// Floats of cache for one group of m weights and k centroids (blocks of kLanes, padded).
inline int64_t cache_floats(int64_t m, int64_t k) { return (m + kLanes - 1) / kLanes * kLanes * k; }

// num_j = sum_n a_nj w_n and den_j = sum_n a_nj at centroids c (k floats), written (not added)
// to num / den (k doubles). cache: nullptr, or cache_floats(m, k) floats that receive the
// attention for reverse_pass.
void moments(const float* w, int64_t m, const float* c, int64_t k, float neg_inv_tau,
             bool squared, double* num, double* den, float* cache);

// out_n = sum_j a_nj c_j.
void soft(const float* w, int64_t m, const float* c, int64_t k, float neg_inv_tau, bool squared,
          float* out);

// The final soft assignment's backward at c = c_T, for upstream gradient gu (nullptr: zero):
// acc_n = gu_n * (-inv_tau * sum_j a_nj (c_j - F_n) slope_nj) and
// gc_j += sum_n gu_n a_nj (1 + inv_tau (c_j - F_n) slope_nj) (gc: k doubles, added to).
void final_pass(const float* w, const float* gu, int64_t m, const float* c, int64_t k,
                float inv_tau, bool squared, float* acc, double* gc);

// One centroid update's backward at c = c_t, given next_j = c_{t+1} (its exact quotient num/den)
// and q_j = dL/dc_{t+1,j} / den_j (0 for a centroid no weight attended): with
// g_nj = (w_n - next_j) q_j and s_n = sum_j a_nj g_nj,
// acc_n += sum_j a_nj q_j - inv_tau * sum_j a_nj (g_nj - s_n) slope_nj and
// part_j = sum_n a_nj (g_nj - s_n) slope_nj (written). cache: the attention moments() wrote at
// this c, or nullptr to recompute it.
void reverse_pass(const float* w, int64_t m, const float* c, const float* next, const float* q,
                  int64_t k, float neg_inv_tau, bool squared, const float* cache, float* acc,
                  double* part);

}  // namespace edkm::ndomain_avx2
