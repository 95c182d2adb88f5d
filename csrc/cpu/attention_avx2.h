// The attention passes of DKM on CPU in float32, eight weights (or table values) at a time
// (AVX2 + FMA), for float32 / bfloat16 / float16 weights (compute dtype float32). The N-domain
// (ndomain_kernel.cpp) calls them on each group's weights, the fused U-domain
// (udomain_kernel.cpp) on each chunk of a group's distinct values with their counts, instead of
// their scalar float64 loops, when available() and settings.h's simd_attention() hold.
//
// Arithmetic: the attention's exponents, exp (a Cephes-style polynomial, about 1 ulp) and the
// per-weight products are float32; every sum over weights is float32 within a block of 128
// weights and float64 across blocks, so a group of any size keeps float32-level relative error
// (measured against the float64 loops in tests/python/test_attention_avx2.py). Each call is one
// thread's sequential work, so results do not depend on the thread count. On x86-64 without
// AVX2/FMA, or on other architectures, available() is false.
//
// counts (U-domain): nullptr means every value counts once; otherwise a value's terms are scaled
// by its count, and a value of count 0 is never read into a sum (padding may hold anything).
#pragma once

#include <cstdint>

namespace edkm::attention_avx2 {

// Whether this CPU runs the kernels (AVX2 and FMA, checked once).
bool available();

// Whether every exponent dist(w, c) / tau is finite in float32 for weights and centroids within
// +-max_abs (centroids stay within their weights' range once they move); callers take the
// float64 loops otherwise.
inline bool exponents_fit(double max_abs, double temperature, bool squared) {
  if (!(max_abs >= 0) || max_abs > 1e300 || !(temperature > 0)) return false;
  const double span = 2 * max_abs;
  const double worst = (squared ? span * span : span) / temperature;
  return worst < 1e36 && 1.0 / temperature < 1e36;
}

// Weights a block of the cache covers (one AVX2 register of floats).
constexpr int64_t kLanes = 8;

// Floats of cache for m weights and k centroids (blocks of kLanes, padded).
inline int64_t cache_floats(int64_t m, int64_t k) { return (m + kLanes - 1) / kLanes * kLanes * k; }

// num_j = sum_n n_n a_nj w_n and den_j = sum_n n_n a_nj at centroids c (k floats), written (not
// added) to num / den (k doubles). cache: nullptr, or cache_floats(m, k) floats that receive the
// attention for reverse_pass.
void moments(const float* w, const float* counts, int64_t m, const float* c, int64_t k, float neg_inv_tau,
             bool squared, double* num, double* den, float* cache);

// out_n = sum_j a_nj c_j (for every entry, count or not).
void soft(const float* w, int64_t m, const float* c, int64_t k, float neg_inv_tau, bool squared, float* out);

// The final soft assignment's backward at c = c_T, for upstream gradient gu (nullptr: zero):
// with slope_n = -inv_tau * sum_j a_nj (c_j - F_n) dist'(w_n - c_j), writes acc_n = gu_n slope_n
// and slope[n] = slope_n (either may be nullptr), and adds
// gc_j += sum_{n: gu_n != 0} gu_n a_nj (1 + inv_tau (c_j - F_n) dist'(w_n - c_j)) (k doubles).
void final_pass(const float* w, const float* gu, int64_t m, const float* c, int64_t k, float inv_tau,
                bool squared, float* acc, float* slope, double* gc);

// One centroid update's backward at c = c_t, given next_j = c_{t+1} (num_j / den_j) and
// q_j = dL/dc_{t+1,j} / den_j (0 for a centroid no weight attended): with
// g_nj = (w_n - next_j) q_j and s_n = sum_j a_nj g_nj,
// acc_n += n_n (sum_j a_nj q_j - inv_tau * sum_j a_nj (g_nj - s_n) dist'(w_n - c_j)) and
// part_j = sum_n n_n a_nj (g_nj - s_n) dist'(w_n - c_j) (written). cache: the attention
// moments() wrote at this c, or nullptr to recompute it.
void reverse_pass(const float* w, const float* counts, int64_t m, const float* c, const float* next,
                  const float* q, int64_t k, float neg_inv_tau, bool squared, const float* cache, float* acc,
                  double* part);

}  // namespace edkm::attention_avx2
