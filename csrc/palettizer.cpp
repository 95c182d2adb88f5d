// ClusteredLinear and Palettizer: the C++ training-and-export API over the edkm ops (dkm_linear,
// assign, dequantize, optimal_kmeans_1d, pack_indices) and the file writer.
#include <edkm/palettizer.h>

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <ostream>

#include <ATen/ATen.h>
#include <torch/nn/functional/linear.h>
#include <torch/utils.h>

#include <edkm/edkm.h>

#include "checks.h"
#include "slot_ops.h"

namespace edkm {

namespace {

// Sorted distinct values of one group and their counts, -0 and +0 merged, as float64 tensors.
std::pair<at::Tensor, at::Tensor> merge_sorted(const at::Tensor& values, const at::Tensor& counts) {
  auto sorted = at::sort(values);
  auto v = std::get<0>(sorted).contiguous();
  auto c = counts.index_select(0, std::get<1>(sorted)).to(at::kDouble).contiguous();
  const double* pv = v.const_data_ptr<double>();
  const double* pc = c.const_data_ptr<double>();
  std::vector<double> uv, uc;
  uv.reserve(v.numel());
  uc.reserve(v.numel());
  for (int64_t i = 0; i < v.numel(); ++i) {
    if (!uv.empty() && uv.back() == pv[i]) {
      uc.back() += pc[i];
    } else {
      uv.push_back(pv[i]);
      uc.push_back(pc[i]);
    }
  }
  const auto n = static_cast<int64_t>(uv.size());
  auto opts = at::TensorOptions().dtype(at::kDouble);
  return {at::from_blob(uv.data(), {n}, opts).clone(), at::from_blob(uc.data(), {n}, opts).clone()};
}

}  // namespace

void PalettizerOptions::check() const {
  const char* who = "edkm::PalettizerOptions";
  TORCH_CHECK_VALUE(bits() >= 1 && bits() <= 8, who, ": bits must be in 1..8, got ", bits());
  TORCH_CHECK_VALUE(group_size() >= 0, who, ": group_size must be >= 0 (0 = one LUT per matrix), got ",
                    group_size());
  TORCH_CHECK_VALUE(std::isfinite(temperature()) && temperature() > 0, who,
                    ": temperature must be a finite number > 0, got ", temperature());
  TORCH_CHECK_VALUE(max_iter() >= 1, who, ": max_iter must be >= 1, got ", max_iter());
  TORCH_CHECK_VALUE(std::isfinite(epsilon()) && epsilon() >= 0, who,
                    ": epsilon must be a finite number >= 0, got ", epsilon());
  parse_distance(who, distance());
}

at::Tensor optimal_centroids(const at::Tensor& weight, int64_t groups, int64_t k) {
  const char* op = "edkm::optimal_centroids";
  TORCH_CHECK_VALUE(weight.defined(), op, ": weight must be a tensor, got an undefined one");
  const auto wt = weight.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat || wt == at::kDouble, op,
                   ": weight must be bfloat16, float16, float32 or float64, got ", wt);
  TORCH_CHECK_VALUE(weight.numel() > 0, op, ": weight must not be empty");
  TORCH_CHECK_VALUE(groups >= 1 && weight.numel() % groups == 0, op, ": groups must be >= 1 and ",
                    "divide weight's ", weight.numel(), " elements, got ", groups);
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  auto w = weight.detach();
  TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>(), op,
                    ": weight has NaN or Inf values; cannot cluster it");
  auto out = at::empty({groups, k}, at::TensorOptions().dtype(at::kDouble));
  if (is_16bit(wt)) {
    // Slot histogram: each group's distinct bit patterns and their counts.
    auto table = slot_table(w.contiguous(), groups);
    auto slots = std::get<0>(table).cpu(), counts = std::get<1>(table).cpu();
    for (int64_t g = 0; g < groups; ++g) {
      auto present = counts[g] > 0;
      auto bits = slots[g].masked_select(present).to(at::kShort);
      auto values = bits.view(wt).to(at::kDouble);
      auto merged = merge_sorted(values, counts[g].masked_select(present));
      out[g].copy_(std::get<0>(optimal_kmeans_1d(merged.first, merged.second, k)));
    }
  } else {
    auto flat = w.reshape({groups, -1}).cpu().to(at::kDouble);
    for (int64_t g = 0; g < groups; ++g) {
      auto uniq = at::_unique2(flat[g], /*sorted=*/true, /*return_inverse=*/false,
                               /*return_counts=*/true);
      auto merged = merge_sorted(std::get<0>(uniq), std::get<2>(uniq));
      out[g].copy_(std::get<0>(optimal_kmeans_1d(merged.first, merged.second, k)));
    }
  }
  return out;
}

