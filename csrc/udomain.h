// DKM iterations over the distinct values of a weight (the U-domain, docs/DESIGN.md section 2),
// forward and the exact reverse pass, in ATen ops so they run on any device; on CPU, fused
// loops with the same arithmetic (csrc/cpu/udomain_kernel.cpp).
// Shapes: values/counts [G, U] (counts as floating, 0 for padding), centroids [G, K].
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace edkm {

struct UDomainForward {
  at::Tensor centroids;   // final centroids c_T [G, K]
  at::Tensor soft;        // F_u = sum_j a_uj c_Tj [G, U]
  at::Tensor history;     // [max_iter + 1, G, K]: c_0..c_T, rows past T repeat c_T
  at::Tensor iterations;  // T, an int64 scalar on values' device (never read on the host, so the
                          // iterations run without a device sync)
};

UDomainForward udomain_forward(const at::Tensor& values, const at::Tensor& counts,
                               const at::Tensor& centroids, double temperature, int64_t max_iter,
                               double epsilon, Distance distance);

struct UDomainBackward {
  at::Tensor direct;     // dF_u/dv_u with c_T held fixed [G, U]
  at::Tensor indirect;   // dL/dv_u through the centroids only (iterations) [G, U]
  at::Tensor centroids;  // dL/dc_0 [G, K]
};

// grad_soft: dL/dF [G, U]; grad_centroids: dL/dc_T [G, K] or undefined; iterations: T as
// an int64 scalar tensor, 1 <= T <= history.size(0) - 1 (not checked here).
UDomainBackward udomain_backward(const at::Tensor& values, const at::Tensor& counts,
                                 const at::Tensor& history, const at::Tensor& iterations, double temperature,
                                 Distance distance, const at::Tensor& grad_soft,
                                 const at::Tensor& grad_centroids);

// a_uj = softmax_j(-dist(v_u, c_j) / tau), [G, U, K]. Shared with the reference.
at::Tensor soft_attention(const at::Tensor& values, const at::Tensor& centroids, double temperature,
                          Distance distance);

// One DKM centroid update from attention a [G, U, K]: sum n a v / sum n a, keeping c_j where
// no weight attends to it (the sum is 0) instead of producing 0/0.
at::Tensor update_centroids(const at::Tensor& attention, const at::Tensor& values, const at::Tensor& counts,
                            const at::Tensor& centroids);

// The CPU kernels behind udomain_forward / udomain_backward (csrc/cpu/udomain_kernel.cpp):
// used when every table is a float32/float64 CPU tensor and settings.h's fused_udomain() is on.
bool udomain_fused_applies(const at::Tensor& values, const at::Tensor& counts,
                           const at::Tensor& centroids_or_history);
UDomainForward udomain_forward_fused(const at::Tensor& values, const at::Tensor& counts,
                                     const at::Tensor& centroids, double temperature, int64_t max_iter,
                                     double epsilon, Distance distance);
UDomainBackward udomain_backward_fused(const at::Tensor& values, const at::Tensor& counts,
                                       const at::Tensor& history, int64_t iterations, double temperature,
                                       Distance distance, const at::Tensor& grad_soft,
                                       const at::Tensor& grad_centroids);

// The CUDA kernels (cuda/udomain_kernels.cu) register themselves here when the library is built
// with CUDA; udomain_forward / udomain_backward use them for CUDA tables when settings.h's
// fused_udomain_cuda() is on (off by default until they have run on a GPU).
using UDomainForwardFn = UDomainForward (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                            int64_t, double, Distance);
using UDomainBackwardFn = UDomainBackward (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, double, Distance, const at::Tensor&,
                                              const at::Tensor&);
void register_udomain_cuda(UDomainForwardFn forward, UDomainBackwardFn backward);
bool udomain_cuda_registered();

}  // namespace edkm
