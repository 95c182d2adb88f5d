// CPU kernels of assign (binary search in the sorted centroids: O(log K) per weight; for
// 16-bit weights in large groups, one table look-up per weight: every one of the 65536 bit
// patterns is assigned once per group) and dequantize (one look-up per weight).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "hard_assign.h"

namespace edkm {

namespace {

constexpr int64_t kGrain = 1 << 14;
constexpr int64_t kPatterns = 1 << 16;
constexpr int32_t kNotFinite = -1;

// One group's centroids sorted by value, each with the lowest original index among equal values.
struct SortedCentroids {
  std::vector<double> value;
  std::vector<int64_t> index;

  explicit SortedCentroids(const double* c, int64_t k) : value(k), index(k) {
    std::vector<int64_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return c[a] < c[b]; });
    for (int64_t j = 0; j < k; ++j) {
      value[j] = c[order[j]];
      index[j] = (j > 0 && value[j] == value[j - 1]) ? index[j - 1] : order[j];
    }
  }

  // Nearest centroid of x; on equal distance the lower original index, as argmin.
  int64_t nearest(double x) const {
    const auto k = static_cast<int64_t>(value.size());
    const int64_t hi = std::lower_bound(value.begin(), value.end(), x) - value.begin();
    if (hi == 0) return index[0];
    if (hi == k) return index[k - 1];
    const double d_lo = std::abs(x - value[hi - 1]), d_hi = std::abs(x - value[hi]);
    if (d_lo < d_hi) return index[hi - 1];
    if (d_hi < d_lo) return index[hi];
    return std::min(index[hi - 1], index[hi]);
  }
};

at::Tensor assign_cpu(const at::Tensor& weight, const at::Tensor& centroids) {
  const auto index_dtype = check_assign_args(weight, centroids);
  auto w = weight.contiguous();
  auto c = centroids.to(at::kDouble).contiguous();
  const int64_t groups = c.size(0), k = c.size(1), m = w.numel() / groups;
  std::vector<SortedCentroids> tables;
  tables.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) tables.emplace_back(c.const_data_ptr<double>() + g * k, k);
  auto out = at::empty(w.sizes(), w.options().dtype(index_dtype));
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "assign", [&] {
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    if constexpr (sizeof(scalar_t) == 2) {
      if (m >= kPatterns) {
        // Index of every bit pattern, per group (kNotFinite for NaN/Inf patterns).
        std::vector<int32_t> lut(static_cast<size_t>(groups * kPatterns));
        at::parallel_for(0, groups * kPatterns, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const auto bits = static_cast<uint16_t>(p % kPatterns);
            scalar_t value;
            std::memcpy(&value, &bits, sizeof(bits));
            const double v = static_cast<double>(value);
            lut[p] = std::isfinite(v) ? static_cast<int32_t>(tables[p / kPatterns].nearest(v)) : kNotFinite;
          }
        });
        auto run16 = [&](auto* dst) {
          using index_t = std::remove_pointer_t<decltype(dst)>;
          at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              uint16_t bits;
              std::memcpy(&bits, x + i, sizeof(bits));
              const int32_t j = lut[(i / m) * kPatterns + bits];
              if (j == kNotFinite) {
                bad = true;
                return;
              }
              dst[i] = static_cast<index_t>(j);
            }
          });
        };
        if (index_dtype == at::kByte)
          run16(out.mutable_data_ptr<uint8_t>());
        else
          run16(out.mutable_data_ptr<int32_t>());
        return;
      }
    }
    auto run = [&](auto* dst) {
      using index_t = std::remove_pointer_t<decltype(dst)>;
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const double v = static_cast<double>(x[i]);
          if (!std::isfinite(v)) {
            bad = true;
            return;
          }
          dst[i] = static_cast<index_t>(tables[i / m].nearest(v));
        }
      });
    };
    if (index_dtype == at::kByte)
      run(out.mutable_data_ptr<uint8_t>());
    else
      run(out.mutable_data_ptr<int32_t>());
  });
  TORCH_CHECK_VALUE(!bad, "assign: weight contains NaN or Inf");
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& indices, const at::Tensor& centroids,
                          c10::optional<at::ScalarType> dtype) {
  const auto out_dtype = check_dequantize_args(indices, centroids, dtype);
  auto idx = indices.contiguous();
  auto c = centroids.to(out_dtype).contiguous();
  auto out = at::empty(idx.sizes(), c.options());
  if (idx.numel() == 0) return out;
  const int64_t groups = c.size(0), k = c.size(1), m = idx.numel() / groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize", [&] {
    const scalar_t* table = c.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* src) {
      at::parallel_for(0, idx.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dst[i] = table[(i / m) * k + static_cast<int64_t>(src[i])];
      });
    };
    switch (idx.scalar_type()) {
      case at::kByte:
        run(idx.const_data_ptr<uint8_t>());
        break;
      case at::kShort:
        run(idx.const_data_ptr<int16_t>());
        break;
      case at::kInt:
        run(idx.const_data_ptr<int32_t>());
        break;
      default:
        run(idx.const_data_ptr<int64_t>());
        break;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) {
  m.impl("assign", &assign_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace edkm
