"""Python front of the edkm ops (torch.ops.edkm.*), with the same defaults as the C++ API."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from edkm import _native  # noqa: F401  (registers torch.ops.edkm)


class DkmResult(NamedTuple):
    clustered: torch.Tensor
    centroids: torch.Tensor
    iterations: torch.Tensor


def dkm(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float,
    max_iter: int = 3,
    epsilon: float = 0.0,
    distance: str = "squared",
) -> DkmResult:
    """Differentiable k-means of ``weight`` against ``centroids`` [G, K], exact over distinct values.

    ``weight`` (any shape, bf16/fp16/fp32/fp64) is viewed as G groups of equal size, each with its
    own K centroids. Returns the soft-clustered weight, the final centroids and the number of
    iterations run. Gradients reach ``weight`` and ``centroids``; pass the previous step's
    centroids detached for the usual warm start.
    """
    return DkmResult(*torch.ops.edkm.dkm(weight, centroids, temperature, max_iter, epsilon, distance))


def dkm_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    centroids: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    max_iter: int = 3,
    epsilon: float = 0.0,
    distance: str = "squared",
) -> DkmResult:
    """``F.linear(input, dkm(weight, centroids, ...).clustered, bias)`` without keeping the
    clustered weight for backward (rebuilt there by one gather): a clustered layer costs about
    what an unclustered one does. Returns (output, centroids, iterations)."""
    return DkmResult(
        *torch.ops.edkm.dkm_linear(input, weight, centroids, bias, temperature, max_iter, epsilon, distance)
    )


def dkm_reference(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float,
    max_iter: int = 3,
    epsilon: float = 0.0,
    distance: str = "squared",
) -> DkmResult:
    """Naive N x K DKM with plain autograd (the oracle and baseline); same contract as :func:`dkm`."""
    return DkmResult(
        *torch.ops.edkm.dkm_reference(weight, centroids, temperature, max_iter, epsilon, distance)
    )


def assign(weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each weight's nearest centroid (uint8 for K <= 256, else int32); ties -> lower index."""
    return torch.ops.edkm.assign(weight, centroids)


def dequantize(
    indices: torch.Tensor, centroids: torch.Tensor, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``centroids[g, indices]`` for every index, in ``dtype`` (default: the centroids' dtype)."""
    return torch.ops.edkm.dequantize(indices, centroids, dtype)
