"""The fused CPU U-domain loops (csrc/cpu/udomain_kernel.cpp) against the ATen composition that
every device runs (csrc/udomain.cpp): same tables in, the same numbers out, forward and backward,
both distances, padding, several groups, early stop, more than one chunk per group."""

import pytest
import torch

import edkm
from edkm import _C


@pytest.fixture
def aten_path():
    """Run the body with the fused CPU loops off; restore the setting afterwards."""

    def run(fn, *args):
        with edkm.settings(fused_udomain=False):
            return fn(*args)

    return run


def tables(groups, width, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(groups, width, generator=g, dtype=torch.float64).sort(1).values
    counts = torch.randint(0, 6, (groups, width), generator=g).double()
    counts[:, width - width // 5 :] = 0  # padding at the end, as dkm's tables have
    values[:, width - width // 5 :] = 0.0
    c = torch.linspace(-1.5, 1.5, k, dtype=torch.float64).repeat(groups, 1)
    c = c + 0.05 * torch.randn(c.shape, generator=g, dtype=torch.float64)
    return values.to(dtype), counts.to(dtype), c.to(dtype)


def close(a, b, dtype):
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale) <= tol


CASES = [  # groups, width, k, temperature, max_iter, epsilon
    (1, 40, 4, 0.3, 3, 0.0),
    (3, 5000, 8, 0.05, 3, 0.0),  # several 2048-entry chunks per group
    (16, 300, 16, 0.2, 5, 1e-3),  # early stop
    (2, 100, 2, 1e-3, 4, 0.0),  # a sharp softmax: centroids no value attends to
]


def check(got, want, exact, dtype):
    """float64: fused == ATen to 1e-11. float32: both against the float64 result, and the fused
    loops at most twice as far from it as the ATen ops (plus 1e-6 of the scale)."""
    for a, b, e in zip(got, want, exact):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float64:
            assert close(a, b, dtype)
        else:
            err_fused = float((a.double() - e).abs().max())
            err_aten = float((b.double() - e).abs().max())
            assert err_fused <= 2 * err_aten + 1e-6 * float(e.abs().max()), (err_fused, err_aten)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("case", CASES, ids=[f"G{c[0]}-U{c[1]}-K{c[2]}" for c in CASES])
def test_fused_loops_match_the_aten_composition(case, distance, dtype, aten_path):
    groups, width, k, tau, max_iter, eps = case
    v, n, c = tables(groups, width, k, dtype, seed=groups + width)
    fwd, bwd = torch.ops.edkm._udomain_forward, torch.ops.edkm._udomain_backward
    assert _C.fused_udomain()
    got = fwd(v, n, c, tau, max_iter, eps, distance)
    want = aten_path(fwd, v, n, c, tau, max_iter, eps, distance)
    exact = fwd(v.double(), n.double(), c.double(), tau, max_iter, eps, distance)
    assert int(got[3]) == int(want[3]) == int(exact[3])
    check(got[:3], want[:3], exact[:3], dtype)
    g = torch.Generator().manual_seed(7)
    grad_soft = torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype) * (n > 0)
    grad_c = torch.randn(c.shape, generator=g, dtype=torch.float64).to(dtype)
    history = exact[2].to(dtype)  # the same history for both (with a sharp softmax, float32
    for extra in (None, grad_c):  # histories that differ in the last bit give visibly different gradients)
        got_b = bwd(v, n, history, exact[3], tau, distance, grad_soft, extra)
        want_b = aten_path(bwd, v, n, history, exact[3], tau, distance, grad_soft, extra)
        exact_b = bwd(
            v.double(),
            n.double(),
            history.double(),
            exact[3],
            tau,
            distance,
            grad_soft.double(),
            None if extra is None else extra.double(),
        )
        check(got_b, want_b, exact_b, dtype)


def test_fused_loops_do_not_depend_on_the_thread_count():
    v, n, c = tables(3, 9000, 8, torch.float32, seed=3)
    threads = torch.get_num_threads()
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        try:
            f = torch.ops.edkm._udomain_forward(v, n, c, 0.05, 3, 0.0, "squared")
            b = torch.ops.edkm._udomain_backward(v, n, f[2], f[3], 0.05, "squared", f[1], None)
        finally:
            torch.set_num_threads(threads)
        outs.append(list(f[:3]) + list(b))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_dkm_with_many_groups_matches_the_aten_path(aten_path):
    """edkm.dkm end to end (bf16 weight, 64 groups) with either U-domain implementation."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 96, generator=g) * 0.02).bfloat16()
    c = torch.linspace(-0.04, 0.04, 8).repeat(64, 1)

    def run():
        wr, cr = w.clone().requires_grad_(), c.clone().requires_grad_()
        r = edkm.dkm(wr, cr, 1e-5, 3)
        (r.clustered.float() * torch.linspace(-1, 1, w.numel()).view(w.shape)).sum().backward()
        return r.clustered, r.centroids, wr.grad, cr.grad

    fused, aten = run(), aten_path(run)
    # bf16 outputs: the two float32 computations round to the same bf16 value almost everywhere,
    # one ulp apart at most where they straddle a rounding boundary
    a, b = fused[0].float(), aten[0].float()
    assert ((a - b).abs() <= b.abs() * 2.0**-7).all()
    assert (a != b).float().mean() < 0.01
    assert close(fused[1], aten[1], torch.float32)
    assert (fused[2].float() - aten[2].float()).abs().max() <= 1e-2 * aten[2].float().abs().max()
    assert close(fused[3], aten[3], torch.float32)
