"""pack_indices / unpack_indices against a bit-by-bit reference of docs/FORMAT.md, and
optimal_kmeans_1d against brute force over every contiguous partition; bad input, opcheck,
torch.compile."""

import itertools
import math

import pytest
import torch

import edkm
from conftest import DEVICES

INDEX_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def reference_pack(indices, bits):
    """FORMAT.md literally: index j at stream bits [j*bits, (j+1)*bits); stream bit k is bit
    k % 8 of byte k // 8."""
    values = [int(v) for v in indices.reshape(-1).tolist()]
    out = [0] * ((len(values) * bits + 7) // 8)
    for j, v in enumerate(values):
        for b in range(bits):
            if (v >> b) & 1:
                k = j * bits + b
                out[k // 8] |= 1 << (k % 8)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_matches_bitwise_reference_and_round_trips(device, bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    idx = torch.randint(0, 2**bits, (n,), generator=g)
    if n:
        idx[0] = 2**bits - 1  # all bits set somewhere
    packed = edkm.pack_indices(idx.to(device), bits)
    assert packed.dtype == torch.uint8 and packed.device.type == device
    assert packed.shape == ((n * bits + 7) // 8,)
    assert packed.cpu().tolist() == reference_pack(idx, bits)
    back = edkm.unpack_indices(packed, bits, n)
    assert back.dtype == torch.uint8 and back.shape == (n,)
    assert torch.equal(back.cpu().long(), idx)


@pytest.mark.parametrize("dtype", INDEX_DTYPES)
def test_pack_any_integer_dtype_and_shape_row_major(dtype):
    idx = torch.randint(0, 8, (5, 3, 7), generator=torch.Generator().manual_seed(3))
    packed = edkm.pack_indices(idx.to(dtype), 3)
    assert packed.tolist() == reference_pack(idx, 3)
    # Non-contiguous input packs in its logical (row-major) order.
    t = idx.transpose(0, 2)
    assert edkm.pack_indices(t.to(dtype), 3).tolist() == reference_pack(t.contiguous(), 3)


def test_pack_large_parallel_chunks_match_reference_slices():
    # Big enough that the kernel splits over threads; compare against unpack and a slice.
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 32, (1_000_003,), generator=g, dtype=torch.int32)
    packed = edkm.pack_indices(idx, 5)
    assert torch.equal(edkm.unpack_indices(packed, 5, idx.numel()).int(), idx)
    # Indices 8*t .. 8*t+7 occupy bytes 5*t .. 5*t+4 exactly.
    t = 77_777
    assert packed[5 * t : 5 * t + 5].tolist() == reference_pack(idx[8 * t : 8 * t + 8], 5)
    # The last 3 indices (1_000_003 = 8 * 125_000 + 3) start on a byte: 15 bits, 2 bytes.
    assert packed[-2:].tolist() == reference_pack(idx[-3:], 5)


def test_unused_high_bits_are_zero():
    packed = edkm.pack_indices(torch.full((3,), 7, dtype=torch.uint8), 3)  # 9 bits -> 2 bytes
    assert packed.tolist() == [0xFF, 0x01]


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            lambda: edkm.pack_indices(torch.tensor([0, 8]), 3),
            r"indices must lie in \[0, 2\^bits\) = \[0, 8\) for bits = 3, got values in \[0, 8\]",
        ),
        (lambda: edkm.pack_indices(torch.tensor([-1, 2], dtype=torch.int16), 3), r"got values in \[-1, 2\]"),
        (lambda: edkm.pack_indices(torch.tensor([0, 1]), 0), r"bits must be in 1\.\.8, got 0"),
        (lambda: edkm.pack_indices(torch.tensor([0, 1]), 9), r"bits must be in 1\.\.8, got 9"),
        (
            lambda: edkm.unpack_indices(torch.zeros(1, dtype=torch.uint8), 3, 5),
            r"5 indices of 3 bits take ceil\(5 \* 3 / 8\) = 2 bytes, but packed has 1",
        ),
        (lambda: edkm.unpack_indices(torch.zeros(4, dtype=torch.uint8), 3, 8), r"= 3 bytes, but packed has 4"),
        (lambda: edkm.unpack_indices(torch.zeros(2, dtype=torch.uint8), 3, 6), r"= 3 bytes, but packed has 2"),
        (lambda: edkm.unpack_indices(torch.zeros(2, 1, dtype=torch.uint8), 8, 2), r"packed must be 1-D"),
        (lambda: edkm.unpack_indices(torch.zeros(1, dtype=torch.uint8), 3, -1), r"count must be >= 0"),
        (lambda: edkm.unpack_indices(torch.zeros(1, dtype=torch.uint8), 9, 1), r"bits must be in 1\.\.8, got 9"),
        (
            lambda: edkm.unpack_indices(torch.tensor([0xFF, 0x03], dtype=torch.uint8), 3, 3),
            r"unused high bits .* must be zero .* got byte 3",
        ),
    ],
)
def test_pack_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: edkm.pack_indices(torch.tensor([0.0, 1.0]), 3), r"indices must be an integer tensor .* got Float"),
        (lambda: edkm.pack_indices(torch.tensor([True]), 1), r"indices must be an integer tensor .* got Bool"),
        (lambda: edkm.unpack_indices(torch.zeros(2, dtype=torch.int32), 8, 2), r"packed must be uint8, got Int"),
    ],
)
def test_pack_bad_types(bad, match):
    with pytest.raises(TypeError, match=match):
        bad()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pack_unpack(device):
    g = torch.Generator().manual_seed(5)
    for dtype in INDEX_DTYPES:
        for bits, shape in [(1, (17,)), (3, (4, 9)), (8, (2, 3, 5)), (5, ())]:
            high = min(2**bits, torch.iinfo(dtype).max + 1)
            idx = torch.randint(0, high, shape, generator=g).to(device=device, dtype=dtype)
            torch.library.opcheck(torch.ops.edkm.pack_indices.default, (idx, bits))
            packed = edkm.pack_indices(idx, bits)
            torch.library.opcheck(torch.ops.edkm.unpack_indices.default, (packed, bits, idx.numel()))


