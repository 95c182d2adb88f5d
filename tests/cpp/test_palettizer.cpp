// ClusteredLinear and Palettizer: initialization, parameter sharing, training and eval
// forwards, finalize, save and load.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <set>
#include <string>

#include <edkm/edkm.h>
#include <edkm/format.h>
#include <edkm/palettizer.h>

namespace {

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "<no error>";
}

#define EXPECT_ERROR_HAS(stmt, text)                                                             \
  do {                                                                                           \
    const std::string msg_ = error_of([&] { stmt; });                                            \
    EXPECT_NE(msg_.find(text), std::string::npos) << "expected '" << (text) << "' in: " << msg_; \
  } while (0)

std::string temp_path(const std::string& name) {
  return "/tmp/edkm_palettizer_" + std::to_string(::getpid()) + "_" + name;
}

// Least weighted squared error of `values` (with counts) against `centroids`.
double cost(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& centroids) {
  auto d = (values.view({-1, 1}) - centroids.view({1, -1})).square().amin(1);
  return (counts * d).sum().item<double>();
}

TEST(Palettizer, InitGivesKSortedOptimalCentroidsPerGroup) {
  torch::manual_seed(0);
  for (auto dtype : {torch::kBFloat16, torch::kFloat}) {
    auto w = torch::randn({8, 50}).to(dtype);
    auto c = edkm::optimal_centroids(w, 4, 8);
    ASSERT_EQ(c.sizes(), torch::IntArrayRef({4, 8}));
    ASSERT_EQ(c.scalar_type(), torch::kDouble);
    for (int64_t g = 0; g < 4; ++g) {
      auto row = c[g];
      EXPECT_TRUE((row.slice(0, 1) > row.slice(0, 0, 7)).all().item<bool>()) << row;
      // Same as optimal_kmeans_1d on the group's distinct values, and no worse than Lloyd's
      // iterations started from it (a fixed point).
      auto group = w.view({4, -1})[g].to(torch::kDouble);
      auto [values, inverse, counts] = at::_unique2(group, true, false, true);
      auto [ref, ref_cost] = edkm::optimal_kmeans_1d(values, counts, 8);
      EXPECT_TRUE(torch::allclose(row, ref, 0, 1e-12));
      EXPECT_NEAR(cost(values, counts.to(torch::kDouble), row), ref_cost.item<double>(), 1e-9);
    }
  }
}

TEST(Palettizer, InitMergesSignedZerosAndPadsSmallGroups) {
  auto w = torch::tensor({0.0f, -0.0f, 1.0f, 1.0f, -0.0f, 2.0f}).to(torch::kBFloat16);
  auto c = edkm::optimal_centroids(w, 1, 4);
  // Three distinct values {0, 1, 2}: the fourth centroid repeats the largest.
  EXPECT_EQ(c[0][0].item<double>(), 0.0);
  EXPECT_EQ(c[0][1].item<double>(), 1.0);
  EXPECT_EQ(c[0][2].item<double>(), 2.0);
  EXPECT_EQ(c[0][3].item<double>(), 2.0);
  EXPECT_ERROR_HAS(edkm::optimal_centroids(torch::tensor({1.0f, NAN}), 1, 2), "NaN or Inf");
  EXPECT_ERROR_HAS(edkm::optimal_centroids(torch::ones({6}), 4, 2), "divide weight's 6 elements");
}

