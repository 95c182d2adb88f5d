// DKM directly over each group's weights (the N-domain), for small LUT groups on CPU, where a
// group has about as many distinct values as weights and building the U-domain tables (slot
// histogram, gather, scatter) costs more than it saves.
//
// Forward: one at::parallel_for over groups per iteration (the early stop is decided over all
// groups together, as in the U-domain), attention in float64 registers, never an N x K tensor.
// Saved for backward: the centroid history [T+1, G, K] only; the weight is referenced.
// Backward: each group is one task that recomputes its attention per iteration in reverse,
// O(N K T). A group is always summed by one thread in element order, so results do not depend
// on the thread count. The arithmetic is the U-domain's (udomain_kernel.cpp) with every count 1.
// 16-bit groups on the AVX2 kernels run over their distinct values with counts instead
// (DistinctGroup below), rebuilt in every call.
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ndomain.h"
#include "../settings.h"
#include "attention_avx2.h"

namespace edkm {

namespace {

// exp(x) is exactly 0 in float64 below this: skipping the call changes no bit.
constexpr double kExpUnderflow = -746.0;

// a_j = softmax_j(-dist(v, c_j) / tau) in float64 (see udomain_kernel.cpp's attention).
template <typename T>
inline void attention(double v, const T* c, int64_t k, double neg_inv_tau, bool squared, double* a) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    const double d = v - double(c[j]);
    const double s = (squared ? d * d : std::abs(d)) * neg_inv_tau;
    a[j] = s;
    m = std::max(m, s);
  }
  double z = 0;
  for (int64_t j = 0; j < k; ++j) {
    const double x = a[j] - m;
    a[j] = x < kExpUnderflow ? 0.0 : std::exp(x);
    z += a[j];
  }
  for (int64_t j = 0; j < k; ++j) a[j] /= z;
}

inline double slope_of(double diff, bool squared) {
  return squared ? diff * 2 : double((diff > 0) - (diff < 0));
}

// Attention entries a backward task may keep for one group (1 MiB of float64).
constexpr int64_t kCacheEntries = int64_t(1) << 17;

int64_t grain_of(int64_t m) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1)); }

// The largest |x| over n values, NaN when one is NaN or infinite (one pass, parallel for
// 32/64-bit values).
template <typename X>
double max_abs_or_nan(const X* x, int64_t n) {
  if constexpr (std::is_same_v<X, at::BFloat16> || std::is_same_v<X, at::Half>) {
    // On the bit patterns: with the sign cleared, a larger pattern is a larger magnitude, and
    // the patterns from the all-ones exponent up are Inf and NaN (a loop the compiler vectorizes).
    constexpr uint16_t kNonFinite = std::is_same_v<X, at::BFloat16> ? 0x7F80 : 0x7C00;
    uint16_t mx = 0;
    for (int64_t i = 0; i < n; ++i) mx = std::max<uint16_t>(mx, x[i].x & 0x7FFF);
    if (mx >= kNonFinite) return std::numeric_limits<double>::quiet_NaN();
    X big;
    big.x = mx;
    return double(float(big));
  }
  constexpr int64_t kSpan = int64_t(1) << 16;
  const int64_t spans = (n + kSpan - 1) / kSpan;
  std::vector<double> part(spans, 0.0);
  at::parallel_for(0, spans, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      double mx = 0;
      for (int64_t i = s * kSpan; i < std::min(n, (s + 1) * kSpan); ++i) {
        const double v = std::abs(double(x[i]));
        mx = std::isfinite(v) ? std::max(mx, v) : std::numeric_limits<double>::quiet_NaN();
        if (std::isnan(mx)) break;
      }
      part[s] = mx;
    }
  });
  double mx = 0;
  for (double p : part) mx = std::isnan(p) || std::isnan(mx) ? p + mx : std::max(mx, p);
  return mx;
}

// Whether the float32 AVX2 passes (attention_avx2.h) run: compute dtype float32, the setting on,
// the CPU able, and every exponent dist(w, c) / tau finite in float32 for weights and centroids
// within +-max_abs (centroids stay within the weights' range once they move). Otherwise the
// float64 loops below run.
template <typename T>
bool simd_applies(double max_abs, double temperature, bool squared) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    return simd_attention() && attention_avx2::available() && std::isfinite(max_abs) &&
           attention_avx2::exponents_fit(max_abs, temperature, squared);
  }
}

