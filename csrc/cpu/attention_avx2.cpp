// AVX2 + FMA float32 kernels of the N-domain passes (see attention_avx2.h for the contract).
// Compiled for every x86-64 build with per-function target attributes, so the library still
// loads on a CPU without AVX2: available() checks the CPU once and callers fall back to the
// scalar float64 loops of ndomain_kernel.cpp.
//
// Written here rather than with ATen's at::vec: an extension compiled without -mavx2 gets
// at::vec's scalar fallback, and Sleef's vector exp is not part of libtorch's public ABI.
// Measured (csrc/cpu micro-benchmark, one core, K = 8, rows of 576): the moments pass costs
// 1.0 ns per weight and centroid here against 17 ns for the scalar float64 loop.
#include "attention_avx2.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EDKM_SIMD_X86 1
#define EDKM_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace edkm::attention_avx2 {

#if EDKM_SIMD_X86

namespace {

// Weights summed in float32 before a block's sums go into the float64 totals.
constexpr int64_t kFlushWeights = 128;

// exp(x) for x <= 0 (an exponent minus its row maximum), 0 below -87 (where float32's exp
// is subnormal or 0). Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial.
EDKM_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

EDKM_AVX2 inline __m256 distance(__m256 d, bool squared) {
  return squared ? _mm256_mul_ps(d, d) : _mm256_andnot_ps(_mm256_set1_ps(-0.0f), d);
}

// d/dd of the distance: 2d (squared) or sign(d) (absolute, 0 at 0).
EDKM_AVX2 inline __m256 slope(__m256 d, bool squared) {
  if (squared) return _mm256_add_ps(d, d);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_GT_OQ), one),
                       _mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_LT_OQ), one));
}

// Eight weights (or table values) starting at w[n]: the tail padded with w[m-1], and with
// counts, every value of count 0 replaced by 0 (so padding that holds anything is never read into
// a sum); mask is all-ones for the lanes that count.
struct Block {
  __m256 v;       // weights
  __m256 mask;    // all-ones bits for real weights of nonzero count, zero otherwise
  __m256 count;   // each lane's count (1 without counts, 0 for padding)
  int64_t lanes;  // real lanes (kLanes except at the tail)
};

EDKM_AVX2 inline Block load_block(const float* w, const float* counts, int64_t n, int64_t m) {
  const int64_t lanes = std::min<int64_t>(kLanes, m - n);
  Block b;
  b.lanes = lanes;
  if (lanes == kLanes) {
    b.v = _mm256_loadu_ps(w + n);
    b.mask = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    b.count = counts ? _mm256_loadu_ps(counts + n) : _mm256_set1_ps(1.0f);
  } else {
    alignas(32) float v[kLanes], cnt[kLanes];
    alignas(32) int32_t bits[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      v[l] = w[n + std::min(l, lanes - 1)];
      bits[l] = l < lanes ? -1 : 0;
      cnt[l] = l < lanes ? (counts ? counts[n + l] : 1.0f) : 0.0f;
    }
    b.v = _mm256_load_ps(v);
    b.mask = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(bits)));
    b.count = _mm256_load_ps(cnt);
  }
  if (counts) {
    const __m256 nonzero = _mm256_cmp_ps(b.count, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    b.mask = _mm256_and_ps(b.mask, nonzero);
    b.v = _mm256_and_ps(b.v, nonzero);
  }
  return b;
}

EDKM_AVX2 inline void store_block(float* out, int64_t n, const Block& b, __m256 x) {
  if (b.lanes == kLanes) {
    _mm256_storeu_ps(out + n, x);
    return;
  }
  alignas(32) float t[kLanes];
  _mm256_store_ps(t, x);
  for (int64_t l = 0; l < b.lanes; ++l) out[n + l] = t[l];
}

EDKM_AVX2 inline __m256 load_or_zero(const float* p, int64_t n, const Block& b) {
  if (p == nullptr) return _mm256_setzero_ps();
  if (b.lanes == kLanes) return _mm256_loadu_ps(p + n);
  alignas(32) float t[kLanes] = {};
  for (int64_t l = 0; l < b.lanes; ++l) t[l] = p[n + l];
  return _mm256_load_ps(t);
}