// ------------------------------------------------------------------------------ ClusteredLinear

ClusteredLinearImpl::ClusteredLinearImpl(const torch::nn::Linear& linear, PalettizerOptions options)
    : options_(std::move(options)) {
  const char* who = "edkm::ClusteredLinear";
  options_.check();
  TORCH_CHECK_VALUE(!linear.is_empty(), who,
                    ": linear must be a constructed torch::nn::Linear, got an empty holder");
  weight = linear->weight;
  bias = linear->bias;
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2 && weight.numel() > 0, who,
                    ": the Linear's weight must be a non-empty 2-D tensor");
  const auto wt = weight.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat || wt == at::kDouble, who,
                   ": the weight must be bfloat16, float16, float32 or float64, got ", wt);
  const int64_t rows = weight.size(0);
  const int64_t group_size = options_.group_size() == 0 ? rows : options_.group_size();
  TORCH_CHECK_VALUE(rows % group_size == 0, who, ": group_size ", group_size, " must divide out_features ",
                    rows);
  groups_ = rows / group_size;
  const int64_t k = int64_t(1) << options_.bits();
  at::Tensor init;
  {
    torch::NoGradGuard no_grad;
    init = optimal_centroids(weight, groups_, k);
    const double var = weight.detach().to(at::kDouble).var(/*unbiased=*/false).item<double>();
    tau_ = options_.temperature() * (var > 0 ? var : 1.0);
  }
  const auto cdtype = is_16bit(wt) ? at::kFloat : wt;
  register_parameter("weight", weight, weight.requires_grad());
  if (bias.defined()) register_parameter("bias", bias, bias.requires_grad());
  centroids = register_buffer("centroids", init.to(weight.device(), cdtype));
}

void ClusteredLinearImpl::reset() {
  // Only clone() calls this: fresh tensors of the same shapes, which clone() then fills.
  weight = register_parameter("weight", at::empty(weight.sizes(), weight.options()), weight.requires_grad());
  if (bias.defined()) {
    bias = register_parameter("bias", at::empty(bias.sizes(), bias.options()), bias.requires_grad());
  }
  centroids = register_buffer("centroids", at::empty(centroids.sizes(), centroids.options()));
  cached_hard_ = at::Tensor();
}

at::Tensor ClusteredLinearImpl::forward(const at::Tensor& input) {
  if (finalized_) return at::linear(input, weight, bias);
  if (!is_training()) return at::linear(input, hard_weight(), bias);
  c10::optional<at::Tensor> b;
  if (bias.defined()) b = bias;
  auto result = dkm_linear(input, weight, centroids.detach(), b, tau_, options_.max_iter(),
                           options_.epsilon(), options_.distance());
  {
    torch::NoGradGuard no_grad;
    centroids.copy_(std::get<1>(result).detach());  // warm start for the next step
  }
  return std::get<0>(result);
}

at::Tensor ClusteredLinearImpl::hard_weight() {
  if (finalized_) return weight.detach();
  torch::NoGradGuard no_grad;
  const uint32_t wv = weight._version(), cv = centroids._version();
  if (cached_hard_.defined() && wv == cached_weight_version_ && cv == cached_centroid_version_) {
    return cached_hard_;
  }
  auto w = weight.detach();
  cached_hard_ = dequantize(assign(w, centroids), centroids, w.scalar_type());
  cached_weight_version_ = wv;
  cached_centroid_version_ = cv;
  return cached_hard_;
}

