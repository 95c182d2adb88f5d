// lut_linear / lut_embedding: argument checks and the plain ATen implementation (rebuild the
// weight, then at::linear / index_select), which serves every case without a fused kernel
// (float64 inputs, devices other than CPU and CUDA) and is the oracle the kernels are tested on.
#include "lut_linear.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "packing.h"

namespace edkm {

namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_outliers(const char* op, const LutWeight& w, const std::optional<at::Tensor>& index,
                    const std::optional<at::Tensor>& values, const at::Tensor& packed, bool check_values) {
  const bool has_i = index.has_value() && index->defined();
  const bool has_v = values.has_value() && values->defined();
  TORCH_CHECK_VALUE(has_i == has_v, op, ": outlier_index and outlier_values go together, got ",
                    has_i ? "outlier_index without outlier_values"
                          : "outlier_values without "
                            "outlier_index");
  if (!has_i) return;
  const auto& i = *index;
  const auto& v = *values;
  TORCH_CHECK_TYPE(i.scalar_type() == at::kInt || i.scalar_type() == at::kLong, op,
                   ": outlier_index must be int32 or int64, got ", i.scalar_type());
  TORCH_CHECK_TYPE(is_float(v.scalar_type()), op, ": outlier_values must be a floating tensor, got ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(i.dim() == 1 && v.dim() == 1 && i.numel() == v.numel(), op,
                    ": outlier_index and outlier_values must be 1-D of one length, got shapes ", i.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(i.device() == packed.device() && v.device() == packed.device(), op,
                    ": outlier_index and outlier_values must be on packed's device (", packed.device(),
                    "), got ", i.device(), " and ", v.device());
  const int64_t n = i.numel();
  if (n == 0 || !check_values) return;
  const int64_t numel = w.rows * w.cols;
  auto pos = i.to(at::kLong);
  const auto range = at::aminmax(pos);
  const int64_t lo = std::get<0>(range).item<int64_t>();
  const int64_t hi = std::get<1>(range).item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < numel, op,
                    ": outlier_index must lie in [0, rows * cols) = "
                    "[0, ",
                    numel, "), got values in [", lo, ", ", hi, "]");
  if (n > 1) {
    TORCH_CHECK_VALUE((pos.narrow(0, 1, n - 1) > pos.narrow(0, 0, n - 1)).all().item<bool>(), op,
                      ": outlier_index must be strictly increasing (sorted, no repeats)");
  }
  TORCH_CHECK_VALUE(at::isfinite(v).all().item<bool>(), op, ": outlier_values must be finite");
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

LutWeight check_lut_weight(const char* op, const at::Tensor& packed, const at::Tensor& lut, int64_t bits,
                           int64_t rows, int64_t cols, const std::optional<at::Tensor>& outlier_index,
                           const std::optional<at::Tensor>& outlier_values, bool check_values) {
  TORCH_CHECK_VALUE(packed.defined(), op, ": packed must be a tensor, got None");
  TORCH_CHECK_VALUE(lut.defined(), op, ": lut must be a tensor, got None");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1, op, ": packed must be 1-D, got shape ", packed.sizes());
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, op, ": bits must be in 1..8, got ", bits);
  TORCH_CHECK_TYPE(is_float(lut.scalar_type()), op,
                   ": lut must be float16, bfloat16, float32 or float64, got ", lut.scalar_type());
  TORCH_CHECK_VALUE(lut.dim() == 3, op, ": lut must be [groups, 2**bits, cluster_dim], got shape ",
                    lut.sizes());
  TORCH_CHECK_VALUE(lut.device() == packed.device(), op, ": lut must be on packed's device (",
                    packed.device(), "), got ", lut.device());
  LutWeight w;
  w.rows = rows;
  w.cols = cols;
  w.bits = bits;
  w.k = int64_t(1) << bits;
  w.groups = lut.size(0);
  w.cluster_dim = lut.size(2);
  TORCH_CHECK_VALUE(lut.size(1) == w.k, op, ": lut must have 2**bits = ", w.k,
                    " entries per group (dim 1), got shape ", lut.sizes());
  TORCH_CHECK_VALUE(w.groups >= 1 && w.cluster_dim >= 1, op,
                    ": lut must have at least one group and cluster_dim >= 1, got shape ", lut.sizes());
  TORCH_CHECK_VALUE(rows >= 1 && cols >= 1 && rows <= (int64_t(1) << 40) / cols, op,
                    ": the weight must be [rows >= 1, cols >= 1] with fewer than 2^40 elements, got [", rows,
                    ", ", cols, "]");
  TORCH_CHECK_VALUE(cols % w.cluster_dim == 0, op, ": cluster_dim ", w.cluster_dim,
                    " must divide the weight's columns (", cols, ")");
  const int64_t numel = rows * cols;
  TORCH_CHECK_VALUE(numel % (w.groups * w.cluster_dim) == 0, op, ": a [", rows, ", ", cols,
                    "] weight cannot be cut into ", w.groups, " groups of ", w.cluster_dim,
                    "-vectors (lut shape ", lut.sizes(), ")");
  w.group_numel = numel / w.groups;
  const int64_t count = numel / w.cluster_dim;
  TORCH_CHECK_VALUE(packed.numel() == packed_bytes(count, bits), op, ": a [", rows, ", ", cols,
                    "] weight (out x in) has ", count, " indices of ", bits, " bits, which take ceil(", count,
                    " * ", bits, " / 8) = ", packed_bytes(count, bits), " bytes, but packed has ",
                    packed.numel());
  if (check_values) {
    TORCH_CHECK_VALUE(at::isfinite(lut).all().item<bool>(), op, ": lut must be finite");
  }
  check_outliers(op, w, outlier_index, outlier_values, packed, check_values);
  return w;
}

