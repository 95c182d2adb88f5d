// What dkm's autograd functions keep of the U-domain tables for backward.
#pragma once

#include <ATen/core/Tensor.h>

namespace edkm {

// Narrows the tables _dkm_forward returns ([G, W], padded to a static W = min(M, 65536) so
// shapes never depend on data) to the columns some group uses, as contiguous copies, before
// they are saved: with many small LUT groups the padded tables (12 bytes an entry) are as
// large as the weight, the used columns a fraction of it; one LUT's 0.75 MiB becomes ~55 KiB.
// `lookup` is narrowed too when it is a slot table (16-bit weights), not when it is the
// per-weight index (32/64-bit).
// Only on real tensors (eager mode): under torch.compile/export tracing (fake or functional
// tensors) the static shapes the fake kernels promise are kept. Off the CPU only where the
// tables are large (G x W x K > 2^22), since reading the width is a device sync.
void narrow_saved_tables(at::Tensor& lookup, at::Tensor& values, at::Tensor& counts, int64_t k);

}  // namespace edkm
