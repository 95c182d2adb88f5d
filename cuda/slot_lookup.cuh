// How a CUDA thread finds u(i), the position of weight i's slot in its group's slot row:
// a dense [G, 65536] map when there are few groups (one load), else binary search in the
// sorted row (<= 16 probes, the row stays in L2).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace edkm {
namespace cuda {

constexpr int64_t kDenseMapMaxGroups = 64;  // 64 maps of 65536 int32 = 16 MiB

struct SlotLookup {
  const int32_t* map;    // [G, 65536], -1 for absent slots; nullptr: binary search
  const int32_t* slots;  // [G, cap], ascending, padded with 65536
  int64_t cap;
  int64_t group_size;

  __device__ __forceinline__ int64_t operator()(int64_t i, int32_t slot) const {
    const int64_t g = i / group_size;
    if (map != nullptr) {
      const int32_t u = map[g * 65536 + slot];
      return u < 0 ? -1 : g * cap + u;
    }
    const int32_t* row = slots + g * cap;
    int64_t lo = 0, hi = cap;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (row[mid] < slot)
        lo = mid + 1;
      else
        hi = mid;
    }
    return (lo < cap && row[lo] == slot) ? g * cap + lo : -1;
  }
};

// Builds the lookup for `weight` (numel N) and `slots`; `storage` keeps the dense map alive.
SlotLookup make_slot_lookup(const at::Tensor& weight, const at::Tensor& slots, at::Tensor& storage);

int blocks_for(int64_t n, int threads);

// Raises the stale-weight error when the device flag is set (reads it: one sync).
void raise_if_missing(const at::Tensor& missing);

}  // namespace cuda
}  // namespace edkm