void check_lut_values_host(const char* op, const LutWeight& w, const float* lut, const int64_t* pos,
                           const float* val, int64_t n_out) {
  const int64_t n_lut = w.groups * w.k * w.cluster_dim;
  bool finite = true;
  for (int64_t i = 0; i < n_lut; ++i) finite &= std::isfinite(lut[i]);
  TORCH_CHECK_VALUE(finite, op, ": lut must be finite");
  if (n_out == 0) return;
  const int64_t numel = w.rows * w.cols;
  bool in_range = true, increasing = true;
  finite = true;
  for (int64_t i = 0; i < n_out; ++i) {
    in_range &= pos[i] >= 0 && pos[i] < numel;
    if (i > 0) increasing &= pos[i] > pos[i - 1];
    finite &= std::isfinite(val[i]);
  }
  if (!in_range) {
    const auto [lo, hi] = std::minmax_element(pos, pos + n_out);
    TORCH_CHECK_VALUE(false, op, ": outlier_index must lie in [0, rows * cols) = [0, ", numel,
                      "), got values in [", *lo, ", ", *hi, "]");
  }
  TORCH_CHECK_VALUE(increasing, op, ": outlier_index must be strictly increasing (sorted, no repeats)");
  TORCH_CHECK_VALUE(finite, op, ": outlier_values must be finite");
}

void check_lut_linear_input(const at::Tensor& input, const LutWeight& w,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "lut_linear";
  TORCH_CHECK_VALUE(input.defined(), op, ": input must be a tensor, got None");
  TORCH_CHECK_TYPE(is_float(input.scalar_type()), op,
                   ": input must be float16, bfloat16, float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == w.cols, op,
                    ": input must be [..., in_features = ", w.cols, "], got shape ", input.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(is_float(bias->scalar_type()), op, ": bias must be a floating tensor, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.rows, op,
                      ": bias must be [out_features = ", w.rows, "], got shape ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == input.device(), op, ": bias must be on input's device (",
                      input.device(), "), got ", bias->device());
  }
}

