"""The N-domain (DKM over each group's weights directly, for small LUT groups on CPU) against the
naive float64 reference and the U-domain; which path dkm / dkm_linear take; what it saves for
backward (the centroid history only); gradcheck, opcheck, torch.compile, bad input."""

import contextlib

import pytest
import torch

import edkm
from conftest import rel_error, sample_weight, spread_centroids
from edkm import _C


@pytest.fixture
def ndomain_mode():
    """Sets the ndomain setting for one test; it comes back afterwards."""
    with contextlib.ExitStack() as stack:
        yield lambda mode: stack.enter_context(edkm.settings(ndomain=mode))


def run(fn, w, c, tau, max_iter, eps, distance, seed=2):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)
    grad_c = torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.dtype)
    wi = w.detach().clone().requires_grad_()
    ci = c.detach().clone().requires_grad_()
    out = fn(wi, ci, tau, max_iter, eps, distance)
    gw, gc = torch.autograd.grad((out.clustered * grad_out).sum() + (out.centroids * grad_c).sum(), (wi, ci))
    return out, gw, gc


@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("k", [2, 8, 16])
@pytest.mark.parametrize("groups", [1, 4, 24])
@pytest.mark.parametrize("repeats", [True, False], ids=["repeated", "distinct"])
def test_matches_reference_float64(ndomain_mode, distance, k, groups, repeats):
    ndomain_mode("always")
    w = sample_weight((24, 40), repeats)
    c = spread_centroids(groups, k)
    tau = 0.05 if distance == "squared" else 0.2
    ours, gw, gc = run(edkm.dkm, w, c, tau, 3, 0.0, distance)
    ref, rgw, rgc = run(edkm.dkm_reference, w, c, tau, 3, 0.0, distance)
    assert int(ours.iterations) == int(ref.iterations) == 3
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    assert rel_error(ours.centroids, ref.centroids) <= 1e-10
    assert rel_error(gw, rgw) <= 1e-10
    assert rel_error(gc, rgc) <= 1e-10


@pytest.mark.parametrize("eps,stops", [(0.0, False), (5e-3, True)], ids=["runs-all", "stops-early"])
@pytest.mark.parametrize("groups", [1, 8])
def test_early_stop(ndomain_mode, eps, stops, groups):
    ndomain_mode("always")
    w = sample_weight((64, 64), True, seed=4)
    c = spread_centroids(groups, 4)
    ours, gw, gc = run(edkm.dkm, w, c, 0.1, 30, eps, "squared")
    ref, rgw, rgc = run(edkm.dkm_reference, w, c, 0.1, 30, eps, "squared")
    assert int(ours.iterations) == int(ref.iterations)
    assert (int(ours.iterations) < 30) == stops
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    assert rel_error(ours.centroids, ref.centroids) <= 1e-10
    assert rel_error(gw, rgw) <= 1e-10
    assert rel_error(gc, rgc) <= 1e-10