// The attention of a block (a[j] holds centroid j's eight lanes), padding lanes zeroed.
// The exponent differences x_j = (dist_j - dist_*) / -tau against each lane's nearest centroid
// c_* are computed from differences of centroids, never as a difference of two large float32
// exponents: with a sharp softmax (tau small against the value range) dist / tau reaches
// thousands, and float32 rounding of each exponent would shift the attention by 1e-4.
// squared: (v - c_j)^2 - (v - c_*)^2 = (c_* - c_j)(2v - c_j - c_*); absolute: with v on the same
// side of both, |v - c_j| - |v - c_*| = sign(v - c_*)(c_* - c_j), else both are within one
// centroid spacing of v and the direct difference is exact enough.
template <int KC>
EDKM_AVX2 inline __m256 attention(const Block& b, const float* c, int64_t k_in, __m256 nit, bool squared,
                                  __m256* a) {
  const int64_t k = KC ? KC : k_in;
  __m256 best = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 cs = _mm256_set1_ps(c[0]);
  for (int64_t j = 0; j < k; ++j) {
    const __m256 cj = _mm256_set1_ps(c[j]);
    const __m256 dist = distance(_mm256_sub_ps(b.v, cj), squared);
    const __m256 closer = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
    best = _mm256_min_ps(best, dist);
    cs = _mm256_blendv_ps(cs, cj, closer);
  }
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 ds = _mm256_sub_ps(b.v, cs);
  const __m256 two_v_cs = _mm256_sub_ps(_mm256_add_ps(b.v, b.v), cs);  // 2v - c_*
  __m256 z = zero;
  for (int64_t j = 0; j < k; ++j) {
    const __m256 cj = _mm256_set1_ps(c[j]);
    __m256 diff;
    if (squared) {
      diff = _mm256_mul_ps(_mm256_sub_ps(cs, cj), _mm256_sub_ps(two_v_cs, cj));
    } else {
      const __m256 dj = _mm256_sub_ps(b.v, cj);
      const __m256 same = _mm256_cmp_ps(_mm256_mul_ps(dj, ds), zero, _CMP_GT_OQ);
      const __m256 direct = _mm256_sub_ps(_mm256_andnot_ps(sign, dj), _mm256_andnot_ps(sign, ds));
      const __m256 shifted = _mm256_xor_ps(_mm256_sub_ps(cs, cj), _mm256_and_ps(sign, ds));
      diff = _mm256_blendv_ps(direct, shifted, same);
    }
    // diff >= 0 up to rounding; exp_nonpositive is exact enough just above 0 as well.
    a[j] = exp_nonpositive(_mm256_mul_ps(diff, nit));
    z = _mm256_add_ps(z, a[j]);
  }
  const __m256 iz = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), z), b.mask);
  for (int64_t j = 0; j < k; ++j) a[j] = _mm256_mul_ps(a[j], iz);
  return cs;
}

// Each lane's reference centroid for the backward sums: the one of largest attention (the
// nearest), as its index's values x[r] of the k per-centroid constants x (c, next or q).
// Softmax gradients sum_j a_j (y_j - sum_i a_i y_i) are taken as sum_j a_j ((y_j - y_r) - Y)
// with Y = sum_i a_i (y_i - y_r): when one centroid takes nearly all the attention, the direct
// form subtracts two nearly equal float32 numbers and loses the small difference that matters.
struct Reference {
  __m256 c, next, q;
};

template <int KC>
EDKM_AVX2 inline Reference reference_of(const __m256* a, const float* c, const float* next, const float* q,
                                        int64_t k_in) {
  const int64_t k = KC ? KC : k_in;
  __m256 best = a[0];
  Reference r{_mm256_set1_ps(c[0]), _mm256_set1_ps(next ? next[0] : 0.0f), _mm256_set1_ps(q ? q[0] : 0.0f)};
  for (int64_t j = 1; j < k; ++j) {
    const __m256 more = _mm256_cmp_ps(a[j], best, _CMP_GT_OQ);
    best = _mm256_max_ps(best, a[j]);
    r.c = _mm256_blendv_ps(r.c, _mm256_set1_ps(c[j]), more);
    if (next) r.next = _mm256_blendv_ps(r.next, _mm256_set1_ps(next[j]), more);
    if (q) r.q = _mm256_blendv_ps(r.q, _mm256_set1_ps(q[j]), more);
  }
  return r;
}

