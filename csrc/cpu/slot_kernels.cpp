// CPU kernels of the slot primitives (16-bit path of dkm): one pass over the N weights each.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "slot_ops.h"

namespace edkm {

namespace {

constexpr int64_t kGrain = 1 << 14;
// Groups at least this large look slots up in a dense 65536-entry map; smaller ones by binary
// search in their sorted row (a map per small group would cost more than the group).
constexpr int64_t kDenseMapMinGroup = 1 << 14;

const uint16_t* bits_of(const at::Tensor& weight) {
  return reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
}

[[noreturn]] void missing_slot() {
  TORCH_CHECK_VALUE(false,
                    "edkm: weight holds values missing from its slot table (was the "
                    "weight modified after the forward pass?)");
}

// Calls body(i, u) for every weight i in [0, N) with u its position in its group's slot row.
// Work is split over threads by element; a failed look-up raises after the pass.
template <typename Body>
void for_each_slot(const at::Tensor& weight, const at::Tensor& slots, const Body& body) {
  const uint16_t* bits = bits_of(weight);
  const int32_t* table = slots.const_data_ptr<int32_t>();
  const int64_t groups = slots.size(0), cap = slots.size(1);
  const int64_t m = weight.numel() / groups;
  std::atomic<bool> missing{false};
  if (m >= kDenseMapMinGroup) {
    std::vector<int32_t> map(65536);
    for (int64_t g = 0; g < groups; ++g) {
      std::fill(map.begin(), map.end(), -1);
      const int32_t* row = table + g * cap;
      for (int64_t u = 0; u < cap && row[u] != kEmptySlot; ++u) {
        TORCH_CHECK_VALUE(row[u] >= 0 && row[u] < 65536, "edkm: slots hold ", row[u],
                          ", outside the 16-bit range [0, 65535]");
        map[row[u]] = static_cast<int32_t>(u);
      }
      const int64_t base = g * m;
      at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = base + begin; i < base + end; ++i) {
          const int32_t u = map[bits[i]];
          if (u < 0) {
            missing = true;
            return;
          }
          body(i, g * cap + u);
        }
      });
    }
  } else {
    // Small groups: each thread keeps one 65536-entry map, sets the group's slots, looks its
    // weights up, and clears just those entries again: O(U + M) per group, no 65536-wide fill,
    // no binary search per weight.
    std::atomic<int64_t> bad_slot{-1};
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / std::max<int64_t>(m, 1)),
                     [&](int64_t begin, int64_t end) {
                       std::vector<int32_t> map(65536, -1);
                       for (int64_t g = begin; g < end && !missing; ++g) {
                         const int32_t* row = table + g * cap;
                         int64_t used = 0;
                         for (; used < cap && row[used] != kEmptySlot; ++used) {
                           if (row[used] < 0 || row[used] >= 65536) {
                             bad_slot = row[used];
                             missing = true;
                             break;
                           }
                           map[row[used]] = static_cast<int32_t>(used);
                         }
                         for (int64_t i = g * m; i < (g + 1) * m && !missing; ++i) {
                           const int32_t u = map[bits[i]];
                           if (u < 0) {
                             missing = true;
                             break;
                           }
                           body(i, g * cap + u);
                         }
                         for (int64_t u = 0; u < used; ++u) {
                           if (row[u] >= 0 && row[u] < 65536) map[row[u]] = -1;
                         }
                       }
                     });
    TORCH_CHECK_VALUE(bad_slot.load() == -1, "edkm: slots hold ", bad_slot.load(),
                      ", outside the 16-bit range [0, 65535]");
  }
  if (missing) missing_slot();
}

std::tuple<at::Tensor, at::Tensor> slot_table_cpu(const at::Tensor& weight, int64_t groups) {
  const char* op = "_slot_table";
  check_slot_table_args(op, weight, groups);
  auto w = weight.contiguous();
  const int64_t m = w.numel() / groups, cap = slot_capacity(m);
  auto slots = at::empty({groups, cap}, w.options().dtype(at::kInt));
  auto counts = at::empty({groups, cap}, w.options().dtype(at::kInt));
  const uint16_t* bits = bits_of(w);
  int32_t* slot_out = slots.mutable_data_ptr<int32_t>();
  int32_t* count_out = counts.mutable_data_ptr<int32_t>();
  // One group per task; within a group a dense histogram for large groups, a sort for small.
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> hist;
    std::vector<uint16_t> sorted;
    for (int64_t g = begin; g < end; ++g) {
      const uint16_t* src = bits + g * m;
      int32_t* s_row = slot_out + g * cap;
      int32_t* c_row = count_out + g * cap;
      int64_t u = 0;
      if (m >= kDenseMapMinGroup) {
        hist.assign(65536, 0);
        for (int64_t i = 0; i < m; ++i) ++hist[src[i]];
        for (int32_t s = 0; s < 65536; ++s) {
          if (hist[s] != 0) {
            s_row[u] = s;
            c_row[u] = hist[s];
            ++u;
          }
        }
      } else {
        sorted.assign(src, src + m);
        std::sort(sorted.begin(), sorted.end());
        for (int64_t i = 0; i < m; ++i) {
          if (u > 0 && s_row[u - 1] == sorted[i]) {
            ++c_row[u - 1];
          } else {
            s_row[u] = sorted[i];
            c_row[u] = 1;
            ++u;
          }
        }
      }
      for (; u < cap; ++u) {
        s_row[u] = kEmptySlot;
        c_row[u] = 0;
      }
    }
  });
  return {slots, counts};
}

