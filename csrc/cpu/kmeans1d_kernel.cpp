// CPU kernel of optimal_kmeans_1d: exact weighted 1-D k-means by dynamic programming.
//
// On sorted values the optimal clusters are contiguous runs. D[m][i], the least cost of the
// first i values in m clusters, is min over j of D[m-1][j] + cost(j, i), where cost(j, i) is the
// weighted sum of squares of values [j, i) about their mean, O(1) from prefix sums. The cost is
// Monge (it satisfies the quadrangle inequality), so the best split j is non-decreasing in i
// and each layer is solved by divide and conquer in O(U log U): O(k U log U) in all, with the
// split points kept (int32, (k - 1) x (U - k + 1)) for backtracking. The returned centroids and
// cost are recomputed directly from the final clusters (two-pass, no prefix-sum cancellation).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kmeans1d.h"

namespace edkm {

namespace {

constexpr const char* kOp = "optimal_kmeans_1d";

// Prefix sums of weight, weight * x and weight * x^2 over x = value - shift (the weighted
// mean: keeps the sums small so cost() loses little to cancellation).
struct Prefix {
  std::vector<double> s0, s1, s2;

  Prefix(const double* v, const double* w, int64_t u) : s0(u + 1), s1(u + 1), s2(u + 1) {
    double tw = 0, twv = 0;
    for (int64_t t = 0; t < u; ++t) {
      tw += w[t];
      twv += w[t] * v[t];
    }
    const double shift = twv / tw;
    for (int64_t t = 0; t < u; ++t) {
      const double x = v[t] - shift;
      s0[t + 1] = s0[t] + w[t];
      s1[t + 1] = s1[t] + w[t] * x;
      s2[t + 1] = s2[t] + w[t] * x * x;
    }
  }

  // Weighted sum of squares of values [j, i) about their mean (j < i).
  double cost(int64_t j, int64_t i) const {
    const double n = s0[i] - s0[j], a = s1[i] - s1[j], b = s2[i] - s2[j];
    return std::max(0.0, b - a * a / n);
  }
};

// One DP layer: cur[i] = min_{j in [jmin, i-1]} prev[j] + cost(j, i) for i in [lo, hi],
// knowing the best j for i lies in [optlo, opthi]; the leftmost best j goes to split[i - base].
struct Layer {
  const Prefix& p;
  const std::vector<double>& prev;
  std::vector<double>& cur;
  int32_t* split;
  int64_t base, jmin;
  double* scratch;  // u + 1 doubles

