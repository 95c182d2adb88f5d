// The CPU slot kernels against the generic ATen versions (which serve devices without kernels).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "slot_ops.h"

namespace {

void expect_kernels_match_generic(const at::Tensor& w, int64_t groups) {
  auto [slots, counts] = edkm::slot_table(w, groups);
  auto [gslots, gcounts] = edkm::generic::slot_table(w, groups);
  ASSERT_TRUE(torch::equal(slots, gslots));
  ASSERT_TRUE(torch::equal(counts, gcounts));
  EXPECT_EQ(counts.sum().item<int64_t>(), w.numel());

  auto table = torch::randn(slots.sizes(), torch::kDouble);
  EXPECT_TRUE(torch::equal(edkm::slot_gather(w, slots, table), edkm::generic::slot_gather(w, slots, table)));
  auto grad = torch::randn(w.sizes()).to(w.scalar_type());
  EXPECT_TRUE(torch::allclose(edkm::slot_scatter_add(w, slots, grad),
                              edkm::generic::slot_scatter_add(w, slots, grad), 1e-5, 1e-5));
  auto scale = torch::randn(slots.sizes(), torch::kFloat);
  auto shift = torch::randn(slots.sizes(), torch::kFloat);
  EXPECT_TRUE(torch::equal(edkm::slot_grad(w, slots, grad, scale, shift),
                           edkm::generic::slot_grad(w, slots, grad, scale, shift)));
}

TEST(SlotKernels, LargeGroupsUseTheDenseMap) {
  torch::manual_seed(0);
  expect_kernels_match_generic(torch::randn({2, 70000}).to(torch::kBFloat16), 2);
}

TEST(SlotKernels, SmallGroupsUseBinarySearch) {
  torch::manual_seed(1);
  expect_kernels_match_generic(torch::randn({64, 300}).to(torch::kHalf), 64);
}

TEST(SlotKernels, NegativeAndPositiveZeroAreDistinctSlots) {
  auto w = torch::tensor({0.0f, -0.0f, 0.0f, 1.0f}).to(torch::kBFloat16);
  auto [slots, counts] = edkm::slot_table(w, 1);
  EXPECT_EQ(slots[0][0].item<int32_t>(), 0);
  EXPECT_EQ(counts[0][0].item<int32_t>(), 2);
  EXPECT_EQ(counts.gt(0).sum().item<int64_t>(), 3);
}

TEST(SlotKernels, StaleWeightIsDetected) {
  auto w = torch::randn({1000}).to(torch::kBFloat16);
  auto [slots, counts] = edkm::slot_table(w, 1);
  auto changed = w + 1000;
  auto table = torch::zeros(slots.sizes(), torch::kFloat);
  EXPECT_THROW(edkm::slot_gather(changed, slots, table), c10::Error);
}

}  // namespace