def test_pack_under_torch_compile_fullgraph():
    def f(idx):
        return edkm.pack_indices(idx + 0, 3), edkm.unpack_indices(edkm.pack_indices(idx, 3), 3, idx.numel())

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n in (40, 41, 1000):
        idx = torch.randint(0, 8, (n,), dtype=torch.uint8)
        packed, back = compiled(idx)
        assert packed.tolist() == reference_pack(idx, 3)
        assert torch.equal(back, idx)
    compiled_inductor = torch.compile(lambda i: edkm.pack_indices(i, 4), fullgraph=True, dynamic=True)
    idx = torch.randint(0, 16, (3, 11), dtype=torch.int32)
    assert compiled_inductor(idx).tolist() == reference_pack(idx, 4)


# ---------------------------------------------------------------- optimal_kmeans_1d


def brute_force(values, counts, k):
    """Least cost over every split of the sorted values into min(k, U) contiguous runs."""
    u = len(values)
    m = min(k, u)
    best = (math.inf, None)
    for cuts in itertools.combinations(range(1, u), m - 1):
        bounds = (0, *cuts, u)
        cost, means = 0.0, []
        for a, b in zip(bounds, bounds[1:]):
            w = counts[a:b]
            v = values[a:b]
            mean = sum(wi * vi for wi, vi in zip(w, v)) / sum(w)
            means.append(mean)
            cost += sum(wi * (vi - mean) ** 2 for wi, vi in zip(w, v))
        if cost < best[0]:
            best = (cost, means)
    return best


def nearest_cost(values, counts, centroids):
    v = values.view(-1, 1)
    d = (v - centroids.view(1, -1)) ** 2
    return float((counts * d.min(1).values).sum())


