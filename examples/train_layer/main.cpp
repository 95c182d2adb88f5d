// Trains one linear layer whose weight is soft-clustered to 3 bits with edkm::dkm, from pure
// C++, then snaps it to the 8 centroids. Exits non-zero if training did not reduce the loss.
#include <cstdio>

#include <edkm/edkm.h>
#include <torch/torch.h>

int main() {
  torch::manual_seed(0);
  const int64_t in = 64, out = 32, k = 8;
  torch::nn::Linear layer(torch::nn::LinearOptions(in, out).bias(false));
  auto teacher = torch::randn({out, in}) * 0.1;
  auto x = torch::randn({512, in});
  auto y = x.matmul(teacher.t());

  auto w = layer->weight;
  auto centroids = torch::linspace(w.min().item<double>(), w.max().item<double>(), k).view({1, k});
  torch::optim::Adam opt(layer->parameters(), torch::optim::AdamOptions(1e-2));
  const double tau = 1e-3;
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    auto [clustered, next_centroids, iterations] = edkm::dkm(w, centroids, tau, 3);
    auto loss = torch::mse_loss(x.matmul(clustered.t()), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    centroids = next_centroids.detach();  // warm start, not learned
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  auto indices = edkm::assign(w.detach(), centroids);
  auto hard = edkm::dequantize(indices, centroids);
  const double hard_loss = torch::mse_loss(x.matmul(hard.t()), y).item<double>();
  std::printf("loss %.5f -> %.5f (soft), %.5f (hard, %lld distinct values)\n", first, last,
              hard_loss, static_cast<long long>(std::get<0>(at::_unique(hard)).numel()));
  return (last < 0.5 * first && hard_loss < first) ? 0 : 1;
}
