"""Centroid initialization over a weight's distinct values: exact 1-D k-means and k-means++.

Both work on the weight's distinct values (vectors when cluster_dim > 1) with their counts (or
summed sensitivities). Exact 1-D k-means runs for all groups in one C++ call, threads over
groups (ops.optimal_kmeans_1d_grouped), so one LUT per row costs about as much as one per
matrix; k-means++ works per group in Python on the distinct values.
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

from edkm import ops

_16BIT = (torch.bfloat16, torch.float16)


class Init(NamedTuple):
    centroids: torch.Tensor  # [G, K] (or [G, K, d]), float64, sorted ascending when d == 1
    cost: torch.Tensor  # [G] float64: within-cluster sum of squared errors per group
    method: str  # "optimal" or "kmeans++"
    variance: float  # of the whole weight (weighted by counts), for the relative temperature


def distinct_values(weight: torch.Tensor, groups: int, name: str = "weight") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per group (``groups`` equal contiguous chunks of the flattened weight): sorted distinct
    values (float64) and their counts (float64). +0 and -0 count as one value."""
    w = weight.detach()
    if w.numel() == 0:
        raise ValueError(f"edkm: {name} is empty; nothing to cluster")
    if w.numel() % groups:
        raise ValueError(f"edkm: {name} with {w.numel()} elements cannot be cut into {groups} groups")
    out = []
    if w.dtype in _16BIT:
        slots, counts = torch.ops.edkm._slot_table(w.contiguous(), groups)
        slots, counts = slots.cpu(), counts.cpu()
        for g in range(groups):
            present = counts[g] > 0
            vals = slots[g][present].to(torch.int16).view(w.dtype).double()
            out.append(_merge_sorted(vals, counts[g][present].double(), name))
    else:
        flat = w.reshape(groups, -1).cpu()
        for g in range(groups):
            vals, cnt = torch.unique(flat[g], sorted=True, return_counts=True)
            out.append(_merge_sorted(vals.double(), cnt.double(), name))
    return out


def _merge_sorted(vals: torch.Tensor, counts: torch.Tensor, name: str):
    if not torch.isfinite(vals).all():
        raise ValueError(f"edkm: {name} has NaN or Inf values; cannot cluster it")
    order = torch.argsort(vals)
    vals, counts = vals[order], counts[order]
    uniq, inverse = torch.unique_consecutive(vals, return_inverse=True)
    if uniq.numel() != vals.numel():
        counts = torch.zeros(uniq.numel(), dtype=counts.dtype).index_add_(0, inverse, counts)
    return uniq, counts


def distinct_vectors(weight: torch.Tensor, groups: int, d: int, name: str = "weight"):
    """Per group: distinct d-vectors (float64 [U, d]) and counts, vectors along the last axis."""
    w = weight.detach()
    if w.shape[-1] % d:
        raise ValueError(f"edkm: cluster_dim {d} must divide {name}'s last dimension {w.shape[-1]}")
    if not torch.isfinite(w).all():
        raise ValueError(f"edkm: {name} has NaN or Inf values; cannot cluster it")
    vecs = w.reshape(groups, -1, d).cpu()
    out = []
    for g in range(groups):
        v, cnt = torch.unique(vecs[g].double(), dim=0, return_counts=True)
        out.append((v, cnt.double()))
    return out