// A group's m weights as float32: the weights themselves, or converted into buf.
template <typename W>
const float* as_float(const W* w, int64_t m, std::vector<float>& buf) {
  if constexpr (std::is_same_v<W, float>) {
    return w;
  } else {
    buf.resize(m);
    for (int64_t n = 0; n < m; ++n) buf[n] = float(w[n]);
    return buf.data();
  }
}

// A group's distinct values, for 16-bit weights (a group of m <= 65535 weights holds at most m
// of the 65536 bit patterns; SmolLM2's bf16 weights hold 0.43 m per row and 0.13 m per 16 rows).
// The AVX2 passes run over the distinct values with their counts, as the U-domain does, instead
// of over every weight: the same sums, each value's terms scaled by its count. Built per group
// and per call from a thread's 65536-entry map from bit pattern to index (reset after each group
// at the entries it used), so nothing per weight outlives the call: the N-domain still saves
// only the centroid history.
constexpr int64_t kMaxDistinctGroup = kNDomainMaxGroup16Simd;  // the auto rule's 16-bit limit
static_assert(kMaxDistinctGroup <= 65535, "distinct indices are uint16 with 0xFFFF unused");
constexpr uint16_t kUnmapped = 0xFFFF;

template <typename W>
constexpr bool is_16bit_v = std::is_same_v<W, at::BFloat16> || std::is_same_v<W, at::Half>;

struct DistinctGroup {
  std::vector<uint16_t> map = std::vector<uint16_t>(65536, kUnmapped);
  std::vector<uint16_t> keys;   // the distinct bit patterns, in order of first appearance
  std::vector<float> values;    // their values
  std::vector<float> counts;    // their counts (floats, as the AVX2 passes take them)
  std::vector<uint16_t> index;  // each weight's distinct index
  std::vector<uint32_t> tally;
  int64_t distinct = 0;

  int64_t size() const { return distinct; }

  // Branch-free (whether a weight's value is new is a coin flip at 0.4 m distinct values, and
  // a mispredicted branch per weight cost more than the rest of the scan): every weight writes
  // its map entry and the next free table slot, which only a new value claims.
  template <typename W>
  void build(const W* w, int64_t m) {
    keys.resize(m);
    values.resize(m);
    index.resize(m);
    uint16_t next = 0;
    for (int64_t n = 0; n < m; ++n) {
      const uint16_t key = w[n].x;
      const uint16_t seen = map[key];
      const bool fresh = seen == kUnmapped;
      const uint16_t u = fresh ? next : seen;
      map[key] = u;
      keys[next] = key;
      values[next] = float(w[n]);
      next = uint16_t(next + fresh);
      index[n] = u;
    }
    distinct = next;
    for (int64_t u = 0; u < distinct; ++u) map[keys[u]] = kUnmapped;
    tally.assign(distinct, 0);
    for (int64_t n = 0; n < m; ++n) ++tally[index[n]];
    counts.resize(distinct);
    for (int64_t u = 0; u < distinct; ++u) counts[u] = float(tally[u]);
  }
};

// Whether a group of m weights of type W runs over its distinct values (on the AVX2 path).
template <typename W>
bool distinct_applies(bool simd, int64_t m) {
  return is_16bit_v<W> && simd && m <= kMaxDistinctGroup;
}

// Every weight of the group d was built from gets its value's soft value sum_j a_j c_j (computed
// once per distinct value into f), rounded to W.
template <typename W>
void scatter_soft_of_distinct(const DistinctGroup& d, const float* c, int64_t k, float neg_inv_tau,
                              bool squared, std::vector<float>& f, W* out) {
  f.resize(d.size());
  attention_avx2::soft(d.values.data(), d.size(), c, k, neg_inv_tau, squared, f.data());
  for (size_t n = 0; n < d.index.size(); ++n) out[n] = W(f[d.index[n]]);
}

