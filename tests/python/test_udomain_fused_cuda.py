"""The CUDA U-domain kernels (cuda/udomain_kernels.cu, off by default: edkm.settings(fused_udomain_cuda=True))
against the ATen composition on the same GPU and the float64 reference: forward and backward,
both distances, padding, several groups, early stop, K above 16, same bits on every run, and
dkm end to end. They were written without a GPU; these tests are what a GPU run checks first."""

import pytest
import torch

import edkm
from edkm import _C
from test_udomain_fused_cpu import CASES, check, tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def kernels_are_registered():
    """Without the kernels (a build without CUDA) every comparison here would be ATen vs ATen."""
    assert _C.udomain_cuda_registered(), "libedkm has no CUDA U-domain kernels: the tests would compare nothing"


def with_kernels(on, fn, *args):
    with edkm.settings(fused_udomain_cuda=on):
        return fn(*args)


CUDA_CASES = CASES + [
    (2, 700, 32, 0.1, 3, 0.0),  # K = 32: the 64-entry arrays
    (1, 3000, 128, 0.1, 3, 0.0),
]  # K = 128: the 256-entry arrays


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"G{c[0]}-U{c[1]}-K{c[2]}" for c in CUDA_CASES])
def test_cuda_kernels_match_the_aten_composition(case, distance, dtype):
    groups, width, k, tau, max_iter, eps = case
    v, n, c = (x.cuda() for x in tables(groups, width, k, dtype, seed=groups + width))
    fwd, bwd = torch.ops.edkm._udomain_forward, torch.ops.edkm._udomain_backward
    got = with_kernels(True, fwd, v, n, c, tau, max_iter, eps, distance)
    want = with_kernels(False, fwd, v, n, c, tau, max_iter, eps, distance)
    exact = fwd(v.double().cpu(), n.double().cpu(), c.double().cpu(), tau, max_iter, eps, distance)
    assert int(got[3]) == int(want[3]) == int(exact[3])
    check([x.cpu() for x in got[:3]], [x.cpu() for x in want[:3]], exact[:3], dtype)
    g = torch.Generator().manual_seed(7)
    grad_soft = (torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype) * (n.cpu() > 0)).cuda()
    grad_c = torch.randn(c.shape, generator=g, dtype=torch.float64).to(dtype).cuda()
    history = exact[2].to(dtype).cuda()
    it = exact[3].cuda()
    for extra in (None, grad_c):
        got_b = with_kernels(True, bwd, v, n, history, it, tau, distance, grad_soft, extra)
        want_b = with_kernels(False, bwd, v, n, history, it, tau, distance, grad_soft, extra)
        exact_b = bwd(
            v.double().cpu(),
            n.double().cpu(),
            history.double().cpu(),
            exact[3],
            tau,
            distance,
            grad_soft.double().cpu(),
            None if extra is None else extra.double().cpu(),
        )
        check([x.cpu() for x in got_b], [x.cpu() for x in want_b], exact_b, dtype)


def test_more_than_256_centroids_fall_back_to_the_aten_path():
    v, n, c = (x.cuda() for x in tables(1, 600, 300, torch.float64, seed=9))
    got = with_kernels(True, torch.ops.edkm._udomain_forward, v, n, c, 0.2, 2, 0.0, "squared")
    want = with_kernels(False, torch.ops.edkm._udomain_forward, v, n, c, 0.2, 2, 0.0, "squared")
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the same code ran


def test_cuda_kernels_give_the_same_bits_on_every_run():
    v, n, c = (x.cuda() for x in tables(3, 9000, 8, torch.float32, seed=3))
    runs = []
    for _ in range(2):
        f = with_kernels(True, torch.ops.edkm._udomain_forward, v, n, c, 0.05, 3, 0.0, "squared")
        b = with_kernels(True, torch.ops.edkm._udomain_backward, v, n, f[2], f[3], 0.05, "squared", f[1], None)
        runs.append(list(f) + list(b))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eps", [0.0, 5e-3], ids=["runs-all", "stops-early"])
def test_dkm_on_the_cuda_kernels_matches_the_reference(eps):
    g = torch.Generator().manual_seed(4)
    w = ((torch.randn(64, 64, generator=g, dtype=torch.float64) * 8).round() / 8).cuda()
    c = torch.linspace(-2, 2, 4, dtype=torch.float64).view(1, 4).cuda()
    grad = torch.randn(w.shape, generator=g, dtype=torch.float64).cuda()

    def run(fn):
        wi, ci = w.clone().requires_grad_(), c.clone().requires_grad_()
        out = fn(wi, ci, 0.1, 30, eps, "squared")
        gw, gc = torch.autograd.grad((out.clustered * grad).sum() + out.centroids.sum(), (wi, ci))
        return out, gw, gc

    ours = with_kernels(True, run, edkm.dkm)
    ref = run(edkm.dkm_reference)
    assert int(ours[0].iterations) == int(ref[0].iterations)
    assert (int(ours[0].iterations) < 30) == (eps > 0)
    for a, b in [
        (ours[0].clustered, ref[0].clustered),
        (ours[0].centroids, ref[0].centroids),
        (ours[1], ref[1]),
        (ours[2], ref[2]),
    ]:
        assert float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) <= 1e-10


def test_bf16_dkm_linear_on_the_cuda_kernels_agrees_with_the_aten_path():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(512, 256, generator=g) * 0.02).bfloat16().cuda()
    c = torch.linspace(-0.04, 0.04, 8).repeat(4, 1).cuda()
    x = torch.randn(8, 256, generator=g).bfloat16().cuda()

    def run():
        wi, ci = w.clone().requires_grad_(), c.clone().requires_grad_()
        y = edkm.dkm_linear(x, wi, ci, None, 1e-5, 3)
        y = y[0] if isinstance(y, tuple) else y
        gw, gc = torch.autograd.grad(y.float().square().sum(), (wi, ci))
        return y, gw, gc

    fused, aten = with_kernels(True, run), with_kernels(False, run)
    for a, b in zip(fused, aten):
        a, b = a.float(), b.float()
        assert float((a - b).abs().max()) <= 1e-2 * float(b.abs().max())
