"""Every bad argument gets one clear error that names it."""

import math

import pytest
import torch

import edkm
from conftest import DEVICES

W = torch.randn(8, 16)
C = torch.linspace(-1, 1, 4).view(1, 4)


def with_nan(t, value=math.nan):
    t = t.clone()
    t.view(-1)[3] = value
    return t


CASES = [
    ("nan-weight", lambda: edkm.dkm(with_nan(W), C, 0.1), ValueError, "weight contains NaN or Inf"),
    ("inf-weight", lambda: edkm.dkm(with_nan(W, math.inf), C, 0.1), ValueError, "weight contains NaN or Inf"),
    ("nan-bf16-weight", lambda: edkm.dkm(with_nan(W).bfloat16(), C, 0.1), ValueError, "weight contains NaN"),
    ("nan-centroids", lambda: edkm.dkm(W, with_nan(torch.zeros(1, 4)), 0.1), ValueError, "centroids contain NaN"),
    ("empty-weight", lambda: edkm.dkm(torch.empty(0, 4), C, 0.1), ValueError, "weight must not be empty"),
    ("centroids-1d", lambda: edkm.dkm(W, C.view(-1), 0.1), ValueError, "centroids must be 2-D"),
    ("k-below-2", lambda: edkm.dkm(W, torch.zeros(1, 1), 0.1), ValueError, "K >= 2"),
    ("groups-do-not-divide", lambda: edkm.dkm(W, torch.zeros(3, 4), 0.1), ValueError, "equal groups"),
    ("centroids-dtype", lambda: edkm.dkm(W, C.double(), 0.1), TypeError, "centroids must have weight's dtype"),
    ("centroids-int", lambda: edkm.dkm(W.bfloat16(), C.int(), 0.1), TypeError, "centroids must have weight's dtype"),
    ("weight-dtype", lambda: edkm.dkm(W.int(), C, 0.1), TypeError, "weight must be bfloat16, float16"),
    ("temperature-zero", lambda: edkm.dkm(W, C, 0.0), ValueError, "temperature must be"),
    ("temperature-negative", lambda: edkm.dkm(W, C, -1.0), ValueError, "temperature must be"),
    ("temperature-nan", lambda: edkm.dkm(W, C, math.nan), ValueError, "temperature must be"),
    ("max-iter-zero", lambda: edkm.dkm(W, C, 0.1, 0), ValueError, "max_iter must be >= 1"),
    ("epsilon-negative", lambda: edkm.dkm(W, C, 0.1, 3, -1.0), ValueError, "epsilon must be"),
    (
        "distance-unknown",
        lambda: edkm.dkm(W, C, 0.1, 3, 0.0, "cosine"),
        ValueError,
        "distance must be 'squared' or 'absolute'",
    ),
    ("reference-bad-temperature", lambda: edkm.dkm_reference(W, C, 0.0), ValueError, "dkm_reference: temperature"),
    ("assign-nan", lambda: edkm.assign(with_nan(W), C), ValueError, "assign: weight contains NaN"),
    ("assign-groups", lambda: edkm.assign(W, torch.zeros(3, 4)), ValueError, "equal groups"),
    ("assign-int-weight", lambda: edkm.assign(W.int(), C), TypeError, "assign: weight must be"),
    (
        "dequantize-out-of-range",
        lambda: edkm.dequantize(torch.tensor([0, 4], dtype=torch.uint8), C),
        ValueError,
        "indices must lie in",
    ),
    ("dequantize-float-indices", lambda: edkm.dequantize(torch.zeros(4), C), TypeError, "indices must be"),
    (
        "dequantize-int-dtype",
        lambda: edkm.dequantize(torch.zeros(4, dtype=torch.uint8), C, torch.int32),
        TypeError,
        "dtype must be floating",
    ),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_devices_must_match():
    with pytest.raises(ValueError, match="centroids must be on weight's device"):
        edkm.dkm(W.cuda(), C, 0.1)


@pytest.mark.parametrize("bad_slot", [-5, 70000], ids=["negative", "above-65535"])
@pytest.mark.parametrize("rows,cols", [(4, 30000), (64, 96)], ids=["large-groups", "small-groups"])
def test_slot_tables_outside_the_16bit_range_are_refused(bad_slot, rows, cols):
    w = torch.randn(rows, cols).bfloat16()  # 30000-weight groups take the per-group dense map,
    slots, counts = torch.ops.edkm._slot_table(w, 4)  # 1536-weight groups the per-thread sparse one
    slots = slots.clone()
    slots[0, 0] = bad_slot
    table = torch.zeros(slots.shape)
    with pytest.raises(ValueError, match="slot"):
        torch.ops.edkm._slot_gather(w, slots, table)


@pytest.mark.parametrize("device", DEVICES)
def test_slot_tables_narrowed_to_their_used_columns_are_accepted(device):
    """dkm saves its tables narrowed to the columns some group uses; the slot ops take any width
    from 1 to min(M, 65536), and nothing else."""
    w = (torch.randn(4, 3000) * 0.02).bfloat16().to(device)
    slots, counts = torch.ops.edkm._slot_table(w, 2)
    used = int((counts > 0).sum(1).max())
    assert used < slots.shape[1]
    table = torch.randn(slots.shape, device=device)
    full = torch.ops.edkm._slot_gather(w, slots, table)
    narrow = torch.ops.edkm._slot_gather(w, slots[:, :used].contiguous(), table[:, :used].contiguous())
    assert torch.equal(narrow, full)
    for bad in (
        torch.zeros(2, 0, dtype=torch.int32, device=device),
        torch.full((2, 6001), 65536, dtype=torch.int32, device=device),
    ):
        with pytest.raises(ValueError, match=r"slots must have shape \[G, W\] with 1 <= W <= min\(M, 65536\)"):
            torch.ops.edkm._slot_gather(w, bad, torch.zeros(bad.shape, device=device))
