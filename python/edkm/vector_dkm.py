"""Vector DKM (cluster_dim d > 1), exact over the distinct d-vectors of a weight.

Scalar clustering runs in the C++ op :func:`edkm.dkm`. For d > 1 the same idea runs here on
ATen: the k-means iterations use the U distinct vectors (with counts) instead of the N / d
vectors, and the result is gathered back. Gradients are exact:

* the centroids depend on the weights only through count-weighted sums over distinct vectors,
  so feeding the iterations the mean of each vector's copies gives every copy its exact share;
* each clustered vector y_i = sum_k a_k(x_i, c) c_k also depends on its own x_i directly, with
  Jacobian dy/dx = (2 / tau) sum_k a_k (c_k - y)(c_k - y)^T (squared distance, fixed c): equal for
  identical copies, applied to each copy's own upstream gradient by :class:`_DirectTerm`.

Autograd keeps O(U * K) tensors plus one int64 index per vector (8 / d bytes per weight).
"""

from __future__ import annotations

from typing import Tuple

import torch

_INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unique_vectors(x: torch.Tensor, groups: int):
    """Distinct vectors of x [groups, M, d] by bit pattern (+0 and -0 kept apart, which is
    harmless). Returns (first index of each distinct vector [U], inverse [groups*M], counts [U],
    group of each distinct vector [U])."""
    g, m, d = x.shape
    bits = x.detach().contiguous().view(_INT_VIEW[x.dtype]).reshape(g * m, d).long()
    gid = torch.arange(g, device=x.device).repeat_interleave(m)[:, None]
    keys = torch.cat([gid, bits], dim=1)
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((counts.numel(),), g * m, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(g * m, device=x.device), reduce="amin")
    return first, inverse, counts, first // m


class _DirectTerm(torch.autograd.Function):
    """Zero in value; in backward, each vector's own Jacobian J[u(i)] applied to its gradient."""

    @staticmethod
    def forward(ctx, x, jac, inverse):
        ctx.save_for_backward(jac, inverse)
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        jac, inverse = ctx.saved_tensors
        out = torch.empty_like(grad)
        step = 1 << 20
        for s in range(0, grad.shape[0], step):
            j = jac[inverse[s : s + step]]
            out[s : s + step] = torch.bmm(j, grad[s : s + step, :, None])[:, :, 0]
        return out, None, None


def vector_dkm(
    weight: torch.Tensor, centroids: torch.Tensor, temperature: float, max_iter: int = 3, epsilon: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-cluster ``weight`` (viewed as G contiguous groups of d-vectors along the last axis)
    against ``centroids`` [G, K, d] with squared distance. Returns (clustered weight in the
    weight's dtype and shape, final centroids [G, K, d])."""
    if centroids.dim() != 3:
        raise ValueError(f"vector_dkm: centroids must be [G, K, d], got shape {tuple(centroids.shape)}")
    g, k, d = centroids.shape
    if weight.shape[-1] % d or weight.numel() % (g * d):
        raise ValueError(
            f"vector_dkm: weight of shape {tuple(weight.shape)} cannot be cut into {g} "
            f"groups of {d}-vectors along its last axis"
        )
    if not temperature > 0:
        raise ValueError(f"vector_dkm: temperature must be > 0, got {temperature}")
    cdt = _compute_dtype(weight.dtype)
    x = weight.reshape(g, -1, d)
    first, inverse, counts, ugroup = _unique_vectors(x, g)
    flat = x.reshape(-1, d).to(cdt)
    cnt = counts.to(cdt)
    exact = flat.detach()[first]
    mean = torch.zeros(cnt.numel(), d, dtype=cdt, device=weight.device).index_add(0, inverse, flat) / cnt[:, None]
    xu = exact + (mean - mean.detach())  # exact values, gradient shared by the copies
    c = centroids.to(cdt)

    def attention(points, cents):
        dist = (points[:, None, :] - cents[ugroup]).square().sum(-1)  # [U, K]
        return torch.softmax(-dist / temperature, dim=1)

    for _ in range(max_iter):
        a = attention(xu, c) * cnt[:, None]  # [U, K]
        mass = torch.zeros(g, k, dtype=cdt, device=weight.device).index_add(0, ugroup, a)
        sums = torch.zeros(g, k, d, dtype=cdt, device=weight.device).index_add(
            0, ugroup, a[:, :, None] * xu[:, None, :]
        )
        new_c = sums / mass[:, :, None].clamp_min(torch.finfo(cdt).tiny)
        new_c = torch.where(mass[:, :, None] > 0, new_c, c)  # a centroid nobody attends stays put
        moved = (new_c - c).abs().max()
        c = new_c
        if epsilon > 0 and float(moved) <= epsilon:
            break
    a = attention(xu.detach(), c)  # [U, K]; the direct dependence on x is added below
    cu = c[ugroup]  # [U, K, d]
    yu = (a[:, :, None] * cu).sum(1)  # [U, d]
    with torch.no_grad():
        e = cu - yu[:, None, :]
        jac = (2.0 / temperature) * torch.einsum("uk,uki,ukj->uij", a, e, e)
    out = yu[inverse] + _DirectTerm.apply(flat, jac, inverse)
    return out.to(weight.dtype).reshape(weight.shape), c


def vector_dkm_reference(
    weight: torch.Tensor, centroids: torch.Tensor, temperature: float, max_iter: int = 3, epsilon: float = 0.0
):
    """Naive N/d x K vector DKM with plain autograd (the oracle for tests)."""
    g, k, d = centroids.shape
    cdt = _compute_dtype(weight.dtype)
    x = weight.reshape(g, -1, d).to(cdt)
    c = centroids.to(cdt)
    for _ in range(max_iter):
        a = torch.softmax(-(x[:, :, None, :] - c[:, None]).square().sum(-1) / temperature, dim=2)
        mass = a.sum(1)
        new_c = torch.einsum("gnk,gnd->gkd", a, x) / mass[:, :, None].clamp_min(torch.finfo(cdt).tiny)
        new_c = torch.where(mass[:, :, None] > 0, new_c, c)
        moved = (new_c - c).abs().max()
        c = new_c
        if epsilon > 0 and float(moved) <= epsilon:
            break
    a = torch.softmax(-(x[:, :, None, :] - c[:, None]).square().sum(-1) / temperature, dim=2)
    out = torch.einsum("gnk,gkd->gnd", a, c)
    return out.to(weight.dtype).reshape(weight.shape), c


def vector_assign(weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each d-vector (ties -> lower index), uint8 for K <= 256 else int32;
    shape [G * M]."""
    g, k, d = centroids.shape
    cdt = _compute_dtype(weight.dtype)
    x = weight.detach().reshape(g, -1, d)
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.uint8 if k <= 256 else torch.int32, device=weight.device)
    step = 1 << 18
    for gi in range(g):
        c = centroids[gi].to(cdt)
        for s in range(0, x.shape[1], step):
            xs = x[gi, s : s + step].to(cdt)
            dist = (xs[:, None, :] - c[None]).square().sum(-1)
            out[gi, s : s + step] = dist.argmin(dim=1).to(out.dtype)
    return out.reshape(-1)


def vector_dequantize(indices: torch.Tensor, centroids: torch.Tensor, shape, dtype) -> torch.Tensor:
    g, k, d = centroids.shape
    idx = indices.long().reshape(g, -1)
    out = torch.stack([centroids[gi][idx[gi]] for gi in range(g)])  # [G, M, d]
    return out.to(dtype).reshape(shape)
