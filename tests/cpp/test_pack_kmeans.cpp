// pack_indices / unpack_indices (CPU kernel against a bit-by-bit reference and the generic ATen
// version that serves other devices) and optimal_kmeans_1d (against brute force).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <edkm/edkm.h>

#include "kmeans1d.h"
#include "packing.h"

namespace {

std::vector<uint8_t> reference_pack(const at::Tensor& indices, int bits) {
  auto v = indices.reshape(-1).to(at::kLong).contiguous();
  const int64_t n = v.numel();
  std::vector<uint8_t> out((n * bits + 7) / 8, 0);
  const int64_t* p = v.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    for (int b = 0; b < bits; ++b) {
      if ((p[j] >> b) & 1) {
        const int64_t k = j * bits + b;
        out[k / 8] |= static_cast<uint8_t>(1u << (k % 8));
      }
    }
  }
  return out;
}

std::vector<uint8_t> bytes_of(const at::Tensor& t) {
  auto c = t.contiguous();
  const uint8_t* p = c.const_data_ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + c.numel());
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "<no error>";
}

TEST(PackIndices, MatchesReferenceAndGenericForEveryWidth) {
  torch::manual_seed(0);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int64_t n : {0, 1, 7, 8, 9, 1001, 200003}) {
      auto idx = torch::randint(0, int64_t(1) << bits, {n}, torch::kLong);
      for (auto dtype : {torch::kUInt8, torch::kInt16, torch::kInt32, torch::kInt64}) {
        auto typed = idx.to(dtype);
        auto packed = edkm::pack_indices(typed, bits);
        ASSERT_EQ(packed.scalar_type(), torch::kUInt8);
        ASSERT_EQ(packed.numel(), (n * bits + 7) / 8);
        ASSERT_EQ(bytes_of(packed), reference_pack(idx, bits)) << "bits " << bits << " n " << n;
        ASSERT_TRUE(torch::equal(packed, edkm::generic::pack_indices(typed, bits)));
      }
      auto packed = edkm::pack_indices(idx, bits);
      auto back = edkm::unpack_indices(packed, bits, n);
      ASSERT_EQ(back.scalar_type(), torch::kUInt8);
      ASSERT_TRUE(torch::equal(back.to(torch::kLong), idx)) << "bits " << bits << " n " << n;
      ASSERT_TRUE(torch::equal(back, edkm::generic::unpack_indices(packed, bits, n)));
    }
  }
}

TEST(PackIndices, ShapedAndStridedInputPacksRowMajor) {
  auto idx = torch::arange(60, torch::kLong).remainder(8).view({3, 4, 5}).transpose(0, 2);
  EXPECT_EQ(bytes_of(edkm::pack_indices(idx, 3)), reference_pack(idx.contiguous(), 3));
}

TEST(PackIndices, OutOfRangeIndicesAreRejectedByBothVersions) {
  for (auto make : {+[] { return torch::tensor({0, 1, 8}, torch::kInt32); },
                    +[] { return torch::tensor({-1, 0}, torch::kInt16); }}) {
    auto idx = make();
    const auto msg = error_of([&] { edkm::pack_indices(idx, 3); });
    EXPECT_NE(msg.find("indices must lie in [0, 2^bits) = [0, 8) for bits = 3"), std::string::npos) << msg;
    EXPECT_EQ(error_of([&] { edkm::generic::pack_indices(idx, 3); }), msg);
  }
  // Out of range only in the tail (after the last full chunk of eight).
  auto idx = torch::zeros({19}, torch::kLong);
  idx[18] = 4;
  EXPECT_NE(error_of([&] { edkm::pack_indices(idx, 2); }).find("got values in [0, 4]"), std::string::npos);
}

