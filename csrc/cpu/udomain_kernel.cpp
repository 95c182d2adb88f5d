// The U-domain iterations on CPU as fused loops (udomain.h's contract, same arithmetic as the
// ATen composition in udomain.cpp): one pass over the table per iteration, attention computed
// in registers and never materialized as a [G, U, K] tensor, entries with count 0 (padding,
// absent bit patterns) skipped wherever the count multiplies them.
//
// Work is split into fixed chunks of each group's row; every chunk writes its own partial sums,
// added in chunk order afterwards, so results do not depend on the number of threads. Sums are
// accumulated, and the attention computed, in float64, except for float32 tables where the
// AVX2 kernels of attention_avx2.h run each chunk (settings.h's simd_attention()).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../settings.h"
#include "../udomain.h"
#include "attention_avx2.h"

namespace edkm {

namespace {

constexpr int64_t kChunk = 2048;

struct Layout {
  int64_t groups, width, k, chunks;
  int64_t tasks() const { return groups * chunks; }
};

// The table entries [lo, hi) of group g that task `task` covers.
struct Span {
  int64_t g, lo, hi;
};

Span span_of(const Layout& l, int64_t task) {
  const int64_t lo = (task % l.chunks) * kChunk;
  return {task / l.chunks, lo, std::min(l.width, lo + kChunk)};
}

// out[g, j] += part[task, j] for every task of group g, in task order (so the sum does not
// depend on the thread count).
void add_partials(const std::vector<double>& part, const Layout& l, double* out) {
  for (int64_t task = 0; task < l.tasks(); ++task) {
    const int64_t g = task / l.chunks;
    for (int64_t j = 0; j < l.k; ++j) out[g * l.k + j] += part[task * l.k + j];
  }
}

Layout layout_of(const at::Tensor& values, int64_t k) {
  const int64_t g = values.size(0), u = values.size(1);
  return {g, u, k, std::max<int64_t>(1, (u + kChunk - 1) / kChunk)};
}

// a_j = softmax_j(-dist(v, c_j) / tau), computed in float64 whatever T is: with a sharp
// softmax (small tau) the 1/tau factor magnifies float32 rounding of the exponents.
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
    a[j] = std::exp(a[j] - m);
    z += a[j];
  }
  for (int64_t j = 0; j < k; ++j) a[j] /= z;
}

inline double slope_of(double diff, bool squared) {
  return squared ? diff * 2 : double((diff > 0) - (diff < 0));
}

// Whether the float32 AVX2 attention passes (attention_avx2.h) run: float32 tables, the setting
// on, the CPU able, and every exponent representable in float32 for the values of nonzero count
// and the centroids c (n_c entries: the initial centroids, or the whole history, which stays
// within the same range). Otherwise the float64 loops below run.
template <typename T>
bool simd_applies(const T* values, const T* counts, int64_t n_values, const T* c, int64_t n_c,
                  double temperature, bool squared) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    if (!simd_attention() || !attention_avx2::available()) return false;
    double mx = 0;
    for (int64_t i = 0; i < n_values; ++i) {
      if (counts[i] == 0) continue;
      const double a = std::abs(double(values[i]));
      if (!std::isfinite(a)) return false;
      mx = std::max(mx, a);
    }
    for (int64_t i = 0; i < n_c; ++i) {
      const double a = std::abs(double(c[i]));
      if (!std::isfinite(a)) return false;
      mx = std::max(mx, a);
    }
    return attention_avx2::exponents_fit(mx, temperature, squared);
  }
}