def test_unattended_centroid_is_kept_not_nan(ndomain_mode):
    ndomain_mode("always")
    w = sample_weight((32, 32), False, seed=5) * 0.01
    c = torch.tensor([[-0.01, 0.0, 0.01, 1000.0]], dtype=torch.float64)
    ours, gw, gc = run(edkm.dkm, w, c, 1e-4, 3, 0.0, "squared")
    ref, rgw, rgc = run(edkm.dkm_reference, w, c, 1e-4, 3, 0.0, "squared")
    assert float(ours.centroids.detach()[0, 3]) == 1000.0
    assert torch.isfinite(gw).all() and torch.isfinite(gc).all()
    assert rel_error(ours.clustered, ref.clustered) <= 1e-10
    assert rel_error(gw, rgw) <= 1e-10
    assert rel_error(gc, rgc) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_16_and_32_bit_weights_agree_with_udomain(ndomain_mode, dtype):
    w = (sample_weight((48, 32), False, seed=6) * 0.05).to(dtype)
    c = spread_centroids(12, 8, dtype=torch.float32) * 0.05
    results = {}
    for mode in ("always", "never"):
        ndomain_mode(mode)
        results[mode] = run(edkm.dkm, w, c, 1e-3, 3, 0.0, "squared")
    (a, ga, gca), (b, gb, gcb) = results["always"], results["never"]
    assert a.clustered.dtype == dtype and a.centroids.dtype == torch.float32
    assert ga.dtype == dtype and gca.dtype == torch.float32
    # Both compute in float64 registers and round to float32 (then the weight's dtype): they
    # differ only by summation order.
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    assert rel_error(a.clustered.double(), b.clustered.double()) <= tol
    assert rel_error(a.centroids.double(), b.centroids.double()) <= 1e-5
    assert rel_error(ga.double(), gb.double()) <= tol
    assert rel_error(gca.double(), gcb.double()) <= 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_dkm_linear_matches_reference(ndomain_mode, bias):
    ndomain_mode("always")
    g = torch.Generator().manual_seed(3)
    w = sample_weight((12, 20), False, seed=7).requires_grad_()
    c = spread_centroids(6, 4).requires_grad_()
    x = torch.randn(3, 5, 20, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    up = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    out, cf, _ = edkm.dkm_linear(x, w, c, b, 0.05, 3)
    ref = edkm.dkm_reference(w, c, 0.05, 3)
    want = torch.nn.functional.linear(x, ref.clustered, b)
    assert rel_error(out, want) <= 1e-10
    inputs = (x, w, c) + ((b,) if bias else ())
    got = torch.autograd.grad((out * up).sum() + cf.square().sum(), inputs)
    exp = torch.autograd.grad((want * up).sum() + ref.centroids.square().sum(), inputs)
    for a, e in zip(got, exp):
        assert rel_error(a, e) <= 1e-10


def test_auto_rule_picks_by_group_size(ndomain_mode):
    """Under 'auto' small groups save only the history, large ones the U-domain tables."""
    limit = _C.ndomain_max_group(torch.float64)
    assert _C.ndomain() == "auto"
    small = saved_kinds(torch.randn(4, limit, dtype=torch.float64))  # 4 groups of `limit`
    large = saved_kinds(torch.randn(2, limit + 1, dtype=torch.float64))
    assert small == [(4, 4, 8)], small  # history [max_iter + 1, G, K] (+ the 0-d iterations)
    assert len(large) > 1 and (4, 2, 8) in large
    ndomain_mode("never")
    assert len(saved_kinds(torch.randn(4, limit, dtype=torch.float64))) > 1
    ndomain_mode("always")
    assert saved_kinds(torch.randn(2, limit + 1, dtype=torch.float64)) == [(4, 2, 8)]


def saved_kinds(w2d):
    """Shapes of what dkm saves besides the weight and 0-d tensors, one LUT per row."""
    groups = w2d.shape[0]
    w = w2d.requires_grad_()
    c = torch.linspace(-1, 1, 8, dtype=torch.float64).repeat(groups, 1)
    shapes = []

    def pack(t):
        if t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr() and t.dim() > 0:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = edkm.dkm(w, c, 0.1, 3)
    out.clustered.sum().backward()
    return shapes


@pytest.mark.parametrize("fn", ["dkm", "dkm_linear"])
def test_saved_bytes_are_the_centroid_history(ndomain_mode, fn):
    """Per-row LUTs of a 16-bit weight: saved bytes = (T+1) x G x K float32, nothing N-sized."""
    rows, cols, k = 256, 64, 8
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    w.requires_grad_()
    c = torch.linspace(-0.05, 0.05, k).repeat(rows, 1)
    x = torch.randn(2, cols, dtype=torch.bfloat16)
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in (w.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()):
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fn == "dkm":
            out = edkm.dkm(w, c, 1e-5, 3).clustered
        else:
            out = edkm.dkm_linear(x, w, c, None, 1e-5, 3)[0]
    out.float().sum().backward()
    history = 4 * rows * k * 4  # [max_iter + 1, G, K] float32
    assert sum(saved.values()) <= history + 8  # + the int64 iteration count
    assert sum(saved.values()) >= history
    assert w.grad is not None and torch.isfinite(w.grad.float()).all()


def test_gradcheck(ndomain_mode):
    ndomain_mode("always")
    g = torch.Generator().manual_seed(8)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.sort(torch.randn(3, 3, generator=g, dtype=torch.float64), 1).values.requires_grad_()
    for distance in ("squared", "absolute"):
        assert torch.autograd.gradcheck(lambda w, c: tuple(edkm.dkm(w, c, 0.7, 2, 0.0, distance)[:2]), (w, c))
    x = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, c: tuple(edkm.dkm_linear(x, w, c, None, 0.7, 2)[:2]), (x, w, c))


