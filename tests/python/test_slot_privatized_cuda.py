"""The privatized CUDA slot kernels (cuda/slot_privatized.cuh, off by default:
edkm.settings(privatized_slot_atomics=True)): shared-memory histograms and warp-aggregated scatter-adds,
with the deterministic scatter's scale found on the device. Checked against the global-atomic
kernels on the same GPU and against the CPU kernels: the same slot tables, the same bits in
deterministic mode, NaN/Inf gradients summed as IEEE sums, the missing-slot error, and dkm end
to end. They were written without a GPU; these tests are what a GPU run checks first."""

import pytest
import torch

import edkm
from conftest import rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def with_privatized(on, fn, *args, deterministic=True):
    with edkm.settings(privatized_slot_atomics=on, deterministic_scatter=deterministic):
        out = fn(*args)
        torch.cuda.synchronize()
        return out


SHAPES = [
    ((512, 1024), 1),  # 16 full tiles of 32768 weights
    ((8, 70000), 2),  # tiles cut by the group end: 8 x 32768 + 17856 per group
    ((64, 300), 64),  # 64 groups of 300: one partial tile each, dense maps
    ((100, 50), 100),  # more than 64 groups: generic table, binary-search look-ups
    ((1, 7), 1),  # fewer weights than a warp
]
IDS = ["one-table", "tiles-cut-by-groups", "64-groups", "100-groups", "tiny"]


def weight(shape, dtype, seed=0, spread=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * spread).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=IDS)
def test_histogram_matches_global_atomics_and_cpu(dtype, shape, groups):
    w = weight(shape, dtype)
    want = torch.ops.edkm._slot_table(w, groups)
    for on in (True, False):
        got = with_privatized(on, torch.ops.edkm._slot_table, w.cuda(), groups)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("value", [0.015625, 0.0157470703125], ids=["even-pattern", "odd-pattern"])
def test_histogram_of_one_value(value):
    """Every weight the same value: one counter reaches the tile size (32768), in the low
    half-word (even bit pattern) or the high one (odd), and the group total adds 16 tiles."""
    w = torch.full((512, 1024), value, dtype=torch.bfloat16)
    pattern = int(w.view(torch.int16)[0, 0]) & 0xFFFF
    assert pattern % 2 == (0 if value == 0.015625 else 1)
    slots, counts = with_privatized(True, torch.ops.edkm._slot_table, w.cuda(), 1)
    assert int(counts[0, 0]) == w.numel() and int((counts > 0).sum()) == 1
    assert int(slots[0, 0]) == pattern


def test_histogram_of_two_values_sharing_a_word():
    """Patterns s and s + 1 (one 32-bit word of counters), split unevenly, in every tile."""
    w = torch.full((512, 1024), 0.015625, dtype=torch.bfloat16)
    odd = torch.tensor(0.0157470703125, dtype=torch.bfloat16)
    w.view(-1)[::3] = odd
    want = torch.ops.edkm._slot_table(w, 1)
    got = with_privatized(True, torch.ops.edkm._slot_table, w.cuda(), 1)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert sorted(int(c) for c in want[1][0] if c > 0) == [w.numel() // 3 + 1, w.numel() - w.numel() // 3 - 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=IDS)
def test_deterministic_scatter_add_same_bits_as_global_atomics(dtype, shape, groups):
    w = weight(shape, dtype).cuda()
    grad = weight(shape, dtype, seed=1, spread=1.0).cuda()
    slots, _ = torch.ops.edkm._slot_table(w, groups)
    add = torch.ops.edkm._slot_scatter_add
    got = with_privatized(True, add, w, slots, grad)
    again = with_privatized(True, add, w, slots, grad)
    want = with_privatized(False, add, w, slots, grad)
    assert torch.equal(got, again) and torch.equal(got, want)
    cpu = torch.ops.edkm._slot_scatter_add(w.cpu(), slots.cpu(), grad.cpu())
    assert rel_error(got.cpu(), cpu) <= 1e-6


@pytest.mark.parametrize("shape,groups", SHAPES, ids=IDS)
def test_fast_scatter_add_matches_cpu(shape, groups):
    w = weight(shape, torch.bfloat16).cuda()
    grad = weight(shape, torch.bfloat16, seed=1, spread=1.0).cuda()
    slots, _ = torch.ops.edkm._slot_table(w, groups)
    got = with_privatized(True, torch.ops.edkm._slot_scatter_add, w, slots, grad, deterministic=False)
    cpu = torch.ops.edkm._slot_scatter_add(w.cpu(), slots.cpu(), grad.cpu())
    assert rel_error(got.cpu(), cpu) <= 1e-6


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "fast"])
def test_non_finite_gradients_sum_like_ieee(deterministic):
    w = weight((64, 512), torch.bfloat16)
    slots, counts = torch.ops.edkm._slot_table(w, 1)
    grad = weight((64, 512), torch.bfloat16, seed=1, spread=1.0)
    flat_w, flat_g = w.view(-1), grad.view(-1)
    # Three slots with several weights each: one gets a NaN, one +Inf, one +Inf and -Inf.
    busy = [int(s) for s in slots[0][counts[0] >= 3][:3]]
    for slot, values in zip(busy, ([float("nan")], [float("inf")], [float("inf"), float("-inf")])):
        where = ((flat_w.view(torch.int16).int() & 0xFFFF) == slot).nonzero().view(-1)
        for idx, v in zip(where, values):
            flat_g[idx] = v
    want = torch.ops.edkm._slot_scatter_add(w, slots, grad)  # CPU: sums in order, IEEE rules
    got = with_privatized(
        True, torch.ops.edkm._slot_scatter_add, w.cuda(), slots.cuda(), grad.cuda(), deterministic=deterministic
    ).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    assert int(finite.logical_not().sum()) == 3
    assert rel_error(got[finite], want[finite]) <= 1e-6


def test_weight_values_missing_from_the_table_are_refused():
    w = weight((64, 256), torch.bfloat16).cuda()
    slots, _ = torch.ops.edkm._slot_table(w, 1)
    other = w.clone()
    other[0, 0] = 1000.0  # a value no weight had
    grad = torch.ones_like(w)
    for deterministic in (True, False):
        with pytest.raises(ValueError, match="missing from its slot table"):
            with_privatized(True, torch.ops.edkm._slot_scatter_add, other, slots, grad, deterministic=deterministic)
    # The public gather still checks (only dkm's own forward skips the read-back).
    table = torch.zeros(slots.shape, device="cuda")
    with pytest.raises(ValueError, match="missing from its slot table"):
        torch.ops.edkm._slot_gather(other, slots, table)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dkm_end_to_end_same_bits_as_global_atomics(dtype):
    w = weight((1024, 1024), dtype).cuda()
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8).cuda()
    grad = weight((1024, 1024), dtype, seed=3, spread=1.0).cuda()

    def run():
        wi = w.clone().requires_grad_()
        ci = c.clone().requires_grad_()
        out = edkm.dkm(wi, ci, 1e-4, 3)
        loss = (out.clustered.float() * grad.float()).sum() + out.centroids.square().sum()
        return (out.clustered, out.centroids) + torch.autograd.grad(loss, (wi, ci))

    got = with_privatized(True, run)
    want = with_privatized(False, run)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