TEST(PackIndices, BadArgumentsGiveOneClearError) {
  auto idx = torch::zeros({4}, torch::kLong);
  EXPECT_NE(error_of([&] { edkm::pack_indices(idx, 0); }).find("bits must be in 1..8, got 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              edkm::pack_indices(idx.to(torch::kFloat), 3);
            }).find("indices must be an integer tensor"),
            std::string::npos);
  auto packed = torch::zeros({2}, torch::kUInt8);
  EXPECT_NE(error_of([&] {
              edkm::unpack_indices(packed, 3, 6);
            }).find("6 indices of 3 bits take ceil(6 * 3 / 8) = 3 bytes, but packed has 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] { edkm::unpack_indices(packed, 3, 2); }).find("= 1 bytes, but packed has 2"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { edkm::unpack_indices(packed.to(torch::kInt32), 8, 2); }).find("packed must be uint8"),
      std::string::npos);
  EXPECT_NE(error_of([&] { edkm::unpack_indices(packed.view({1, 2}), 8, 2); }).find("packed must be 1-D"),
            std::string::npos);
  EXPECT_NE(error_of([&] { edkm::unpack_indices(packed, 3, -5); }).find("count must be >= 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              edkm::unpack_indices(packed, 3, std::numeric_limits<int64_t>::max());
            }).find("count must be >= 0"),
            std::string::npos);
  // 5 indices of 3 bits use 15 bits: the top bit of byte 1 must be zero.
  auto dirty = torch::tensor({0, 0x80}, torch::kUInt8);
  const auto msg = error_of([&] { edkm::unpack_indices(dirty, 3, 5); });
  EXPECT_NE(msg.find("unused high bits"), std::string::npos) << msg;
  EXPECT_EQ(error_of([&] { edkm::generic::unpack_indices(dirty, 3, 5); }), msg);
}

// ------------------------------------------------------------------ optimal_kmeans_1d

struct Best {
  double cost = std::numeric_limits<double>::infinity();
  std::vector<double> means;
};

// Every split of u sorted values into m contiguous runs: choose m - 1 cuts among u - 1 gaps.
void brute(const std::vector<double>& v, const std::vector<double>& w, int m, std::vector<int>& cuts,
           int next, Best& best) {
  const int u = static_cast<int>(v.size());
  if (static_cast<int>(cuts.size()) == m - 1) {
    std::vector<int> bounds{0};
    bounds.insert(bounds.end(), cuts.begin(), cuts.end());
    bounds.push_back(u);
    double cost = 0;
    std::vector<double> means;
    for (size_t r = 0; r + 1 < bounds.size(); ++r) {
      double sw = 0, swv = 0;
      for (int t = bounds[r]; t < bounds[r + 1]; ++t) sw += w[t], swv += w[t] * v[t];
      const double mean = swv / sw;
      means.push_back(mean);
      for (int t = bounds[r]; t < bounds[r + 1]; ++t) cost += w[t] * (v[t] - mean) * (v[t] - mean);
    }
    if (cost < best.cost) best = {cost, means};
    return;
  }
  for (int c = next; c < u; ++c) {
    cuts.push_back(c);
    brute(v, w, m, cuts, c + 1, best);
    cuts.pop_back();
  }
}