TEST(Palettizer, SharesTheLinearsParameters) {
  torch::manual_seed(1);
  torch::nn::Linear linear(6, 8);
  edkm::Palettizer pal(edkm::PalettizerOptions().bits(2).group_size(4));
  auto m = pal.wrap("fc", linear);
  EXPECT_EQ(m->groups(), 2);
  EXPECT_EQ(m->centroids.sizes(), torch::IntArrayRef({2, 4}));
  auto params = m->named_parameters();
  ASSERT_EQ(params.size(), 2u);
  EXPECT_TRUE(params["weight"].is_same(linear->weight));
  EXPECT_TRUE(params["bias"].is_same(linear->bias));
  EXPECT_EQ(m->named_buffers().size(), 1u);
  EXPECT_TRUE(m->named_buffers().contains("centroids"));
  // Frozen stays frozen.
  torch::nn::Linear frozen(4, 4);
  frozen->weight.set_requires_grad(false);
  auto fm = pal.wrap("frozen", frozen);
  EXPECT_FALSE(fm->weight.requires_grad());
  // clone(): same values, separate tensors.
  auto copy = std::dynamic_pointer_cast<edkm::ClusteredLinearImpl>(m->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->weight, m->weight));
  EXPECT_TRUE(torch::equal(copy->centroids, m->centroids));
  EXPECT_FALSE(copy->weight.is_same(m->weight));
  EXPECT_NE(copy->weight.data_ptr(), m->weight.data_ptr());
}

TEST(Palettizer, TrainingForwardIsDkmLinearAndTrainsTheOriginalWeight) {
  torch::manual_seed(2);
  torch::nn::Linear linear(12, 8);
  auto before = linear->weight.detach().clone();
  edkm::ClusteredLinear m(linear, edkm::PalettizerOptions().bits(3).temperature(0.05));
  auto x = torch::randn({5, 12});
  auto c0 = m->centroids.clone();
  auto [ref, ref_c, iters] = edkm::dkm_linear(x, linear->weight, c0, linear->bias, m->tau(), 3);
  m->train();
  auto out = m->forward(x);
  EXPECT_TRUE(torch::equal(out, ref));
  EXPECT_TRUE(torch::equal(m->centroids, ref_c));  // warm start kept
  torch::optim::SGD opt(linear->parameters(), 0.1);
  out.square().sum().backward();
  ASSERT_TRUE(linear->weight.grad().defined());
  EXPECT_GT(linear->weight.grad().abs().sum().item<double>(), 0);
  opt.step();
  EXPECT_FALSE(torch::equal(linear->weight, before));
  EXPECT_TRUE(m->weight.is_same(linear->weight));
}

TEST(Palettizer, EvalUsesTheHardWeightAndFinalizeMakesItExact) {
  torch::manual_seed(3);
  torch::nn::Linear linear(16, 12);
  edkm::Palettizer pal(edkm::PalettizerOptions().bits(3).group_size(3));
  auto m = pal.wrap("fc", linear);
  m->train();
  auto x = torch::randn({7, 16});
  for (int i = 0; i < 3; ++i) m->forward(x);  // moves the centroids
  m->eval();
  torch::NoGradGuard no_grad;
  auto hard = edkm::dequantize(edkm::assign(m->weight, m->centroids), m->centroids);
  EXPECT_TRUE(torch::equal(m->forward(x), torch::nn::functional::linear(x, hard, m->bias)));

  // With fp16-representable centroids the eval output is already the finalized output.
  m->centroids.copy_(m->centroids.to(torch::kHalf));
  auto eval_out = m->forward(x);
  pal.finalize();
  EXPECT_TRUE(m->finalized());
  EXPECT_TRUE(torch::equal(m->forward(x), eval_out));
  m->train();
  EXPECT_TRUE(torch::equal(m->forward(x), eval_out));  // finalized: plain linear in both modes
  // <= K distinct values per group, all from the group's fp16 LUT.
  auto groups = linear->weight.view({4, -1});
  for (int64_t g = 0; g < 4; ++g) {
    auto distinct = std::get<0>(at::_unique2(groups[g], true, false, false));
    EXPECT_LE(distinct.numel(), 8);
    auto lut = m->centroids[g];
    EXPECT_TRUE(torch::equal(lut.to(torch::kHalf).to(torch::kFloat), lut));
    for (int64_t i = 0; i < distinct.numel(); ++i) {
      EXPECT_TRUE((lut == distinct[i]).any().item<bool>());
    }
  }
  // Finalize again: nothing changes.
  auto w = linear->weight.clone();
  m->finalize();
  EXPECT_TRUE(torch::equal(linear->weight, w));
}

