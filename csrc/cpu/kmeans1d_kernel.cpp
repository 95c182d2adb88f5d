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
#include <limits>
#include <vector>

#include <ATen/ATen.h>
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

  void solve(int64_t lo, int64_t hi, int64_t optlo, int64_t opthi) const {
    while (lo <= hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int64_t jlo = std::max(optlo, jmin), jhi = std::min(mid - 1, opthi);
      double best = std::numeric_limits<double>::infinity();
      int64_t bestj = jlo;
      for (int64_t j = jlo; j <= jhi; ++j) {
        const double c = prev[j] + p.cost(j, mid);
        if (c < best) {
          best = c;
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

std::tuple<at::Tensor, at::Tensor> optimal_kmeans_1d_cpu(const at::Tensor& values,
                                                         const at::Tensor& counts, int64_t k) {
  check_kmeans1d_args(values, counts, k);
  auto vt = values.to(at::kDouble).contiguous();
  auto wt = counts.to(at::kDouble).contiguous();
  const double* v = vt.const_data_ptr<double>();
  const double* w = wt.const_data_ptr<double>();
  const int64_t u = vt.numel();
  for (int64_t t = 0; t < u; ++t) {
    TORCH_CHECK_VALUE(std::isfinite(v[t]), kOp, ": values must be finite, got ", v[t],
                      " at index ", t);
    TORCH_CHECK_VALUE(std::isfinite(w[t]) && w[t] > 0, kOp,
                      ": counts must be finite and > 0, got ", w[t], " at index ", t);
    TORCH_CHECK_VALUE(t == 0 || v[t] > v[t - 1], kOp,
                      ": values must be sorted strictly increasing, got values[", t - 1,
                      "] = ", v[t - 1], " and values[", t, "] = ", v[t]);
  }
  const auto opts = vt.options();
  auto centroids = at::empty({k}, opts);
  double* c = centroids.mutable_data_ptr<double>();
  if (k >= u) {
    for (int64_t j = 0; j < k; ++j) c[j] = v[std::min(j, u - 1)];
    return {centroids, at::zeros({}, opts)};
  }

  // bounds[m] = first value of cluster m (bounds[0] = 0, bounds[k] = u).
  std::vector<int64_t> bounds(k + 1, 0);
  bounds[k] = u;
  if (k > 1) {
    const Prefix p(v, w, u);
    const int64_t width = u - k + 1;  // layer m (1-based) needs i in [m, u - k + m]
    std::vector<int32_t> splits(static_cast<size_t>((k - 1) * width));
    std::vector<double> prev(u + 1, 0.0), cur(u + 1, 0.0);
    for (int64_t i = 1; i <= width; ++i) prev[i] = p.cost(0, i);
    for (int64_t m = 2; m <= k; ++m) {
      const int64_t lo = m, hi = u - k + m;
      Layer layer{p, prev, cur, splits.data() + (m - 2) * width, lo, m - 1};
      if (m == k) layer.solve(u, u, m - 1, u - 1);
      else layer.solve(lo, hi, m - 1, hi - 1);
      std::swap(prev, cur);
    }
    int64_t i = u;
    for (int64_t m = k; m >= 2; --m) {
      i = splits[(m - 2) * width + (i - m)];
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
  return {centroids, at::scalar_tensor(cost, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) { m.impl("optimal_kmeans_1d", &optimal_kmeans_1d_cpu); }

}  // namespace edkm