// F_n = sum_j a_nj c_j of every weight, rounded to T (as the U-domain's soft values) then W.
template <typename W, typename T>
void ndomain_soft(const W* w, const T* c, int64_t groups, int64_t m, int64_t k, double temperature,
                  bool squared, bool simd, W* out) {
  const double neg_inv_tau = -1.0 / temperature;
  if constexpr (std::is_same_v<T, float> && is_16bit_v<W>) {
    if (distinct_applies<W>(simd, m)) {  // the same values per weight, computed once per value
      at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
        DistinctGroup d;
        std::vector<float> f;
        for (int64_t g = g0; g < g1; ++g) {
          d.build(w + g * m, m);
          scatter_soft_of_distinct(d, c + g * k, k, float(neg_inv_tau), squared, f, out + g * m);
        }
      });
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (simd) {
      at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
        std::vector<float> buf, f(std::is_same_v<W, float> ? 0 : m);
        for (int64_t g = g0; g < g1; ++g) {
          const float* wg = as_float(w + g * m, m, buf);
          if constexpr (std::is_same_v<W, float>) {
            attention_avx2::soft(wg, m, c + g * k, k, float(neg_inv_tau), squared, out + g * m);
          } else {
            attention_avx2::soft(wg, m, c + g * k, k, float(neg_inv_tau), squared, f.data());
            for (int64_t n = 0; n < m; ++n) out[g * m + n] = W(f[n]);
          }
        }
      });
      return;
    }
  }
  at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
    std::vector<double> a(k);
    for (int64_t g = g0; g < g1; ++g) {
      const T* cg = c + g * k;
      for (int64_t n = 0; n < m; ++n) {
        attention(double(w[g * m + n]), cg, k, neg_inv_tau, squared, a.data());
        double f = 0;
        for (int64_t j = 0; j < k; ++j) f += a[j] * double(cg[j]);
        out[g * m + n] = W(T(f));
      }
    }
  });
}

// forward_impl over each group's distinct values (16-bit weights, AVX2). A group's iterations
// do not depend on other groups, so each group runs all max_iter of them in one task (one
// uniquification); the early stop is then decided over all groups as forward_impl decides it,
// the history past it repeats c_T, and if it stopped early the soft values are taken again at
// c_T. The soft value of a value is the one ndomain_soft computes for each weight of that value
// (the same lanewise arithmetic), so the clustered weight is bit-identical to the per-weight path.
template <typename W>
NDomainForward forward_distinct(const at::Tensor& weight, const W* w, float* h, const at::Tensor& history,
                                int64_t groups, int64_t m, int64_t k, double temperature, int64_t max_iter,
                                double epsilon, bool squared) {
  const int64_t gk = groups * k;
  const float neg_inv_tau = float(-1.0 / temperature);
  std::vector<double> move(max_iter * groups);
  auto clustered = at::empty(weight.sizes(), weight.options());
  W* out = clustered.data_ptr<W>();
  at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
    DistinctGroup d;
    std::vector<double> num(k), den(k);
    std::vector<float> soft;
    for (int64_t g = g0; g < g1; ++g) {
      d.build(w + g * m, m);
      const int64_t u = d.size();
      for (int64_t t = 0; t < max_iter; ++t) {
        const float* cg = h + t * gk + g * k;
        float* next = h + (t + 1) * gk + g * k;
        attention_avx2::moments(d.values.data(), d.counts.data(), u, cg, k, neg_inv_tau, squared, num.data(),
                                den.data(), nullptr);
        double mv = 0;
        for (int64_t j = 0; j < k; ++j) {
          next[j] = den[j] > 0 ? float(num[j] / den[j]) : cg[j];
          mv = std::max(mv, double(std::abs(next[j] - cg[j])));
        }
        move[t * groups + g] = mv;
      }
      scatter_soft_of_distinct(d, h + max_iter * gk + g * k, k, neg_inv_tau, squared, soft, out + g * m);
    }
  });
  int64_t t = 0;
  while (t < max_iter) {
    ++t;
    const double* mv = move.data() + (t - 1) * groups;
    if (*std::max_element(mv, mv + groups) <= epsilon) break;
  }
  if (t < max_iter) {
    for (int64_t r = t + 1; r <= max_iter; ++r) std::copy(h + t * gk, h + (t + 1) * gk, h + r * gk);
    ndomain_soft<W, float>(w, h + t * gk, groups, m, k, temperature, squared, /*simd=*/true, out);
  }
  return {clustered, history[t].clone(), history, at::scalar_tensor(t, weight.options().dtype(at::kLong))};
}

