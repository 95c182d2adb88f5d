"""optimal_kmeans_1d_grouped (all LUT groups' exact 1-D k-means in one threaded op) against the
per-group path (distinct values, then optimal_kmeans_1d per group) and brute force, weighted
and unweighted; init_centroids through it; bad input, opcheck, torch.compile."""

import itertools
import math

import pytest
import torch

import edkm
from conftest import DEVICES
from edkm.init import distinct_values, init_centroids, weighted_distinct_values

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def coarse_weight(groups, m, dtype, seed, scale=4.0):
    """Values on a coarse grid: many repeats, and +0 / -0 both present."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(groups, m, generator=g, dtype=torch.float64) * scale).round() / 8
    w.view(-1)[::7] = -0.0
    w.view(-1)[3::7] = 0.0
    return w.to(dtype)


def per_group_path(w, k, importance=None):
    """What init.py did before the grouped op: Python distinct values, one op call per group."""
    groups = w.shape[0]
    per = distinct_values(w, groups) if importance is None else weighted_distinct_values(w, importance, groups)
    cs, costs = zip(*(edkm.optimal_kmeans_1d(v, c, k) for v, c in per))
    return torch.stack(cs), torch.stack(costs)


def brute_force(values, mass, k):
    u = len(values)
    best = (math.inf, None)
    for cuts in itertools.combinations(range(1, u), min(k, u) - 1):
        bounds = (0, *cuts, u)
        cost, means = 0.0, []
        for a, b in zip(bounds, bounds[1:]):
            mm = sum(mass[a:b])
            mean = sum(x * y for x, y in zip(values[a:b], mass[a:b])) / mm
            means.append(mean)
            cost += sum(y * (x - mean) ** 2 for x, y in zip(values[a:b], mass[a:b]))
        if cost < best[0]:
            best = (cost, means)
    return best


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups, m, k", [(1, 40, 8), (5, 24, 4), (7, 9, 3), (3, 16, 16), (4, 5, 1)])
def test_grouped_equals_per_group_path_unweighted(dtype, groups, m, k):
    w = coarse_weight(groups, m, dtype, seed=groups * 100 + m)
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, k)
    assert c.shape == (groups, k) and c.dtype == torch.float64
    assert cost.shape == (groups,) and cost.dtype == torch.float64
    ref_c, ref_cost = per_group_path(w, k)
    # The same distinct values and counts reach the same DP: the same bits.
    assert torch.equal(c, ref_c)
    assert torch.equal(cost, ref_cost)
    assert bool((c[:, 1:] >= c[:, :-1]).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("zero_frac", [0.0, 0.4, 1.0])
def test_grouped_equals_per_group_path_weighted(dtype, zero_frac):
    g = torch.Generator().manual_seed(7)
    w = coarse_weight(6, 30, dtype, seed=3)
    imp = torch.rand(6, 30, generator=g, dtype=torch.float64) ** 3
    imp[torch.rand(6, 30, generator=g) < zero_frac] = 0.0
    for k in (2, 4, 8):
        c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, k, imp)
        ref_c, ref_cost = per_group_path(w, k, imp)
        # Masses are sums of importances in the same element order, but the per-group path
        # sums over a float64 copy by index_add_: allow the last bits.
        torch.testing.assert_close(c, ref_c, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(cost, ref_cost, rtol=1e-10, atol=1e-14)
    # Integer importances add exactly: the same bits.
    imp_int = torch.randint(0, 5, (6, 30), generator=g).to(torch.float32)
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, 3, imp_int)
    ref_c, ref_cost = per_group_path(w, 3, imp_int)
    assert torch.equal(c, ref_c) and torch.equal(cost, ref_cost)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_equals_brute_force(seed, weighted):
    g = torch.Generator().manual_seed(seed)
    groups, m, k = 3, 10, 3
    w = (torch.randn(groups, m, generator=g, dtype=torch.float64) * 2).round() / 2  # repeats
    imp = torch.rand(groups, m, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, k, imp)
    for gi in range(groups):
        vals, inv = torch.unique(w[gi], return_inverse=True)
        mass = torch.zeros(vals.numel(), dtype=torch.float64).index_add_(
            0, inv, imp[gi] if weighted else torch.ones(m, dtype=torch.float64)
        )
        ref_cost, ref_means = brute_force(vals.tolist(), mass.tolist(), k)
        assert float(cost[gi]) == pytest.approx(ref_cost, rel=1e-12, abs=1e-12)
        if vals.numel() > k:
            torch.testing.assert_close(c[gi], torch.tensor(ref_means, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fewer_distinct_values_than_k_and_signed_zero():
    w = torch.tensor([[0.5, -0.0, 0.5, 0.0, -0.25, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, 4)
    assert c[0].tolist() == [-0.25, 0.0, 0.5, 0.5]  # +0 and -0 are one value
    assert c[1].tolist() == [1.0] * 4
    assert cost.tolist() == [0.0, 0.0]


def test_all_zero_importance_falls_back_to_equal_mass():
    w = coarse_weight(2, 20, torch.float32, seed=1)
    c0, cost0 = edkm.ops.optimal_kmeans_1d_grouped(w, 3, torch.zeros(2, 20))
    # every distinct value gets mass 1: k-means over distinct values, counts ignored
    for gi in range(2):
        vals = torch.unique(w[gi].double())
        ref_c, ref_cost = edkm.optimal_kmeans_1d(vals, torch.ones_like(vals), 3)
        assert torch.equal(c0[gi], ref_c) and float(cost0[gi]) == float(ref_cost)


def test_many_groups_run_across_threads_and_match_one_by_one():
    w = (torch.randn(300, 64, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, 8)
    for gi in (0, 1, 150, 299):
        c1, cost1 = edkm.ops.optimal_kmeans_1d_grouped(w[gi : gi + 1], 8)
        assert torch.equal(c[gi], c1[0]) and torch.equal(cost[gi], cost1[0])


@pytest.mark.parametrize("method", ["optimal", "auto"])
def test_init_centroids_uses_grouped_and_keeps_its_contract(method):
    w = (torch.randn(12, 40, generator=torch.Generator().manual_seed(0)) * 0.1).to(torch.bfloat16)
    init = init_centroids(w, 12, 8, method=method)
    ref_c, ref_cost = per_group_path(w.reshape(12, -1), 8)
    assert init.method == "optimal"  # exact: k-means++ can at best tie it
    assert torch.equal(init.centroids, ref_c) and torch.equal(init.cost, ref_cost)
    pp = init_centroids(w, 12, 8, method="kmeans++")
    assert float(init.cost.sum()) <= float(pp.cost.sum()) * (1 + 1e-12)
    wd = w.double()
    assert init.variance == pytest.approx(float(((wd - wd.mean()) ** 2).mean()), rel=1e-12)


def test_init_centroids_sensitivity_through_grouped():
    g = torch.Generator().manual_seed(4)
    w = coarse_weight(4, 12, torch.float32, seed=5)
    s = torch.rand(4, 12, generator=g)
    init = init_centroids(w, 2, 3, method="sensitivity", weights=s)
    ref_c, ref_cost = per_group_path(w.reshape(2, -1), 3, s.reshape(2, -1))
    assert init.method == "sensitivity"
    torch.testing.assert_close(init.centroids, ref_c, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(init.cost, ref_cost, rtol=1e-10, atol=1e-14)
    wd = w.double()
    assert init.variance == pytest.approx(float(((wd - wd.mean()) ** 2).mean()), rel=1e-9)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(6), 2),
            ValueError,
            r"weight must be 2-D \[groups, group_numel\], got shape \[6\]",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(0, 3), 2),
            ValueError,
            r"at least one group of at least one value",
        ),
        (lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(2, 3), 0), ValueError, r"k must be >= 1, got 0"),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(2, 3, dtype=torch.int32), 2),
            TypeError,
            r"weight must be floating point",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(2, 3), 2, torch.ones(3, 2)),
            ValueError,
            r"importance must have weight's shape \[2, 3\], got \[3, 2\]",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(2, 3), 2, torch.ones(2, 3, dtype=torch.int64)),
            TypeError,
            r"importance must be floating point",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.tensor([[0.0, float("nan")]]), 2),
            ValueError,
            r"weight has NaN or Inf values \(group 0\)",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.tensor([[0.0], [float("inf")]], dtype=torch.bfloat16), 2),
            ValueError,
            r"weight has NaN or Inf values \(group 1\)",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(1, 2), 2, torch.tensor([[1.0, -1.0]])),
            ValueError,
            r"importance must be finite and >= 0, got -1",
        ),
        (
            lambda: edkm.ops.optimal_kmeans_1d_grouped(torch.zeros(1, 2), 2, torch.tensor([[1.0, float("nan")]])),
            ValueError,
            r"importance must be finite and >= 0, got nan",
        ),
        (
            lambda: init_centroids(torch.tensor([[0.5, float("nan")]]), 1, 2, name="layer.weight"),
            ValueError,
            r"edkm: layer.weight has NaN or Inf values",
        ),
        (
            lambda: init_centroids(
                torch.zeros(2, 2),
                1,
                2,
                method="sensitivity",
                name="l.weight",
                weights=torch.tensor([[1.0, -1.0], [1.0, 1.0]]),
            ),
            ValueError,
            r"edkm: l.weight: the sensitivity \(importance\) of every weight must be finite and >= 0",
        ),
        (
            lambda: init_centroids(torch.zeros(3, 2), 4, 2, name="l.weight"),
            ValueError,
            r"l.weight with 6 elements cannot be cut into 4 groups",
        ),
    ],
)
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in DTYPES:
        w = coarse_weight(3, 14, dtype, seed=11).to(device)
        imp = torch.rand(3, 14).to(device)
        for k, importance in [(1, None), (4, None), (20, None), (3, imp)]:
            torch.library.opcheck(torch.ops.edkm.optimal_kmeans_1d_grouped.default, (w, k, importance))
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, 3, imp)
    assert c.device.type == device and cost.device.type == device


def test_under_torch_compile_fullgraph():
    def f(w, imp):
        c, cost = torch.ops.edkm.optimal_kmeans_1d_grouped(w * 1, 4, imp)
        return c.sum(1), cost

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    w = coarse_weight(5, 16, torch.float32, seed=2)
    imp = torch.rand(5, 16)
    got = compiled(w, imp)
    want = f(w, imp)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_large_16bit_groups_take_the_slot_histogram_and_agree():
    # Groups over 65536 bf16 weights go through the per-group slot-table path: same result.
    w = (torch.randn(2, 70000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    init = init_centroids(w, 2, 8, method="optimal")
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, 8)
    assert torch.equal(init.centroids, c) and torch.equal(init.cost, cost)
    with pytest.raises(ValueError, match=r"edkm: big.weight has NaN or Inf values"):
        init_centroids(torch.full((1, 70000), float("nan"), dtype=torch.bfloat16), 1, 8, name="big.weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_16bit_weighted_groups_take_the_slot_histogram_and_agree(dtype):
    # Weighted (sensitivity, or outliers with zero mass) groups over 65536 16-bit weights take
    # the slot histogram too: the grouped op's (value, position) sort sums each value's masses
    # in the same element order, so values, masses and centroids are the same bits.
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(2, 70000, generator=g) * 0.02).to(dtype)
    w[0, :50] = 0.0
    w[0, 50:100] = -0.0  # +0 and -0 are one value
    imp = torch.rand(2, 70000, generator=g, dtype=torch.float64)
    imp[1, :3000] = 0.0  # zero-mass values keep a tiny mass
    imp[0, :100] = 0.0
    init = init_centroids(w, 2, 8, method="sensitivity", weights=imp)
    c, cost = edkm.ops.optimal_kmeans_1d_grouped(w, 8, imp)
    assert torch.equal(init.centroids, c) and torch.equal(init.cost, cost)
    with pytest.raises(ValueError, match=r"edkm: big.weight: the sensitivity"):
        init_centroids(w, 2, 8, method="sensitivity", weights=-imp, name="big.weight")
