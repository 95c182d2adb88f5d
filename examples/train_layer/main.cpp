// A small MLP of torch::nn::Linear layers, trained while its weights are clustered to 3 bits
// (edkm::Palettizer, one LUT per 16 output rows), finalized, saved in edkm's compressed format,
// loaded back into a fresh MLP with edkm::load_compressed, and checked: the loaded model's
// output must equal the finalized model's bit for bit. Pure C++, built against an installed
// edkm with find_package(edkm). Exits non-zero when a check fails.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include <edkm/edkm.h>
#include <edkm/format.h>
#include <edkm/palettizer.h>
#include <torch/torch.h>

// Three Linear layers; `layers` is what forward calls: the Linears, or their clustered wrappers.
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    const int64_t sizes[] = {32, 64, 64, 16};
    for (int i = 0; i < 3; ++i) {
      names.push_back("fc" + std::to_string(i + 1));
      linears.push_back(register_module(names[i], torch::nn::Linear(sizes[i], sizes[i + 1])));
      layers.emplace_back(linears[i]);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (size_t i = 0; i < layers.size(); ++i) {
      x = layers[i].forward(x);
      if (i + 1 < layers.size()) x = torch::relu(x);
    }
    return x;
  }
  std::vector<std::string> names;
  std::vector<torch::nn::Linear> linears;
  std::vector<torch::nn::AnyModule> layers;
};
TORCH_MODULE(Mlp);

int main() {
  torch::manual_seed(0);
  Mlp teacher, model;
  auto x = torch::randn({1024, 32});
  auto y = teacher->forward(x).detach();

  // Cluster every Linear: each wrapper shares its Linear's weight and bias.
  edkm::Palettizer pal(edkm::PalettizerOptions().bits(3).group_size(16).temperature(0.02));
  for (size_t i = 0; i < model->layers.size(); ++i) {
    auto clustered = pal.wrap(model->names[i], model->linears[i]);
    model->replace_module(model->names[i], clustered);  // train()/eval()/buffers reach it
    model->layers[i] = torch::nn::AnyModule(clustered);
  }
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(3e-3));
  model->train();
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    auto loss = torch::mse_loss(model->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }

  pal.finalize();
  model->eval();
  torch::Tensor finalized_out;
  {
    torch::NoGradGuard no_grad;
    finalized_out = model->forward(x);
  }
  const double final_loss = torch::mse_loss(finalized_out, y).item<double>();

  const std::string path = "train_layer_model.safetensors";
  const int64_t file_bytes = pal.save(path);

  // A fresh, plain MLP filled from the file.
  torch::manual_seed(123);
  Mlp loaded;
  auto state = edkm::load_compressed(path).state_dict();
  {
    torch::NoGradGuard no_grad;
    for (auto& p : loaded->named_parameters()) p.value().copy_(state.at(p.key()));
  }
  loaded->eval();
  torch::Tensor loaded_out;
  {
    torch::NoGradGuard no_grad;
    loaded_out = loaded->forward(x);
  }
  const bool exact = torch::equal(loaded_out, finalized_out);

  int64_t params = 0, weights = 0, clustered_bytes = 0, distinct_max = 0;
  for (auto& [name, layer] : pal.layers()) {
    const auto stored = layer->export_clustered();
    weights += layer->weight.numel();
    clustered_bytes += stored.packed.numel() + stored.lut.numel() * 2;
    params += layer->weight.numel() + (layer->bias.defined() ? layer->bias.numel() : 0);
    auto groups = layer->weight.detach().view({layer->groups(), -1});
    for (int64_t g = 0; g < layer->groups(); ++g) {
      distinct_max = std::max<int64_t>(distinct_max, std::get<0>(at::_unique2(groups[g])).numel());
    }
  }
  std::printf("loss %.5f -> %.5f (soft, 150 steps), %.5f (finalized, <= %lld values per LUT group)\n", first,
              last, final_loss, static_cast<long long>(distinct_max));
  std::printf("file %s: %lld bytes; the same %lld parameters in float32: %lld bytes (%.1fx smaller)\n",
              path.c_str(), static_cast<long long>(file_bytes), static_cast<long long>(params),
              static_cast<long long>(params * 4), double(params * 4) / double(file_bytes));
  std::printf(
      "clustered weights: %lld bytes for %lld weights = %.2f bits each (3-bit indices + "
      "fp16 LUTs); the rest is biases and the header\n",
      static_cast<long long>(clustered_bytes), static_cast<long long>(weights),
      8.0 * double(clustered_bytes) / double(weights));
  std::printf("loaded model output %s the finalized model's\n",
              exact ? "equals, bit for bit," : "DIFFERS from");
  const bool ok = exact && last < 0.5 * first && final_loss < first && distinct_max <= 8;
  return ok ? 0 : 1;
}