EDKM_AVX2 inline double hsum(__m256 x) {
  alignas(32) float t[kLanes];
  _mm256_store_ps(t, x);
  double s = 0;
  for (float f : t) s += f;
  return s;
}

// Per-lane float32 sums of k quantities, moved into float64 totals every kFlushWeights weights.
struct Sums {
  __m256* lanes;
  double* total;
  int64_t k;
  EDKM_AVX2 void clear() {
    for (int64_t j = 0; j < k; ++j) lanes[j] = _mm256_setzero_ps();
  }
  EDKM_AVX2 void flush() {
    for (int64_t j = 0; j < k; ++j) total[j] += hsum(lanes[j]);
    clear();
  }
};

// Scratch of one call: a block's attention plus up to two sets of per-lane sums. At most 256
// centroids (8 bits): 24 KiB on the stack.
constexpr int64_t kMaxK = 256;

template <int KC>
EDKM_AVX2 void moments_avx2(const float* w, const float* counts, int64_t m, const float* c, int64_t k_in,
                            float neg_inv_tau, bool squared, double* num, double* den, float* cache) {
  const int64_t k = KC ? KC : k_in;
  alignas(32) __m256 a[KC ? KC : kMaxK], sn[KC ? KC : kMaxK], sd[KC ? KC : kMaxK];
  for (int64_t j = 0; j < k; ++j) num[j] = den[j] = 0.0;
  Sums snum{sn, num, k}, sden{sd, den, k};
  snum.clear();
  sden.clear();
  const __m256 nit = _mm256_set1_ps(neg_inv_tau);
  for (int64_t n = 0; n < m; n += kLanes) {
    const Block b = load_block(w, counts, n, m);
    attention<KC>(b, c, k, nit, squared, a);
    if (cache) {
      float* out = cache + n * k;
      for (int64_t j = 0; j < k; ++j) _mm256_storeu_ps(out + j * kLanes, a[j]);
    }
    const __m256 nv = _mm256_mul_ps(b.count, b.v);
    for (int64_t j = 0; j < k; ++j) {
      sn[j] = _mm256_fmadd_ps(a[j], nv, sn[j]);
      sd[j] = _mm256_fmadd_ps(a[j], b.count, sd[j]);
    }
    if ((n + kLanes) % kFlushWeights == 0) {
      snum.flush();
      sden.flush();
    }
  }
  snum.flush();
  sden.flush();
}

template <int KC>
EDKM_AVX2 void soft_avx2(const float* w, int64_t m, const float* c, int64_t k_in, float neg_inv_tau,
                         bool squared, float* out) {
  const int64_t k = KC ? KC : k_in;
  alignas(32) __m256 a[KC ? KC : kMaxK];
  const __m256 nit = _mm256_set1_ps(neg_inv_tau);
  for (int64_t n = 0; n < m; n += kLanes) {
    const Block b = load_block(w, nullptr, n, m);
    const __m256 cs = attention<KC>(b, c, k, nit, squared, a);
    __m256 f = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      f = _mm256_fmadd_ps(a[j], _mm256_sub_ps(_mm256_set1_ps(c[j]), cs), f);
    }
    store_block(out, n, b, _mm256_add_ps(cs, f));
  }
}