template <typename W, typename T>
NDomainForward forward_impl(const at::Tensor& weight_in, const at::Tensor& centroids_in, double temperature,
                            int64_t max_iter, double epsilon, bool squared) {
  const char* op = "dkm";
  auto weight = weight_in.contiguous();
  const int64_t groups = centroids_in.size(0), k = centroids_in.size(1);
  const int64_t m = weight.numel() / groups;
  const double neg_inv_tau = -1.0 / temperature;
  at::Tensor history =
      at::empty({max_iter + 1, groups, k}, centroids_in.options().dtype(c10::CppTypeToScalarType<T>::value));
  history[0].copy_(centroids_in);
  T* h = history.data_ptr<T>();
  const W* w = weight.const_data_ptr<W>();
  const int64_t gk = groups * k;
  for (int64_t i = 0; i < gk; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(double(h[i])), op, ": centroids contain NaN or Inf");
  }
  const double w_max = max_abs_or_nan(w, weight.numel());
  TORCH_CHECK_VALUE(!std::isnan(w_max), op, ": weight contains NaN or Inf");
  const bool simd = simd_applies<T>(std::max(w_max, max_abs_or_nan(h, gk)), temperature, squared);
  if constexpr (std::is_same_v<T, float> && is_16bit_v<W>) {
    if (distinct_applies<W>(simd, m)) {
      return forward_distinct<W>(weight, w, h, history, groups, m, k, temperature, max_iter, epsilon,
                                 squared);
    }
  }
  std::vector<double> move(groups);
  int64_t t = 0;
  while (t < max_iter) {
    const T* c = h + t * gk;
    T* next = h + (t + 1) * gk;
    at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
      std::vector<double> a(k), num(k), den(k);
      std::vector<float> buf;
      for (int64_t g = g0; g < g1; ++g) {
        const T* cg = c + g * k;
        if constexpr (std::is_same_v<T, float>) {
          if (simd) {
            attention_avx2::moments(as_float(w + g * m, m, buf), nullptr, m, cg, k, float(neg_inv_tau),
                                    squared, num.data(), den.data(), nullptr);
          }
        }
        if (!simd) {
          std::fill(num.begin(), num.end(), 0.0);
          std::fill(den.begin(), den.end(), 0.0);
          for (int64_t n = 0; n < m; ++n) {
            const double v = double(w[g * m + n]);
            attention(v, cg, k, neg_inv_tau, squared, a.data());
            for (int64_t j = 0; j < k; ++j) {
              num[j] += a[j] * v;
              den[j] += a[j];
            }
          }
        }
        double mv = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = g * k + j;
          next[i] = den[j] > 0 ? T(num[j] / den[j]) : cg[j];
          mv = std::max(mv, double(std::abs(next[i] - cg[j])));
        }
        move[g] = mv;
      }
    });
    ++t;
    if (*std::max_element(move.begin(), move.end()) <= epsilon) break;
  }
  for (int64_t r = t + 1; r <= max_iter; ++r) std::copy(h + t * gk, h + (t + 1) * gk, h + r * gk);
  auto clustered = at::empty(weight.sizes(), weight.options());
  ndomain_soft<W, T>(w, h + t * gk, groups, m, k, temperature, squared, simd, clustered.data_ptr<W>());
  return {clustered, history[t].clone(), history, at::scalar_tensor(t, weight.options().dtype(at::kLong))};
}

