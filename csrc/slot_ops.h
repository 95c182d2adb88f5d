// The N-element passes of the 16-bit path, called through the dispatcher so each backend
// (CPU kernels in cpu/, CUDA kernels in ../cuda/, the generic ATen version otherwise) serves
// them. The weight is viewed as [G, M]; slot(w) = w's bit pattern as uint16; slots [G, Ucap] holds
// each group's distinct slots in ascending order, padded with kEmptySlot.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace edkm {

// Distinct slots per group and how often each occurs: (slots int32 [G, Ucap], counts int32).
std::tuple<at::Tensor, at::Tensor> slot_table(const at::Tensor& weight, int64_t groups);
// out_i = table[g, u(i)], in weight's dtype and shape.
at::Tensor slot_gather(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& table);
// sum of grad_i over the weights of each slot, [G, Ucap] in grad's compute dtype.
at::Tensor slot_scatter_add(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad);
// out_i = grad_i * scale[g, u(i)] + shift[g, u(i)], in weight's dtype and shape.
at::Tensor slot_grad(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                     const at::Tensor& scale, const at::Tensor& shift);
// slot_grad written over grad itself (contiguous, weight's dtype and shape): the weight's
// gradient without a second weight-sized buffer. On error grad's contents are unspecified.
void slot_grad_(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                const at::Tensor& scale, const at::Tensor& shift);

// Generic ATen implementations (any device): the fallback, and the cross-check for kernels.
namespace generic {
std::tuple<at::Tensor, at::Tensor> slot_table(const at::Tensor& weight, int64_t groups);
at::Tensor slot_gather(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& table);
at::Tensor slot_scatter_add(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad);
at::Tensor slot_grad(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                     const at::Tensor& scale, const at::Tensor& shift);
void slot_grad_(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                const at::Tensor& scale, const at::Tensor& shift);
}  // namespace generic

// Checks of table/grad arguments shared by every backend.
void check_slot_table_values(const char* op, const at::Tensor& slots, const at::Tensor& table,
                             const char* name);
void check_slot_grad_input(const char* op, const at::Tensor& weight, const at::Tensor& grad);
// grad as the output of an in-place pass: also contiguous and of weight's dtype.
void check_slot_grad_inplace(const char* op, const at::Tensor& weight, const at::Tensor& grad);

}  // namespace edkm
