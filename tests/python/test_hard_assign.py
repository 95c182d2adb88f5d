"""assign / dequantize against argmin over |w - c| in float64."""

import pytest
import torch

import edkm
from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 8, 256, 300])
def test_assign_is_nearest_with_lowest_index_on_ties(device, dtype, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(4, 500, generator=g).to(device=device, dtype=dtype)
    c = torch.randn(4, k, generator=g).to(device=device, dtype=torch.float32)
    c[:, 1] = c[:, 0]  # duplicate centroid: ties go to the lower index
    w.view(-1)[: min(k, 4)] = c[0, :4].to(dtype)  # exact hits
    idx = edkm.assign(w, c)
    assert idx.dtype == (torch.uint8 if k <= 256 else torch.int32)
    assert idx.shape == w.shape
    expected = (w.double().view(4, -1, 1) - c.double().view(4, 1, -1)).abs().argmin(2)
    assert torch.equal(idx.long().view(4, -1), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_round_trip(device):
    c = torch.randn(3, 8, device=device)
    idx = torch.randint(0, 8, (3, 40), device=device, dtype=torch.uint8)
    out = edkm.dequantize(idx, c)
    assert torch.equal(out, c.gather(1, idx.long()))
    assert edkm.dequantize(idx, c, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(edkm.assign(out, c).long(), idx.long())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [8, 300])
def test_assign_16bit_large_groups_table_path(dtype, k):
    """Groups of >= 65536 16-bit weights use a per-group table over all bit patterns."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(2, 70000, generator=g).to(dtype)
    c = torch.randn(2, k, generator=g)
    c[:, 1] = c[:, 0]
    w.view(-1)[:4] = c[0, :4].to(dtype)
    w[1, :3] = torch.tensor([0.0, -0.0, 60000.0]).to(dtype)  # far out, but |w - c| still tells centroids apart
    idx = edkm.assign(w, c)
    expected = (w.double().view(2, -1, 1) - c.double().view(2, 1, -1)).abs().argmin(2)
    assert torch.equal(idx.long(), expected)
    w[1, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        edkm.assign(w, c)
