// dkm_linear's autograd: saves the input (as nn.Linear does) and the U-domain tables, not the
// clustered weight; backward rebuilds the clustered weight with one gather, then runs the
// linear's and dkm's backward, writing the weight's gradient over the clustered weight's.
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/saved_tables.h"
#include "dkm_ops.h"
#include "ndomain.h"

namespace edkm {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DkmLinearFunction : public torch::autograd::Function<DkmLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& centroids, const c10::optional<at::Tensor>& bias,
                               double temperature, int64_t max_iter, double epsilon,
                               c10::string_view distance, bool recorded) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const c10::optional<at::Tensor> maybe_bias = bias.has_value() && bias->defined() ? bias : c10::nullopt;
    check_dkm_linear_args(input, weight, maybe_bias);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["distance"] = std::string(distance);
    ctx->saved_data["centroids_dtype"] = static_cast<int64_t>(centroids.scalar_type());
    ctx->saved_data["has_bias"] = maybe_bias.has_value();
    ctx->saved_data["ndomain"] = ndomain_applies(weight, centroids);
    if (ctx->saved_data["ndomain"].toBool()) {
      // Small groups: the centroid history is all that is saved; backward recomputes the
      // clustered weight from it.
      auto [clustered, centroids_out, iterations, history] =
          ops::ndomain_forward(weight, centroids, temperature, max_iter, epsilon, distance);
      auto output = at::linear(input, clustered, maybe_bias);
      ctx->save_for_backward({input, weight, history, iterations});
      ctx->mark_non_differentiable({iterations});
      return {output, centroids_out, iterations};
    }
    auto [clustered, centroids_out, iterations, lookup, values, counts, history] =
        ops::dkm_forward(weight, centroids, temperature, max_iter, epsilon, distance);
    auto output = at::linear(input, clustered, maybe_bias);
    if (recorded) narrow_saved_tables(lookup, values, counts, centroids.size(1));
    ctx->save_for_backward({input, weight, lookup, values, counts, history, iterations});
    ctx->mark_non_differentiable({iterations});
    return {output, centroids_out, iterations};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const auto distance = ctx->saved_data["distance"].toStringRef();
    at::Tensor grad_input, grad_clustered, grad_bias;
    const auto& grad_output = grads[0];
    const bool ndomain = ctx->saved_data["ndomain"].toBool();
    if (grad_output.defined()) {
      auto clustered = ndomain ? ops::ndomain_recompute(weight, saved[2], saved[3], temperature, distance)
                               : ops::dkm_recompute(weight, saved[2], saved[3], saved[4], saved[5], saved[6],
                                                    temperature, distance);
      auto g2 = grad_output.reshape({-1, weight.size(0)});
      grad_input = grad_output.matmul(clustered);
      clustered.reset();  // weight-sized: free it before the weight's gradient is allocated
      grad_clustered = g2.t().mm(input.reshape({-1, weight.size(1)}));
      if (ctx->saved_data["has_bias"].toBool()) grad_bias = g2.sum(0);
    }
    const auto centroids_dtype = static_cast<at::ScalarType>(ctx->saved_data["centroids_dtype"].toInt());
    at::Tensor grad_weight, grad_centroids;
    if (ndomain) {
      std::tie(grad_weight, grad_centroids) = ops::ndomain_backward(
          grad_clustered, grads[1], weight, saved[2], saved[3], temperature, distance, centroids_dtype);
    } else if (grad_clustered.defined() && grad_clustered.scalar_type() == weight.scalar_type() &&
               grad_clustered.is_contiguous() && !grad_clustered.requires_grad()) {
      // grad_clustered is ours: the weight's gradient is written over it (no second buffer).
      // Not under create_graph (grad_clustered then has a history the in-place write would
      // falsify); that goes the out-of-place way, whose ops have no double backward.
      grad_centroids = ops::dkm_backward_(grad_clustered, grads[1], weight, saved[2], saved[3], saved[4],
                                          saved[5], saved[6], temperature, distance, centroids_dtype);
      grad_weight = std::move(grad_clustered);
    } else {
      std::tie(grad_weight, grad_centroids) =
          ops::dkm_backward(grad_clustered, grads[1], weight, saved[2], saved[3], saved[4], saved[5],
                            saved[6], temperature, distance, centroids_dtype);
    }
    return {grad_input,   grad_weight,  grad_centroids, grad_bias,   at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(),   at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_linear_autograd(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& centroids,
    const c10::optional<at::Tensor>& bias, double temperature, int64_t max_iter, double epsilon,
    c10::string_view distance) {
  // Whether autograd records this call (the saved tables are then worth narrowing): decided
  // here, where the caller's grad mode is still in force.
  const bool recorded = at::GradMode::is_enabled() &&
                        (input.requires_grad() || weight.requires_grad() || centroids.requires_grad() ||
                         (bias.has_value() && bias->defined() && bias->requires_grad()));
  auto out = DkmLinearFunction::apply(input, weight, centroids, bias, temperature, max_iter, epsilon,
                                      distance, recorded);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, Autograd, m) { m.impl("dkm_linear", &dkm_linear_autograd); }

}  // namespace edkm