at::Tensor slot_gather_cpu(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& table) {
  const char* op = "_slot_gather";
  check_slot_args(op, weight, slots);
  check_slot_table_values(op, slots, table, "table");
  auto t = table.contiguous();
  auto out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "_slot_gather", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "_slot_gather_out", [&] {
      using out_t = scalar_t;
      out_t* dst = out.mutable_data_ptr<out_t>();
      for_each_slot(weight, slots, [&](int64_t i, int64_t u) { dst[i] = static_cast<out_t>(src[u]); });
    });
  });
  return out;
}

at::Tensor slot_scatter_add_cpu(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad) {
  const char* op = "_slot_scatter_add";
  check_slot_args(op, weight, slots);
  check_slot_grad_input(op, weight, grad);
  auto g = grad.contiguous();
  const int64_t groups = slots.size(0), cap = slots.size(1), m = weight.numel() / groups;
  // Accumulate in double, one group at a time in element order: the same bits on every run,
  // whatever the thread count.
  auto sums = at::zeros({groups, cap}, weight.options().dtype(at::kDouble));
  double* acc = sums.mutable_data_ptr<double>();
  const uint16_t* bits = bits_of(weight);
  const int32_t* table = slots.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "_slot_scatter_add", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    std::atomic<bool> missing{false};
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> map;
      for (int64_t gi = begin; gi < end; ++gi) {
        const int32_t* row = table + gi * cap;
        double* out = acc + gi * cap;
        const uint16_t* b = bits + gi * m;
        const scalar_t* x = src + gi * m;
        if (m >= kDenseMapMinGroup) {
          map.assign(65536, -1);
          for (int64_t u = 0; u < cap && row[u] != kEmptySlot; ++u) {
            if (row[u] < 0 || row[u] >= 65536) {  // not a bit pattern: report, never index
              missing = true;
              return;
            }
            map[row[u]] = static_cast<int32_t>(u);
          }
          for (int64_t i = 0; i < m; ++i) {
            const int32_t u = map[b[i]];
            if (u < 0) {
              missing = true;
              return;
            }
            out[u] += static_cast<double>(x[i]);
          }
        } else {
          // Small groups: the same map, set and cleared per group (O(U + M), see for_each_slot).
          if (map.size() != 65536) map.assign(65536, -1);
          int64_t used = 0;
          bool bad = false;
          for (; used < cap && row[used] != kEmptySlot; ++used) {
            if (row[used] < 0 || row[used] >= 65536) {
              bad = true;
              break;
            }
            map[row[used]] = static_cast<int32_t>(used);
          }
          for (int64_t i = 0; i < m && !bad; ++i) {
            const int32_t u = map[b[i]];
            if (u < 0) {
              bad = true;
              break;
            }
            out[u] += static_cast<double>(x[i]);
          }
          for (int64_t u = 0; u < used; ++u) map[row[u]] = -1;
          if (bad) {
            missing = true;
            return;
          }
        }
      }
    });
    if (missing) missing_slot();
  });
  return sums.to(compute_dtype(grad.scalar_type()));
}

// out_i = grad_i * scale[u(i)] + shift[u(i)]; out may be grad itself (each i reads, then writes).
void slot_grad_into(const char* op, const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& g,
                    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_slot_table_values(op, slots, scale, "scale");
  check_slot_table_values(op, slots, shift, "shift");
  TORCH_CHECK_TYPE(scale.scalar_type() == shift.scalar_type(), op,
                   ": scale and shift must have the same dtype, got ", scale.scalar_type(), " and ",
                   shift.scalar_type());
  auto sc = scale.contiguous(), sh = shift.contiguous();
  AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "_slot_grad", [&] {
    using acc_t = scalar_t;
    const acc_t* a = sc.const_data_ptr<acc_t>();
    const acc_t* b = sh.const_data_ptr<acc_t>();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "_slot_grad_out", [&] {
      const scalar_t* x = g.const_data_ptr<scalar_t>();
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      for_each_slot(weight, slots, [&](int64_t i, int64_t u) {
        dst[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * a[u] + b[u]);
      });
    });
  });
}

at::Tensor slot_grad_cpu(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                         const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "_slot_grad";
  check_slot_args(op, weight, slots);
  check_slot_grad_input(op, weight, grad);
  auto g = grad.contiguous().to(weight.scalar_type());
  auto out = at::empty_like(weight);
  slot_grad_into(op, weight, slots, g, scale, shift, out);
  return out;
}

void slot_grad_inplace_cpu(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                           const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "_slot_grad_";
  check_slot_args(op, weight, slots);
  check_slot_grad_inplace(op, weight, grad);
  slot_grad_into(op, weight, slots, grad, scale, shift, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CPU, m) {
  m.impl("_slot_table", &slot_table_cpu);
  m.impl("_slot_gather", &slot_gather_cpu);
  m.impl("_slot_scatter_add", &slot_scatter_add_cpu);
  m.impl("_slot_grad", &slot_grad_cpu);
  m.impl("_slot_grad_", &slot_grad_inplace_cpu);
}

}  // namespace edkm