// One group's whole backward: dL/dw (written to out, which may alias gf) and dL/dc_0.
template <typename W, typename T>
void backward_group(const W* w, const W* gf, const T* h, const T* gct, int64_t groups, int64_t g, int64_t m,
                    int64_t k, int64_t iterations, double inv_tau, bool squared, std::vector<double>& a,
                    std::vector<double>& grad_a, std::vector<double>& cache, std::vector<T>& acc, W* out,
                    T* gc_out) {
  // A small group's attention at c_t is computed once per iteration and read twice (for the
  // centroid sums, then for the gradient); a large one (forced N-domain) recomputes it.
  const bool cached = int64_t(cache.size()) >= m * k;
  const double neg_inv_tau = -inv_tau;
  const int64_t gk = groups * k;
  std::vector<double> gc(k, 0.0), num(k), den(k), g_num(k), g_den(k), part(k);
  // Final soft assignment at c_T: the direct slope dF/dw, and dL/dc_T through F.
  const T* c = h + iterations * gk + g * k;
  for (int64_t n = 0; n < m; ++n) {
    const double v = double(w[g * m + n]);
    attention(v, c, k, neg_inv_tau, squared, a.data());
    double f = 0;
    for (int64_t j = 0; j < k; ++j) f += a[j] * double(c[j]);
    double d = 0;
    const double gu = gf ? double(gf[g * m + n]) : 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const double s = slope_of(v - double(c[j]), squared);
      const double sg = a[j] * (double(c[j]) - f);
      d += sg * s;
      if (gu != 0) gc[j] += gu * a[j] + gu * sg * s * inv_tau;
    }
    acc[n] = T(gu * T(-d * inv_tau));
  }
  // dL/dc_T through F, rounded to the compute dtype whether or not a gradient for c_T came in,
  // so an absent one and a zero one (as torch.compile passes) give the same bits.
  for (int64_t j = 0; j < k; ++j) {
    gc[j] = double(T(gc[j])) + (gct ? double(gct[g * k + j]) : 0.0);
  }
  for (int64_t t = iterations - 1; t >= 0; --t) {
    const T* ct = h + t * gk + g * k;
    std::fill(num.begin(), num.end(), 0.0);
    std::fill(den.begin(), den.end(), 0.0);
    for (int64_t n = 0; n < m; ++n) {
      const double v = double(w[g * m + n]);
      double* an = cached ? cache.data() + n * k : a.data();
      attention(v, ct, k, neg_inv_tau, squared, an);
      for (int64_t j = 0; j < k; ++j) {
        const double aj = an[j];
        num[j] += aj * v;
        den[j] += aj;
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      const bool attended = den[j] > 0;
      const double safe = attended ? den[j] : 1.0;
      const double next = num[j] / safe;
      g_num[j] = attended ? gc[j] / safe : 0.0;
      g_den[j] = attended ? -gc[j] * next / safe : 0.0;
      part[j] = attended ? 0.0 : gc[j];
    }
    for (int64_t n = 0; n < m; ++n) {
      const double v = double(w[g * m + n]);
      const double* an = a.data();
      if (cached)
        an = cache.data() + n * k;
      else
        attention(v, ct, k, neg_inv_tau, squared, a.data());
      double through = 0, sum_ag = 0;
      for (int64_t j = 0; j < k; ++j) {
        through += an[j] * g_num[j];
        grad_a[j] = v * g_num[j] + g_den[j];
        sum_ag += an[j] * grad_a[j];
      }
      double back = 0;
      for (int64_t j = 0; j < k; ++j) {
        const double term = an[j] * (grad_a[j] - sum_ag) * slope_of(v - double(ct[j]), squared);
        back += term;
        part[j] += term * inv_tau;
      }
      acc[n] = T(double(acc[n]) + through - back * inv_tau);
    }
    std::copy(part.begin(), part.end(), gc.begin());
  }
  for (int64_t n = 0; n < m; ++n) out[g * m + n] = W(acc[n]);
  for (int64_t j = 0; j < k; ++j) gc_out[g * k + j] = T(gc[j]);
}

// backward_group with the float32 AVX2 passes: the same sums, the attention cached as float32.
template <typename W>
void backward_group_simd(const W* w, const W* gf, const float* h, const float* gct, int64_t groups, int64_t g,
                         int64_t m, int64_t k, int64_t iterations, double inv_tau, bool squared,
                         std::vector<float>& wbuf, std::vector<float>& gbuf, std::vector<float>& cache,
                         std::vector<float>& acc, W* out, float* gc_out) {
  const float* wg = as_float(w + g * m, m, wbuf);
  const float* gug = gf ? as_float(gf + g * m, m, gbuf) : nullptr;
  const bool cached = int64_t(cache.size()) >= attention_avx2::cache_floats(m, k);
  const int64_t gk = groups * k;
  std::vector<double> gc(k, 0.0), num(k), den(k), part(k), keep(k);
  std::vector<float> next(k), q(k);
  attention_avx2::final_pass(wg, gug, m, h + iterations * gk + g * k, k, float(inv_tau), squared, acc.data(),
                             nullptr, gc.data());
  // dL/dc_T through F, rounded to the compute dtype whether or not a gradient for c_T came in,
  // so an absent one and a zero one (as torch.compile passes) give the same bits.
  for (int64_t j = 0; j < k; ++j) {
    gc[j] = double(float(gc[j])) + (gct ? double(gct[g * k + j]) : 0.0);
  }
  for (int64_t t = iterations - 1; t >= 0; --t) {
    const float* ct = h + t * gk + g * k;
    attention_avx2::moments(wg, nullptr, m, ct, k, float(-inv_tau), squared, num.data(), den.data(),
                            cached ? cache.data() : nullptr);
    for (int64_t j = 0; j < k; ++j) {
      const bool attended = den[j] > 0;
      next[j] = attended ? float(num[j] / den[j]) : 0.0f;
      q[j] = attended ? float(gc[j] / den[j]) : 0.0f;
      keep[j] = attended ? 0.0 : gc[j];
    }
    attention_avx2::reverse_pass(wg, nullptr, m, ct, next.data(), q.data(), k, float(-inv_tau), squared,
                                 cached ? cache.data() : nullptr, acc.data(), part.data());
    for (int64_t j = 0; j < k; ++j) gc[j] = keep[j] + part[j] * inv_tau;
  }
  for (int64_t n = 0; n < m; ++n) out[g * m + n] = W(acc[n]);
  for (int64_t j = 0; j < k; ++j) gc_out[g * k + j] = float(gc[j]);
}

