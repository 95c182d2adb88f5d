#include "ndomain.h"

#include <limits>

#include "cpu/attention_avx2.h"
#include "settings.h"

namespace edkm {

int64_t ndomain_max_group(at::ScalarType dtype) {
  const bool simd = simd_attention() && attention_avx2::available();
  if (simd && dtype == at::kFloat) return std::numeric_limits<int64_t>::max();
  if (simd && (dtype == at::kBFloat16 || dtype == at::kHalf)) return kNDomainMaxGroup16Simd;
  return kNDomainMaxGroup;
}

bool ndomain_applies(const at::Tensor& weight, const at::Tensor& centroids) {
  const NDomainMode mode = ndomain_mode();
  if (mode == NDomainMode::kNever || !weight.device().is_cpu() || !centroids.device().is_cpu()) {
    return false;
  }
  if (mode == NDomainMode::kAlways) return true;
  const int64_t groups = centroids.sym_size(0).guard_int(__FILE__, __LINE__);
  const int64_t numel = weight.sym_numel().guard_int(__FILE__, __LINE__);
  return groups > 0 && numel / groups <= ndomain_max_group(weight.scalar_type());
}

}  // namespace edkm
