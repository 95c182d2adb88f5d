// dkm through the public C++ API against the naive reference, forward and backward from C++.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <edkm/edkm.h>

namespace {

double rel_error(const at::Tensor& a, const at::Tensor& b) {
  const double scale = std::max(b.abs().max().item<double>(), 1e-300);
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() / scale;
}

struct Case {
  int64_t k, groups;
  const char* distance;
  bool repeats;
};

class DkmVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(DkmVsReference, ForwardAndBackwardMatchInFloat64) {
  const Case c = GetParam();
  torch::manual_seed(7);
  auto w = torch::randn({32, 48}, torch::kDouble);
  if (c.repeats) w = (w * 8).round() / 8;  // ~50 distinct values, many repeats
  auto centroids = torch::linspace(-1.5, 1.5, c.k, torch::kDouble).repeat({c.groups, 1});
  centroids = centroids + 0.01 * torch::randn_like(centroids);
  const double tau = 0.05;

  auto w1 = w.clone().requires_grad_();
  auto c1 = centroids.clone().requires_grad_();
  auto [out, cent, iters] = edkm::dkm(w1, c1, tau, 3, 0.0, c.distance);
  auto w2 = w.clone().requires_grad_();
  auto c2 = centroids.clone().requires_grad_();
  auto [ref, ref_cent, ref_iters] = edkm::dkm_reference(w2, c2, tau, 3, 0.0, c.distance);

  EXPECT_LE(rel_error(out, ref), 1e-10);
  EXPECT_LE(rel_error(cent, ref_cent), 1e-10);
  EXPECT_EQ(iters.item<int64_t>(), ref_iters.item<int64_t>());

  auto g = torch::randn_like(w);
  auto gc = torch::randn_like(centroids);
  ((out * g).sum() + (cent * gc).sum()).backward();
  ((ref * g).sum() + (ref_cent * gc).sum()).backward();
  EXPECT_LE(rel_error(w1.grad(), w2.grad()), 1e-10);
  EXPECT_LE(rel_error(c1.grad(), c2.grad()), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Cases, DkmVsReference,
                         ::testing::Values(Case{2, 1, "squared", true}, Case{8, 1, "squared", false},
                                           Case{8, 4, "squared", true}, Case{16, 4, "absolute", false},
                                           Case{4, 1, "absolute", true}, Case{256, 1, "squared", false}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           const Case& c = info.param;
                           return "K" + std::to_string(c.k) + "_G" + std::to_string(c.groups) + "_" +
                                  c.distance + (c.repeats ? "_repeated" : "_distinct");
                         });

TEST(Dkm, EarlyStopMatchesReference) {
  torch::manual_seed(3);
  auto w = torch::randn({4096}, torch::kDouble);
  auto c = torch::linspace(-2, 2, 4, torch::kDouble).view({1, 4});
  auto [out, cent, iters] = edkm::dkm(w, c, 0.1, 50, 1e-3, "squared");
  auto [ref, ref_cent, ref_iters] = edkm::dkm_reference(w, c, 0.1, 50, 1e-3, "squared");
  EXPECT_LT(iters.item<int64_t>(), 50);
  EXPECT_EQ(iters.item<int64_t>(), ref_iters.item<int64_t>());
  EXPECT_LE(rel_error(out, ref), 1e-10);
}

TEST(Dkm, Bfloat16AgreesWithFloat64Reference) {
  torch::manual_seed(5);
  auto w = (torch::randn({256, 256}) * 0.02).to(torch::kBFloat16);
  auto c = torch::linspace(-0.04, 0.04, 8, torch::kFloat).view({1, 8});
  auto [out, cent, iters] = edkm::dkm(w, c, 1e-4, 3);
  auto [ref, ref_cent, ref_iters] = edkm::dkm_reference(w.to(torch::kDouble), c.to(torch::kDouble), 1e-4, 3);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  // One bf16 rounding of the output (2^-8 relative) dominates.
  EXPECT_LE(rel_error(out, ref), 1.0 / 128);
  EXPECT_LE(rel_error(cent, ref_cent), 1e-5);
}

TEST(Dkm, BadInputGetsOneClearError) {
  auto w = torch::randn({8, 8});
  auto c = torch::randn({1, 4});
  EXPECT_THROW(
      {
        try {
          edkm::dkm(w, c, -1.0);
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("temperature"), std::string::npos);
          throw;
        }
      },
      c10::Error);
  EXPECT_THROW(edkm::dkm(w, torch::randn({1, 1}), 0.1), c10::Error);
  EXPECT_THROW(edkm::dkm(w, torch::randn({3, 4}), 0.1), c10::Error);
  EXPECT_THROW(edkm::dkm(w.to(torch::kInt), c, 0.1), c10::Error);
  auto nan_w = w.clone();
  nan_w[0][0] = std::nan("");
  EXPECT_THROW(edkm::dkm(nan_w, c, 0.1), c10::Error);
}

TEST(HardAssign, AssignAndDequantizeMatchArgmin) {
  torch::manual_seed(11);
  auto w = torch::randn({4, 1000});
  auto c = torch::randn({4, 8});
  auto idx = edkm::assign(w, c);
  EXPECT_EQ(idx.scalar_type(), torch::kByte);
  auto expected = (w.to(torch::kDouble).unsqueeze(2) - c.to(torch::kDouble).unsqueeze(1)).abs().argmin(2);
  EXPECT_TRUE(torch::equal(idx.to(torch::kLong), expected));
  auto back = edkm::dequantize(idx, c);
  EXPECT_TRUE(torch::equal(back, c.gather(1, expected)));
}

}  // namespace
