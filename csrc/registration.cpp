// Every edkm op's schema, in one readable place. Kernels register per backend in their own
// files: cpu/ (CPU), ../cuda/ (CUDA), generic/ATen code (CompositeExplicitAutograd),
// autograd/ (Autograd).
#include <torch/library.h>

namespace {
// Ops whose kernels read device values on the host (input checks, the early stop) cannot be
// captured in a CUDA graph; the tag lets torch.compile(mode="reduce-overhead") run them outside.
const std::vector<at::Tag> kSyncing = {at::Tag::pt2_compliant_tag, at::Tag::cudagraph_unsafe};
const std::vector<at::Tag> kPure = {at::Tag::pt2_compliant_tag};
}  // namespace

TORCH_LIBRARY(edkm, m) {
  // Public ops.
  m.def(
      "dkm(Tensor weight, Tensor centroids, float temperature, int max_iter=3, "
      "float epsilon=0.0, str distance='squared') -> (Tensor clustered, Tensor centroids, "
      "Tensor iterations)",
      kSyncing);
  m.def(
      "dkm_reference(Tensor weight, Tensor centroids, float temperature, int max_iter=3, "
      "float epsilon=0.0, str distance='squared') -> (Tensor clustered, Tensor centroids, "
      "Tensor iterations)",
      kPure);
  // linear(input, dkm(weight, centroids, ...).clustered, bias) that keeps no clustered weight
  // for backward: it is recomputed there from the U-domain tables (one gather).
  m.def(
      "dkm_linear(Tensor input, Tensor weight, Tensor centroids, Tensor? bias, "
      "float temperature, int max_iter=3, float epsilon=0.0, str distance='squared') -> "
      "(Tensor output, Tensor centroids, Tensor iterations)",
      kSyncing);
  m.def("assign(Tensor weight, Tensor centroids) -> Tensor", kSyncing);
  m.def("dequantize(Tensor indices, Tensor centroids, ScalarType? dtype=None) -> Tensor", kSyncing);
  // Bit packing of the file format (docs/FORMAT.md): index j at bits [j*bits, (j+1)*bits) of a
  // little-endian bit stream; uint8 [ceil(n * bits / 8)] out, uint8 [count] back.
  m.def("pack_indices(Tensor indices, int bits) -> Tensor", kSyncing);
  m.def("unpack_indices(Tensor packed, int bits, int count) -> Tensor", kSyncing);
  // Exact optimal weighted 1-D k-means over sorted distinct values: float64 centroids [k]
  // (ascending) and the optimal cost (0-d float64). Runs on the CPU (other devices copy).
  // Run a clustered weight from its file form (docs/FORMAT.md) without rebuilding it: W [rows,
  // cols] = lut[group, index] (as float32), then the outliers (flat positions, sorted) written
  // over it. lut_linear = linear(input, W, bias) with in_features = input.size(-1), computed in
  // float32 (float64 for float64 input), returned in input's dtype; lut_embedding = W[indices]
  // in dtype (default lut's). Inference only (no autograd).
  m.def(
      "lut_linear(Tensor input, Tensor packed, Tensor lut, int bits, int out_features, "
      "Tensor? bias=None, Tensor? outlier_index=None, Tensor? outlier_values=None) -> Tensor",
      kSyncing);
  m.def(
      "lut_embedding(Tensor indices, Tensor packed, Tensor lut, int bits, int num_embeddings, "
      "int embedding_dim, Tensor? outlier_index=None, Tensor? outlier_values=None, "
      "ScalarType? dtype=None) -> Tensor",
      kSyncing);
  m.def(
      "optimal_kmeans_1d(Tensor values, Tensor counts, int k) -> (Tensor centroids, "
      "Tensor cost)",
      kSyncing);
  // The same for every group of a weight viewed as [G, M] at once (CPU threads over groups):
  // each group's distinct values with mass = count, or = the summed per-element importance
  // (>= 0, weight's shape). Sorted centroids [G, k] and costs [G], float64.
  m.def(
      "optimal_kmeans_1d_grouped(Tensor weight, int k, Tensor? importance=None) -> "
      "(Tensor centroids, Tensor cost)",
      kSyncing);

  // dkm's forward and backward below autograd. `lookup` is the sorted slot table [G, Ucap] for
  // 16-bit weights (the index is rebuilt from the weight's bits) or the int32 index [N] for
  // 32/64-bit weights; values/counts are the distinct values and their counts [G, Ucap];
  // history holds the centroids before each iteration [max_iter + 1, G, K].
  m.def(
      "_dkm_forward(Tensor weight, Tensor centroids, float temperature, int max_iter, "
      "float epsilon, str distance) -> (Tensor clustered, Tensor centroids_out, "
      "Tensor iterations, Tensor lookup, Tensor values, Tensor counts, Tensor history)",
      kSyncing);
  // The input centroids are not needed (history[0] holds them), so a caller may overwrite its
  // centroid buffer with the new centroids (warm start) before calling backward.
  m.def(
      "_dkm_backward(Tensor? grad_clustered, Tensor? grad_centroids, Tensor weight, "
      "Tensor lookup, Tensor values, Tensor counts, Tensor history, Tensor iterations, "
      "float temperature, str distance, ScalarType centroids_dtype) -> (Tensor grad_weight, "
      "Tensor grad_centroids)",
      kSyncing);
  // _dkm_backward that writes the weight's gradient over grad_clustered (contiguous, weight's
  // dtype and shape) and returns the centroids' gradient: for callers that own grad_clustered
  // (dkm_linear's backward), so the step needs no second weight-sized gradient buffer.
  m.def(
      "_dkm_backward_(Tensor(a!) grad_clustered, Tensor? grad_centroids, Tensor weight, "
      "Tensor lookup, Tensor values, Tensor counts, Tensor history, Tensor iterations, "
      "float temperature, str distance, ScalarType centroids_dtype) -> Tensor",
      kSyncing);

  m.def(
      "_dkm_recompute(Tensor weight, Tensor lookup, Tensor values, Tensor counts, "
      "Tensor history, Tensor iterations, float temperature, str distance) -> Tensor",
      kSyncing);

  // The U-domain itself (DKM over distinct values with counts, no N-sized input), for callers
  // that build the tables themselves: sharded weights whose per-rank histograms are
  // all-reduced (docs/DESIGN.md section 4, python/edkm/distributed.py). values/counts [G, U]
  // (counts floating, 0 for padding), centroids [G, K] in the compute dtype.
  m.def(
      "_udomain_forward(Tensor values, Tensor counts, Tensor centroids, float temperature, "
      "int max_iter, float epsilon, str distance) -> (Tensor centroids_out, Tensor soft, "
      "Tensor history, Tensor iterations)",
      kSyncing);
  // dL/dF [G, U] and dL/dc_T [G, K] (optional) back to: direct = dF_u/dv_u with c_T fixed,
  // indirect = dL/dv_u through the centroid iterations (for all n_u copies together), dL/dc_0.
  m.def(
      "_udomain_backward(Tensor values, Tensor counts, Tensor history, Tensor iterations, "
      "float temperature, str distance, Tensor grad_soft, Tensor? grad_centroids) -> "
      "(Tensor direct, Tensor indirect, Tensor grad_centroids)",
      kSyncing);

  // dkm over each group's weights directly (the N-domain, for small groups on CPU): the same
  // outputs as _dkm_forward's first three, and the centroid history, all it saves.
  m.def(
      "_ndomain_forward(Tensor weight, Tensor centroids, float temperature, int max_iter, "
      "float epsilon, str distance) -> (Tensor clustered, Tensor centroids_out, "
      "Tensor iterations, Tensor history)",
      kSyncing);
  m.def(
      "_ndomain_backward(Tensor? grad_clustered, Tensor? grad_centroids, Tensor weight, "
      "Tensor history, Tensor iterations, float temperature, str distance, "
      "ScalarType centroids_dtype) -> (Tensor grad_weight, Tensor grad_centroids)",
      kSyncing);
  m.def(
      "_ndomain_recompute(Tensor weight, Tensor history, Tensor iterations, "
      "float temperature, str distance) -> Tensor",
      kSyncing);

  // The N-element passes of the 16-bit path (weight viewed as [G, M], slot = bit pattern).
  m.def("_slot_table(Tensor weight, int groups) -> (Tensor slots, Tensor counts)", kSyncing);
  m.def("_slot_gather(Tensor weight, Tensor slots, Tensor table) -> Tensor", kSyncing);
  m.def("_slot_scatter_add(Tensor weight, Tensor slots, Tensor grad) -> Tensor", kSyncing);
  m.def(
      "_slot_grad(Tensor weight, Tensor slots, Tensor grad, Tensor scale, Tensor shift) -> "
      "Tensor",
      kSyncing);
  // _slot_grad written over grad (contiguous, weight's dtype): no second weight-sized buffer.
  m.def(
      "_slot_grad_(Tensor weight, Tensor slots, Tensor(a!) grad, Tensor scale, Tensor shift) "
      "-> ()",
      kSyncing);
}
