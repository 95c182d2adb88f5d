// dkm_linear below autograd: cluster the weight, then an ordinary linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "dkm_ops.h"

namespace edkm {

namespace {

void check_linear_args(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  const char* op = "dkm_linear";
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == weight.size(1), op,
                    ": input's last dimension must be in_features = ", weight.size(1), ", got shape ",
                    input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type(), op, ": input must have weight's dtype (",
                   weight.scalar_type(), "), got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.device() == weight.device(), op, ": input must be on weight's device (",
                    weight.device(), "), got ", input.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                      weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), op, ": bias must have weight's dtype (",
                     weight.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == weight.device(), op, ": bias must be on weight's device");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_linear_no_grad(const at::Tensor& input,
                                                                  const at::Tensor& weight,
                                                                  const at::Tensor& centroids,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  double temperature, int64_t max_iter,
                                                                  double epsilon, c10::string_view distance) {
  check_linear_args(input, weight, bias);
  auto fwd = ops::dkm_forward(weight, centroids, temperature, max_iter, epsilon, distance);
  auto output = at::linear(input, std::get<0>(fwd), bias);
  return {output, std::get<1>(fwd), std::get<2>(fwd)};
}

}  // namespace

void check_dkm_linear_args(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, bias);
}

TORCH_LIBRARY_IMPL(edkm, CompositeExplicitAutograd, m) { m.impl("dkm_linear", &dkm_linear_no_grad); }

}  // namespace edkm
