// edkm::dkm_reference: DKM as the paper defines it, N x K tensors and plain autograd. The test
// oracle and the benchmark baseline; CompositeImplicitAutograd, so autograd and torch.compile
// see its ATen ops. Early stop freezes the centroids with torch.where instead of leaving the
// loop, so it needs no host sync and traces into one graph; the values are the same.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "udomain.h"

namespace edkm {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkm_reference(const at::Tensor& weight,
                                                             const at::Tensor& centroids, double temperature,
                                                             int64_t max_iter, double epsilon,
                                                             c10::string_view distance) {
  const char* op = "dkm_reference";
  check_dkm_args(op, weight, centroids, temperature, max_iter, epsilon);
  const Distance dist = parse_distance(op, distance);
  const auto ct = compute_dtype(weight.scalar_type());
  // Symbolic sizes throughout: this composite op is traced by torch.compile.
  auto w = weight.reshape_symint({centroids.sym_size(0), -1}).to(ct);
  auto c = centroids.to(ct);
  auto done = at::zeros({}, weight.options().dtype(at::kBool));
  auto iterations = at::zeros({}, weight.options().dtype(at::kLong));
  for (int64_t t = 0; t < max_iter; ++t) {
    auto a = soft_attention(w, c, temperature, dist);
    auto num = (a * w.unsqueeze(2)).sum(1);
    auto den = a.sum(1);
    auto attended = den.gt(0);
    auto next = at::where(attended, num / at::where(attended, den, at::ones_like(den)), c);
    auto move = (next - c).abs().amax();
    c = at::where(done, c, next);
    iterations = iterations + at::logical_not(done).to(at::kLong);
    done = at::logical_or(done, move.le(epsilon));
  }
  auto a = soft_attention(w, c, temperature, dist);
  auto clustered = (a * c.unsqueeze(1)).sum(2);
  return {clustered.to(weight.scalar_type()).view_symint(weight.sym_sizes()), c.to(centroids.scalar_type()),
          iterations};
}

}  // namespace

TORCH_LIBRARY_IMPL(edkm, CompositeImplicitAutograd, m) { m.impl("dkm_reference", &dkm_reference); }

}  // namespace edkm
