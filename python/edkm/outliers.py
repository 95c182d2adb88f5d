"""Outliers kept exact (dense-and-sparse, as in SqueezeLLM): which weights, and how they are
split from and merged back into the clustered weight.

A matrix W is split into a dense part D (W with the outlier positions set to 0), which is
clustered, and a sparse part S (W at the outlier positions), kept in 16 bits. The weight the
model computes with is the clustered D with the outlier positions replaced by S. Positions are
flat row-major indices into the weight, sorted ascending.
"""

from __future__ import annotations

from typing import Optional

import torch

_16BIT = (torch.bfloat16, torch.float16)


def outlier_count(fraction: float, numel: int) -> int:
    """How many weights of a ``numel``-element matrix are outliers: round(fraction * numel)
    (Python's round, halves to even)."""
    return int(round(fraction * numel))


def outlier_dtype(source_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype outlier values are stored in: the clustered source's own dtype when it is
    16 bits wide (exact), else float16 (the wider mantissa of the two; its range is checked)."""
    return source_dtype if source_dtype in _16BIT else torch.float16


@torch.no_grad()
def choose_outliers(
    weight: torch.Tensor, count: int, criterion: str, sensitivity: Optional[torch.Tensor] = None, name: str = "weight"
) -> torch.Tensor:
    """Flat positions (int64, ascending) of the ``count`` highest-scoring weights: score |w| for
    criterion "magnitude", sensitivity * w**2 for "sensitivity" (SqueezeLLM). Ties at the
    threshold go to the lower positions, so the choice is deterministic."""
    w = weight.detach().reshape(-1)
    if not torch.isfinite(w).all():
        raise ValueError(f"edkm: {name} has NaN or Inf values; cannot choose its outliers")
    if criterion == "magnitude":
        score = w.float().abs()
    elif criterion == "sensitivity":
        if sensitivity is None or sensitivity.numel() != w.numel():
            raise ValueError(
                f"edkm: {name}: outlier_criterion='sensitivity' needs a sensitivity tensor "
                f"of the weight's shape {tuple(weight.shape)}: pass palettize_(model, "
                f"config, sensitivity={{name: tensor}}) (e.g. from edkm.fisher)"
            )
        score = sensitivity.detach().reshape(-1).to(w.device, torch.float32) * w.float().square()
    else:
        raise ValueError(f"edkm: outlier_criterion must be 'magnitude' or 'sensitivity', got {criterion!r}")
    if not 0 <= count <= w.numel():
        raise ValueError(f"edkm: {name}: outlier count must be in 0..{w.numel()}, got {count}")
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=w.device)
    threshold = torch.topk(score, count, sorted=False).values.min()
    above = torch.nonzero(score > threshold).reshape(-1)
    tied = torch.nonzero(score == threshold).reshape(-1)[: count - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def dense_part(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """D: ``source`` with the outlier positions set to 0 (differentiable; no gradient reaches
    the outlier positions through it)."""
    return source.reshape(-1).index_fill(0, index, 0).view(source.shape)


def merge_outliers(clustered: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``clustered`` with the outlier positions replaced by ``values`` (differentiable in both:
    the outlier positions take their gradient directly, the others through the clustering)."""
    flat = clustered.reshape(-1).index_copy(0, index, values.to(clustered.dtype))
    return flat.view(clustered.shape)


def gather_outliers(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The values at the outlier positions (differentiable)."""
    return source.reshape(-1).index_select(0, index)
