import pytest
import torch

import edkm  # noqa: F401  (loads the library)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def sample_weight(shape, repeats: bool, device="cpu", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if repeats:
        w = (w * 8).round() / 8  # a few dozen distinct values, each repeated many times
    return w.to(device=device, dtype=dtype)


def spread_centroids(groups: int, k: int, device="cpu", dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = torch.linspace(-2.0, 2.0, k, dtype=torch.float64).repeat(groups, 1)
    c = c + 0.01 * torch.randn(c.shape, generator=g, dtype=torch.float64)
    return c.to(device=device, dtype=dtype)


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs a GPU with `cuda` (parametrized on device "cuda", or skipped
    for want of one), so the GPU check runs just those: `pytest -m cuda`."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        needs_gpu = params.get("device") == "cuda" or any(
            "no CUDA device" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")
        )
        if needs_gpu and not item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.cuda)
