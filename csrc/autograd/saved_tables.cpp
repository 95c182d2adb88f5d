#include "autograd/saved_tables.h"

#include <algorithm>

#include <ATen/ATen.h>

namespace edkm {

namespace {
// Fake, functional or meta tensors: a trace, whose shapes must stay the fake kernels' ones.
bool traced(const at::Tensor& t) {
  return t.is_meta() || t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python,
                                                                 c10::DispatchKey::PythonTLSSnapshot,
                                                                 c10::DispatchKey::Functionalize}));
}
}  // namespace

void narrow_saved_tables(at::Tensor& lookup, at::Tensor& values, at::Tensor& counts, int64_t k) {
  if (traced(lookup) || traced(values) || traced(counts) || counts.dim() != 2) return;
  const int64_t groups = counts.size(0), width = counts.size(1);
  if (!counts.is_cpu() && groups * width * k <= (int64_t(1) << 22)) return;
  const int64_t used = std::max<int64_t>(1, counts.gt(0).sum(1).max().item<int64_t>());
  if (used >= width) return;
  // clone, not contiguous(): with one group the narrowed view already counts as contiguous and
  // would keep the whole padded storage alive.
  values = values.narrow(1, 0, used).clone(at::MemoryFormat::Contiguous);
  counts = counts.narrow(1, 0, used).clone(at::MemoryFormat::Contiguous);
  if (lookup.dim() == 2) lookup = lookup.narrow(1, 0, used).clone(at::MemoryFormat::Contiguous);
}

}  // namespace edkm
