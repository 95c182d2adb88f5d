"""The saved-tensor store: exact round trips, dedup of views, in-place safety, uniquify only
when smaller, and gradients unchanged when a real graph runs through it."""

import pytest
import torch

import edkm
from conftest import DEVICES

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.bool]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride() or a.device != b.device:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


def sample(dtype, device, shape=(33, 17)):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return (torch.rand(shape, generator=g) > 0.5).to(device)
    if dtype == torch.int64:
        return torch.randint(-5, 5, shape, generator=g).to(device)
    t = torch.randn(shape, generator=g).to(dtype)
    t.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")]).to(dtype)
    return t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("uniquify", [False, True], ids=["plain", "uniquify"])
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "on-device"])
def test_round_trip_is_exact_for_views(device, dtype, uniquify, offload):
    store = edkm.SavedTensorStore(offload=offload, uniquify=uniquify)
    base = sample(dtype, device)
    views = [base, base.t(), base[3:20:2], base[:, 5], base.reshape(-1), base[0:1].expand(4, 17)]
    handles = [store.pack(v) for v in views]
    for v, h in zip(views, handles):
        assert same(store.unpack(h), v)
        assert same(store.unpack(h), v)  # unpacking twice (retain_graph) works too


def test_views_of_one_storage_are_copied_once():
    store = edkm.SavedTensorStore(offload=True)
    base = torch.randn(256, 256)
    for v in (base, base.t(), base.view(-1), base[:200]):
        store.pack(v)
    c = store.counters()
    assert c["dedup_hits"] == 3
    assert c["host_bytes"] == base.nbytes
    assert c["dedup_bytes_avoided"] == base.nbytes * 2 + base[:200].nbytes


def test_small_slice_of_a_large_storage_copies_only_the_slice():
    store = edkm.SavedTensorStore(offload=True)
    big = torch.randn(1000, 1000)
    h = store.pack(big[:10])
    assert store.counters()["host_bytes"] == big[:10].nbytes
    assert torch.equal(store.unpack(h), big[:10])


def test_in_place_change_after_save_is_never_served_stale():
    store = edkm.SavedTensorStore(offload=True)
    t = torch.arange(10.0)
    first = store.pack(t)
    t.add_(100)
    second = store.pack(t)  # a new version: not a dedup hit
    assert store.counters()["dedup_hits"] == 0
    assert torch.equal(store.unpack(first), torch.arange(10.0))
    assert torch.equal(store.unpack(second), torch.arange(10.0) + 100)


def test_in_place_change_of_a_referenced_tensor_raises_like_autograd():
    store = edkm.SavedTensorStore(offload=False, uniquify=False)  # nothing copied
    t = torch.arange(10.0)
    h = store.pack(t)
    t.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        store.unpack(h)


def test_uniquify_only_when_it_saves_bytes():
    store = edkm.SavedTensorStore(offload=True, uniquify=True)
    store.pack(torch.randn(4096))  # all distinct float32: an index would not help
    assert store.counters()["uniquify_bytes_avoided"] == 0
    few = (torch.randn(4096) * 4).round().bfloat16()  # a dozen distinct values: uint8 index
    h = store.pack(few)
    avoided = store.counters()["uniquify_bytes_avoided"]
    assert avoided > 0.4 * few.nbytes
    assert same(store.unpack(h), few)
    rows = torch.randn(16, 8)[torch.randint(0, 16, (5000,))]  # 5000 rows, 16 distinct
    h = store.pack(rows)
    assert store.counters()["uniquify_bytes_avoided"] - avoided > 0.9 * rows.nbytes
    assert same(store.unpack(h), rows)


def test_parameters_are_referenced_not_copied():
    store = edkm.SavedTensorStore(offload=True)
    p = torch.nn.Parameter(torch.randn(64, 64))
    h = store.pack(p)
    c = store.counters()
    assert c["referenced_bytes"] == p.nbytes and c["host_bytes"] == 0
    assert store.unpack(h) is p or torch.equal(store.unpack(h), p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "opts",
    [dict(offload=True), dict(offload=True, uniquify=True), dict(offload=False, uniquify=True), dict(dedup=False)],
    ids=["M", "M+U", "U", "no-dedup"],
)
def test_gradients_through_the_store_are_bitwise_unchanged(device, opts):
    w = (torch.randn(96, 64, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    w = w.to(device).requires_grad_()
    c = torch.linspace(-0.05, 0.05, 8, device=device).view(1, 8)
    x = torch.randn(5, 64, device=device).bfloat16()

    def loss():
        clustered = edkm.dkm_reference(w, c, 1e-4, 3).clustered
        return (x @ clustered.t()).float().square().sum() + edkm.dkm(w, c, 1e-4, 3).clustered.float().sum()

    expected = torch.autograd.grad(loss(), w)[0]
    with edkm.saved_tensors(**opts) as store:
        value = loss()
    assert store.live_handles > 0
    got = torch.autograd.grad(value, w)[0]
    assert torch.equal(got, expected)
    del value
    assert store.live_handles == 0  # the graph is gone, and so are its copies


def test_reference_memory_shrinks_with_each_stage():
    w = (torch.randn(256, 256) * 0.02).bfloat16().requires_grad_()
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8)
    totals = {}
    for name, opts in {"M": dict(offload=True), "M+U": dict(offload=True, uniquify=True)}.items():
        with edkm.saved_tensors(**opts) as store:
            out = edkm.dkm_reference(w, c, 1e-4, 3)
        totals[name] = store.counters()
        del out
    assert totals["M"]["device_bytes"] == 0  # CPU tensors count as host memory
    assert totals["M+U"]["host_bytes"] * 5 < totals["M"]["host_bytes"]


def test_unknown_handle_is_a_clear_error():
    store = edkm.SavedTensorStore()
    with pytest.raises(ValueError, match="unknown or released handle"):
        store.unpack(12345)


def test_writing_into_an_unpacked_tensor_does_not_change_the_store():
    store = edkm.SavedTensorStore(offload=True)
    t = torch.arange(10.0)
    h = store.pack(t)
    store.unpack(h).mul_(100)
    assert torch.equal(store.unpack(h), torch.arange(10.0))


def test_views_of_parameters_are_referenced_too():
    # F.linear saves weight.t(): a view of the parameter, alive in its module anyway.
    w = torch.nn.Parameter(torch.randn(32, 64))
    leaf = torch.randn(4, 64, requires_grad=True)
    with edkm.saved_tensors(offload=True) as store:
        x = leaf * 2  # an activation: needs grad, not a leaf
        y = torch.nn.functional.linear(x, w)
    c = store.counters()
    assert c["referenced_bytes"] == w.nbytes
    assert c["host_bytes"] == x.nbytes  # only the activation was copied
    y.sum().backward()
    assert torch.equal(w.grad, x.detach().sum(0).expand(32, 64))
    assert torch.allclose(leaf.grad, 2 * w.detach().sum(0).expand(4, 64), rtol=1e-5, atol=1e-5)
