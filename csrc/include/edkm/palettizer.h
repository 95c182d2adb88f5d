// Clustering-aware training of torch::nn::Linear layers from C++ (the C++ counterpart of
// Python's edkm.palettize_ / finalize / save), and export to the compressed-model file.
//
//   edkm::Palettizer pal(edkm::PalettizerOptions().bits(3).group_size(16));
//   auto fc1 = pal.wrap("fc1", model->fc1);   // ClusteredLinear sharing fc1's weight and bias
//   model->replace_module("fc1", fc1);        // (or call fc1 where the model called its Linear)
//   ... train: fc1 forward = edkm::dkm_linear in train(), the hard-assigned weight in eval() ...
//   pal.finalize();                           // weights snap to their fp16 LUTs, in place
//   pal.save("model.safetensors");            // FORMAT.md; fc1.weight clustered, fc1.bias plain
//
// C++ scope: scalar clustering only (cluster_dim d = 1); the weight is clustered in its own
// dtype (no cluster_dtype rounding as Python offers); no tied weights. Python's edkm.load reads
// the files, and edkm::load_compressed reads files Python writes.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <edkm/format.h>

namespace edkm {

struct PalettizerOptions {
  // Raises c10::ValueError naming the field when an option is out of range.
  void check() const;

  // 1..8: K = 2^bits centroids per look-up table (LUT).
  TORCH_ARG(int64_t, bits) = 3;
  // Output rows that share one LUT; must divide out_features. 0: one LUT for the whole matrix.
  TORCH_ARG(int64_t, group_size) = 0;
  // Softness relative to the weight's variance: the softmax uses tau = temperature * var(w),
  // fixed at initialization (as Python's edkm.Config). > 0.
  TORCH_ARG(double, temperature) = 0.02;
  // DKM iterations per step (>= 1), early-stop tolerance (>= 0), "squared" or "absolute".
  TORCH_ARG(int64_t, max_iter) = 3;
  TORCH_ARG(double, epsilon) = 0.0;
  TORCH_ARG(std::string, distance) = "squared";
};

// Exact optimal 1-D k-means initialization: `weight` (any shape, floating, finite) viewed as
// `groups` equal contiguous groups; for each, optimal_kmeans_1d over its distinct values (16-bit
// weights: the slot histogram; others: sorting; +0 and -0 are one value) with their counts.
// Returns float64 [groups, k], ascending in each row (a group with fewer than k distinct values
// repeats its largest one).
at::Tensor optimal_centroids(const at::Tensor& weight, int64_t groups, int64_t k);

// A torch::nn::Linear whose weight is clustered while it trains. It shares the Linear's weight
// and bias Parameters (named "weight" and "bias" here too), so optimizers and
// named_parameters() see the original trainable weight; the centroids [G, K] are a buffer
// ("centroids": float32 for 16-bit weights, else the weight's dtype), moved by every training
// step (DKM's warm start), never by the optimizer.
//   train(): edkm::dkm_linear (soft clustering, exact DKM gradient to the weight);
//   eval():  linear with the hard-assigned weight (nearest centroid, edkm::assign + dequantize);
//   after finalize(): plain linear with the (now hard-assigned) weight, in both modes.
class ClusteredLinearImpl : public torch::nn::Cloneable<ClusteredLinearImpl> {
 public:
  // Initializes the centroids with optimal_centroids and fixes tau; raises c10::ValueError for
  // bad options, an undefined Linear, or a weight that is not floating point and finite.
  ClusteredLinearImpl(const torch::nn::Linear& linear, PalettizerOptions options);

  // Cloneable: fresh tensors of the same shapes (clone() then copies the values).
  void reset() override;

  at::Tensor forward(const at::Tensor& input);

  // The weight eval() computes with: each weight replaced by its nearest current centroid (after
  // finalize(), the weight itself). Not differentiable.
  at::Tensor hard_weight();

  // Rounds the centroids to float16 (the file's LUT precision; raises if one overflows it),
  // then replaces the weight, in place, by its nearest centroid. Afterwards the weight takes at
  // most K values per group and equals what the saved file rebuilds, bit for bit. Idempotent.
  void finalize();
  bool finalized() const { return finalized_; }

  // The stored form (FORMAT.md) of the finalized weight. Raises when not finalized, or when the
  // weight was changed after finalize() (it must still be exactly the LUT values).
  ClusteredTensor export_clustered() const;

  int64_t groups() const { return groups_; }
  double tau() const { return tau_; }
  const PalettizerOptions& options() const { return options_; }

  void pretty_print(std::ostream& stream) const override;

  at::Tensor weight, bias, centroids;

 private:
  PalettizerOptions options_;
  int64_t groups_ = 1;
  double tau_ = 1.0;
  bool finalized_ = false;
  // Hard weight cache, valid while neither weight nor centroids change (version counters).
  at::Tensor cached_hard_;
  uint32_t cached_weight_version_ = 0, cached_centroid_version_ = 0;
};
TORCH_MODULE(ClusteredLinear);

// Wraps Linear layers under names, then finalizes and exports them together.
class Palettizer {
 public:
  explicit Palettizer(PalettizerOptions options = PalettizerOptions());

  // A ClusteredLinear for `linear` (sharing its parameters), remembered under `name` (the
  // module's name in the model: the file stores NAME.weight clustered and NAME.bias plain).
  // Raises c10::ValueError for an empty or repeated name, or what ClusteredLinear raises.
  ClusteredLinear wrap(const std::string& name, const torch::nn::Linear& linear);

  // finalize() on every wrapped layer.
  void finalize();

  // The file's contents: each layer's NAME.weight clustered and NAME.bias (if any), plus
  // `extra` plain tensors (e.g. layers that are not clustered). Every layer must be finalized.
  CompressedFile to_file(const std::map<std::string, at::Tensor>& extra = {}) const;

  // save_compressed(path, to_file(extra)); returns the file's size in bytes.
  int64_t save(const std::string& path, const std::map<std::string, at::Tensor>& extra = {}) const;

  const std::vector<std::pair<std::string, ClusteredLinear>>& layers() const { return layers_; }
  const PalettizerOptions& options() const { return options_; }

 private:
  PalettizerOptions options_;
  std::vector<std::pair<std::string, ClusteredLinear>> layers_;
};

}  // namespace edkm