// backward_group_simd over the group's distinct values (16-bit weights): the gradient reaching
// each value (sum over its weights) through the final soft assignment, the reverse passes over
// the values with their counts, then each weight's gradient gf_n * dF/dv + (its value's indirect
// gradient) / count, as the U-domain splits them (dkm.cpp).
template <typename W>
void backward_group_distinct(const W* w, const W* gf, const float* h, const float* gct, int64_t groups,
                             int64_t g, int64_t m, int64_t k, int64_t iterations, double inv_tau,
                             bool squared, DistinctGroup& d, std::vector<double>& gsum,
                             std::vector<float>& gsoft, std::vector<float>& dir, std::vector<float>& ind,
                             std::vector<float>& cache, W* out, float* gc_out) {
  d.build(w + g * m, m);
  const int64_t u = d.size();
  const int64_t gk = groups * k;
  gsoft.resize(u);
  dir.resize(u);
  ind.assign(u, 0.0f);
  const float* gsp = nullptr;
  if (gf) {
    gsum.assign(u, 0.0);
    for (int64_t n = 0; n < m; ++n) gsum[d.index[n]] += double(float(gf[g * m + n]));
    for (int64_t i = 0; i < u; ++i) gsoft[i] = float(gsum[i]);
    gsp = gsoft.data();
  }
  const int64_t need = attention_avx2::cache_floats(u, k);
  const bool cached = need <= 2 * kCacheEntries;
  if (cached && int64_t(cache.size()) < need) cache.resize(need);
  std::vector<double> gc(k, 0.0), num(k), den(k), part(k), keep(k);
  std::vector<float> next(k), q(k);
  attention_avx2::final_pass(d.values.data(), gsp, u, h + iterations * gk + g * k, k, float(inv_tau), squared,
                             nullptr, dir.data(), gc.data());
  // dL/dc_T through F, rounded to the compute dtype whether or not a gradient for c_T came in,
  // so an absent one and a zero one (as torch.compile passes) give the same bits.
  for (int64_t j = 0; j < k; ++j) {
    gc[j] = double(float(gc[j])) + (gct ? double(gct[g * k + j]) : 0.0);
  }
  for (int64_t t = iterations - 1; t >= 0; --t) {
    const float* ct = h + t * gk + g * k;
    attention_avx2::moments(d.values.data(), d.counts.data(), u, ct, k, float(-inv_tau), squared, num.data(),
                            den.data(), cached ? cache.data() : nullptr);
    for (int64_t j = 0; j < k; ++j) {
      const bool attended = den[j] > 0;
      next[j] = attended ? float(num[j] / den[j]) : 0.0f;
      q[j] = attended ? float(gc[j] / den[j]) : 0.0f;
      keep[j] = attended ? 0.0 : gc[j];
    }
    attention_avx2::reverse_pass(d.values.data(), d.counts.data(), u, ct, next.data(), q.data(), k,
                                 float(-inv_tau), squared, cached ? cache.data() : nullptr, ind.data(),
                                 part.data());
    for (int64_t j = 0; j < k; ++j) gc[j] = keep[j] + part[j] * inv_tau;
  }
  for (int64_t i = 0; i < u; ++i) ind[i] /= d.counts[i];
  for (int64_t n = 0; n < m; ++n) {
    const uint16_t i = d.index[n];
    const float gu = gf ? float(gf[g * m + n]) : 0.0f;
    out[g * m + n] = W(gu * dir[i] + ind[i]);
  }
  for (int64_t j = 0; j < k; ++j) gc_out[g * k + j] = float(gc[j]);
}