template <int KC>
EDKM_AVX2 void final_pass_avx2(const float* w, const float* gu, int64_t m, const float* c, int64_t k_in,
                               float inv_tau, bool squared, float* acc, float* slope_out, double* gc) {
  const int64_t k = KC ? KC : k_in;
  alignas(32) __m256 a[KC ? KC : kMaxK], sg[KC ? KC : kMaxK];
  Sums sums{sg, gc, k};
  sums.clear();
  const __m256 nit = _mm256_set1_ps(-inv_tau);
  const __m256 it = _mm256_set1_ps(inv_tau);
  for (int64_t n = 0; n < m; n += kLanes) {
    const Block b = load_block(w, nullptr, n, m);
    const __m256 cs = attention<KC>(b, c, k, nit, squared, a);
    // G = F - c_* = sum_j a_j (c_j - c_*), and c_j - F = (c_j - c_*) - G.
    __m256 big_g = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      big_g = _mm256_fmadd_ps(a[j], _mm256_sub_ps(_mm256_set1_ps(c[j]), cs), big_g);
    }
    const __m256 g = load_or_zero(gu, n, b);
    // Lanes with gu = 0 add nothing to gc, whatever their value holds (U-domain padding).
    const __m256 live = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    __m256 d = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m256 cj = _mm256_set1_ps(c[j]);
      const __m256 s = slope(_mm256_sub_ps(b.v, cj), squared);
      const __m256 cf = _mm256_sub_ps(_mm256_sub_ps(cj, cs), big_g);  // c_j - F
      const __m256 as = _mm256_mul_ps(_mm256_mul_ps(a[j], cf), s);
      d = _mm256_add_ps(d, as);
      // gu a_j (1 + inv_tau (c_j - F) slope_j) = gu (a_j + inv_tau as_j)
      sg[j] = _mm256_add_ps(sg[j], _mm256_and_ps(live, _mm256_mul_ps(g, _mm256_fmadd_ps(it, as, a[j]))));
    }
    const __m256 dslope = _mm256_mul_ps(d, nit);
    if (acc) store_block(acc, n, b, _mm256_mul_ps(g, dslope));
    if (slope_out) store_block(slope_out, n, b, dslope);
    if ((n + kLanes) % kFlushWeights == 0) sums.flush();
  }
  sums.flush();
}

template <int KC>
EDKM_AVX2 void reverse_pass_avx2(const float* w, const float* counts, int64_t m, const float* c,
                                 const float* next, const float* q, int64_t k_in, float neg_inv_tau,
                                 bool squared, const float* cache, float* acc, double* part) {
  const int64_t k = KC ? KC : k_in;
  alignas(32) __m256 a[KC ? KC : kMaxK], sp[KC ? KC : kMaxK];
  for (int64_t j = 0; j < k; ++j) part[j] = 0.0;
  Sums sums{sp, part, k};
  sums.clear();
  const __m256 nit = _mm256_set1_ps(neg_inv_tau);
  const __m256 it = _mm256_set1_ps(-neg_inv_tau);
  for (int64_t n = 0; n < m; n += kLanes) {
    const Block b = load_block(w, counts, n, m);
    if (cache) {
      const float* in = cache + n * k;
      for (int64_t j = 0; j < k; ++j) a[j] = _mm256_loadu_ps(in + j * kLanes);
    } else {
      attention<KC>(b, c, k, nit, squared, a);
    }
    // g_j = (w - next_j) q_j, taken relative to the reference's g_r (see Reference).
    const Reference r = reference_of<KC>(a, c, next, q, k);
    const __m256 g_r = _mm256_mul_ps(_mm256_sub_ps(b.v, r.next), r.q);
    __m256 through = _mm256_setzero_ps(), big_h = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m256 qj = _mm256_set1_ps(q[j]);
      through = _mm256_fmadd_ps(a[j], qj, through);
      const __m256 g = _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(b.v, _mm256_set1_ps(next[j])), qj), g_r);
      big_h = _mm256_fmadd_ps(a[j], g, big_h);
    }
    // Every term scales by the value's count (1 in the N-domain).
    __m256 back = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m256 g = _mm256_sub_ps(
          _mm256_mul_ps(_mm256_sub_ps(b.v, _mm256_set1_ps(next[j])), _mm256_set1_ps(q[j])), g_r);
      const __m256 s = slope(_mm256_sub_ps(b.v, _mm256_set1_ps(c[j])), squared);
      const __m256 term =
          _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(a[j], b.count), _mm256_sub_ps(g, big_h)), s);
      back = _mm256_add_ps(back, term);
      sp[j] = _mm256_add_ps(sp[j], term);
    }
    const __m256 old = load_or_zero(acc, n, b);
    const __m256 add = _mm256_fnmadd_ps(back, it, _mm256_mul_ps(b.count, through));
    store_block(acc, n, b, _mm256_add_ps(old, add));
    if ((n + kLanes) % kFlushWeights == 0) sums.flush();
  }
  sums.flush();
}

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace

