#include "udomain.h"

#include <ATen/ATen.h>

#include "settings.h"

namespace edkm {

namespace {
UDomainForwardFn g_cuda_forward = nullptr;
UDomainBackwardFn g_cuda_backward = nullptr;

// The kernels take float32/float64 tables and K <= 256; anything else stays on the ATen path.
bool use_cuda_kernels(const at::Tensor& values, int64_t k) {
  const auto st = values.scalar_type();
  return values.is_cuda() && g_cuda_forward != nullptr && fused_udomain_cuda() && k <= 256 &&
         values.size(0) > 0 && (st == at::kFloat || st == at::kDouble);
}
}  // namespace

bool udomain_cuda_registered() { return g_cuda_forward != nullptr; }

void register_udomain_cuda(UDomainForwardFn forward, UDomainBackwardFn backward) {
  g_cuda_forward = forward;
  g_cuda_backward = backward;
}

namespace {
// d dist(v, c) / dv, [G, U, K].
at::Tensor distance_slope(const at::Tensor& diff, Distance distance) {
  return distance == Distance::kSquared ? diff * 2 : at::sign(diff);
}

at::Tensor differences(const at::Tensor& values, const at::Tensor& centroids) {
  return values.unsqueeze(2) - centroids.unsqueeze(1);
}

// Softmax backward: given a and dL/da, dL/ds.
at::Tensor softmax_grad(const at::Tensor& a, const at::Tensor& grad_a) {
  return a * (grad_a - (a * grad_a).sum(2, /*keepdim=*/true));
}
}  // namespace

at::Tensor soft_attention(const at::Tensor& values, const at::Tensor& centroids, double temperature,
                          Distance distance) {
  auto diff = differences(values, centroids);
  auto d = distance == Distance::kSquared ? diff * diff : diff.abs();
  return at::softmax(d * (-1.0 / temperature), 2);
}

at::Tensor update_centroids(const at::Tensor& attention, const at::Tensor& values, const at::Tensor& counts,
                            const at::Tensor& centroids) {
  auto weighted = attention * counts.unsqueeze(2);     // n_u a_uj
  auto num = (weighted * values.unsqueeze(2)).sum(1);  // [G, K]
  auto den = weighted.sum(1);
  auto attended = den > 0;
  auto safe_den = at::where(attended, den, at::ones_like(den));
  return at::where(attended, num / safe_den, centroids);
}

UDomainForward udomain_forward(const at::Tensor& values, const at::Tensor& counts,
                               const at::Tensor& centroids, double temperature, int64_t max_iter,
                               double epsilon, Distance distance) {
  if (udomain_fused_applies(values, counts, centroids)) {
    return udomain_forward_fused(values, counts, centroids, temperature, max_iter, epsilon, distance);
  }
  if (use_cuda_kernels(values, centroids.size(1))) {
    return g_cuda_forward(values, counts, centroids, temperature, max_iter, epsilon, distance);
  }
  // The early stop is decided on the device: every iteration runs, and once the centroids move
  // by <= epsilon they are held (c = where(done, c, next)), so history rows past T repeat c_T
  // and T counts the iterations that were not held. No .item(), no sync per iteration.
  auto history = at::empty({max_iter + 1, centroids.size(0), centroids.size(1)}, centroids.options());
  auto c = centroids;
  history[0].copy_(c);
  auto done = at::zeros({}, values.options().dtype(at::kBool));
  auto iterations = at::zeros({}, values.options().dtype(at::kLong));
  for (int64_t t = 0; t < max_iter; ++t) {
    auto a = soft_attention(values, c, temperature, distance);
    auto next = update_centroids(a, values, counts, c);
    auto move = (next - c).abs().amax();
    c = at::where(done, c, next);
    iterations = iterations + at::logical_not(done).to(at::kLong);
    done = at::logical_or(done, move.le(epsilon));
    history[t + 1].copy_(c);
  }
  auto a = soft_attention(values, c, temperature, distance);
  auto soft = (a * c.unsqueeze(1)).sum(2);
  return {c, soft, history, iterations};
}

UDomainBackward udomain_backward(const at::Tensor& values, const at::Tensor& counts,
                                 const at::Tensor& history, const at::Tensor& iterations, double temperature,
                                 Distance distance, const at::Tensor& grad_soft,
                                 const at::Tensor& grad_centroids) {
  if (udomain_fused_applies(values, counts, history) && grad_soft.scalar_type() == values.scalar_type() &&
      grad_soft.device().is_cpu() &&
      (!grad_centroids.defined() ||
       (grad_centroids.scalar_type() == values.scalar_type() && grad_centroids.device().is_cpu()))) {
    return udomain_backward_fused(values, counts, history, iterations.item<int64_t>(), temperature, distance,
                                  grad_soft, grad_centroids);
  }
  if (use_cuda_kernels(values, history.size(2))) {
    return g_cuda_backward(values, counts, history, iterations, temperature, distance, grad_soft,
                           grad_centroids);
  }
  const double inv_tau = 1.0 / temperature;
  auto v = values.unsqueeze(2);
  auto n = counts.unsqueeze(2);

  // Final soft assignment F_u = sum_j a_uj c_j with c = c_T (T read on the device).
  auto steps = iterations.to(at::kLong).view({1});
  auto c = history.index_select(0, steps.to(history.device())).squeeze(0);
  auto a = soft_attention(values, c, temperature, distance);
  auto slope = distance_slope(differences(values, c), distance);  // d dist / dv
  // dF/dv at fixed c: sum_j c_j da_j/dv, with ds_j/dv = -slope_j / tau.
  auto direct = -(softmax_grad(a, c.unsqueeze(1).expand_as(a)) * slope).sum(2) * inv_tau;
  // dL/dc_T from F (the direct term of dL/dv is G_u * direct, applied per weight later).
  auto grad_s = softmax_grad(a, grad_soft.unsqueeze(2) * c.unsqueeze(1));
  auto gc = (grad_soft.unsqueeze(2) * a).sum(1) + (grad_s * slope).sum(1) * inv_tau;
  if (grad_centroids.defined()) gc = gc + grad_centroids;

  auto indirect = at::zeros_like(values);
  // Every step of the history is walked back; steps t >= T (held in the forward) leave the
  // gradients unchanged, selected on the device.
  const auto t_device = steps.to(values.device()).squeeze(0);
  for (int64_t t = history.size(0) - 2; t >= 0; --t) {
    auto active = t_device.gt(t);
    c = history[t];
    a = soft_attention(values, c, temperature, distance);
    auto weighted = a * n;
    auto num = (weighted * v).sum(1);
    auto den = weighted.sum(1);
    auto attended = den > 0;
    auto safe_den = at::where(attended, den, at::ones_like(den));
    auto next = num / safe_den;
    auto zero = at::zeros_like(gc);
    auto g_num = at::where(attended, gc / safe_den, zero);  // [G, K]
    auto g_den = at::where(attended, -gc * next / safe_den, zero);
    auto g_keep = at::where(attended, zero, gc);  // c_j carried over
    // num_j = sum_u n_u a_uj v_u, den_j = sum_u n_u a_uj.
    auto step_indirect = indirect + (weighted * g_num.unsqueeze(1)).sum(2);
    auto grad_a = n * (v * g_num.unsqueeze(1) + g_den.unsqueeze(1));
    grad_s = softmax_grad(a, grad_a);
    slope = distance_slope(differences(values, c), distance);
    step_indirect = step_indirect - (grad_s * slope).sum(2) * inv_tau;
    indirect = at::where(active, step_indirect, indirect);
    gc = at::where(active, g_keep + (grad_s * slope).sum(1) * inv_tau, gc);
  }
  return {direct, indirect, gc};
}

}  // namespace edkm