TEST(OptimalKMeans1d, MatchesBruteForceOverAllContiguousPartitions) {
  torch::manual_seed(3);
  for (int u = 1; u <= 12; ++u) {
    for (int k = 1; k <= 4; ++k) {
      auto values = std::get<0>(torch::sort(torch::randn({u}, torch::kDouble) * 2));
      auto counts = torch::randint(1, 30, {u}, torch::kDouble);
      std::vector<double> v(values.data_ptr<double>(), values.data_ptr<double>() + u);
      std::vector<double> w(counts.data_ptr<double>(), counts.data_ptr<double>() + u);
      auto [centroids, cost] = edkm::optimal_kmeans_1d(values, counts, k);
      ASSERT_EQ(centroids.scalar_type(), torch::kDouble);
      ASSERT_EQ(centroids.numel(), k);
      ASSERT_EQ(cost.dim(), 0);
      if (k >= u) {
        EXPECT_EQ(cost.item<double>(), 0.0);
        for (int j = 0; j < k; ++j) EXPECT_EQ(centroids[j].item<double>(), v[std::min(j, u - 1)]);
        continue;
      }
      Best best;
      std::vector<int> cuts;
      brute(v, w, k, cuts, 1, best);
      EXPECT_NEAR(cost.item<double>(), best.cost, 1e-12 * std::max(1.0, best.cost))
          << "U " << u << " k " << k;
      for (int j = 0; j < k; ++j) EXPECT_NEAR(centroids[j].item<double>(), best.means[j], 1e-12);
      for (int j = 1; j < k; ++j) EXPECT_LT(centroids[j - 1].item<double>(), centroids[j].item<double>());
      // The generic (any-device) path returns the same.
      auto [gc, gcost] = edkm::generic::optimal_kmeans_1d(values, counts, k);
      EXPECT_TRUE(torch::equal(gc, centroids));
      EXPECT_TRUE(torch::equal(gcost, cost));
    }
  }
}

TEST(OptimalKMeans1d, WellSeparatedClustersAreFoundExactly) {
  // Three tight clumps, k = 3: each clump is one cluster whatever the counts.
  auto values = torch::tensor({-10.0, -9.9, -9.8, 0.0, 0.1, 20.0, 20.2, 20.4}, torch::kDouble);
  auto counts = torch::tensor({1, 100, 1, 5, 5, 2, 2, 2}, torch::kInt64);
  auto [c, cost] = edkm::optimal_kmeans_1d(values, counts, 3);
  EXPECT_NEAR(c[0].item<double>(), (-10.0 - 990.0 - 9.8) / 102, 1e-12);
  EXPECT_NEAR(c[1].item<double>(), 0.05, 1e-12);
  EXPECT_NEAR(c[2].item<double>(), 20.2, 1e-12);
}

TEST(OptimalKMeans1d, BadArgumentsGiveOneClearError) {
  auto v = torch::tensor({0.0, 1.0, 2.0}, torch::kDouble);
  auto w = torch::ones({3}, torch::kDouble);
  auto expect = [](auto f, const char* what) {
    const auto msg = error_of(f);
    EXPECT_NE(msg.find(what), std::string::npos) << "expected '" << what << "', got: " << msg;
  };
  expect([&] { edkm::optimal_kmeans_1d(v.view({1, 3}), w, 2); }, "values must be 1-D");
  expect([&] { edkm::optimal_kmeans_1d(v, w.view({3, 1}), 2); }, "counts must be 1-D");
  expect([&] { edkm::optimal_kmeans_1d(v, torch::ones({2}), 2); },
         "counts must have values' length 3, got 2");
  expect([&] { edkm::optimal_kmeans_1d(v.narrow(0, 0, 0), w.narrow(0, 0, 0), 2); }, "at least one value");
  expect([&] { edkm::optimal_kmeans_1d(v, w, 0); }, "k must be >= 1, got 0");
  expect([&] { edkm::optimal_kmeans_1d(v.flip(0), w, 2); }, "sorted strictly increasing");
  expect([&] { edkm::optimal_kmeans_1d(torch::tensor({0.0, 0.0}, torch::kDouble), torch::ones({2}), 1); },
         "sorted strictly increasing");
  expect(
      [&] {
        edkm::optimal_kmeans_1d(torch::tensor({0.0, std::nan("")}, torch::kDouble), torch::ones({2}), 1);
      },
      "values must be finite");
  expect([&] { edkm::optimal_kmeans_1d(v, torch::tensor({1.0, 0.0, 1.0}, torch::kDouble), 2); },
         "counts must be finite and > 0, got 0 at index 1");
  expect([&] { edkm::optimal_kmeans_1d(v.to(torch::kLong), w, 2); }, "values must be floating point");
}

}  // namespace