template <typename W, typename T>
void backward_impl(const at::Tensor& weight, const at::Tensor& grad_clustered,
                   const at::Tensor& grad_centroids, const at::Tensor& history, int64_t iterations,
                   double temperature, bool squared, at::Tensor& grad_weight, at::Tensor& grad_c0) {
  const int64_t groups = history.size(1), k = history.size(2);
  const int64_t m = weight.numel() / groups;
  const W* w = weight.const_data_ptr<W>();
  const W* gf = grad_clustered.defined() ? grad_clustered.const_data_ptr<W>() : nullptr;
  const T* gct = grad_centroids.defined() ? grad_centroids.const_data_ptr<T>() : nullptr;
  const T* h = history.const_data_ptr<T>();
  W* out = grad_weight.data_ptr<W>();
  T* gco = grad_c0.data_ptr<T>();
  if constexpr (std::is_same_v<T, float>) {
    const double w_max = max_abs_or_nan(w, weight.numel());
    if (simd_applies<T>(std::max(w_max, max_abs_or_nan(h, history.numel())), temperature, squared)) {
      if constexpr (is_16bit_v<W>) {
        if (distinct_applies<W>(true, m)) {
          at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
            DistinctGroup d;
            std::vector<double> gsum;
            std::vector<float> gsoft, dir, ind, cache;
            for (int64_t g = g0; g < g1; ++g) {
              backward_group_distinct<W>(w, gf, h, gct, groups, g, m, k, iterations, 1.0 / temperature,
                                         squared, d, gsum, gsoft, dir, ind, cache, out, gco);
            }
          });
          return;
        }
      }
      at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
        const int64_t cache_floats = attention_avx2::cache_floats(m, k);
        std::vector<float> wbuf, gbuf, acc(m);
        std::vector<float> cache(cache_floats <= 2 * kCacheEntries ? cache_floats : 0);
        for (int64_t g = g0; g < g1; ++g) {
          backward_group_simd<W>(w, gf, h, gct, groups, g, m, k, iterations, 1.0 / temperature, squared, wbuf,
                                 gbuf, cache, acc, out, gco);
        }
      });
      return;
    }
  }
  at::parallel_for(0, groups, grain_of(m), [&](int64_t g0, int64_t g1) {
    std::vector<double> a(k), grad_a(k);
    std::vector<double> cache(m * k <= kCacheEntries ? m * k : 0);
    std::vector<T> acc(m);
    for (int64_t g = g0; g < g1; ++g) {
      backward_group<W, T>(w, gf, h, gct, groups, g, m, k, iterations, 1.0 / temperature, squared, a, grad_a,
                           cache, acc, out, gco);
    }
  });
}

