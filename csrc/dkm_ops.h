// Dispatcher calls of dkm's internal ops, shared by the autograd functions and composite ops.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace edkm {
namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkm_forward(
    const at::Tensor& weight, const at::Tensor& centroids, double temperature, int64_t max_iter,
    double epsilon, c10::string_view distance);

std::tuple<at::Tensor, at::Tensor> dkm_backward(const at::Tensor& grad_clustered,
                                                const at::Tensor& grad_centroids, const at::Tensor& weight,
                                                const at::Tensor& lookup, const at::Tensor& values,
                                                const at::Tensor& counts, const at::Tensor& history,
                                                const at::Tensor& iterations, double temperature,
                                                c10::string_view distance, at::ScalarType centroids_dtype);

// dkm_backward writing the weight's gradient over grad_clustered (contiguous, weight's dtype);
// returns the centroids' gradient.
at::Tensor dkm_backward_(const at::Tensor& grad_clustered, const at::Tensor& grad_centroids,
                         const at::Tensor& weight, const at::Tensor& lookup, const at::Tensor& values,
                         const at::Tensor& counts, const at::Tensor& history, const at::Tensor& iterations,
                         double temperature, c10::string_view distance, at::ScalarType centroids_dtype);

at::Tensor dkm_recompute(const at::Tensor& weight, const at::Tensor& lookup, const at::Tensor& values,
                         const at::Tensor& counts, const at::Tensor& history, const at::Tensor& iterations,
                         double temperature, c10::string_view distance);

// The N-domain (csrc/cpu/ndomain_kernel.cpp): clustered, centroids_out, iterations, history.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ndomain_forward(const at::Tensor& weight,
                                                                           const at::Tensor& centroids,
                                                                           double temperature,
                                                                           int64_t max_iter, double epsilon,
                                                                           c10::string_view distance);

std::tuple<at::Tensor, at::Tensor> ndomain_backward(const at::Tensor& grad_clustered,
                                                    const at::Tensor& grad_centroids,
                                                    const at::Tensor& weight, const at::Tensor& history,
                                                    const at::Tensor& iterations, double temperature,
                                                    c10::string_view distance,
                                                    at::ScalarType centroids_dtype);

at::Tensor ndomain_recompute(const at::Tensor& weight, const at::Tensor& history,
                             const at::Tensor& iterations, double temperature, c10::string_view distance);

}  // namespace ops

void check_dkm_linear_args(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias);

}  // namespace edkm
