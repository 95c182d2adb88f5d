#include "checks.h"

#include <cmath>

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

namespace edkm {

Distance parse_distance(const char* op, c10::string_view distance) {
  if (distance == "squared") return Distance::kSquared;
  if (distance == "absolute") return Distance::kAbsolute;
  TORCH_CHECK_VALUE(false, op, ": distance must be 'squared' or 'absolute', got '", std::string(distance),
                    "'");
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

at::ScalarType compute_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

bool holds(bool b) { return b; }
// Under torch.compile sizes may be SymInts; a check on them becomes a guard.
bool holds(const c10::SymBool& b) { return b.guard_bool(__FILE__, __LINE__); }

std::string shape_of(const at::Tensor& t) {
  if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return c10::str(t.sym_sizes());
  return c10::str(t.sizes());
}

// The size checks of dkm for Int = int64_t (eager) or c10::SymInt (traced).
template <typename Int>
void check_dkm_sizes(const char* op, const at::Tensor& weight, const at::Tensor& centroids, const Int& n,
                     const Int& groups, const Int& k) {
  TORCH_CHECK_VALUE(holds(n > 0), op, ": weight must not be empty, got shape ", shape_of(weight));
  TORCH_CHECK_VALUE(holds(n < (int64_t(1) << 31)), op, ": weight must have fewer than 2^31 elements, got ",
                    n);
  TORCH_CHECK_VALUE(holds(groups >= 1), op, ": centroids must have at least one group (row), got shape ",
                    shape_of(centroids));
  TORCH_CHECK_VALUE(holds(k >= 2), op, ": centroids must have K >= 2 columns, got K = ", k);
  TORCH_CHECK_VALUE(holds(n % groups == 0), op, ": weight's ", n,
                    " elements do not split into centroids.size(0) = ", groups, " equal groups");
}

}  // namespace

void check_dkm_args(const char* op, const at::Tensor& weight, const at::Tensor& centroids, double temperature,
                    int64_t max_iter, double epsilon) {
  TORCH_CHECK_VALUE(weight.defined(), op, ": weight must be a tensor, got None");
  TORCH_CHECK_VALUE(centroids.defined(), op, ": centroids must be a tensor, got None");
  const auto wt = weight.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat || wt == at::kDouble, op,
                   ": weight must be bfloat16, float16, float32 or float64, got ", wt);
  TORCH_CHECK_VALUE(centroids.dim() == 2, op, ": centroids must be 2-D [groups, K], got shape ",
                    shape_of(centroids));
  const bool symbolic = weight.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
                        centroids.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  if (symbolic) {
    check_dkm_sizes<c10::SymInt>(op, weight, centroids, weight.sym_numel(), centroids.sym_size(0),
                                 centroids.sym_size(1));
  } else {
    check_dkm_sizes<int64_t>(op, weight, centroids, weight.numel(), centroids.size(0), centroids.size(1));
  }
  const auto ct = centroids.scalar_type();
  const bool ok = ct == wt || (is_16bit(wt) && ct == at::kFloat);
  TORCH_CHECK_TYPE(ok, op, ": centroids must have weight's dtype (", wt, ")",
                   is_16bit(wt) ? " or float32" : "", ", got ", ct);
  TORCH_CHECK_VALUE(centroids.device() == weight.device(), op, ": centroids must be on weight's device (",
                    weight.device(), "), got ", centroids.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(max_iter >= 1, op, ": max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK_VALUE(std::isfinite(epsilon) && epsilon >= 0, op,
                    ": epsilon must be a finite number >= 0, got ", epsilon);
}

void check_slot_table_args(const char* op, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK_TYPE(is_16bit(weight.scalar_type()), op, ": weight must be bfloat16 or float16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(groups >= 1 && weight.numel() > 0 && weight.numel() % groups == 0, op,
                    ": groups must be >= 1 and divide weight's ", weight.numel(), " elements, got ", groups);
}

void check_slot_args(const char* op, const at::Tensor& weight, const at::Tensor& slots) {
  TORCH_CHECK_TYPE(is_16bit(weight.scalar_type()), op, ": weight must be bfloat16 or float16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK_TYPE(slots.scalar_type() == at::kInt, op, ": slots must be int32, got ", slots.scalar_type());
  TORCH_CHECK_VALUE(slots.dim() == 2 && slots.size(0) >= 1 && weight.numel() % slots.size(0) == 0 &&
                        slots.size(1) >= 1 && slots.size(1) <= slot_capacity(weight.numel() / slots.size(0)),
                    op, ": slots must have shape [G, W] with 1 <= W <= min(M, 65536) for weight of ",
                    weight.numel(), " elements in G groups of M, got ", slots.sizes());
  TORCH_CHECK_VALUE(slots.is_contiguous(), op, ": slots must be contiguous");
  TORCH_CHECK_VALUE(slots.device() == weight.device(), op, ": slots must be on weight's device (",
                    weight.device(), "), got ", slots.device());
}

void check_finite_centroids(const char* op, const at::Tensor& centroids) {
  TORCH_CHECK_VALUE(at::isfinite(centroids).all().item<bool>(), op, ": centroids contain NaN or Inf");
}

}  // namespace edkm