  void solve(int64_t lo, int64_t hi, int64_t optlo, int64_t opthi) const {
    const double* s0 = p.s0.data();
    const double* s1 = p.s1.data();
    const double* s2 = p.s2.data();
    const double* pv = prev.data();
    while (lo <= hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int64_t jlo = std::max(optlo, jmin), jhi = std::min(mid - 1, opthi);
      // All candidates first, in a branch-free loop the compiler vectorizes (the division is
      // most of the time), then the leftmost minimum: the same values as prev[j] + cost(j, mid).
      const double n0 = s0[mid], a0 = s1[mid], b0 = s2[mid];
      for (int64_t j = jlo; j <= jhi; ++j) {
        const double n = n0 - s0[j], a = a0 - s1[j], b = b0 - s2[j];
        scratch[j] = pv[j] + std::max(0.0, b - a * a / n);
      }
      double best = std::numeric_limits<double>::infinity();
      int64_t bestj = jlo;
      for (int64_t j = jlo; j <= jhi; ++j) {
        if (scratch[j] < best) {
          best = scratch[j];
          bestj = j;
        }
      }
      cur[mid] = best;
      split[mid - base] = static_cast<int32_t>(bestj);
      // Left half recursively (the smaller stack), right half by looping.
      solve(lo, mid - 1, optlo, bestj);
      lo = mid + 1;
      optlo = bestj;
    }
  }
};

// Reusable buffers of one solve, so a thread solving many small groups allocates once.
struct Workspace {
  std::vector<int32_t> splits;
  std::vector<double> prev, cur, scratch;
  std::vector<int64_t> bounds;
};

// The optimal k clusters of sorted, strictly increasing v[0..u) with masses w > 0: writes the
// k ascending centroids to c (k >= u: the values, the last one repeated) and returns the cost.
double solve_sorted(const double* v, const double* w, int64_t u, int64_t k, double* c, Workspace& ws) {
  if (k >= u) {
    for (int64_t j = 0; j < k; ++j) c[j] = v[std::min(j, u - 1)];
    return 0.0;
  }
  // bounds[m] = first value of cluster m (bounds[0] = 0, bounds[k] = u).
  auto& bounds = ws.bounds;
  bounds.assign(k + 1, 0);
  bounds[k] = u;
  if (k > 1) {
    const Prefix p(v, w, u);
    const int64_t width = u - k + 1;  // layer m (1-based) needs i in [m, u - k + m]
    ws.splits.resize(static_cast<size_t>((k - 1) * width));
    ws.prev.assign(u + 1, 0.0);
    ws.cur.assign(u + 1, 0.0);
    ws.scratch.resize(u + 1);
    auto& prev = ws.prev;
    auto& cur = ws.cur;
    for (int64_t i = 1; i <= width; ++i) prev[i] = p.cost(0, i);
    for (int64_t m = 2; m <= k; ++m) {
      const int64_t lo = m, hi = u - k + m;
      Layer layer{p, prev, cur, ws.splits.data() + (m - 2) * width, lo, m - 1, ws.scratch.data()};
      if (m == k)
        layer.solve(u, u, m - 1, u - 1);
      else
        layer.solve(lo, hi, m - 1, hi - 1);
      std::swap(prev, cur);
    }
    int64_t i = u;
    for (int64_t m = k; m >= 2; --m) {
      i = ws.splits[(m - 2) * width + (i - m)];
      bounds[m - 1] = i;
    }
  }
  double cost = 0;
  for (int64_t m = 0; m < k; ++m) {
    double sw = 0, swv = 0;
    for (int64_t t = bounds[m]; t < bounds[m + 1]; ++t) {
      sw += w[t];
      swv += w[t] * v[t];
    }
    // The mean of a run of sorted values lies inside it (clamp against rounding).
    const double mean = std::min(std::max(swv / sw, v[bounds[m]]), v[bounds[m + 1] - 1]);
    c[m] = mean;
    for (int64_t t = bounds[m]; t < bounds[m + 1]; ++t) cost += w[t] * (v[t] - mean) * (v[t] - mean);
  }
  return cost;
}

std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d_cpu(const at::Tensor& values, const at::Tensor& counts,
                                                         int64_t k) {
  check_kmeans1d_args(values, counts, k);
  auto vt = values.to(at::kDouble).contiguous();
  auto wt = counts.to(at::kDouble).contiguous();
  const double* v = vt.const_data_ptr<double>();
  const double* w = wt.const_data_ptr<double>();
  const int64_t u = vt.numel();
  for (int64_t t = 0; t < u; ++t) {
    TORCH_CHECK_VALUE(std::isfinite(v[t]), kOp, ": values must be finite, got ", v[t], " at index ", t);
    TORCH_CHECK_VALUE(std::isfinite(w[t]) && w[t] > 0, kOp, ": counts must be finite and > 0, got ", w[t],
                      " at index ", t);
    TORCH_CHECK_VALUE(t == 0 || v[t] > v[t - 1], kOp,
                      ": values must be sorted strictly increasing, got values[", t - 1, "] = ", v[t - 1],
                      " and values[", t, "] = ", v[t]);
  }
  const auto opts = vt.options();
  auto centroids = at::empty({k}, opts);
  Workspace ws;
  const double cost = solve_sorted(v, w, u, k, centroids.mutable_data_ptr<double>(), ws);
  return {centroids, at::scalar_tensor(cost, opts)};
}

// Grouped: each row of weight [G, M] is one group, solved over its own distinct values (equal
// values merged, +0 and -0 as one) with mass = count, or = the sum of the elements' importances
// (SqueezeLLM-style weighted k-means). A distinct value whose importances sum to 0 keeps a tiny
// mass (1e-12 of the group's largest, 1 if all are 0), as init.weighted_distinct_values does,
// so every value still belongs to a cluster and the DP never divides by 0. Groups are
// independent: at::parallel_for over them, each thread with its own buffers.
// An unsigned integer whose order is the float's order (-0 just below +0): sorting these is
// several times faster than sorting doubles with a comparator.
inline uint32_t order_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float from_order_key(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

template <typename scalar_t>
void solve_groups(const scalar_t* x, const double* imp, int64_t groups, int64_t m, int64_t k,
                  double* centroids, double* cost) {
  // Weights narrower than float64 are exact in float: sort (key << 32 | position) as integers.
  constexpr bool kNarrow = !std::is_same_v<scalar_t, double>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    Workspace ws;
    std::vector<uint64_t> keys(kNarrow ? m : 0);
    std::vector<std::pair<double, double>> pairs(kNarrow ? 0 : m);
    std::vector<double> v(m), w(m);
    for (int64_t g = g0; g < g1; ++g) {
      const scalar_t* xg = x + g * m;
      const double* ig = imp ? imp + g * m : nullptr;
      int64_t u = 0;
      // Appends element (value, mass) in ascending value order, merging equal values.
      auto push = [&](double value, double mass) {
        TORCH_CHECK_VALUE(std::isfinite(value),
                          "optimal_kmeans_1d_grouped: weight has NaN or "
                          "Inf values (group ",
                          g, "); cannot cluster it");
        TORCH_CHECK_VALUE(std::isfinite(mass) && mass >= 0,
                          "optimal_kmeans_1d_grouped: "
                          "importance must be finite and >= 0, got ",
                          mass, " in group ", g);
        if (u > 0 && value == v[u - 1]) {
          w[u - 1] += mass;
        } else {
          v[u] = value;
          w[u] = mass;
          ++u;
        }
      };
      if constexpr (kNarrow) {
        for (int64_t t = 0; t < m; ++t)
          keys[t] = (uint64_t(order_key(static_cast<float>(xg[t]))) << 32) | uint64_t(t);
        std::sort(keys.begin(), keys.end());
        for (int64_t t = 0; t < m; ++t)
          push(from_order_key(uint32_t(keys[t] >> 32)), ig ? ig[keys[t] & 0xffffffffu] : 1.0);
      } else {
        for (int64_t t = 0; t < m; ++t) pairs[t] = {static_cast<double>(xg[t]), ig ? ig[t] : 1.0};
        std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
        for (int64_t t = 0; t < m; ++t) push(pairs[t].first, pairs[t].second);
      }
      double wmax = 0;
      for (int64_t t = 0; t < u; ++t) wmax = std::max(wmax, w[t]);
      const double floor = wmax > 0 ? wmax * 1e-12 : 1.0;
      for (int64_t t = 0; t < u; ++t) w[t] = std::max(w[t], floor);
      cost[g] = solve_sorted(v.data(), w.data(), u, k, centroids + g * k, ws);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d_grouped_cpu(
    const at::Tensor& weight, int64_t k, const std::optional<at::Tensor>& importance) {
  check_kmeans1d_grouped_args(weight, k, importance);
  constexpr const char* op = "optimal_kmeans_1d_grouped";
  const auto x = weight.contiguous();
  const int64_t groups = x.size(0), m = x.size(1);
  at::Tensor imp;
  if (importance.has_value() && importance->defined()) {
    imp = importance->to(at::kDouble).contiguous();
  }
  // Finiteness (and importance >= 0) is checked per element inside the group loop: a
  // separate pass over a large weight would cost as much as the sort.
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto centroids = at::empty({groups, k}, opts);
  auto cost = at::empty({groups}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    solve_groups<scalar_t>(x.const_data_ptr<scalar_t>(),
                           imp.defined() ? imp.const_data_ptr<double>() : nullptr, groups, m, k,
                           centroids.mutable_data_ptr<double>(), cost.mutable_data_ptr<double>());
  });
  return {centroids, cost};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) {
  m.impl("optimal_kmeans_1d", &optimal_kmeans_1d_cpu);
  m.impl("optimal_kmeans_1d_grouped", &optimal_kmeans_1d_grouped_cpu);
}

}  // namespace edkm
