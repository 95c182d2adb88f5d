"""Fake (meta) kernels: output shapes without data, for torch.compile and torch.export.

Each mirrors its C++ kernel's output shapes; opcheck tests that the two agree.
"""

from __future__ import annotations

import torch

from edkm import _native  # noqa: F401


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _capacity(weight: torch.Tensor, groups: int) -> int:
    return min(weight.numel() // groups, 65536)


@torch.library.register_fake("edkm::dkm")
def _dkm_fake(weight, centroids, temperature, max_iter=3, epsilon=0.0, distance="squared"):
    return (
        torch.empty_like(weight),
        torch.empty_like(centroids),
        weight.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("edkm::dkm_linear")
def _dkm_linear_fake(input, weight, centroids, bias, temperature, max_iter=3, epsilon=0.0, distance="squared"):
    return (
        input.new_empty((*input.shape[:-1], weight.shape[0])),
        torch.empty_like(centroids),
        weight.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("edkm::_dkm_recompute")
def _dkm_recompute_fake(weight, lookup, values, counts, history, iterations, temperature, distance):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("edkm::_dkm_forward")
def _dkm_forward_fake(weight, centroids, temperature, max_iter, epsilon, distance):
    groups, k = centroids.shape
    ct = _compute_dtype(weight.dtype)
    if _is_16bit(weight.dtype):
        cap = _capacity(weight, groups)
        lookup = weight.new_empty((groups, cap), dtype=torch.int32)
    else:
        cap = weight.numel() // groups
        lookup = weight.new_empty((weight.numel(),), dtype=torch.int32)
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(centroids),
        weight.new_empty((), dtype=torch.int64),
        lookup,
        weight.new_empty((groups, cap), dtype=ct),
        weight.new_empty((groups, cap), dtype=torch.int32),
        weight.new_empty((max_iter + 1, groups, k), dtype=ct),
    )


@torch.library.register_fake("edkm::_dkm_backward")
def _dkm_backward_fake(
    grad_clustered,
    grad_centroids,
    weight,
    lookup,
    values,
    counts,
    history,
    iterations,
    temperature,
    distance,
    centroids_dtype,
):
    groups, k = history.shape[1], history.shape[2]
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty((groups, k), dtype=centroids_dtype),
    )


@torch.library.register_fake("edkm::_dkm_backward_")
def _dkm_backward_inplace_fake(
    grad_clustered,
    grad_centroids,
    weight,
    lookup,
    values,
    counts,
    history,
    iterations,
    temperature,
    distance,
    centroids_dtype,
):
    return weight.new_empty((history.shape[1], history.shape[2]), dtype=centroids_dtype)


@torch.library.register_fake("edkm::_slot_table")
def _slot_table_fake(weight, groups):
    cap = _capacity(weight, groups)
    return (
        weight.new_empty((groups, cap), dtype=torch.int32),
        weight.new_empty((groups, cap), dtype=torch.int32),
    )


@torch.library.register_fake("edkm::_slot_gather")
def _slot_gather_fake(weight, slots, table):
    return torch.empty_like(weight)


@torch.library.register_fake("edkm::_slot_scatter_add")
def _slot_scatter_add_fake(weight, slots, grad):
    return slots.new_empty(slots.shape, dtype=_compute_dtype(grad.dtype))


@torch.library.register_fake("edkm::_slot_grad")
def _slot_grad_fake(weight, slots, grad, scale, shift):
    return torch.empty_like(weight)


@torch.library.register_fake("edkm::_slot_grad_")
def _slot_grad_inplace_fake(weight, slots, grad, scale, shift):
    return None


@torch.library.register_fake("edkm::assign")
def _assign_fake(weight, centroids):
    dtype = torch.uint8 if centroids.shape[1] <= 256 else torch.int32
    return torch.empty_like(weight, dtype=dtype, memory_format=torch.contiguous_format)


@torch.library.register_fake("edkm::dequantize")
def _dequantize_fake(indices, centroids, dtype=None):
    return indices.new_empty(indices.shape, dtype=dtype or centroids.dtype)


def _check_bits(op: str, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"{op}: bits must be in 1..8, got {bits}")


@torch.library.register_fake("edkm::pack_indices")
def _pack_indices_fake(indices, bits):
    _check_bits("pack_indices", bits)
    return indices.new_empty(((indices.numel() * bits + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("edkm::unpack_indices")
def _unpack_indices_fake(packed, bits, count):
    _check_bits("unpack_indices", bits)
    return packed.new_empty((count,), dtype=torch.uint8)


@torch.library.register_fake("edkm::optimal_kmeans_1d")
def _optimal_kmeans_1d_fake(values, counts, k):
    return values.new_empty((k,), dtype=torch.float64), values.new_empty((), dtype=torch.float64)


@torch.library.register_fake("edkm::optimal_kmeans_1d_grouped")
def _optimal_kmeans_1d_grouped_fake(weight, k, importance=None):
    groups = weight.shape[0]
    return (weight.new_empty((groups, k), dtype=torch.float64), weight.new_empty((groups,), dtype=torch.float64))


@torch.library.register_fake("edkm::_udomain_forward")
def _udomain_forward_fake(values, counts, centroids, temperature, max_iter, epsilon, distance):
    groups, k = centroids.shape
    return (
        torch.empty_like(centroids),
        torch.empty_like(values),
        values.new_empty((max_iter + 1, groups, k)),
        values.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("edkm::_udomain_backward")
def _udomain_backward_fake(values, counts, history, iterations, temperature, distance, grad_soft, grad_centroids=None):
    return torch.empty_like(values), torch.empty_like(values), values.new_empty(history.shape[1:])


@torch.library.register_fake("edkm::_ndomain_forward")
def _ndomain_forward_fake(weight, centroids, temperature, max_iter, epsilon, distance):
    groups, k = centroids.shape
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(centroids),
        weight.new_empty((), dtype=torch.int64),
        weight.new_empty((max_iter + 1, groups, k), dtype=_compute_dtype(weight.dtype)),
    )


@torch.library.register_fake("edkm::_ndomain_backward")
def _ndomain_backward_fake(
    grad_clustered, grad_centroids, weight, history, iterations, temperature, distance, centroids_dtype
):
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty((history.shape[1], history.shape[2]), dtype=centroids_dtype),
    )


@torch.library.register_fake("edkm::_ndomain_recompute")
def _ndomain_recompute_fake(weight, history, iterations, temperature, distance):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _check_same_device(op: str, packed, lut, input=None) -> None:
    if lut.device != packed.device:
        raise ValueError(f"{op}: lut must be on packed's device ({packed.device}), got {lut.device}")
    if input is not None and input.device != packed.device:
        raise ValueError(f"{op}: input must be on packed's device ({packed.device}), got {input.device}")


@torch.library.register_fake("edkm::lut_linear")
def _lut_linear_fake(input, packed, lut, bits, out_features, bias=None, outlier_index=None, outlier_values=None):
    _check_bits("lut_linear", bits)
    _check_same_device("lut_linear", packed, lut, input)
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("edkm::lut_embedding")
def _lut_embedding_fake(
    indices, packed, lut, bits, num_embeddings, embedding_dim, outlier_index=None, outlier_values=None, dtype=None
):
    _check_bits("lut_embedding", bits)
    _check_same_device("lut_embedding", packed, lut)
    return lut.new_empty((*indices.shape, embedding_dim), dtype=dtype or lut.dtype)
