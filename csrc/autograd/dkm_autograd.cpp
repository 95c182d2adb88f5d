// dkm's autograd: saves only the U-domain tables, or for small groups on CPU only the centroid
// history (ndomain.h), references the weight, and calls the registered backward op, so torch.compile sees
// both halves as ops.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/saved_tables.h"
#include "dkm_ops.h"
#include "ndomain.h"

namespace edkm {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DkmFunction : public torch::autograd::Function<DkmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& centroids,
                               double temperature, int64_t max_iter, double epsilon,
                               c10::string_view distance, bool recorded) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["distance"] = std::string(distance);
    ctx->saved_data["centroids_dtype"] = static_cast<int64_t>(centroids.scalar_type());
    ctx->saved_data["ndomain"] = ndomain_applies(weight, centroids);
    if (ctx->saved_data["ndomain"].toBool()) {
      // Small groups: only the centroid history is saved (the weight is referenced).
      auto [clustered, centroids_out, iterations, history] =
          ops::ndomain_forward(weight, centroids, temperature, max_iter, epsilon, distance);
      ctx->save_for_backward({weight, history, iterations});
      ctx->mark_non_differentiable({iterations});
      return {clustered, centroids_out, iterations};
    }
    auto [clustered, centroids_out, iterations, lookup, values, counts, history] =
        ops::dkm_forward(weight, centroids, temperature, max_iter, epsilon, distance);
    if (recorded) narrow_saved_tables(lookup, values, counts, centroids.size(1));
    ctx->save_for_backward({weight, lookup, values, counts, history, iterations});
    ctx->mark_non_differentiable({iterations});
    return {clustered, centroids_out, iterations};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto distance = ctx->saved_data["distance"].toStringRef();
    if (ctx->saved_data["ndomain"].toBool()) {
      auto [grad_weight, grad_centroids] = ops::ndomain_backward(
          grads[0], grads[1], saved[0], saved[1], saved[2], ctx->saved_data["temperature"].toDouble(),
          distance, static_cast<at::ScalarType>(ctx->saved_data["centroids_dtype"].toInt()));
      return {grad_weight,  grad_centroids, at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(),   at::Tensor()};
    }
    auto [grad_weight, grad_centroids] =
        ops::dkm_backward(grads[0], grads[1], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                          ctx->saved_data["temperature"].toDouble(), distance,
                          static_cast<at::ScalarType>(ctx->saved_data["centroids_dtype"].toInt()));
    return {grad_weight,  grad_centroids, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(),   at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_autograd(const at::Tensor& weight,
                                                            const at::Tensor& centroids, double temperature,
                                                            int64_t max_iter, double epsilon,
                                                            c10::string_view distance) {
  // Whether autograd records this call (the saved tables are then worth narrowing): decided
  // here, where the caller's grad mode is still in force.
  const bool recorded = at::GradMode::is_enabled() && (weight.requires_grad() || centroids.requires_grad());
  auto out = DkmFunction::apply(weight, centroids, temperature, max_iter, epsilon, distance, recorded);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, Autograd, m) { m.impl("dkm", &dkm_autograd); }

}  // namespace edkm