// W = the weight's scalar type, T = the compute dtype (float64 for float64 weights, else float).
#define EDKM_DISPATCH_WT(wtype, name, ...)                                   \
  [&] {                                                                      \
    switch (wtype) {                                                         \
      case at::kDouble: {                                                    \
        using W = double;                                                    \
        using T = double;                                                    \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kFloat: {                                                     \
        using W = float;                                                     \
        using T = float;                                                     \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kBFloat16: {                                                  \
        using W = at::BFloat16;                                              \
        using T = float;                                                     \
        return __VA_ARGS__();                                                \
      }                                                                      \
      case at::kHalf: {                                                      \
        using W = at::Half;                                                  \
        using T = float;                                                     \
        return __VA_ARGS__();                                                \
      }                                                                      \
      default:                                                               \
        TORCH_CHECK_TYPE(false, name, ": unsupported weight dtype ", wtype); \
    }                                                                        \
  }()

void check_ndomain_args(const char* op, const at::Tensor& weight, const at::Tensor& history,
                        const at::Tensor& iterations) {
  TORCH_CHECK_VALUE(history.dim() == 3 && history.size(0) >= 2 && history.size(1) >= 1, op,
                    ": history must be [max_iter + 1, groups, K], got shape ", history.sizes());
  TORCH_CHECK_VALUE(weight.numel() % history.size(1) == 0, op, ": history's ", history.size(1),
                    " groups do not divide the weight's ", weight.numel(), " elements");
  TORCH_CHECK_TYPE(history.scalar_type() == compute_dtype(weight.scalar_type()), op, ": history must be ",
                   compute_dtype(weight.scalar_type()), ", got ", history.scalar_type());
  TORCH_CHECK_VALUE(iterations.numel() == 1, op, ": iterations must be a scalar");
  const int64_t t = iterations.item<int64_t>();
  TORCH_CHECK_VALUE(t >= 1 && t < history.size(0), op, ": iterations out of range: ", t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ndomain_forward_cpu(
    const at::Tensor& weight, const at::Tensor& centroids, double temperature, int64_t max_iter,
    double epsilon, c10::string_view distance) {
  const char* op = "dkm";
  check_dkm_args(op, weight, centroids, temperature, max_iter, epsilon);
  const bool squared = parse_distance(op, distance) == Distance::kSquared;
  auto c = centroids.to(compute_dtype(weight.scalar_type())).contiguous();
  auto r = EDKM_DISPATCH_WT(weight.scalar_type(), op, [&] {
    return forward_impl<W, T>(weight, c, temperature, max_iter, epsilon, squared);
  });
  return {r.clustered.view(weight.sizes()), r.centroids.to(centroids.scalar_type()), r.iterations, r.history};
}

std::tuple<at::Tensor, at::Tensor> ndomain_backward_cpu(
    const c10::optional<at::Tensor>& grad_clustered, const c10::optional<at::Tensor>& grad_centroids,
    const at::Tensor& weight_in, const at::Tensor& history_in, const at::Tensor& iterations,
    double temperature, c10::string_view distance, at::ScalarType centroids_dtype) {
  const char* op = "_ndomain_backward";
  const bool squared = parse_distance(op, distance) == Distance::kSquared;
  check_ndomain_args(op, weight_in, history_in, iterations);
  auto weight = weight_in.contiguous();
  auto history = history_in.contiguous();
  const auto ct = history.scalar_type();
  at::Tensor gf, gct;
  if (grad_clustered.has_value() && grad_clustered->defined()) {
    TORCH_CHECK_VALUE(grad_clustered->numel() == weight.numel(), op,
                      ": grad_clustered must have the weight's ", weight.numel(), " elements");
    gf = grad_clustered->to(weight.scalar_type()).contiguous();
  }
  if (grad_centroids.has_value() && grad_centroids->defined()) {
    gct = grad_centroids->to(ct).contiguous();
  }
  auto grad_weight = at::empty(weight.sizes(), weight.options());
  auto grad_c0 = at::empty({history.size(1), history.size(2)}, history.options());
  const int64_t t = iterations.item<int64_t>();
  EDKM_DISPATCH_WT(weight.scalar_type(), op, [&] {
    backward_impl<W, T>(weight, gf, gct, history, t, temperature, squared, grad_weight, grad_c0);
  });
  return {grad_weight, grad_c0.to(centroids_dtype)};
}

at::Tensor ndomain_recompute_cpu(const at::Tensor& weight_in, const at::Tensor& history,
                                 const at::Tensor& iterations, double temperature,
                                 c10::string_view distance) {
  const char* op = "_ndomain_recompute";
  const bool squared = parse_distance(op, distance) == Distance::kSquared;
  check_ndomain_args(op, weight_in, history, iterations);
  auto weight = weight_in.contiguous();
  const int64_t groups = history.size(1), k = history.size(2);
  auto c = history[iterations.item<int64_t>()].contiguous();
  auto out = at::empty(weight.sizes(), weight.options());
  EDKM_DISPATCH_WT(weight.scalar_type(), op, [&] {
    const W* w = weight.const_data_ptr<W>();
    const double w_max = max_abs_or_nan(w, weight.numel());
    // Decided over the whole history, as the forward and backward decide it.
    auto hist = history.contiguous();
    const double c_max = max_abs_or_nan(hist.const_data_ptr<T>(), hist.numel());
    const bool simd = simd_applies<T>(std::max(w_max, c_max), temperature, squared);
    ndomain_soft<W, T>(w, c.const_data_ptr<T>(), groups, weight.numel() / groups, k, temperature, squared,
                       simd, out.data_ptr<W>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) {
  m.impl("_ndomain_forward", &ndomain_forward_cpu);
  m.impl("_ndomain_backward", &ndomain_backward_cpu);
  m.impl("_ndomain_recompute", &ndomain_recompute_cpu);
}

}  // namespace edkm
