"""gradcheck, opcheck (schema, autograd registration, fake kernels, AOT dispatch) and
torch.compile for every edkm op."""

import pytest
import torch

from conftest import DEVICES, rel_error, sample_weight, spread_centroids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("repeats", [True, False], ids=["repeated", "distinct"])
def test_gradcheck(device, distance, repeats):
    w = sample_weight((6, 8), repeats, device).requires_grad_()
    c = spread_centroids(2, 4, device).requires_grad_()
    tau = 0.3

    def f(w, c):
        out = torch.ops.edkm.dkm(w, c, tau, 3, 0.0, distance)
        return out[0], out[1]

    assert torch.autograd.gradcheck(f, (w, c), eps=1e-6, atol=1e-7, rtol=1e-6)


def dkm_samples(device):
    out = []
    for dtype, cdtype, groups in [
        (torch.float64, torch.float64, 1),
        (torch.float32, torch.float32, 2),
        (torch.bfloat16, torch.float32, 1),
        (torch.float16, torch.float16, 4),
    ]:
        w = sample_weight((16, 12), True, device).to(dtype).requires_grad_()
        c = spread_centroids(groups, 4, device).to(cdtype).requires_grad_()
        out.append((w, c, 0.2, 3, 0.0, "squared"))
    w = sample_weight((8, 8), False, device).requires_grad_()
    out.append((w, spread_centroids(1, 8, device), 0.5, 5, 1e-3, "absolute"))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dkm_and_reference(device):
    for args in dkm_samples(device):
        torch.library.opcheck(torch.ops.edkm.dkm.default, args)
        torch.library.opcheck(torch.ops.edkm.dkm_reference.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_internal_ops(device):
    for w, c, tau, it, eps, dist in dkm_samples(device):
        w, c = w.detach(), c.detach()
        fwd = torch.ops.edkm._dkm_forward(w, c, tau, it, eps, dist)
        torch.library.opcheck(torch.ops.edkm._dkm_forward.default, (w, c, tau, it, eps, dist))
        _, _, iterations, lookup, values, counts, history = fwd
        g = torch.randn_like(w)
        gc = torch.randn_like(c)
        torch.library.opcheck(
            torch.ops.edkm._dkm_backward.default,
            (g, gc, w, lookup, values, counts, history, iterations, tau, dist, c.dtype),
        )
        torch.library.opcheck(
            torch.ops.edkm._dkm_backward.default,
            (g, None, w, lookup, values, counts, history, iterations, tau, dist, c.dtype),
        )
        # The in-place variant: the same gradients, the weight's written over grad_clustered.
        gw, gcen = torch.ops.edkm._dkm_backward(
            g, gc, w, lookup, values, counts, history, iterations, tau, dist, c.dtype
        )
        buf = g.clone()
        gcen_ip = torch.ops.edkm._dkm_backward_(
            buf, gc, w, lookup, values, counts, history, iterations, tau, dist, c.dtype
        )
        assert torch.equal(buf, gw) and torch.equal(gcen_ip, gcen)
        torch.library.opcheck(
            torch.ops.edkm._dkm_backward_.default,
            (g.clone(), gc, w, lookup, values, counts, history, iterations, tau, dist, c.dtype),
        )
    for dtype in (torch.bfloat16, torch.float16):
        w = sample_weight((4, 300), True, device).to(dtype)
        slots, counts = torch.ops.edkm._slot_table(w, 4)
        torch.library.opcheck(torch.ops.edkm._slot_table.default, (w, 4))
        table = torch.randn(slots.shape, device=device)
        grad = torch.randn_like(w)
        torch.library.opcheck(torch.ops.edkm._slot_gather.default, (w, slots, table))
        torch.library.opcheck(torch.ops.edkm._slot_scatter_add.default, (w, slots, grad))
        torch.library.opcheck(torch.ops.edkm._slot_grad.default, (w, slots, grad, table, table * 2))
        out = torch.ops.edkm._slot_grad(w, slots, grad, table, table * 2)
        buf = grad.clone()
        assert torch.ops.edkm._slot_grad_(w, slots, buf, table, table * 2) is None
        assert torch.equal(buf, out)
        torch.library.opcheck(torch.ops.edkm._slot_grad_.default, (w, slots, grad.clone(), table, table * 2))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_slot_grad_rejects_buffers_it_cannot_write(device):
    w = sample_weight((4, 64), True, device).bfloat16()
    slots, _ = torch.ops.edkm._slot_table(w, 1)
    table = torch.randn(slots.shape, device=device)
    with pytest.raises(TypeError, match=r"_slot_grad_: grad must have weight's dtype"):
        torch.ops.edkm._slot_grad_(w, slots, torch.zeros_like(w, dtype=torch.float32), table, table)
    with pytest.raises(ValueError, match=r"_slot_grad_: grad must be contiguous"):
        torch.ops.edkm._slot_grad_(w, slots, torch.zeros(64, 4, device=device).bfloat16().t(), table, table)
    with pytest.raises(ValueError, match=r"_slot_grad_: grad must not share memory with weight"):
        torch.ops.edkm._slot_grad_(w, slots, w, table, table)
    with pytest.raises(ValueError, match=r"_slot_grad_: grad must have weight's shape"):
        torch.ops.edkm._slot_grad_(w, slots, torch.zeros(4, 63, device=device).bfloat16(), table, table)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_assign_dequantize(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w = sample_weight((8, 32), False, device).to(dtype)
        c = spread_centroids(4, 8, device).to(dtype)
        torch.library.opcheck(torch.ops.edkm.assign.default, (w, c))
        idx = torch.ops.edkm.assign(w, c)
        torch.library.opcheck(torch.ops.edkm.dequantize.default, (idx, c, None))
        torch.library.opcheck(torch.ops.edkm.dequantize.default, (idx, c, torch.float16))


def loss_and_grads(fn, w, c, g):
    w = w.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = fn(w, c, g)
    gw, gc = torch.autograd.grad(loss, (w, c))
    return loss.detach(), gw, gc


def clustered_loss(w, c, g):
    clustered, centroids, iterations = torch.ops.edkm.dkm(w, c, 0.1, 3, 0.0, "squared")
    # The loss itself in float64, so eager and inductor only differ in how our ops ran.
    loss = (clustered.double() * g.double()).sum() + centroids.double().square().sum()
    return loss + iterations.double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_torch_compile_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()
    w = sample_weight((32, 16), True).to(dtype)
    c = spread_centroids(2, 4).to(torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.randn(w.shape, dtype=torch.float64).to(dtype)
    eager = loss_and_grads(clustered_loss, w, c, g)
    compiled = loss_and_grads(torch.compile(clustered_loss, fullgraph=True), w, c, g)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b) or rel_error(a, b) <= 1e-12


def test_torch_compile_dynamic_shapes():
    torch._dynamo.reset()
    fn = torch.compile(clustered_loss, fullgraph=True, dynamic=True)
    for rows in (8, 12):
        w = sample_weight((rows, 16), True)
        c = spread_centroids(2, 4)
        g = torch.randn(w.shape, dtype=torch.float64)
        for a, b in zip(loss_and_grads(fn, w, c, g), loss_and_grads(clustered_loss, w, c, g)):
            assert rel_error(a, b) <= 1e-12


def test_torch_compile_reference_and_hard_path():
    torch._dynamo.reset()

    def f(w, c):
        soft = torch.ops.edkm.dkm_reference(w, c, 0.1, 3, 1e-3, "squared")[0]
        hard = torch.ops.edkm.dequantize(torch.ops.edkm.assign(w, c), c, None)
        return soft, hard

    w = sample_weight((16, 16), False)
    c = spread_centroids(1, 8)
    for a, b in zip(torch.compile(f, fullgraph=True)(w, c), f(w, c)):
        assert rel_error(a, b) <= 1e-12


def test_torch_export():
    class M(torch.nn.Module):
        def forward(self, w, c):
            return torch.ops.edkm.dkm(w, c, 0.1, 3, 0.0, "squared")[0]

    w = sample_weight((8, 8), True, dtype=torch.bfloat16)
    c = spread_centroids(1, 4, dtype=torch.float32)
    ep = torch.export.export(M(), (w, c))
    assert torch.equal(ep.module()(w, c), M()(w, c))
