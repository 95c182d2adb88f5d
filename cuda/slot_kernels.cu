// CUDA kernels of the slot primitives that write or read every weight (gather, scatter-add,
// gradient). Each weight finds its slot by binary search in its group's sorted row (<= 16
// probes, the row stays in L2). _slot_table uses the generic sort-based version for now.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "slot_ops.h"

namespace edkm {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t find_slot(const int32_t* row, int64_t cap, int32_t s) {
  int64_t lo = 0, hi = cap;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (row[mid] < s) lo = mid + 1;
    else hi = mid;
  }
  return (lo < cap && row[lo] == s) ? lo : -1;
}

int blocks_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
}

void raise_if_missing(const at::Tensor& missing) {
  TORCH_CHECK_VALUE(missing.item<int32_t>() == 0,
                    "edkm: weight holds values missing from its slot table (was the weight "
                    "modified after the forward pass?)");
}

template <typename table_t, typename out_t>
__global__ void slot_gather_kernel(const uint16_t* __restrict__ bits,
                                   const int32_t* __restrict__ slots,
                                   const table_t* __restrict__ table, out_t* __restrict__ out,
                                   int64_t n, int64_t m, int64_t cap, int32_t* missing) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / m;
    const int64_t u = find_slot(slots + g * cap, cap, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    out[i] = static_cast<out_t>(table[g * cap + u]);
  }
}

template <typename grad_t>
__global__ void slot_scatter_add_kernel(const uint16_t* __restrict__ bits,
                                        const int32_t* __restrict__ slots,
                                        const grad_t* __restrict__ grad, double* __restrict__ sums,
                                        int64_t n, int64_t m, int64_t cap, int32_t* missing) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / m;
    const int64_t u = find_slot(slots + g * cap, cap, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    atomicAdd(sums + g * cap + u, static_cast<double>(grad[i]));
  }
}

template <typename acc_t, typename out_t>
__global__ void slot_grad_kernel(const uint16_t* __restrict__ bits,
                                 const int32_t* __restrict__ slots,
                                 const out_t* __restrict__ grad, const acc_t* __restrict__ scale,
                                 const acc_t* __restrict__ shift, out_t* __restrict__ out,
                                 int64_t n, int64_t m, int64_t cap, int32_t* missing) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / m;
    const int64_t u = find_slot(slots + g * cap, cap, bits[i]);
    if (u < 0) {
      *missing = 1;
      continue;
    }
    out[i] = static_cast<out_t>(static_cast<acc_t>(grad[i]) * scale[g * cap + u] +
                                shift[g * cap + u]);
  }
}

const uint16_t* bits_of(const at::Tensor& weight) {
  return reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
}

at::Tensor slot_gather_cuda(const at::Tensor& weight, const at::Tensor& slots,
                            const at::Tensor& table) {
  const char* op = "_slot_gather";
  check_slot_args(op, weight, slots);
  check_slot_table_values(op, slots, table, "table");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto t = table.contiguous();
  auto out = at::empty_like(weight);
  auto missing = at::zeros({}, weight.options().dtype(at::kInt));
  const int64_t n = weight.numel(), cap = slots.size(1), m = n / slots.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "_slot_gather", [&] {
    using table_t = scalar_t;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "_slot_gather_out", [&] {
      slot_gather_kernel<table_t, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          bits_of(weight), slots.const_data_ptr<int32_t>(), t.const_data_ptr<table_t>(),
          out.mutable_data_ptr<scalar_t>(), n, m, cap, missing.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  raise_if_missing(missing);
  return out;
}

at::Tensor slot_scatter_add_cuda(const at::Tensor& weight, const at::Tensor& slots,
                                 const at::Tensor& grad) {
  const char* op = "_slot_scatter_add";
  check_slot_args(op, weight, slots);
  check_slot_grad_input(op, weight, grad);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto g = grad.contiguous();
  auto sums = at::zeros(slots.sizes(), weight.options().dtype(at::kDouble));
  auto missing = at::zeros({}, weight.options().dtype(at::kInt));
  const int64_t n = weight.numel(), cap = slots.size(1), m = n / slots.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "_slot_scatter_add", [&] {
    slot_scatter_add_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        bits_of(weight), slots.const_data_ptr<int32_t>(), g.const_data_ptr<scalar_t>(),
        sums.mutable_data_ptr<double>(), n, m, cap, missing.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_if_missing(missing);
  return sums.to(compute_dtype(grad.scalar_type()));
}

at::Tensor slot_grad_cuda(const at::Tensor& weight, const at::Tensor& slots,
                          const at::Tensor& grad, const at::Tensor& scale,
                          const at::Tensor& shift) {
  const char* op = "_slot_grad";
  check_slot_args(op, weight, slots);
  check_slot_grad_input(op, weight, grad);
  check_slot_table_values(op, slots, scale, "scale");
  check_slot_table_values(op, slots, shift, "shift");
  TORCH_CHECK_TYPE(scale.scalar_type() == shift.scalar_type(), op,
                   ": scale and shift must have the same dtype, got ", scale.scalar_type(),
                   " and ", shift.scalar_type());
  const c10::cuda::CUDAGuard guard(weight.device());
  auto g = grad.contiguous().to(weight.scalar_type());
  auto sc = scale.contiguous(), sh = shift.contiguous();
  auto out = at::empty_like(weight);
  auto missing = at::zeros({}, weight.options().dtype(at::kInt));
  const int64_t n = weight.numel(), cap = slots.size(1), m = n / slots.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "_slot_grad", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "_slot_grad_out", [&] {
      slot_grad_kernel<acc_t, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          bits_of(weight), slots.const_data_ptr<int32_t>(), g.const_data_ptr<scalar_t>(),
          sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
          n, m, cap, missing.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  raise_if_missing(missing);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CUDA, m) {
  m.impl("_slot_gather", &slot_gather_cuda);
  m.impl("_slot_scatter_add", &slot_scatter_add_cuda);
  m.impl("_slot_grad", &slot_grad_cuda);
}

}  // namespace edkm
