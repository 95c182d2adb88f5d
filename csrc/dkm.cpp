// dkm below autograd, for any device: the weight's distinct values and their counts, DKM over
// them (udomain.cpp), and the N-element passes that map results back to every weight.
// 16-bit weights go through the slot primitives and save nothing N-sized; 32/64-bit weights
// take exact distinct values by sorting and save an int32 index.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "settings.h"
#include "slot_ops.h"
#include "udomain.h"

namespace edkm {

namespace {

struct DistinctValues {
  at::Tensor lookup;  // slots [G, Ucap] (16-bit) or int32 index [N]
  at::Tensor values;  // [G, Ucap] in the compute dtype
  at::Tensor counts;  // [G, Ucap] int32, 0 for padding
};

// Exact distinct values of each group by sorting: values/counts [G, M] padded, index [N].
DistinctValues sorted_distinct(const at::Tensor& weight, int64_t groups) {
  auto w = weight.reshape({groups, -1});
  auto [sorted, order] = w.sort(1);
  auto starts = at::ones_like(sorted, sorted.options().dtype(at::kBool));
  const int64_t m = sorted.size(1);
  if (m > 1) {
    starts.narrow(1, 1, m - 1).copy_(sorted.narrow(1, 1, m - 1).ne(sorted.narrow(1, 0, m - 1)));
  }
  auto position = starts.to(at::kLong).cumsum(1) - 1;
  auto values = at::zeros({groups, m}, sorted.options().dtype(compute_dtype(weight.scalar_type())));
  values.scatter_(1, position, sorted.to(values.scalar_type()));
  auto counts = at::zeros({groups, m}, sorted.options().dtype(at::kInt));
  counts.scatter_add_(1, position, at::ones_like(position, position.options().dtype(at::kInt)));
  auto index = at::empty({groups, m}, position.options().dtype(at::kInt));
  index.scatter_(1, order, position.to(at::kInt));
  return {index.view(-1), values, counts};
}

DistinctValues distinct_values(const at::Tensor& weight, int64_t groups) {
  if (!is_16bit(weight.scalar_type())) return sorted_distinct(weight, groups);
  auto [slots, counts] = slot_table(weight.contiguous(), groups);
  // Back from bit patterns to values; padding (65536) wraps to +0.0 and has count 0.
  auto values = slots.to(at::kShort).view(weight.scalar_type()).to(at::kFloat);
  return {slots, values, counts};
}

// Tables are padded to a static capacity (so shapes never depend on data); the arithmetic
// only needs the columns some group uses. Padding sits at the end of every row and has count
// 0, so computing over it changes nothing. Reading that width is a device sync: off the CPU it
// is read only where the padding would cost more than the sync (G x U x K above 2^22).
bool narrow_to_used(const at::Tensor& counts, int64_t k) {
  return counts.device().is_cpu() || counts.size(0) * counts.size(1) * k > (int64_t(1) << 22);
}

int64_t table_width(const at::Tensor& counts, int64_t k) {
  if (!narrow_to_used(counts, k)) return counts.size(1);
  return std::max<int64_t>(1, counts.gt(0).sum(1).max().item<int64_t>());
}

// The forward's checks (finite centroids, finite weight values) and the table width, read in
// one transfer: a single device sync per forward.
int64_t checked_width(const char* op, const at::Tensor& centroids, const at::Tensor& values,
                      const at::Tensor& counts) {
  const int64_t k = centroids.size(1);
  auto present = counts.gt(0);
  auto bad_centroids = at::logical_not(at::isfinite(centroids)).any();
  auto bad_values = at::logical_and(at::logical_not(at::isfinite(values)), present).any();
  auto used = narrow_to_used(counts, k)
                  ? present.sum(1).max().to(at::kLong)
                  : at::scalar_tensor(counts.size(1), counts.options().dtype(at::kLong));
  auto flags = at::stack({bad_centroids.to(at::kLong), bad_values.to(at::kLong), used}).cpu();
  const int64_t* f = flags.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(f[0] == 0, op, ": centroids contain NaN or Inf");
  TORCH_CHECK_VALUE(f[1] == 0, op, ": weight contains NaN or Inf");
  return std::max<int64_t>(1, f[2]);
}

at::Tensor pad_columns(const at::Tensor& t, int64_t columns) {
  if (t.size(1) == columns) return t;
  auto out = at::zeros({t.size(0), columns}, t.options());
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// history[T] with T read on the device.
at::Tensor final_centroids(const at::Tensor& history, const at::Tensor& iterations) {
  return history.index_select(0, iterations.to(at::kLong).view({1})).squeeze(0);
}

// Every weight's soft value F[u(i)], in weight's dtype and shape.
at::Tensor gather_soft(const at::Tensor& weight, const at::Tensor& lookup, const at::Tensor& soft) {
  if (is_16bit(weight.scalar_type())) return slot_gather(weight.contiguous(), lookup, soft);
  return soft.gather(1, lookup.view({soft.size(0), -1}).to(at::kLong))
      .to(weight.scalar_type())
      .view(weight.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkm_forward(
    const at::Tensor& weight, const at::Tensor& centroids, double temperature, int64_t max_iter,
    double epsilon, c10::string_view distance) {
  const char* op = "dkm";
  check_dkm_args(op, weight, centroids, temperature, max_iter, epsilon);
  const Distance dist = parse_distance(op, distance);
  const int64_t groups = centroids.size(0);
  const auto ct = compute_dtype(weight.scalar_type());

  auto distinct = distinct_values(weight, groups);
  const int64_t used = checked_width(op, centroids, distinct.values, distinct.counts);
  auto fwd = udomain_forward(distinct.values.narrow(1, 0, used), distinct.counts.narrow(1, 0, used).to(ct),
                             centroids.to(ct), temperature, max_iter, epsilon, dist);
  fwd.soft = pad_columns(fwd.soft, distinct.values.size(1));
  const TrustedSlotTable trusted;  // the table was built from this weight just above
  auto clustered = gather_soft(weight, distinct.lookup, fwd.soft);
  return {clustered,       fwd.centroids.to(centroids.scalar_type()),
          fwd.iterations,  distinct.lookup,
          distinct.values, distinct.counts,
          fwd.history};
}

// dkm's backward. With `in_place`, grad_clustered (contiguous, weight's dtype) is overwritten
// with the weight's gradient and returned as it; otherwise a new tensor is.
std::tuple<at::Tensor, at::Tensor> backward_impl(const char* op,
                                                 const c10::optional<at::Tensor>& grad_clustered,
                                                 const c10::optional<at::Tensor>& grad_centroids,
                                                 const at::Tensor& weight, const at::Tensor& lookup,
                                                 const at::Tensor& values, const at::Tensor& counts,
                                                 const at::Tensor& history, const at::Tensor& iterations,
                                                 double temperature, c10::string_view distance,
                                                 at::ScalarType centroids_dtype, bool in_place) {
  const Distance dist = parse_distance(op, distance);
  TORCH_CHECK_VALUE(history.dim() == 3 && values.dim() == 2 && counts.sizes() == values.sizes(), op,
                    ": saved tables have unexpected shapes");
  const int64_t groups = values.size(0);
  if (iterations.is_cpu()) {  // the saved tables are dkm's own; off the CPU, no sync to re-check
    const int64_t t = iterations.item<int64_t>();
    TORCH_CHECK_VALUE(t >= 1 && t < history.size(0), op, ": iterations out of range: ", t);
  }
  const auto ct = values.scalar_type();
  const bool half = is_16bit(weight.scalar_type());

  at::Tensor grad = grad_clustered.has_value() && grad_clustered->defined()
                        ? *grad_clustered
                        : at::zeros(weight.sizes(), weight.options());
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), op, ": grad_clustered must have weight's shape ",
                    weight.sizes(), ", got ", grad.sizes());
  if (in_place) {
    TORCH_CHECK_TYPE(grad.scalar_type() == weight.scalar_type(), op,
                     ": grad_clustered must have weight's dtype (", weight.scalar_type(), "), got ",
                     grad.scalar_type());
    TORCH_CHECK_VALUE(grad.is_contiguous(), op, ": grad_clustered must be contiguous");
  }
  at::Tensor index;  // 32/64-bit path
  at::Tensor grad_soft;
  if (half) {
    grad_soft = slot_scatter_add(weight.contiguous(), lookup, grad.contiguous()).to(ct);
  } else {
    index = lookup.view({groups, -1}).to(at::kLong);
    grad_soft =
        at::zeros(values.sizes(), values.options()).scatter_add_(1, index, grad.reshape({groups, -1}).to(ct));
  }
  at::Tensor gc_final;
  if (grad_centroids.has_value() && grad_centroids->defined()) gc_final = grad_centroids->to(ct);

  const int64_t used = table_width(counts, history.size(2));
  auto countsf = counts.narrow(1, 0, used).to(ct);
  auto bwd = udomain_backward(values.narrow(1, 0, used), countsf, history, iterations, temperature, dist,
                              grad_soft.narrow(1, 0, used), gc_final);
  // Each weight of value v_u owns 1/n_u of the gradient that reaches v_u through the centroids.
  auto shift = at::where(countsf.gt(0), bwd.indirect / countsf.clamp_min(1), at::zeros_like(countsf));
  shift = pad_columns(shift, values.size(1));
  bwd.direct = pad_columns(bwd.direct, values.size(1));
  at::Tensor grad_weight;
  const TrustedSlotTable trusted;  // the scatter-add above checked this weight against lookup
  if (half && in_place) {
    slot_grad_(weight.contiguous(), lookup, grad, bwd.direct, shift);
    grad_weight = grad;
  } else if (half) {
    grad_weight = slot_grad(weight.contiguous(), lookup, grad.contiguous(), bwd.direct, shift);
  } else {
    auto g = grad.reshape({groups, -1}).to(ct);
    grad_weight = (g * bwd.direct.gather(1, index) + shift.gather(1, index))
                      .to(weight.scalar_type())
                      .view(weight.sizes());
    if (in_place) grad_weight = grad.copy_(grad_weight);
  }
  return {grad_weight, bwd.centroids.to(centroids_dtype)};
}

std::tuple<at::Tensor, at::Tensor> dkm_backward(const c10::optional<at::Tensor>& grad_clustered,
                                                const c10::optional<at::Tensor>& grad_centroids,
                                                const at::Tensor& weight, const at::Tensor& lookup,
                                                const at::Tensor& values, const at::Tensor& counts,
                                                const at::Tensor& history, const at::Tensor& iterations,
                                                double temperature, c10::string_view distance,
                                                at::ScalarType centroids_dtype) {
  return backward_impl("dkm backward", grad_clustered, grad_centroids, weight, lookup, values, counts,
                       history, iterations, temperature, distance, centroids_dtype,
                       /*in_place=*/false);
}

at::Tensor dkm_backward_inplace(const at::Tensor& grad_clustered,
                                const c10::optional<at::Tensor>& grad_centroids, const at::Tensor& weight,
                                const at::Tensor& lookup, const at::Tensor& values, const at::Tensor& counts,
                                const at::Tensor& history, const at::Tensor& iterations, double temperature,
                                c10::string_view distance, at::ScalarType centroids_dtype) {
  return std::get<1>(backward_impl("dkm backward", grad_clustered, grad_centroids, weight, lookup, values,
                                   counts, history, iterations, temperature, distance, centroids_dtype,
                                   /*in_place=*/true));
}

// The clustered weight again from the saved tables (one U-domain step and one gather), for
// layers that recompute it in backward instead of keeping it.
at::Tensor dkm_recompute(const at::Tensor& weight, const at::Tensor& lookup, const at::Tensor& values,
                         const at::Tensor& counts, const at::Tensor& history, const at::Tensor& iterations,
                         double temperature, c10::string_view distance) {
  const char* op = "dkm recompute";
  const Distance dist = parse_distance(op, distance);
  TORCH_CHECK_VALUE(history.dim() == 3, op, ": saved history has unexpected shape ", history.sizes());
  if (iterations.is_cpu()) {
    const int64_t t = iterations.item<int64_t>();
    TORCH_CHECK_VALUE(t >= 1 && t < history.size(0), op, ": iterations out of range: ", t);
  }
  const int64_t used = table_width(counts, history.size(2));
  auto c = final_centroids(history, iterations);
  auto a = soft_attention(values.narrow(1, 0, used), c, temperature, dist);
  auto soft = pad_columns((a * c.unsqueeze(1)).sum(2), values.size(1));
  return gather_soft(weight, lookup, soft);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_no_grad(const at::Tensor& weight,
                                                           const at::Tensor& centroids, double temperature,
                                                           int64_t max_iter, double epsilon,
                                                           c10::string_view distance) {
  auto out = dkm_forward(weight, centroids, temperature, max_iter, epsilon, distance);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) {
  m.impl("dkm", &dkm_no_grad);
  m.impl("_dkm_forward", &dkm_forward);
  m.impl("_dkm_backward", &dkm_backward);
  m.impl("_dkm_backward_", &dkm_backward_inplace);
  m.impl("_dkm_recompute", &dkm_recompute);
}

}  // namespace edkm
