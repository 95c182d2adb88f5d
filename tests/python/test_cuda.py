"""CUDA-only checks: CUDA kernels against the CPU kernels and the float64 reference, the
current-stream/device discipline, and CUDA graphs through torch.compile(mode="reduce-overhead").
Every op is also run on CUDA by the device-parametrized tests of the other files."""

import pytest
import torch

import edkm
from conftest import rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_build_has_cuda_kernels():
    assert edkm.cuda_compiled()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,groups",
    [((512, 1024), 1), ((64, 300), 64), ((8, 70000), 2), ((100, 50), 100)],
    ids=["one-table", "64-dense-maps", "large-groups", "binary-search"],
)
def test_slot_kernels_match_cpu(dtype, shape, groups):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    slots, counts = torch.ops.edkm._slot_table(w, groups)
    cs, cc = torch.ops.edkm._slot_table(w.cuda(), groups)
    assert torch.equal(cs.cpu(), slots) and torch.equal(cc.cpu(), counts)
    table = torch.randn(slots.shape, generator=g)
    assert torch.equal(
        torch.ops.edkm._slot_gather(w.cuda(), cs, table.cuda()).cpu(), torch.ops.edkm._slot_gather(w, slots, table)
    )
    grad = torch.randn(shape, generator=g).to(dtype)
    sums = torch.ops.edkm._slot_scatter_add(w, slots, grad)
    assert rel_error(torch.ops.edkm._slot_scatter_add(w.cuda(), cs, grad.cuda()), sums) <= 1e-6
    shift = torch.randn(slots.shape, generator=g)
    out = torch.ops.edkm._slot_grad(w, slots, grad, table, shift)
    out_cuda = torch.ops.edkm._slot_grad(w.cuda(), cs, grad.cuda(), table.cuda(), shift.cuda())
    # Both round x*a+b once to the weight's dtype; fused multiply-add may differ by one rounding.
    assert rel_error(out_cuda, out) <= 2.0**-7
    buf = grad.cuda()
    torch.ops.edkm._slot_grad_(w.cuda(), cs, buf, table.cuda(), shift.cuda())
    assert torch.equal(buf, out_cuda)  # the in-place kernel computes the same bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dkm_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(256, 512, generator=g) * 0.02).to(dtype)
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8).to(torch.float64 if dtype == torch.float64 else torch.float32)
    grad = torch.randn(w.shape, generator=g).to(dtype)
    outs = []
    for dev in ("cpu", "cuda"):
        wi = w.to(dev).requires_grad_()
        out = edkm.dkm(wi, c.to(dev), 1e-4, 3)
        (gw,) = torch.autograd.grad(out.clustered, wi, grad.to(dev))
        outs.append((out.clustered, out.centroids, gw))
    tol = {torch.bfloat16: 2.0**-7, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for a, b in zip(outs[1], outs[0]):
        assert rel_error(a, b) <= tol


def test_runs_on_current_stream_and_non_default_device_index():
    w = torch.randn(128, 128, device="cuda").bfloat16().requires_grad_()
    c = torch.linspace(-2, 2, 8, device="cuda").view(1, 8)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = edkm.dkm(w, c, 0.05, 3)
        out.clustered.float().sum().backward()
    s.synchronize()
    ref = edkm.dkm(w.detach(), c, 0.05, 3)
    assert torch.equal(out.clustered, ref.clustered)


def test_compile_reduce_overhead_matches_eager():
    torch._dynamo.reset()

    def step(w, c):
        clustered, centroids, _ = torch.ops.edkm.dkm(w, c, 0.05, 3, 0.0, "squared")
        return (clustered.float() ** 2).sum() + centroids.sum()

    w = torch.randn(64, 64, device="cuda").bfloat16()
    c = torch.linspace(-2, 2, 8, device="cuda").view(1, 8)
    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        wi = w.clone().requires_grad_()
        loss = compiled(wi, c)
        (gw,) = torch.autograd.grad(loss, wi)
    we = w.clone().requires_grad_()
    le = step(we, c)
    (ge,) = torch.autograd.grad(le, we)
    assert rel_error(loss, le) <= 1e-6
    assert rel_error(gw, ge) <= 1e-2


def test_deterministic_scatter_is_bitwise_repeatable_and_close_to_fast_mode():
    from edkm import _C

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(2048, 2048, generator=g) * 0.02).bfloat16().cuda()
    grad = torch.randn(w.shape, generator=g).bfloat16().cuda()
    slots, _ = torch.ops.edkm._slot_table(w, 1)
    assert _C.deterministic_scatter()
    first = torch.ops.edkm._slot_scatter_add(w, slots, grad)
    for _ in range(3):
        assert torch.equal(torch.ops.edkm._slot_scatter_add(w, slots, grad), first)
    with edkm.settings(deterministic_scatter=False):
        fast = torch.ops.edkm._slot_scatter_add(w, slots, grad)
    assert _C.deterministic_scatter()
    exact = torch.ops.edkm._slot_scatter_add(w.cpu(), slots.cpu(), grad.cpu())  # float64 serial
    assert rel_error(first, exact) <= 1e-6
    assert rel_error(fast, exact) <= 1e-6


@pytest.mark.parametrize("k", [8, 256, 300])
@pytest.mark.parametrize("groups", [1, 8])
def test_assign_dequantize_cuda_match_cpu(k, groups):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(groups * 4, 1000, generator=g).bfloat16()
    c = torch.randn(groups, k, generator=g)
    c[:, 1] = c[:, 0]
    idx = edkm.assign(w, c)
    idx_cuda = edkm.assign(w.cuda(), c.cuda())
    assert idx_cuda.dtype == idx.dtype and torch.equal(idx_cuda.cpu(), idx)
    assert torch.equal(edkm.dequantize(idx_cuda, c.cuda()).cpu(), edkm.dequantize(idx, c))