// Per group: num_j = sum_u n_u a_uj v_u and den_j = sum_u n_u a_uj at centroids c [G, K].
template <typename T>
void moments(const T* values, const T* counts, const T* c, const Layout& l, double neg_inv_tau, bool squared,
             bool simd, std::vector<double>& num, std::vector<double>& den) {
  std::vector<double> pnum(l.tasks() * l.k, 0.0), pden(l.tasks() * l.k, 0.0);
  at::parallel_for(0, l.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> a(l.k);
    for (int64_t task = begin; task < end; ++task) {
      const auto [g, lo, hi] = span_of(l, task);
      const T* cg = c + g * l.k;
      double* tn = pnum.data() + task * l.k;
      double* td = pden.data() + task * l.k;
      if constexpr (std::is_same_v<T, float>) {
        if (simd) {
          const int64_t at = g * l.width + lo;
          attention_avx2::moments(values + at, counts + at, hi - lo, cg, l.k, float(neg_inv_tau), squared, tn,
                                  td, nullptr);
          continue;
        }
      }
      for (int64_t u = lo; u < hi; ++u) {
        const T n = counts[g * l.width + u];
        if (n == 0) continue;
        const double v = values[g * l.width + u];
        attention(v, cg, l.k, neg_inv_tau, squared, a.data());
        for (int64_t j = 0; j < l.k; ++j) {
          const double w = double(n) * a[j];
          tn[j] += w * v;
          td[j] += w;
        }
      }
    }
  });
  num.assign(l.groups * l.k, 0.0);
  den.assign(l.groups * l.k, 0.0);
  add_partials(pnum, l, num.data());
  add_partials(pden, l, den.data());
}

// F_u = sum_j a_uj c_j for every entry (padding included, as the ATen path does).
template <typename T>
void soft_values(const T* values, const T* c, const Layout& l, double neg_inv_tau, bool squared, bool simd,
                 T* soft) {
  at::parallel_for(0, l.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> a(l.k);
    for (int64_t task = begin; task < end; ++task) {
      const auto [g, lo, hi] = span_of(l, task);
      const T* cg = c + g * l.k;
      if constexpr (std::is_same_v<T, float>) {
        if (simd) {
          const int64_t at = g * l.width + lo;
          attention_avx2::soft(values + at, hi - lo, cg, l.k, float(neg_inv_tau), squared, soft + at);
          continue;
        }
      }
      for (int64_t u = lo; u < hi; ++u) {
        attention(values[g * l.width + u], cg, l.k, neg_inv_tau, squared, a.data());
        double f = 0;
        for (int64_t j = 0; j < l.k; ++j) f += a[j] * double(cg[j]);
        soft[g * l.width + u] = T(f);
      }
    }
  });
}

template <typename T>
UDomainForward forward_impl(const at::Tensor& values_in, const at::Tensor& counts_in,
                            const at::Tensor& centroids, double temperature, int64_t max_iter, double epsilon,
                            Distance distance) {
  auto values = values_in.contiguous();
  auto counts = counts_in.contiguous();
  const Layout l = layout_of(values, centroids.size(1));
  const bool squared = distance == Distance::kSquared;
  const double neg_inv_tau = -1.0 / temperature;
  auto history = at::empty({max_iter + 1, l.groups, l.k}, centroids.options());
  history[0].copy_(centroids);
  T* h = history.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const T* n = counts.data_ptr<T>();
  const int64_t gk = l.groups * l.k;
  const bool simd = simd_applies(v, n, l.groups * l.width, h, gk, temperature, squared);
  std::vector<double> num, den;
  int64_t t = 0;
  while (t < max_iter) {
    const T* c = h + t * gk;
    T* next = h + (t + 1) * gk;
    moments(v, n, c, l, neg_inv_tau, squared, simd, num, den);
    double move = 0;
    for (int64_t i = 0; i < gk; ++i) {
      next[i] = den[i] > 0 ? T(num[i] / den[i]) : c[i];
      move = std::max(move, double(std::abs(next[i] - c[i])));
    }
    ++t;
    if (move <= epsilon) break;
  }
  for (int64_t r = t + 1; r <= max_iter; ++r) std::copy(h + t * gk, h + (t + 1) * gk, h + r * gk);
  auto c_final = history[t].clone();
  auto soft = at::empty_like(values);
  soft_values(v, h + t * gk, l, neg_inv_tau, squared, simd, soft.data_ptr<T>());
  return {c_final, soft, history, at::scalar_tensor(t, values.options().dtype(at::kLong))};
}