@pytest.mark.parametrize("u", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans1d_matches_brute_force(u, k, seed):
    g = torch.Generator().manual_seed(100 * u + 10 * k + seed)
    values = torch.sort(torch.randn(u, generator=g, dtype=torch.float64) * 3).values
    counts = torch.randint(1, 20, (u,), generator=g).double()
    cost_ref, means_ref = brute_force(values.tolist(), counts.tolist(), k)
    centroids, cost = edkm.optimal_kmeans_1d(values, counts, k)
    assert centroids.dtype == torch.float64 and centroids.shape == (k,)
    assert cost.dtype == torch.float64 and cost.dim() == 0
    assert abs(float(cost) - cost_ref) <= 1e-12 * max(1.0, cost_ref)
    assert bool((centroids[1:] >= centroids[:-1]).all())
    # The centroids themselves achieve the cost under nearest assignment.
    assert abs(nearest_cost(values, counts, centroids) - cost_ref) <= 1e-12 * max(1.0, cost_ref)
    if k < u:
        assert torch.allclose(centroids, torch.tensor(means_ref, dtype=torch.float64), rtol=0, atol=1e-12)
        assert bool((centroids[1:] > centroids[:-1]).all())
    else:
        padded = values.tolist() + [values[-1].item()] * (k - u)
        assert centroids.tolist() == padded
        assert float(cost) == 0.0


def test_kmeans1d_integer_counts_and_float32_values():
    values = torch.tensor([-1.0, -0.5, 0.25, 2.0, 2.5], dtype=torch.float32)
    counts = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32)
    c, cost = edkm.optimal_kmeans_1d(values, counts, 2)
    ref_cost, ref_means = brute_force(values.double().tolist(), counts.double().tolist(), 2)
    assert c.dtype == torch.float64
    assert torch.allclose(c, torch.tensor(ref_means, dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(float(cost) - ref_cost) <= 1e-12


def test_kmeans1d_large_is_fast_and_no_worse_than_lloyd():
    import time

    g = torch.Generator().manual_seed(0)
    values = torch.unique(torch.randn(400_000, generator=g).float()).double()[:65536]
    assert values.numel() == 65536
    counts = torch.randint(1, 100, (values.numel(),), generator=g).double()
    start = time.perf_counter()
    centroids, cost = edkm.optimal_kmeans_1d(values, counts, 8)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"U=65536, k=8 took {elapsed:.3f} s"
    assert abs(nearest_cost(values, counts, centroids) - float(cost)) <= 1e-9 * float(cost)
    # Lloyd's iterations from the optimum cannot improve it; from a uniform start they end no
    # lower than the optimum.
    c = torch.linspace(float(values[0]), float(values[-1]), 8, dtype=torch.float64)
    for _ in range(100):
        a = (values.view(-1, 1) - c.view(1, -1)).abs().argmin(1)
        for j in range(8):
            m = a == j
            if m.any():
                c[j] = (counts[m] * values[m]).sum() / counts[m].sum()
    assert nearest_cost(values, counts, c) >= float(cost) * (1 - 1e-12)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (
            lambda: edkm.optimal_kmeans_1d(torch.zeros(2, 2, dtype=torch.float64), torch.ones(4), 2),
            ValueError,
            r"values must be 1-D \[U\], got shape \[2, 2\]",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.arange(3.0).double(), torch.ones(1, 3), 2),
            ValueError,
            r"counts must be 1-D",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.arange(3.0).double(), torch.ones(4), 2),
            ValueError,
            r"counts must have values' length 3, got 4",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.zeros(0, dtype=torch.float64), torch.ones(0), 2),
            ValueError,
            r"values must hold at least one value",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.arange(3.0).double(), torch.ones(3), 0),
            ValueError,
            r"k must be >= 1, got 0",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, 2.0, 1.0]).double(), torch.ones(3), 2),
            ValueError,
            r"sorted strictly increasing, got values\[1\] = 2 and values\[2\] = 1",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, 1.0, 1.0]).double(), torch.ones(3), 2),
            ValueError,
            r"sorted strictly increasing",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, float("nan")]).double(), torch.ones(2), 2),
            ValueError,
            r"values must be finite, got nan at index 1",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, float("inf")]).double(), torch.ones(2), 2),
            ValueError,
            r"values must be finite, got inf at index 1",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, 1.0]).double(), torch.tensor([1.0, 0.0]), 2),
            ValueError,
            r"counts must be finite and > 0, got 0 at index 1",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, 1.0]).double(), torch.tensor([-2, 1]), 2),
            ValueError,
            r"counts must be finite and > 0, got -2 at index 0",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, 1.0]).double(), torch.tensor([1.0, float("nan")]), 2),
            ValueError,
            r"counts must be finite and > 0, got nan",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0, 1]), torch.ones(2), 2),
            TypeError,
            r"values must be floating point",
        ),
        (
            lambda: edkm.optimal_kmeans_1d(torch.tensor([0.0, 1.0]).double(), torch.tensor([True, True]), 2),
            TypeError,
            r"counts must be floating point or integer, got Bool",
        ),
    ],
)
def test_kmeans1d_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kmeans1d(device):
    g = torch.Generator().manual_seed(9)
    for u, k in [(1, 1), (5, 2), (40, 8), (6, 10)]:
        values = torch.sort(torch.randn(u, generator=g, dtype=torch.float64)).values.to(device)
        counts = torch.randint(1, 9, (u,), generator=g).double().to(device)
        torch.library.opcheck(torch.ops.edkm.optimal_kmeans_1d.default, (values, counts, k))
    c, cost = edkm.optimal_kmeans_1d(values, counts, 3)
    assert c.device.type == device and cost.device.type == device
