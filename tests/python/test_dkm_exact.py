"""dkm against the naive reference: forward, centroids, iterations and both gradients."""

import pytest
import torch

import edkm
from conftest import DEVICES, rel_error, sample_weight, spread_centroids


@pytest.fixture(autouse=True, params=["fused", "aten"], ids=["udomain-fused", "udomain-aten"])
def cpu_udomain(request):
    """Every test here runs twice on CPU: the U-domain as fused loops (the default) and as the
    composition of ATen ops that CUDA runs (device-side early stop, no host syncs), so that
    path is checked against the reference on every machine. On CUDA both runs are the same.
    The N-domain (which 'auto' picks for small groups) is forced off: test_ndomain.py checks it."""
    with edkm.settings(fused_udomain=request.param == "fused", ndomain="never"):
        yield request.param


def run_both(w, c, tau, max_iter, eps, distance, seed=2):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.device, w.dtype)
    grad_c = torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.device, c.dtype)
    results = []
    for fn in (edkm.dkm, edkm.dkm_reference):
        wi = w.detach().clone().requires_grad_()
        ci = c.detach().clone().requires_grad_()
        out = fn(wi, ci, tau, max_iter, eps, distance)
        gw, gc = torch.autograd.grad((out.clustered * grad_out).sum() + (out.centroids * grad_c).sum(), (wi, ci))
        results.append((out, gw, gc))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("k", [2, 4, 8, 16, 256])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("repeats", [True, False], ids=["repeated", "distinct"])
def test_matches_reference_float64(device, distance, k, groups, repeats):
    w = sample_weight((24, 40), repeats, device)
    c = spread_centroids(groups, k, device)
    tau = 0.05 if distance == "squared" else 0.2
    (ours, gw, gc), (ref, rgw, rgc) = run_both(w, c, tau, 3, 0.0, distance)
    assert int(ours.iterations) == int(ref.iterations) == 3
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    assert rel_error(ours.centroids, ref.centroids) <= 1e-10
    assert rel_error(gw, rgw) <= 1e-10
    assert rel_error(gc, rgc) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps,stops", [(0.0, False), (5e-3, True)], ids=["runs-all", "stops-early"])
def test_early_stop(device, eps, stops):
    w = sample_weight((64, 64), True, device, seed=4)
    c = spread_centroids(1, 4, device)
    (ours, gw, gc), (ref, rgw, rgc) = run_both(w, c, 0.1, 30, eps, "squared")
    assert int(ours.iterations) == int(ref.iterations)
    assert (int(ours.iterations) < 30) == stops
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    assert rel_error(gw, rgw) <= 1e-10
    assert rel_error(gc, rgc) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_unattended_centroid_is_kept_not_nan(device):
    # A centroid far from every weight gets exactly zero attention: it must stay put.
    w = sample_weight((32, 32), False, device, seed=5) * 0.01
    c = torch.tensor([[-0.01, 0.0, 0.01, 1000.0]], dtype=torch.float64, device=device)
    (ours, gw, gc), (ref, rgw, rgc) = run_both(w, c, 1e-4, 3, 0.0, "squared")
    assert float(ours.centroids.detach()[0, 3]) == 1000.0
    assert torch.isfinite(gw).all() and torch.isfinite(gc).all()
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    assert rel_error(gw, rgw) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("groups", [1, 4])
def test_low_precision_agrees_within_dtype_rounding(device, dtype, groups):
    w = (sample_weight((128, 96), False, device, seed=6) * 0.02).to(dtype)
    cdtype = torch.float32
    c = torch.linspace(-0.04, 0.04, 8, device=device).repeat(groups, 1).to(cdtype)
    tau = 2e-4
    ours = edkm.dkm(w.requires_grad_(), c, tau, 3)
    ref = edkm.dkm_reference(w.detach().double(), c.double(), tau, 3)
    assert ours.clustered.dtype == dtype and ours.centroids.dtype == cdtype
    bound = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 1e-5}[dtype]
    assert rel_error(ours.clustered, ref.clustered) <= bound
    assert rel_error(ours.centroids, ref.centroids) <= 1e-5

    g = torch.randn(w.shape, dtype=torch.float64, device=device)
    (gw,) = torch.autograd.grad(ours.clustered, w, g.to(dtype))
    wd = w.detach().double().requires_grad_()
    (rgw,) = torch.autograd.grad(edkm.dkm_reference(wd, c.double(), tau, 3).clustered, wd, g.to(dtype).double())
    assert gw.dtype == dtype
    # Gradients pass through float32 tables and one rounding to the weight's dtype.
    assert rel_error(gw, rgw) <= max(bound * 4, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_any_shape_and_non_contiguous(device):
    w = sample_weight((6, 10, 8), True, device)
    c = spread_centroids(2, 4, device)
    t = w.transpose(0, 2)  # non-contiguous view, 480 elements in 2 groups
    ours = edkm.dkm(t, c, 0.1)
    ref = edkm.dkm_reference(t, c, 0.1)
    assert ours.clustered.shape == t.shape
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    wb = w.to(torch.bfloat16).transpose(0, 2)
    ob = edkm.dkm(wb, c.float(), 0.1)
    rb = edkm.dkm_reference(wb, c.float(), 0.1)
    assert rel_error(ob.clustered, rb.clustered) <= 2.0**-8


def test_dkm_centroid_buffer_may_be_overwritten_before_backward():
    # Warm start: a training loop copies the new centroids into its buffer before backward.
    w = sample_weight((32, 32), False).requires_grad_()
    c = spread_centroids(1, 8)
    out = edkm.dkm(w, c, 0.1)
    c.copy_(out.centroids.detach())
    out.clustered.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_weight_modified_in_place_after_forward_is_refused():
    w = sample_weight((32, 32), False, dtype=torch.bfloat16).requires_grad_()
    c = torch.linspace(-2, 2, 8).view(1, 8)
    out = edkm.dkm(w, c, 0.1)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.clustered.sum().backward()


def test_no_grad_and_inference_mode():
    w = sample_weight((16, 16), True)
    c = spread_centroids(1, 4)
    expected = edkm.dkm_reference(w, c, 0.1).clustered
    with torch.no_grad():
        assert rel_error(edkm.dkm(w, c, 0.1).clustered, expected) <= 1e-10
    with torch.inference_mode():
        assert rel_error(edkm.dkm(w, c, 0.1).clustered, expected) <= 1e-10
