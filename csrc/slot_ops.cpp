// Dispatcher entry points of the slot primitives and their generic ATen implementation
// (registered as CompositeExplicitAutograd: serves any device without its own kernel).
#include "slot_ops.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace edkm {

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Slot of every weight as int32 in [0, 65535], viewed [G, M].
at::Tensor slots_of(const at::Tensor& weight, int64_t groups) {
  return weight.view(at::kShort).to(at::kInt).bitwise_and(0xFFFF).view({groups, -1});
}

// u(i) for every weight, int64 [G, M], by binary search in the sorted slot rows.
at::Tensor index_of(const at::Tensor& weight, const at::Tensor& slots) {
  auto s = slots_of(weight, slots.size(0)).contiguous();
  auto u = at::searchsorted(slots, s);
  auto found = slots.gather(1, u.clamp_max(slots.size(1) - 1)).eq(s).all().item<bool>();
  TORCH_CHECK_VALUE(found,
                    "edkm: weight holds values missing from its slot table (was the "
                    "weight modified after the forward pass?)");
  return u;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> slot_table(const at::Tensor& weight, int64_t groups) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>("edkm::_slot_table");
  return h.call(weight, groups);
}
at::Tensor slot_gather(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& table) {
  static auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("edkm::_slot_gather");
  return h.call(weight, slots, table);
}
at::Tensor slot_scatter_add(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad) {
  static auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("edkm::_slot_scatter_add");
  return h.call(weight, slots, grad);
}
at::Tensor slot_grad(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                     const at::Tensor& scale, const at::Tensor& shift) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>("edkm::_slot_grad");
  return h.call(weight, slots, grad, scale, shift);
}
void slot_grad_(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                const at::Tensor& scale, const at::Tensor& shift) {
  static auto h =
      op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "edkm::_slot_grad_");
  h.call(weight, slots, grad, scale, shift);
}

void check_slot_table_values(const char* op, const at::Tensor& slots, const at::Tensor& table,
                             const char* name) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.sizes() == slots.sizes(), op, ": ", name, " must have slots' shape ", slots.sizes(),
                    ", got ", table.sizes());
  TORCH_CHECK_VALUE(table.device() == slots.device(), op, ": ", name, " must be on slots' device (",
                    slots.device(), "), got ", table.device());
}

void check_slot_grad_input(const char* op, const at::Tensor& weight, const at::Tensor& grad) {
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), op, ": grad must have weight's shape ", weight.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.is_floating_point(), op, ": grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == weight.device(), op, ": grad must be on weight's device (",
                    weight.device(), "), got ", grad.device());
}

void check_slot_grad_inplace(const char* op, const at::Tensor& weight, const at::Tensor& grad) {
  check_slot_grad_input(op, weight, grad);
  TORCH_CHECK_TYPE(grad.scalar_type() == weight.scalar_type(), op, ": grad must have weight's dtype (",
                   weight.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.is_contiguous(), op, ": grad must be contiguous");
  // grad is written while weight's bits are read: they must not share memory.
  const auto overlap = at::get_overlap_status(grad, weight);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                    ": grad must not share memory with weight");
}

namespace generic {

std::tuple<at::Tensor, at::Tensor> slot_table(const at::Tensor& weight, int64_t groups) {
  const char* op = "_slot_table";
  check_slot_table_args(op, weight, groups);
  auto w = weight.contiguous();
  const int64_t cap = slot_capacity(w.numel() / groups);
  auto sorted = std::get<0>(slots_of(w, groups).sort(1));
  auto starts = at::ones_like(sorted, sorted.options().dtype(at::kBool));
  if (sorted.size(1) > 1) {
    starts.narrow(1, 1, sorted.size(1) - 1)
        .copy_(sorted.narrow(1, 1, sorted.size(1) - 1).ne(sorted.narrow(1, 0, sorted.size(1) - 1)));
  }
  auto position = starts.to(at::kLong).cumsum(1) - 1;
  auto slots = at::full({groups, cap}, kEmptySlot, sorted.options());
  slots.scatter_(1, position, sorted);
  auto counts = at::zeros({groups, cap}, sorted.options());
  counts.scatter_add_(1, position, at::ones_like(sorted));
  return {slots, counts};
}

at::Tensor slot_gather(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& table) {
  check_slot_args("_slot_gather", weight, slots);
  check_slot_table_values("_slot_gather", slots, table, "table");
  auto u = index_of(weight, slots);
  return table.gather(1, u).to(weight.scalar_type()).view(weight.sizes());
}

at::Tensor slot_scatter_add(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad) {
  check_slot_args("_slot_scatter_add", weight, slots);
  check_slot_grad_input("_slot_scatter_add", weight, grad);
  auto u = index_of(weight, slots);
  auto ct = compute_dtype(grad.scalar_type());
  auto sums = at::zeros(slots.sizes(), grad.options().dtype(ct));
  return sums.scatter_add_(1, u, grad.reshape({slots.size(0), -1}).to(ct));
}

at::Tensor slot_grad(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                     const at::Tensor& scale, const at::Tensor& shift) {
  check_slot_args("_slot_grad", weight, slots);
  check_slot_grad_input("_slot_grad", weight, grad);
  check_slot_table_values("_slot_grad", slots, scale, "scale");
  check_slot_table_values("_slot_grad", slots, shift, "shift");
  auto u = index_of(weight, slots);
  auto g = grad.reshape({slots.size(0), -1}).to(scale.scalar_type());
  return (g * scale.gather(1, u) + shift.gather(1, u)).to(weight.scalar_type()).view(weight.sizes());
}

void slot_grad_(const at::Tensor& weight, const at::Tensor& slots, const at::Tensor& grad,
                const at::Tensor& scale, const at::Tensor& shift) {
  check_slot_args("_slot_grad_", weight, slots);
  check_slot_grad_inplace("_slot_grad_", weight, grad);
  grad.copy_(slot_grad(weight, slots, grad, scale, shift));
}

}  // namespace generic

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("_slot_table", &generic::slot_table);
  m.impl("_slot_gather", &generic::slot_gather);
  m.impl("_slot_scatter_add", &generic::slot_scatter_add);
  m.impl("_slot_grad", &generic::slot_grad);
  m.impl("_slot_grad_", &generic::slot_grad_);
}

}  // namespace edkm