template <typename T>
UDomainBackward backward_impl(const at::Tensor& values_in, const at::Tensor& counts_in,
                              const at::Tensor& history_in, int64_t iterations, double temperature,
                              Distance distance, const at::Tensor& grad_soft_in,
                              const at::Tensor& grad_centroids) {
  auto values = values_in.contiguous();
  auto counts = counts_in.contiguous();
  auto history = history_in.contiguous();
  auto grad_soft = grad_soft_in.contiguous();
  const Layout l = layout_of(values, history.size(2));
  const bool squared = distance == Distance::kSquared;
  const double inv_tau = 1.0 / temperature;
  const double neg_inv_tau = -inv_tau;
  const T* v = values.data_ptr<T>();
  const T* n = counts.data_ptr<T>();
  const T* h = history.data_ptr<T>();
  const T* gs = grad_soft.data_ptr<T>();
  const int64_t gk = l.groups * l.k;
  const bool simd = simd_applies(v, n, l.groups * l.width, h, history.numel(), temperature, squared);

  auto direct = at::empty_like(values);
  auto indirect = at::zeros_like(values);
  T* dir = direct.data_ptr<T>();
  T* ind = indirect.data_ptr<T>();
  std::vector<double> part(l.tasks() * l.k);

  // Final soft assignment at c_T: the direct slope dF/dv, and dL/dc_T through F.
  const T* ct = h + iterations * gk;
  std::fill(part.begin(), part.end(), 0.0);
  at::parallel_for(0, l.tasks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> a(l.k);
    for (int64_t task = begin; task < end; ++task) {
      const auto [g, lo, hi] = span_of(l, task);
      const T* c = ct + g * l.k;
      double* pg = part.data() + task * l.k;
      if constexpr (std::is_same_v<T, float>) {
        if (simd) {
          const int64_t at = g * l.width + lo;
          attention_avx2::final_pass(v + at, gs + at, hi - lo, c, l.k, float(inv_tau), squared, nullptr,
                                     dir + at, pg);
          continue;
        }
      }
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t i = g * l.width + u;
        attention(v[i], c, l.k, neg_inv_tau, squared, a.data());
        double f = 0;
        for (int64_t j = 0; j < l.k; ++j) f += a[j] * double(c[j]);
        double d = 0;
        const double gu = gs[i];
        for (int64_t j = 0; j < l.k; ++j) {
          const double s = slope_of(double(v[i]) - double(c[j]), squared);
          const double sg = a[j] * (double(c[j]) - f);  // softmax_grad(a, c)_j
          d += sg * s;
          if (gu != 0) pg[j] += gu * a[j] + gu * sg * s * inv_tau;
        }
        dir[i] = T(-d * inv_tau);
      }
    }
  });
  std::vector<double> gc(gk, 0.0);
  add_partials(part, l, gc.data());
  if (grad_centroids.defined()) {
    auto extra = grad_centroids.contiguous();
    const T* e = extra.data_ptr<T>();
    // The ATen path adds in T: round gc first, as it does.
    for (int64_t i = 0; i < gk; ++i) gc[i] = double(T(gc[i])) + double(e[i]);
  }

  std::vector<double> num, den, g_num(gk), g_den(gk), g_keep(gk);
  std::vector<float> next_f(gk), q_f(gk);  // the AVX2 reverse pass's next_j and q_j
  for (int64_t t = iterations - 1; t >= 0; --t) {
    const T* c = h + t * gk;
    moments(v, n, c, l, neg_inv_tau, squared, simd, num, den);
    for (int64_t i = 0; i < gk; ++i) {
      const bool attended = den[i] > 0;
      const double safe = attended ? den[i] : 1.0;
      const double next = num[i] / safe;
      g_num[i] = attended ? gc[i] / safe : 0.0;
      g_den[i] = attended ? -gc[i] * next / safe : 0.0;
      g_keep[i] = attended ? 0.0 : gc[i];
      next_f[i] = attended ? float(next) : 0.0f;
      q_f[i] = float(g_num[i]);
    }
    std::fill(part.begin(), part.end(), 0.0);
    at::parallel_for(0, l.tasks(), 1, [&](int64_t begin, int64_t end) {
      std::vector<double> a(l.k);
      std::vector<double> grad_a(l.k);
      for (int64_t task = begin; task < end; ++task) {
        const auto [g, lo, hi] = span_of(l, task);
        const T* cg = c + g * l.k;
        const double* gn = g_num.data() + g * l.k;
        const double* gd = g_den.data() + g * l.k;
        double* pg = part.data() + task * l.k;
        if constexpr (std::is_same_v<T, float>) {
          if (simd) {
            const int64_t at = g * l.width + lo;
            attention_avx2::reverse_pass(v + at, n + at, hi - lo, cg, next_f.data() + g * l.k,
                                         q_f.data() + g * l.k, l.k, float(neg_inv_tau), squared, nullptr,
                                         ind + at, pg);
            for (int64_t j = 0; j < l.k; ++j) pg[j] *= inv_tau;
            continue;
          }
        }
        for (int64_t u = lo; u < hi; ++u) {
          const int64_t i = g * l.width + u;
          const double nu = n[i];
          if (nu == 0) continue;
          const double vu = v[i];
          attention(vu, cg, l.k, neg_inv_tau, squared, a.data());
          double through = 0, sum_ag = 0;
          for (int64_t j = 0; j < l.k; ++j) {
            through += nu * a[j] * gn[j];
            grad_a[j] = nu * (vu * gn[j] + gd[j]);
            sum_ag += a[j] * grad_a[j];
          }
          double back = 0;
          for (int64_t j = 0; j < l.k; ++j) {
            const double gsj = a[j] * (grad_a[j] - sum_ag);
            const double term = gsj * double(slope_of(vu - double(cg[j]), squared));
            back += term;
            pg[j] += term * inv_tau;
          }
          ind[i] = T(double(ind[i]) + through - back * inv_tau);
        }
      }
    });
    for (int64_t i = 0; i < gk; ++i) gc[i] = g_keep[i];
    add_partials(part, l, gc.data());
  }
  auto gc_out = at::empty({l.groups, l.k}, values.options());
  T* go = gc_out.data_ptr<T>();
  for (int64_t i = 0; i < gk; ++i) go[i] = T(gc[i]);
  return {direct, indirect, gc_out};
}

}  // namespace