void ClusteredLinearImpl::finalize() {
  const char* who = "edkm::ClusteredLinear::finalize";
  torch::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(at::isfinite(centroids).all().item<bool>(), who,
                    ": the centroids have NaN or Inf values");
  auto lut = centroids.to(at::kHalf);
  TORCH_CHECK_VALUE(at::isfinite(lut).all().item<bool>(), who,
                    ": a centroid exceeds float16's range (65504); the file stores LUTs in float16");
  centroids.copy_(lut);
  auto w = weight.detach();
  w.copy_(dequantize(assign(w, centroids), centroids, w.scalar_type()));
  finalized_ = true;
  cached_hard_ = at::Tensor();
}

ClusteredTensor ClusteredLinearImpl::export_clustered() const {
  const char* who = "edkm::ClusteredLinear::export_clustered";
  TORCH_CHECK_VALUE(finalized_, who, ": the layer is not finalized; call finalize() first");
  torch::NoGradGuard no_grad;
  auto w = weight.detach().cpu();
  auto c = centroids.cpu();
  auto idx = assign(w, c);
  TORCH_CHECK_VALUE(at::equal(dequantize(idx, c, w.scalar_type()), w), who,
                    ": the weight changed after finalize() and is no longer exactly its LUT "
                    "values; call finalize() again");
  ClusteredTensor out;
  out.lut = c.to(at::kHalf).view({groups_, c.size(1), 1}).contiguous();
  out.packed = pack_indices(idx, options_.bits());
  out.bits = options_.bits();
  out.shape = w.sizes().vec();
  out.dtype = w.scalar_type();
  out.groups = groups_;
  out.cluster_dim = 1;
  return out;
}

void ClusteredLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "edkm::ClusteredLinear(in_features=" << weight.size(1) << ", out_features=" << weight.size(0)
         << ", bias=" << (bias.defined() ? "true" : "false") << ", bits=" << options_.bits()
         << ", groups=" << groups_ << (finalized_ ? ", finalized" : "") << ")";
}

// ------------------------------------------------------------------------------ Palettizer

Palettizer::Palettizer(PalettizerOptions options) : options_(std::move(options)) { options_.check(); }

ClusteredLinear Palettizer::wrap(const std::string& name, const torch::nn::Linear& linear) {
  TORCH_CHECK_VALUE(!name.empty(), "edkm::Palettizer::wrap: name must not be empty");
  for (const auto& layer : layers_) {
    TORCH_CHECK_VALUE(layer.first != name, "edkm::Palettizer::wrap: a layer named '", name,
                      "' is already wrapped");
  }
  try {
    ClusteredLinear m(linear, options_);
    layers_.emplace_back(name, m);
    return m;
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, "edkm::Palettizer::wrap('", name, "'): ", e.what_without_backtrace());
  }
}

void Palettizer::finalize() {
  for (auto& layer : layers_) {
    try {
      layer.second->finalize();
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "edkm::Palettizer::finalize: layer '", layer.first,
                        "': ", e.what_without_backtrace());
    }
  }
}

CompressedFile Palettizer::to_file(const std::map<std::string, at::Tensor>& extra) const {
  CompressedFile file;
  for (const auto& [name, m] : layers_) {
    try {
      file.clustered[name + ".weight"] = m->export_clustered();
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "edkm::Palettizer: layer '", name, "': ", e.what_without_backtrace());
    }
    if (m->bias.defined()) file.tensors[name + ".bias"] = m->bias.detach().cpu();
  }
  for (const auto& [name, t] : extra) {
    TORCH_CHECK_VALUE(!file.tensors.count(name) && !file.clustered.count(name),
                      "edkm::Palettizer: extra tensor '", name, "' has the name of a wrapped layer's tensor");
    file.tensors[name] = t.detach();
  }
  return file;
}

int64_t Palettizer::save(const std::string& path, const std::map<std::string, at::Tensor>& extra) const {
  save_compressed(path, to_file(extra));
  struct stat st{};
  TORCH_CHECK(::stat(path.c_str(), &st) == 0, "edkm::Palettizer::save: cannot stat ", path);
  return static_cast<int64_t>(st.st_size);
}

}  // namespace edkm
