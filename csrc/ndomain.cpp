#include "ndomain.h"

#include "settings.h"

namespace edkm {

bool ndomain_applies(const at::Tensor& weight, const at::Tensor& centroids) {
  const NDomainMode mode = ndomain_mode();
  if (mode == NDomainMode::kNever || !weight.device().is_cpu() || !centroids.device().is_cpu()) {
    return false;
  }
  if (mode == NDomainMode::kAlways) return true;
  const int64_t groups = centroids.sym_size(0).guard_int(__FILE__, __LINE__);
  const int64_t numel = weight.sym_numel().guard_int(__FILE__, __LINE__);
  return groups > 0 && numel / groups <= kNDomainMaxGroup;
}

}  // namespace edkm