TEST(Palettizer, SaveLoadRebuildsTheFinalizedWeightsExactly) {
  torch::manual_seed(4);
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    torch::nn::Linear a(10, 8), b(torch::nn::LinearOptions(8, 6).bias(false));
    a->to(dtype);
    b->to(dtype);
    edkm::Palettizer pal(edkm::PalettizerOptions().bits(4).group_size(2));
    auto ca = pal.wrap("a", a);
    auto cb = pal.wrap("b", b);
    const auto path = temp_path("save.safetensors");
    EXPECT_ERROR_HAS(pal.save(path),
                     "layer 'a': edkm::ClusteredLinear::export_clustered: the "
                     "layer is not finalized");
    pal.finalize();
    auto extra = torch::arange(3);
    const int64_t size = pal.save(path, {{"step", extra}});
    EXPECT_GT(size, 0);
    auto file = edkm::load_compressed(path);
    ::unlink(path.c_str());
    auto sd = file.state_dict();
    EXPECT_EQ(sd.size(), 4u);  // a.weight, a.bias, b.weight, step
    EXPECT_TRUE(torch::equal(sd.at("a.weight"), a->weight));
    EXPECT_EQ(sd.at("a.weight").scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(sd.at("a.bias"), a->bias));
    EXPECT_TRUE(torch::equal(sd.at("b.weight"), b->weight));
    EXPECT_TRUE(torch::equal(sd.at("step"), extra));
    EXPECT_EQ(file.clustered.at("a.weight").bits, 4);
    EXPECT_EQ(file.clustered.at("a.weight").groups, 4);
    // A weight changed after finalize can no longer be exported.
    {
      torch::NoGradGuard no_grad;
      a->weight.add_(1e-3);
    }
    EXPECT_ERROR_HAS(pal.save(path), "changed after finalize()");
    EXPECT_ERROR_HAS(pal.save(path, {{"a.bias", extra}}), "changed after finalize()");
    ca->finalize();
    EXPECT_ERROR_HAS(pal.save(path, {{"a.bias", extra}}), "extra tensor 'a.bias'");
  }
}

TEST(Palettizer, BadOptionsAndArgumentsAreClearErrors) {
  torch::nn::Linear linear(4, 6);
  using O = edkm::PalettizerOptions;
  EXPECT_ERROR_HAS(edkm::Palettizer(O().bits(0)), "bits must be in 1..8, got 0");
  EXPECT_ERROR_HAS(edkm::Palettizer(O().bits(9)), "bits must be in 1..8, got 9");
  EXPECT_ERROR_HAS(edkm::Palettizer(O().temperature(0)), "temperature must be a finite number > 0");
  EXPECT_ERROR_HAS(edkm::Palettizer(O().max_iter(0)), "max_iter must be >= 1");
  EXPECT_ERROR_HAS(edkm::Palettizer(O().epsilon(-1)), "epsilon must be a finite number >= 0");
  EXPECT_ERROR_HAS(edkm::Palettizer(O().distance("cosine")), "distance must be 'squared' or 'absolute'");
  EXPECT_ERROR_HAS(edkm::Palettizer(O().group_size(-2)), "group_size must be >= 0");
  edkm::Palettizer pal(O().group_size(4));
  EXPECT_ERROR_HAS(pal.wrap("fc", linear),
                   "wrap('fc'): edkm::ClusteredLinear: group_size 4 must divide out_features 6");
  EXPECT_ERROR_HAS(pal.wrap("", linear), "name must not be empty");
  EXPECT_ERROR_HAS(pal.wrap("x", torch::nn::Linear(nullptr)), "got an empty holder");
  torch::nn::Linear ok(4, 8);
  pal.wrap("ok", ok);
  EXPECT_ERROR_HAS(pal.wrap("ok", ok), "a layer named 'ok' is already wrapped");
  torch::nn::Linear bad(4, 8);
  {
    torch::NoGradGuard no_grad;
    bad->weight[0][0] = std::numeric_limits<float>::infinity();
  }
  EXPECT_ERROR_HAS(pal.wrap("bad", bad), "NaN or Inf");
}

}  // namespace