def _weighted_cost(values: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    v = values if values.dim() == 2 else values[:, None]
    c = centroids if centroids.dim() == 2 else centroids[:, None]
    d2 = torch.cdist(v, c).square().min(dim=1).values
    return (counts * d2).sum()


def kmeans_plus_plus(
    values: torch.Tensor, counts: torch.Tensor, k: int, seed: int = 0, max_lloyd: int = 100
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means++ seeding (fixed seed) then Lloyd iterations, over distinct values
    [U] or vectors [U, d] with counts. Returns (centroids [k] or [k, d], cost)."""
    gen = torch.Generator().manual_seed(seed)
    v = values if values.dim() == 2 else values[:, None]
    u = v.shape[0]
    chosen = [int(torch.multinomial(counts, 1, generator=gen))]
    d2 = (v - v[chosen[0]]).square().sum(1)
    while len(chosen) < min(k, u):
        p = counts * d2
        if not p.sum() > 0:
            break
        j = int(torch.multinomial(p, 1, generator=gen))
        chosen.append(j)
        d2 = torch.minimum(d2, (v - v[j]).square().sum(1))
    c = v[chosen].clone()
    if values.dim() == 1:
        c = _lloyd_1d(values, counts, c[:, 0].sort().values, max_lloyd)[:, None]
    else:
        assign = None
        for _ in range(max_lloyd):
            new_assign = torch.cdist(v, c).argmin(dim=1)
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            mass = torch.zeros(c.shape[0], dtype=v.dtype).index_add_(0, assign, counts)
            sums = torch.zeros_like(c).index_add_(0, assign, v * counts[:, None])
            keep = mass > 0
            c[keep] = sums[keep] / mass[keep, None]
    if c.shape[0] < k:  # fewer distinct values than centroids: repeat the last one
        c = torch.cat([c, c[-1:].expand(k - c.shape[0], -1)])
    if values.dim() == 1:
        c = c[:, 0].sort().values
    return c, _weighted_cost(values, counts, c)


def _lloyd_1d(values: torch.Tensor, counts: torch.Tensor, c: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Weighted Lloyd iterations over sorted distinct values: each cluster is a run of values
    between midpoints of sorted centroids, so one step is a binary search and prefix sums."""
    mass = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    moment = torch.cat([counts.new_zeros(1), (counts * values).cumsum(0)])
    for _ in range(max_iter):
        bounds = torch.searchsorted(values, (c[1:] + c[:-1]) / 2)  # first index of clusters 1..
        lo = torch.cat([bounds.new_zeros(1), bounds])
        hi = torch.cat([bounds, bounds.new_full((1,), values.numel())])
        m = mass[hi] - mass[lo]
        new_c = torch.where(m > 0, (moment[hi] - moment[lo]) / m.clamp_min(1e-300), c).sort().values
        if torch.equal(new_c, c):
            break
        c = new_c
    return c


def optimal_1d(values: torch.Tensor, counts: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact weighted 1-D k-means (dynamic programming, in the C++ library)."""
    c, cost = ops.optimal_kmeans_1d(values, counts, k)
    return c, cost


def weighted_distinct_values(
    weight: torch.Tensor, weights: torch.Tensor, groups: int, name: str = "weight"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per group: sorted distinct values (float64) and the sum of ``weights`` (same shape as
    ``weight``, >= 0) over the elements holding each value (+0 and -0 as one). Values whose
    weights sum to 0 are kept with a tiny mass (1e-12 of the group's largest, 1 if all are 0)
    so every value still belongs to some cluster, as in the grouped op."""
    w = weight.detach().reshape(groups, -1).cpu()
    s = weights.detach().reshape(groups, -1).cpu().double()
    if not torch.isfinite(w).all():
        raise ValueError(f"edkm: {name} has NaN or Inf values; cannot cluster it")
    if not (torch.isfinite(s).all() and bool((s >= 0).all())):
        raise ValueError(f"edkm: {name}: the sensitivity (importance) of every weight must be finite and >= 0")
    per = []
    if w.dtype in _16BIT:
        # A 65536-slot histogram of the bit patterns per group: one pass, no sort. Each value's
        # mass is summed in element order, as the grouped op's (value, position) sort does.
        keys = w.view(torch.int16).to(torch.int64) & 0xFFFF
        keys += torch.arange(groups, dtype=torch.int64)[:, None] * 65536
        counts = torch.bincount(keys.reshape(-1), minlength=groups * 65536).view(groups, 65536)
        sums = torch.bincount(keys.reshape(-1), weights=s.reshape(-1), minlength=groups * 65536)
        sums = sums.view(groups, 65536)
        slots = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(w.dtype).double()
        for g in range(groups):
            present = counts[g] > 0
            per.append(_merge_sorted(slots[present], sums[g][present], name))
    else:
        for g in range(groups):
            vals, inverse = torch.unique(w[g].double(), sorted=True, return_inverse=True)
            per.append((vals, torch.zeros(vals.numel(), dtype=torch.float64).index_add_(0, inverse, s[g])))
    out = []
    for vals, mass in per:
        top = float(mass.max())
        out.append((vals, mass.clamp_min(top * 1e-12 if top > 0 else 1.0)))
    return out


def init_centroids(
    weight: torch.Tensor,
    groups: int,
    k: int,
    cluster_dim: int = 1,
    method: str = "auto",
    seed: int = 0,
    name: str = "weight",
    weights: "torch.Tensor | None" = None,
) -> Init:
    """Centroids for ``weight`` cut into ``groups`` LUT groups, by ``method``
    ("optimal", "kmeans++", "auto" = the lower total within-cluster error: the exact optimum in
    1-D, k-means++ for vectors; or "sensitivity": exact 1-D k-means where each element counts
    by ``weights``, its sensitivity)."""
    if method == "sensitivity":
        if weights is None or tuple(weights.shape) != tuple(weight.shape):
            raise ValueError(
                f"edkm: {name}: init='sensitivity' needs a sensitivity tensor of the "
                f"weight's shape {tuple(weight.shape)}"
            )
        if cluster_dim != 1:
            raise ValueError(f"edkm: {name}: init='sensitivity' is 1-D (cluster_dim 1)")
    if cluster_dim == 1 and method in ("optimal", "auto", "sensitivity"):
        # Exact 1-D k-means is optimal, so k-means++ + Lloyd can at best tie it (up to the
        # rounding of two different cost sums): "auto" is the exact optimum, without running
        # k-means++ only to discard it.
        return _init_exact_1d(
            weight,
            groups,
            k,
            name,
            weights if method == "sensitivity" else None,
            "sensitivity" if method == "sensitivity" else "optimal",
        )
    if cluster_dim == 1:
        per_group = distinct_values(weight, groups, name)
    else:
        per_group = distinct_vectors(weight, groups, cluster_dim, name)
    # What is left is k-means++ ("kmeans++", or "auto" for vectors, where no exact method exists).
    cs, costs = [], []
    for g, (vals, cnt) in enumerate(per_group):
        c, cost = kmeans_plus_plus(vals, cnt, k, seed=seed + g)
        cs.append(c)
        costs.append(cost)
    best = (None, torch.stack(cs), torch.stack(costs), "kmeans++")
    mass = sum(float(cnt.sum()) for _, cnt in per_group)
    mean = sum(float((cnt[:, None] * (v if v.dim() == 2 else v[:, None])).sum()) for v, cnt in per_group) / mass
    sq = sum(float((cnt[:, None] * (v if v.dim() == 2 else v[:, None]).square()).sum()) for v, cnt in per_group)
    d = cluster_dim
    variance = max(sq / mass - d * mean * mean if d == 1 else _vector_variance(per_group, mass), 0.0)
    return Init(best[1], best[2], best[3], variance)


def _init_exact_1d(
    weight: torch.Tensor, groups: int, k: int, name: str, importance: "torch.Tensor | None", method: str
) -> Init:
    """All groups at once in the C++ library (threads over groups): each group's distinct
    values with count (or summed ``importance``) as mass, exact weighted 1-D k-means."""
    w = weight.detach()
    if w.numel() == 0:
        raise ValueError(f"edkm: {name} is empty; nothing to cluster")
    if w.numel() % groups:
        raise ValueError(f"edkm: {name} with {w.numel()} elements cannot be cut into {groups} groups")
    w = w.cpu()
    imp = None
    if importance is not None:
        imp = importance.detach().cpu()
        imp = (imp if imp.is_floating_point() else imp.double()).reshape(groups, -1)
    if w.dtype in _16BIT and w.numel() // groups > 65536:
        # Few large 16-bit groups: a slot histogram beats sorting each group on one thread (the
        # grouped op's threads are over groups; sorting the 28M-weight embedding alone took 3 s),
        # and U <= 65536 keeps the DP small.
        per = distinct_values(w, groups, name) if imp is None else weighted_distinct_values(w, imp, groups, name)
        cs, costs = zip(*(ops.optimal_kmeans_1d(v, c, k) for v, c in per))
        centroids, cost = torch.stack(cs), torch.stack(costs)
    else:
        centroids, cost = _grouped(w.reshape(groups, -1), k, imp, name)
    # The weight's own variance (every element counted once), as over distinct values x counts,
    # in float64 a few million elements at a time (no float64 copy of a large weight).
    flat, s1, s2 = w.reshape(-1), 0.0, 0.0
    for start in range(0, flat.numel(), 1 << 22):
        x = flat[start : start + (1 << 22)].double()
        s1 += float(x.sum())
        s2 += float(x.square().sum())
    var = s2 / flat.numel() - (s1 / flat.numel()) ** 2
    return Init(centroids, cost, method, max(float(var), 0.0))


def _grouped(w2d: torch.Tensor, k: int, imp: "torch.Tensor | None", name: str):
    try:
        return ops.optimal_kmeans_1d_grouped(w2d, k, imp)
    except ValueError as e:  # the op checks values as it reads them; say which weight
        if "NaN or Inf" in str(e):
            raise ValueError(f"edkm: {name} has NaN or Inf values; cannot cluster it") from None
        if "importance" in str(e):
            raise ValueError(
                f"edkm: {name}: the sensitivity (importance) of every weight must be finite and >= 0"
            ) from None
        raise


def _vector_variance(per_group, mass: float) -> float:
    """Mean squared distance of the vectors to their mean (the trace of the covariance)."""
    total = sum((cnt[:, None] * v).sum(0) for v, cnt in per_group) / mass
    return float(sum((cnt * (v - total).square().sum(1)).sum() for v, cnt in per_group) / mass)
