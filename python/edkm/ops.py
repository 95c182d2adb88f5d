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
    return DkmResult(*torch.ops.edkm.dkm_reference(weight, centroids, temperature, max_iter, epsilon, distance))


def assign(weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each weight's nearest centroid (uint8 for K <= 256, else int32); ties -> lower index."""
    return torch.ops.edkm.assign(weight, centroids)


def dequantize(indices: torch.Tensor, centroids: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``centroids[g, indices]`` for every index, in ``dtype`` (default: the centroids' dtype)."""
    return torch.ops.edkm.dequantize(indices, centroids, dtype)


class KMeans1dResult(NamedTuple):
    centroids: torch.Tensor
    cost: torch.Tensor


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack ``indices`` (any shape, integer, values in [0, 2**bits)) as docs/FORMAT.md says:
    index j at bits [j*bits, (j+1)*bits) of a little-endian bit stream, unused high bits of the
    last byte zero. Returns uint8 of shape [ceil(numel * bits / 8)]. ``bits`` in 1..8."""
    return torch.ops.edkm.pack_indices(indices, bits)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: uint8 [count] from ``packed`` (uint8 1-D of exactly
    ceil(count * bits / 8) bytes)."""
    return torch.ops.edkm.unpack_indices(packed, bits, count)


def lut_linear(
    input: torch.Tensor,
    packed: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    out_features: int,
    bias: Optional[torch.Tensor] = None,
    outlier_index: Optional[torch.Tensor] = None,
    outlier_values: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(input, W, bias)`` for the clustered weight W [out_features, input.shape[-1]]
    stored as in docs/FORMAT.md (``packed`` uint8 bit-packed indices, ``lut`` [G, 2**bits, d],
    optional exact outliers: sorted flat positions and their values), without rebuilding W.
    W's values are the LUT's (converted to float32), so pass the LUT in the weight's own dtype
    to get the weight the file rebuilds. Computed in float32 (float64 for float64 input),
    returned in ``input``'s dtype. Inference only: no gradients."""
    return torch.ops.edkm.lut_linear(input, packed, lut, bits, out_features, bias, outlier_index, outlier_values)


def lut_embedding(
    indices: torch.Tensor,
    packed: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    num_embeddings: int,
    embedding_dim: int,
    outlier_index: Optional[torch.Tensor] = None,
    outlier_values: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Rows ``indices`` (int32/int64, any shape) of the clustered weight W [num_embeddings,
    embedding_dim] stored as :func:`lut_linear` takes it, in ``dtype`` (default: ``lut``'s).
    Unpacks only the rows asked for. Inference only."""
    return torch.ops.edkm.lut_embedding(
        indices, packed, lut, bits, num_embeddings, embedding_dim, outlier_index, outlier_values, dtype
    )


def optimal_kmeans_1d(values: torch.Tensor, counts: torch.Tensor, k: int) -> KMeans1dResult:
    """Exact optimal weighted 1-D k-means over sorted, strictly increasing, finite ``values`` [U]
    with positive ``counts`` [U]. Returns float64 ``centroids`` [k] (ascending) and the optimal
    ``cost`` = sum counts * (values - nearest centroid)**2 (0-d float64). When k >= U the
    centroids are the values padded by repeating the last one (cost 0). O(k U log U)."""
    return KMeans1dResult(*torch.ops.edkm.optimal_kmeans_1d(values, counts, k))


def optimal_kmeans_1d_grouped(
    weight: torch.Tensor, k: int, importance: Optional[torch.Tensor] = None
) -> KMeans1dResult:
    """:func:`optimal_kmeans_1d` for every row of ``weight`` [G, M] (bf16, fp16, fp32, fp64) at
    once, each over its own distinct values (+0 and -0 as one), on CPU threads across groups.
    A value's mass is its count, or with ``importance`` (>= 0, weight's shape) the sum of its
    elements' importances (sensitivity-weighted k-means; a value whose importances sum to 0
    keeps mass 1e-12 of its group's largest, or 1 if all are 0). Returns float64 ``centroids``
    [G, k] (ascending per row) and ``cost`` [G]."""
    return KMeans1dResult(*torch.ops.edkm.optimal_kmeans_1d_grouped(weight, k, importance))