bool udomain_fused_applies(const at::Tensor& values, const at::Tensor& counts,
                           const at::Tensor& centroids_or_history) {
  const auto st = values.scalar_type();
  return fused_udomain() && values.device().is_cpu() && (st == at::kFloat || st == at::kDouble) &&
         counts.scalar_type() == st && centroids_or_history.scalar_type() == st &&
         centroids_or_history.device().is_cpu() && counts.device().is_cpu();
}

UDomainForward udomain_forward_fused(const at::Tensor& values, const at::Tensor& counts,
                                     const at::Tensor& centroids, double temperature, int64_t max_iter,
                                     double epsilon, Distance distance) {
  auto c = centroids.contiguous();
  if (values.scalar_type() == at::kDouble) {
    return forward_impl<double>(values, counts, c, temperature, max_iter, epsilon, distance);
  }
  return forward_impl<float>(values, counts, c, temperature, max_iter, epsilon, distance);
}

UDomainBackward udomain_backward_fused(const at::Tensor& values, const at::Tensor& counts,
                                       const at::Tensor& history, int64_t iterations, double temperature,
                                       Distance distance, const at::Tensor& grad_soft,
                                       const at::Tensor& grad_centroids) {
  if (values.scalar_type() == at::kDouble) {
    return backward_impl<double>(values, counts, history, iterations, temperature, distance, grad_soft,
                                 grad_centroids);
  }
  return backward_impl<float>(values, counts, history, iterations, temperature, distance, grad_soft,
                              grad_centroids);
}

}  // namespace edkm