void check_lut_embedding_indices(const at::Tensor& indices, const LutWeight& w) {
  const char* op = "lut_embedding";
  TORCH_CHECK_VALUE(indices.defined(), op, ": indices must be a tensor, got None");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  if (indices.numel() == 0) return;
  const auto range = at::aminmax(indices.reshape(-1));
  const int64_t lo = std::get<0>(range).item<int64_t>();
  const int64_t hi = std::get<1>(range).item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < w.rows, op, ": indices must lie in [0, num_embeddings) = [0, ", w.rows,
                    "), got values in [", lo, ", ", hi, "]");
}

at::Tensor lut_linear_rows(const at::Tensor& input, const LutWeight& w) {
  return input.reshape({-1, w.cols}).to(at::kFloat).contiguous();
}

at::Tensor lut_linear_output(at::Tensor y, const std::optional<at::Tensor>& bias, const at::Tensor& input) {
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  auto sizes = input.sizes().vec();
  sizes.back() = y.size(1);
  return y.to(input.scalar_type()).view(sizes);
}

namespace generic {

at::Tensor lut_dense_weight(const at::Tensor& packed, const at::Tensor& lut, const LutWeight& w,
                            const std::optional<at::Tensor>& outlier_index,
                            const std::optional<at::Tensor>& outlier_values, at::ScalarType dtype) {
  static auto unpack = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("edkm::unpack_indices", "")
                           .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  const int64_t count = w.rows * w.cols / w.cluster_dim;
  auto idx = unpack.call(packed.contiguous(), w.bits, count).to(at::kLong);
  auto offsets = at::arange(w.groups, idx.options()).mul_(w.k).unsqueeze(1);
  auto flat = idx.view({w.groups, count / w.groups}).add(offsets).reshape(-1);
  auto table = lut.to(dtype).reshape({w.groups * w.k, w.cluster_dim});
  auto weight = table.index_select(0, flat).reshape({w.rows, w.cols});
  if (outlier_index.has_value() && outlier_index->defined() && outlier_index->numel() > 0) {
    weight.view(-1).index_put_({outlier_index->to(at::kLong)}, outlier_values->to(dtype));
  }
  return weight;
}

at::Tensor lut_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& lut, int64_t bits,
                      int64_t out_features, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& outlier_index,
                      const std::optional<at::Tensor>& outlier_values) {
  TORCH_CHECK_VALUE(input.defined(), "lut_linear: input must be a tensor, got None");
  const auto w = check_lut_weight("lut_linear", packed, lut, bits, out_features,
                                  input.dim() >= 1 ? input.size(-1) : 0, outlier_index, outlier_values);
  check_lut_linear_input(input, w, bias);
  const auto ct = compute_dtype(input.scalar_type());
  auto weight = lut_dense_weight(packed, lut, w, outlier_index, outlier_values, ct);
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(ct);
  return at::linear(input.to(ct), weight, b).to(input.scalar_type());
}

at::Tensor lut_embedding(const at::Tensor& indices, const at::Tensor& packed, const at::Tensor& lut,
                         int64_t bits, int64_t num_embeddings, int64_t embedding_dim,
                         const std::optional<at::Tensor>& outlier_index,
                         const std::optional<at::Tensor>& outlier_values,
                         std::optional<at::ScalarType> dtype) {
  const auto w = check_lut_weight("lut_embedding", packed, lut, bits, num_embeddings, embedding_dim,
                                  outlier_index, outlier_values);
  check_lut_embedding_indices(indices, w);
  const auto out_t = dtype.value_or(lut.scalar_type());
  TORCH_CHECK_TYPE(is_float(out_t), "lut_embedding: dtype must be a floating type, got ", out_t);
  auto weight = lut_dense_weight(packed, lut, w, outlier_index, outlier_values, compute_dtype(out_t));
  auto sizes = indices.sizes().vec();
  sizes.push_back(embedding_dim);
  return weight.index_select(0, indices.reshape(-1).to(at::kLong)).to(out_t).view(sizes);
}

}  // namespace generic

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("lut_linear", &generic::lut_linear);
  m.impl("lut_embedding", &generic::lut_embedding);
}

}  // namespace edkm