bool available() {
  static const bool yes = cpu_has_avx2_fma();
  return yes;
}

// Calls f with std::integral_constant<int, K> for the common centroid counts (1-4 bits), whose
// loops the compiler unrolls with every centroid's registers live (about 1.6x faster than the
// runtime-k loops, measured on K = 8), and with 0 (runtime k) otherwise.
template <typename F>
inline void with_k(int64_t k, F&& f) {
  switch (k) {
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 0>{});
  }
}

#define EDKM_REQUIRE_SIMD() \
  TORCH_CHECK(available(), "edkm: the AVX2 attention kernels were called on a CPU without AVX2/FMA")

void moments(const float* w, const float* counts, int64_t m, const float* c, int64_t k, float neg_inv_tau,
             bool squared, double* num, double* den, float* cache) {
  EDKM_REQUIRE_SIMD();
  TORCH_CHECK(k >= 1 && k <= kMaxK, "edkm: the AVX2 attention kernels take 1..256 centroids, got ", k);
  with_k(k, [&](auto kc) {
    moments_avx2<decltype(kc)::value>(w, counts, m, c, k, neg_inv_tau, squared, num, den, cache);
  });
}

void soft(const float* w, int64_t m, const float* c, int64_t k, float neg_inv_tau, bool squared, float* out) {
  EDKM_REQUIRE_SIMD();
  TORCH_CHECK(k >= 1 && k <= kMaxK, "edkm: the AVX2 attention kernels take 1..256 centroids, got ", k);
  with_k(k, [&](auto kc) { soft_avx2<decltype(kc)::value>(w, m, c, k, neg_inv_tau, squared, out); });
}

void final_pass(const float* w, const float* gu, int64_t m, const float* c, int64_t k, float inv_tau,
                bool squared, float* acc, float* slope, double* gc) {
  EDKM_REQUIRE_SIMD();
  TORCH_CHECK(k >= 1 && k <= kMaxK, "edkm: the AVX2 attention kernels take 1..256 centroids, got ", k);
  with_k(k, [&](auto kc) {
    final_pass_avx2<decltype(kc)::value>(w, gu, m, c, k, inv_tau, squared, acc, slope, gc);
  });
}

void reverse_pass(const float* w, const float* counts, int64_t m, const float* c, const float* next,
                  const float* q, int64_t k, float neg_inv_tau, bool squared, const float* cache, float* acc,
                  double* part) {
  EDKM_REQUIRE_SIMD();
  TORCH_CHECK(k >= 1 && k <= kMaxK, "edkm: the AVX2 attention kernels take 1..256 centroids, got ", k);
  with_k(k, [&](auto kc) {
    reverse_pass_avx2<decltype(kc)::value>(w, counts, m, c, next, q, k, neg_inv_tau, squared, cache, acc,
                                           part);
  });
}

#else  // not x86-64: the scalar float64 loops always run

bool available() { return false; }

#define EDKM_NO_SIMD() TORCH_CHECK(false, "edkm: the AVX2 attention kernels need an x86-64 CPU")
void moments(const float*, const float*, int64_t, const float*, int64_t, float, bool, double*, double*,
             float*) {
  EDKM_NO_SIMD();
}
void soft(const float*, int64_t, const float*, int64_t, float, bool, float*) { EDKM_NO_SIMD(); }
void final_pass(const float*, const float*, int64_t, const float*, int64_t, float, bool, float*, float*,
                double*) {
  EDKM_NO_SIMD();
}
void reverse_pass(const float*, const float*, int64_t, const float*, const float*, const float*, int64_t,
                  float, bool, const float*, float*, double*) {
  EDKM_NO_SIMD();
}

#endif

}  // namespace edkm::attention_avx2
