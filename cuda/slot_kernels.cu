// CUDA kernels of the slot primitives of dkm's 16-bit path: the slot table (histogram of bit
// patterns + compaction), and the three passes that read every weight: gather (forward),
// scatter-add and gradient (backward). Bytes each must move, per weight: table 2 (read bits);
// gather 2 + 2 (bits in, value out); scatter-add 2 + 2 (bits, grad); gradient 2 + 2 + 2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "settings.h"
#include "slot_lookup.cuh"
#include "slot_ops.h"
#include "slot_privatized.cuh"

namespace edkm {
namespace cuda {

constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0, "the warp-aggregated kernels run whole warps");

int blocks_for(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * 16)));
}

void raise_if_missing(const at::Tensor& missing) {
  TORCH_CHECK_VALUE(missing.item<int32_t>() == 0,
                    "edkm: weight holds values missing from its slot table (was the weight "
                    "modified after the forward pass?)");
}

namespace {

#define EDKM_GRID_STRIDE(i, n)                                              \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

const uint16_t* bits_of(const at::Tensor& weight) {
  return reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
}

__global__ void fill_map_kernel(const int32_t* __restrict__ slots, int32_t* __restrict__ map, int64_t groups,
                                int64_t cap) {
  EDKM_GRID_STRIDE(j, groups * cap) {
    const int32_t s = slots[j];
    // Padding (65536) and any out-of-range value stay unmapped: look-ups then report them.
    if (s >= 0 && s < 65536) map[(j / cap) * 65536 + s] = static_cast<int32_t>(j % cap);
  }
}

__global__ void histogram_kernel(const uint16_t* __restrict__ bits, int32_t* __restrict__ hist, int64_t n,
                                 int64_t group_size) {
  EDKM_GRID_STRIDE(i, n) { atomicAdd(hist + (i / group_size) * 65536 + bits[i], 1); }
}

__global__ void compact_kernel(const int32_t* __restrict__ hist, const int32_t* __restrict__ pos,
                               int32_t* __restrict__ slots, int32_t* __restrict__ counts, int64_t groups,
                               int64_t cap) {
  EDKM_GRID_STRIDE(j, groups * 65536) {
    const int32_t c = hist[j];
    if (c > 0) {
      const int64_t out = (j / 65536) * cap + pos[j] - 1;  // pos: inclusive prefix count
      slots[out] = static_cast<int32_t>(j % 65536);
      counts[out] = c;
    }
  }
}

template <typename table_t, typename out_t>
__global__ void gather_kernel(const uint16_t* __restrict__ bits, SlotLookup lookup,
                              const table_t* __restrict__ table, out_t* __restrict__ out, int64_t n,
                              int32_t* missing) {
  EDKM_GRID_STRIDE(i, n) {
    const int64_t u = lookup(i, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    out[i] = static_cast<out_t>(table[u]);
  }
}

// Deterministic: each term is rounded once to a fixed-point integer; integer addition is
// associative, so the sums do not depend on the order the atomics land in.
template <typename grad_t>
__global__ void scatter_fixed_kernel(const uint16_t* __restrict__ bits, SlotLookup lookup,
                                     const grad_t* __restrict__ grad, unsigned long long* __restrict__ sums,
                                     double scale, int64_t n, int32_t* missing) {
  EDKM_GRID_STRIDE(i, n) {
    const int64_t u = lookup(i, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    const long long q = __double2ll_rn(static_cast<double>(grad[i]) * scale);
    atomicAdd(sums + u, static_cast<unsigned long long>(q));
  }
}

template <typename grad_t>
__global__ void scatter_float_kernel(const uint16_t* __restrict__ bits, SlotLookup lookup,
                                     const grad_t* __restrict__ grad, double* __restrict__ sums, int64_t n,
                                     int32_t* missing) {
  EDKM_GRID_STRIDE(i, n) {
    const int64_t u = lookup(i, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    atomicAdd(sums + u, static_cast<double>(grad[i]));
  }
}

// out may be grad itself (the in-place variant): each thread reads grad[i], then writes out[i],
// so neither pointer is __restrict__.
template <typename acc_t, typename out_t>
__global__ void grad_kernel(const uint16_t* __restrict__ bits, SlotLookup lookup, const out_t* grad,
                            const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, out_t* out,
                            int64_t n, int32_t* missing) {
  EDKM_GRID_STRIDE(i, n) {
    const int64_t u = lookup(i, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    out[i] = static_cast<out_t>(static_cast<acc_t>(grad[i]) * scale[u] + shift[u]);
  }
}

std::tuple<at::Tensor, at::Tensor> slot_table_cuda(const at::Tensor& weight, int64_t groups) {
  const char* op = "_slot_table";
  check_slot_table_args(op, weight, groups);
  if (groups > kDenseMapMaxGroups) return generic::slot_table(weight, groups);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous();
  const int64_t n = w.numel(), m = n / groups, cap = slot_capacity(m);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto hist = at::zeros({groups, 65536}, w.options().dtype(at::kInt));
  if (n == 0) {
    // nothing to count
  } else if (privatized_slot_atomics() && at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin >=
                                              privatized::kHistogramSharedBytes) {
    const int64_t tiles = (m + privatized::kHistogramTile - 1) / privatized::kHistogramTile;
    C10_CUDA_CHECK(cudaFuncSetAttribute(privatized::histogram_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(privatized::kHistogramSharedBytes)));
    privatized::histogram_kernel<<<static_cast<unsigned>(groups * tiles), privatized::kHistogramThreads,
                                   privatized::kHistogramSharedBytes, stream>>>(
        bits_of(w), hist.mutable_data_ptr<int32_t>(), m, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    histogram_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        bits_of(w), hist.mutable_data_ptr<int32_t>(), n, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto pos = hist.gt(0).to(at::kInt).cumsum(1, at::kInt).contiguous();
  auto slots = at::full({groups, cap}, kEmptySlot, hist.options());
  auto counts = at::zeros({groups, cap}, hist.options());
  compact_kernel<<<blocks_for(groups * 65536, kThreads), kThreads, 0, stream>>>(
      hist.const_data_ptr<int32_t>(), pos.const_data_ptr<int32_t>(), slots.mutable_data_ptr<int32_t>(),
      counts.mutable_data_ptr<int32_t>(), groups, cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {slots, counts};
}

at::Tensor slot_gather_cuda(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& table) {
  const char* op = "_slot_gather";
  check_slot_args(op, weight, slots);
  check_slot_table_values(op, slots, table, "table");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto t = table.contiguous();
  auto out = at::empty_like(weight);
  auto missing = at::zeros({}, weight.options().dtype(at::kInt));
  at::Tensor map;
  const auto lookup = make_slot_lookup(weight, slots, map);
  const int64_t n = weight.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "_slot_gather", [&] {
    using table_t = scalar_t;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "_slot_gather_out", [&] {
      gather_kernel<table_t, scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          bits_of(weight), lookup, t.const_data_ptr<table_t>(), out.mutable_data_ptr<scalar_t>(), n,
          missing.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!slot_table_trusted()) raise_if_missing(missing);
  return out;
}

// One float64 or fixed-point atomic per weight; deterministic mode reads max |grad| (a sync).
at::Tensor global_scatter_add(const at::Tensor& weight, const at::Tensor& slots, const SlotLookup& lookup,
                              const at::Tensor& g, int64_t m, bool deterministic, const at::Tensor& missing) {
  const int64_t n = weight.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  const double amax = deterministic && n > 0 ? g.abs().max().item<double>() : 0.0;
  if (deterministic && std::isfinite(amax)) {
    const double scale = fixed_point_scale(amax, m);
    auto fixed = at::zeros(slots.sizes(), weight.options().dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "_slot_scatter_add", [&] {
      scatter_fixed_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          bits_of(weight), lookup, g.const_data_ptr<scalar_t>(),
          reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>()), scale, n,
          missing.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return fixed.to(at::kDouble).div_(scale);
  }
  // fast mode, or non-finite gradients (propagated as NaN/Inf like any sum)
  auto sums = at::zeros(slots.sizes(), weight.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "_slot_scatter_add", [&] {
    scatter_float_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        bits_of(weight), lookup, g.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<double>(), n,
        missing.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return sums;
}

// Warp-aggregated atomics; deterministic mode finds its scale on the device (no sync).
at::Tensor privatized_scatter_add(const at::Tensor& weight, const at::Tensor& slots, const SlotLookup& lookup,
                                  const at::Tensor& g, int64_t m, bool deterministic,
                                  const at::Tensor& missing) {
  const int64_t n = weight.numel();
  const int64_t groups = slots.size(0), cap = slots.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto opts = weight.options();
  if (!deterministic) {
    auto sums = at::zeros({groups, cap}, opts.dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "_slot_scatter_add", [&] {
      privatized::scatter_float_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          bits_of(weight), lookup, g.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<double>(), n,
          missing.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return sums;
  }
  auto amax = at::zeros({}, opts.dtype(at::kLong));
  auto fixed = at::zeros({groups, cap}, opts.dtype(at::kLong));
  auto special = at::zeros({groups, cap}, opts.dtype(at::kInt));
  auto sums = at::empty({groups, cap}, opts.dtype(at::kDouble));
  auto* amax_bits = reinterpret_cast<unsigned long long*>(amax.mutable_data_ptr<int64_t>());
  auto* fixed_sums = reinterpret_cast<unsigned long long*>(fixed.mutable_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "_slot_scatter_add", [&] {
    privatized::finite_amax_kernel<scalar_t>
        <<<blocks_for(n, kThreads), kThreads, 0, stream>>>(g.const_data_ptr<scalar_t>(), amax_bits, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    privatized::scatter_fixed_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        bits_of(weight), lookup, g.const_data_ptr<scalar_t>(), fixed_sums,
        special.mutable_data_ptr<int32_t>(), amax_bits, m, n, missing.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  privatized::fixed_to_double_kernel<<<blocks_for(groups * cap, kThreads), kThreads, 0, stream>>>(
      fixed_sums, special.const_data_ptr<int32_t>(), amax_bits, m, sums.mutable_data_ptr<double>(),
      groups * cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

at::Tensor slot_scatter_add_cuda(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad) {
  const char* op = "_slot_scatter_add";
  check_slot_args(op, weight, slots);
  check_slot_grad_input(op, weight, grad);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto g = grad.contiguous();
  auto missing = at::zeros({}, weight.options().dtype(at::kInt));
  at::Tensor map;
  const auto lookup = make_slot_lookup(weight, slots, map);
  const int64_t m = weight.numel() / slots.size(0);
  const auto ct = compute_dtype(grad.scalar_type());
  const bool deterministic = deterministic_scatter();  // read once: another thread may flip it
  at::Tensor sums;
  if (privatized_slot_atomics()) {
    sums = privatized_scatter_add(weight, slots, lookup, g, m, deterministic, missing);
  } else {
    sums = global_scatter_add(weight, slots, lookup, g, m, deterministic, missing);
  }
  raise_if_missing(missing);
  return sums.to(ct);
}

void slot_grad_into(const char* op, const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& g,
                    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_slot_table_values(op, slots, scale, "scale");
  check_slot_table_values(op, slots, shift, "shift");
  TORCH_CHECK_TYPE(scale.scalar_type() == shift.scalar_type(), op,
                   ": scale and shift must have the same dtype, got ", scale.scalar_type(), " and ",
                   shift.scalar_type());
  auto sc = scale.contiguous(), sh = shift.contiguous();
  auto missing = at::zeros({}, weight.options().dtype(at::kInt));
  at::Tensor map;
  const auto lookup = make_slot_lookup(weight, slots, map);
  const int64_t n = weight.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "_slot_grad", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "_slot_grad_out", [&] {
      grad_kernel<acc_t, scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          bits_of(weight), lookup, g.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
          sh.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n,
          missing.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!slot_table_trusted()) raise_if_missing(missing);
}

at::Tensor slot_grad_cuda(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                          const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "_slot_grad";
  check_slot_args(op, weight, slots);
  check_slot_grad_input(op, weight, grad);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto g = grad.contiguous().to(weight.scalar_type());
  auto out = at::empty_like(weight);
  slot_grad_into(op, weight, slots, g, scale, shift, out);
  return out;
}

void slot_grad_inplace_cuda(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                            const at::Tensor& scale, const at::Tensor& shift) {
  const char* op = "_slot_grad_";
  check_slot_args(op, weight, slots);
  check_slot_grad_inplace(op, weight, grad);
  const c10::cuda::CUDAGuard guard(weight.device());
  slot_grad_into(op, weight, slots, grad, scale, shift, grad);
}

}  // namespace

SlotLookup make_slot_lookup(const at::Tensor& weight, const at::Tensor& slots, at::Tensor& storage) {
  const int64_t groups = slots.size(0), cap = slots.size(1);
  SlotLookup lookup{nullptr, slots.const_data_ptr<int32_t>(), cap, weight.numel() / groups};
  if (groups <= kDenseMapMaxGroups) {
    storage = at::full({groups, 65536}, -1, slots.options());
    fill_map_kernel<<<blocks_for(groups * cap, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        slots.const_data_ptr<int32_t>(), storage.mutable_data_ptr<int32_t>(), groups, cap);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lookup.map = storage.const_data_ptr<int32_t>();
  }
  return lookup;
}

TORCH_LIBRARY_IMPL(edkm, CUDA, m) {
  m.impl("_slot_table", &slot_table_cuda);
  m.impl("_slot_gather", &slot_gather_cuda);
  m.impl("_slot_scatter_add", &slot_scatter_add_cuda);
  m.impl("_slot_grad", &slot_grad_cuda);
  m.impl("_slot_grad_", &slot_grad_inplace_cuda);
}

}  // namespace cuda
}  // namespace edkm
