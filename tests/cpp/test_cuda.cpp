// The CUDA kernels through the C++ API: dkm and dkm_linear forward + backward on the GPU against
// the float64 reference on the CPU. Skipped only when no CUDA device is present.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <edkm/edkm.h>

namespace {

double rel_error(const at::Tensor& a, const at::Tensor& b) {
  auto x = a.to(torch::kCPU, torch::kDouble), y = b.to(torch::kCPU, torch::kDouble);
  return (x - y).abs().max().item<double>() / std::max(y.abs().max().item<double>(), 1e-300);
}

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(Cuda, DkmFloat64MatchesCpuReference) {
  torch::manual_seed(1);
  auto w = (torch::randn({64, 96}, torch::kDouble) * 8).round() / 8;
  auto c = torch::linspace(-2, 2, 8, torch::kDouble).repeat({2, 1});
  auto wg = w.cuda().requires_grad_();
  auto [out, cent, iters] = edkm::dkm(wg, c.cuda(), 0.1, 3);
  auto wr = w.clone().requires_grad_();
  auto [ref, ref_cent, ref_iters] = edkm::dkm_reference(wr, c, 0.1, 3);
  EXPECT_LE(rel_error(out, ref), 1e-10);
  EXPECT_LE(rel_error(cent, ref_cent), 1e-10);
  auto g = torch::randn_like(w);
  out.backward(g.cuda());
  ref.backward(g);
  EXPECT_LE(rel_error(wg.grad(), wr.grad()), 1e-10);
}

TEST_F(Cuda, Bfloat16DkmLinearMatchesCpu) {
  torch::manual_seed(2);
  auto w = (torch::randn({256, 128}) * 0.02).to(torch::kBFloat16);
  auto x = torch::randn({32, 128}).to(torch::kBFloat16);
  auto c = torch::linspace(-0.04, 0.04, 8).view({1, 8});
  std::vector<at::Tensor> outs, grads;
  for (auto device : {torch::kCPU, torch::kCUDA}) {
    auto wi = w.to(device).detach().requires_grad_();  // a fresh leaf per device
    auto [y, cent, iters] = edkm::dkm_linear(x.to(device), wi, c.to(device), c10::nullopt, 1e-4, 3);
    y.to(torch::kFloat).square().sum().backward();
    outs.push_back(y);
    grads.push_back(wi.grad());
  }
  EXPECT_LE(rel_error(outs[1], outs[0]), 1.0 / 64);
  EXPECT_LE(rel_error(grads[1], grads[0]), 1.0 / 64);
}

}  // namespace