def test_opcheck(ndomain_mode):
    ndomain_mode("always")
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float64, torch.bfloat16):
        w = (torch.randn(8, 6, generator=g, dtype=torch.float64) * 0.1).to(dtype)
        c = torch.sort(torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.1, 1).values
        c = c.to(torch.float64 if dtype == torch.float64 else torch.float32)
        torch.library.opcheck(torch.ops.edkm._ndomain_forward.default, (w, c, 0.01, 3, 0.0, "squared"))
        _, _, it, hist = torch.ops.edkm._ndomain_forward(w, c, 0.01, 3, 0.0, "absolute")
        gw = torch.randn(w.shape, generator=g).to(dtype)
        gc = torch.randn(c.shape, generator=g).to(c.dtype)
        torch.library.opcheck(
            torch.ops.edkm._ndomain_backward.default, (gw, gc, w, hist, it, 0.01, "absolute", c.dtype)
        )
        torch.library.opcheck(
            torch.ops.edkm._ndomain_backward.default, (None, gc, w, hist, it, 0.01, "absolute", c.dtype)
        )
        torch.library.opcheck(torch.ops.edkm._ndomain_recompute.default, (w, hist, it, 0.01, "absolute"))
        if dtype == torch.float64:
            wr = w.detach().clone().requires_grad_()
            torch.library.opcheck(torch.ops.edkm.dkm.default, (wr, c, 0.01, 3, 0.0, "squared"))


def test_torch_compile_fullgraph(ndomain_mode):
    ndomain_mode("always")
    g = torch.Generator().manual_seed(10)
    w0 = torch.randn(8, 12, generator=g, dtype=torch.float64)
    c = spread_centroids(8, 4)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64)

    def step(w, c, x):
        out, cf, _ = edkm.dkm_linear(x, w, c, None, 0.05, 3)
        clustered = edkm.dkm(w, c, 0.05, 3).clustered
        return out.square().sum() + clustered.square().sum() + cf.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    wa = w0.clone().requires_grad_()
    wb = w0.clone().requires_grad_()
    la = compiled(wa, c, x)
    lb = step(wb, c, x)
    la.backward()
    lb.backward()
    assert rel_error(la.detach(), lb.detach()) <= 1e-12
    assert rel_error(wa.grad, wb.grad) <= 1e-12


def test_bad_input(ndomain_mode):
    with pytest.raises(ValueError, match=r"ndomain must be one of \('auto', 'always', 'never'\), got 'sometimes'"):
        with edkm.settings(ndomain="sometimes"):
            pass
    with pytest.raises(ValueError, match=r"set_ndomain: mode must be 'auto', 'always' or 'never', got 'sometimes'"):
        _C.set_ndomain("sometimes")  # the native setter checks too
    assert edkm.get_settings()["ndomain"] == "auto"
    ndomain_mode("always")
    w = torch.tensor([[0.0, float("nan")], [1.0, 2.0]], dtype=torch.float64)
    c = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dkm: weight contains NaN or Inf"):
        edkm.dkm(w, c, 0.1, 3)
    with pytest.raises(ValueError, match=r"dkm: centroids contain NaN or Inf"):
        edkm.dkm(w.nan_to_num(), torch.full((2, 2), float("inf"), dtype=torch.float64), 0.1, 3)
    with pytest.raises(ValueError, match=r"dkm: .*5"):
        edkm.dkm(torch.zeros(5, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), 0.1, 3)
    wv = torch.zeros(4, 2, dtype=torch.float64)
    hist = torch.zeros(4, 2, 3, dtype=torch.float64)
    it = torch.tensor(5)
    with pytest.raises(ValueError, match=r"_ndomain_backward: iterations out of range: 5"):
        torch.ops.edkm._ndomain_backward(None, None, wv, hist, it, 0.1, "squared", torch.float64)
    with pytest.raises(
        ValueError, match=r"_ndomain_recompute: history's 3 groups do not divide the weight's 8 elements"
    ):
        torch.ops.edkm._ndomain_recompute(
            wv, torch.zeros(4, 3, 3, dtype=torch.float64), torch.tensor(1), 0.1, "squared"
        )
    with pytest.raises(TypeError, match=r"_ndomain_recompute: history must be Double, got Float"):
        torch.ops.edkm._ndomain_recompute(wv, hist.float(), torch.tensor(1), 0.1, "squared")
    with pytest.raises(ValueError, match=r"_ndomain_backward: grad_clustered must have the weight's 8 elements"):
        torch.ops.edkm._ndomain_backward(torch.zeros(3), None, wv, hist, torch.tensor(1), 0.1, "squared", torch.float64)
    with pytest.raises(ValueError, match=r"distance"):
        torch.ops.edkm._ndomain_recompute(wv, hist, torch.tensor(1), 0.1, "cosine")
