// assign / dequantize: argument checks and the generic ATen implementation (any device).
#include "hard_assign.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace edkm {

at::ScalarType check_assign_args(const at::Tensor& weight, const at::Tensor& centroids) {
  const char* op = "assign";
  const auto wt = weight.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat || wt == at::kDouble, op,
                   ": weight must be bfloat16, float16, float32 or float64, got ", wt);
  TORCH_CHECK_VALUE(weight.numel() > 0, op, ": weight must not be empty, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(0) >= 1 && centroids.size(1) >= 1, op,
                    ": centroids must be 2-D [groups, K] with K >= 1, got shape ", centroids.sizes());
  TORCH_CHECK_TYPE(centroids.is_floating_point(), op, ": centroids must be floating point, got ",
                   centroids.scalar_type());
  TORCH_CHECK_VALUE(weight.numel() % centroids.size(0) == 0, op, ": weight's ", weight.numel(),
                    " elements do not split into centroids.size(0) = ", centroids.size(0), " equal groups");
  TORCH_CHECK_VALUE(centroids.device() == weight.device(), op, ": centroids must be on weight's device (",
                    weight.device(), "), got ", centroids.device());
  TORCH_CHECK_VALUE(at::isfinite(centroids).all().item<bool>(), op, ": centroids contain NaN or Inf");
  return centroids.size(1) <= 256 ? at::kByte : at::kInt;
}

at::ScalarType check_dequantize_args(const at::Tensor& indices, const at::Tensor& centroids,
                                     c10::optional<at::ScalarType> dtype) {
  const char* op = "dequantize";
  const auto it = indices.scalar_type();
  TORCH_CHECK_TYPE(it == at::kByte || it == at::kShort || it == at::kInt || it == at::kLong, op,
                   ": indices must be uint8, int16, int32 or int64, got ", it);
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(0) >= 1 && centroids.size(1) >= 1, op,
                    ": centroids must be 2-D [groups, K] with K >= 1, got shape ", centroids.sizes());
  TORCH_CHECK_TYPE(centroids.is_floating_point(), op, ": centroids must be floating point, got ",
                   centroids.scalar_type());
  TORCH_CHECK_VALUE(indices.numel() % centroids.size(0) == 0, op, ": indices' ", indices.numel(),
                    " elements do not split into centroids.size(0) = ", centroids.size(0), " equal groups");
  TORCH_CHECK_VALUE(centroids.device() == indices.device(), op, ": centroids must be on indices' device (",
                    indices.device(), "), got ", centroids.device());
  const auto out = dtype.value_or(centroids.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(out), op, ": dtype must be floating point, got ", out);
  if (indices.numel() > 0) {
    auto range = at::aminmax(indices);
    const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < centroids.size(1), op, ": indices must lie in [0, ", centroids.size(1),
                      "), got values in [", lo, ", ", hi, "]");
  }
  return out;
}

namespace generic {

at::Tensor assign(const at::Tensor& weight, const at::Tensor& centroids) {
  const auto index_dtype = check_assign_args(weight, centroids);
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(), "assign: weight contains NaN or Inf");
  const int64_t groups = centroids.size(0);
  auto w = weight.reshape({groups, -1, 1}).to(at::kDouble);
  auto c = centroids.to(at::kDouble).unsqueeze(1);
  // Chunked so the [chunk, K] distances stay small; argmin keeps the first (lowest) index on ties.
  auto out = at::empty({groups, w.size(1)}, weight.options().dtype(index_dtype));
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / centroids.size(1));
  for (int64_t s = 0; s < w.size(1); s += chunk) {
    const int64_t len = std::min(chunk, w.size(1) - s);
    out.narrow(1, s, len).copy_((w.narrow(1, s, len) - c).abs().argmin(2));
  }
  return out.view(weight.sizes());
}

at::Tensor dequantize(const at::Tensor& indices, const at::Tensor& centroids,
                      c10::optional<at::ScalarType> dtype) {
  const auto out = check_dequantize_args(indices, centroids, dtype);
  if (indices.numel() == 0) return at::empty(indices.sizes(), centroids.options().dtype(out));
  auto idx = indices.reshape({centroids.size(0), -1}).to(at::kLong);
  return centroids.gather(1, idx).to(out).view(indices.sizes());
}

}  // namespace generic

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("assign", &generic::assign);
  m.impl("dequantize", &generic::dequantize);
}

}  // namespace edkm
