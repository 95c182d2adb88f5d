"""What dkm saves for backward, counted with a saved-tensor hook: nothing N-sized for 16-bit
weights (the weight itself is referenced, not copied), against >= 100 bytes/weight naive."""

import pytest
import torch

import edkm


def saved_for_backward(fn, weight, centroids):
    """Distinct storages autograd saves (excluding the weight's own), as (elements, bytes)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() != weight.untyped_storage().data_ptr():
            storages[s.data_ptr()] = (s.nbytes() // t.element_size(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(weight, centroids, 1e-4, 3)
    out.clustered.float().sum().backward()
    return sum(e for e, _ in storages.values()), sum(b for _, b in storages.values())


def bf16_weight(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()


CENTROIDS = torch.linspace(-0.05, 0.05, 8).view(1, 8)


@pytest.mark.slow
def test_dkm_saved_memory_does_not_grow_with_n():
    small_elems, small_bytes = saved_for_backward(edkm.dkm, bf16_weight(1 << 20), CENTROIDS)
    n = 1 << 22
    large_elems, large_bytes = saved_for_backward(edkm.dkm, bf16_weight(n), CENTROIDS)
    assert large_bytes < 1.25 * small_bytes
    assert large_elems < n / 10


@pytest.mark.slow
def test_reference_saves_at_least_100_bytes_per_weight():
    n = 1 << 20
    _, saved = saved_for_backward(edkm.dkm_reference, bf16_weight(n), CENTROIDS)
    assert saved >= 100 * n


def test_fp32_saves_one_int32_index_and_tables():
    n = 1 << 16
    w = torch.randn(n, requires_grad=True)
    _, saved = saved_for_backward(edkm.dkm, w, CENTROIDS)
    # int32 index + values (fp32) + counts (int32) per weight, plus O(K * iterations).
    assert saved <= 12 * n + 4096
