"""The N-domain's float32 AVX2 kernels (csrc/cpu/attention_avx2.cpp) against the float64 reference
and the scalar float64 loops they replace for float32 / bfloat16 / float16 weights: forward,
backward and dkm_linear, block tails, groups larger than one float32 summing block, up to 256
centroids, unattended centroids; the fallback when exponents would overflow float32; results
independent of the thread count; the auto rule that follows from their speed."""

import contextlib

import pytest
import torch

import edkm
from conftest import rel_error, spread_centroids
from edkm import _C

pytestmark = pytest.mark.skipif(
    not _C.simd_attention_available(), reason="this CPU has no AVX2/FMA: the scalar float64 loops run"
)


@pytest.fixture
def modes():
    """set(ndomain=..., simd=...) for one test; the settings come back afterwards."""
    with contextlib.ExitStack() as stack:
        yield lambda ndomain="always", simd=True: stack.enter_context(
            edkm.settings(ndomain=ndomain, simd_attention=simd)
        )


def run(w, c, tau, max_iter, distance, seed=3, fn=edkm.dkm):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)
    grad_c = torch.randn(c.shape, generator=g, dtype=torch.float64).to(c.dtype)
    wi = w.detach().clone().requires_grad_()
    ci = c.detach().clone().requires_grad_()
    out = fn(wi, ci, tau, max_iter, 0.0, distance)
    gw, gc = torch.autograd.grad((out.clustered * grad_out).sum() + (out.centroids * grad_c).sum(), (wi, ci))
    return out.clustered.detach(), out.centroids.detach(), gw, gc


def weight(groups, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(groups, m, generator=g, dtype=torch.float64) * 0.05).to(dtype)


def centroids(groups, k, seed=1):
    return (spread_centroids(groups, k, seed=seed) * 0.05).float()


@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize(
    "groups,m,k",
    [(48, 37, 8), (16, 576, 8), (3, 5000, 16), (10, 13, 3), (2, 1000, 256), (5, 7, 2), (7, 300, 4)],
    ids=["tail", "row", "multi-block", "k3", "k256", "one-block", "k4"],
)
def test_float32_matches_float64_reference(modes, distance, groups, m, k):
    """float32 weights: the AVX2 path against the exact float64 computation of the same inputs
    (the scalar float64 loops, themselves checked against the naive reference in test_ndomain.py)."""
    w, c = weight(groups, m, torch.float32), centroids(groups, k)
    tau = 2e-4 if distance == "squared" else 5e-3
    modes(simd=True)
    got = run(w, c, tau, 3, distance)
    want = run(w.double(), c.double(), tau, 3, distance)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    names = ("clustered", "centroids", "grad_weight", "grad_centroids")
    bounds = (1e-6, 1e-6, 1e-5, 1e-5)
    for name, a, b, bound in zip(names, got, want, bounds):
        assert torch.isfinite(a).all(), name
        assert rel_error(a.double(), b) <= bound, (name, rel_error(a.double(), b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distance", ["squared", "absolute"])
def test_16_bit_weights_match_scalar_loops(modes, dtype, distance):
    w, c = weight(24, 300, dtype), centroids(24, 8)
    tau = 2e-4 if distance == "squared" else 5e-3
    results = {}
    for simd in (True, False):
        modes(simd=simd)
        results[simd] = run(w, c, tau, 3, distance)
    (a, ca, ga, gca), (b, cb, gb, gcb) = results[True], results[False]
    assert a.dtype == dtype and ga.dtype == dtype
    # Both round to the weight's 16-bit dtype in the end: a few elements may round apart.
    assert rel_error(a.double(), b.double()) <= 1e-3
    assert rel_error(ca.double(), cb.double()) <= 1e-6
    assert rel_error(ga.double(), gb.double()) <= 1e-3
    assert rel_error(gca.double(), gcb.double()) <= 1e-5


def test_dkm_linear_matches_float64(modes):
    """dkm_linear (its backward recomputes the soft weight) on the AVX2 path against the same
    inputs in float64: forward outputs to float32 rounding, gradients to a few 1e-6 (sums of
    float32 attention over a sharp softmax)."""
    g = torch.Generator().manual_seed(4)
    w, c = weight(40, 96, torch.float32), centroids(40, 8)
    x = torch.randn(3, 96, generator=g)
    results = {}
    modes(simd=True)
    for dtype in (torch.float32, torch.float64):
        xi, wi, ci = (t.to(dtype).clone().requires_grad_() for t in (x, w, c))
        out, cf, _ = edkm.dkm_linear(xi, wi, ci, None, 2e-4, 3)
        grads = torch.autograd.grad(out.square().sum() + cf.sum(), (xi, wi, ci))
        results[dtype] = (out.detach(), cf.detach()) + grads
    names = ("out", "centroids", "grad_x", "grad_weight", "grad_centroids")
    bounds = (1e-6, 1e-6, 1e-6, 2e-5, 2e-5)
    for name, a, b, bound in zip(names, results[torch.float32], results[torch.float64], bounds):
        assert rel_error(a.double(), b) <= bound, (name, rel_error(a.double(), b))


def test_unattended_centroid_keeps_its_value_and_gradient(modes):
    """A centroid far from every weight gets no attention: it stays put and passes its gradient
    through unchanged, as in the float64 loops."""
    w = weight(4, 50, torch.float32)
    c = centroids(4, 4)
    c[:, -1] = 50.0
    modes(simd=True)
    got = run(w, c, 2e-4, 3, "squared")
    modes(simd=False)
    want = run(w, c, 2e-4, 3, "squared")
    assert torch.equal(got[1][:, -1], c[:, -1])
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert rel_error(a.double(), b.double()) <= 1e-5


def test_overflowing_exponents_fall_back_to_float64(modes):
    """With 1/tau beyond float32's range the AVX2 path would overflow: the float64 loops run,
    so both settings give the same bits."""
    w, c = weight(6, 40, torch.float32), centroids(6, 4)
    modes(simd=True)
    got = run(w, c, 1e-40, 2, "squared")
    modes(simd=False)
    want = run(w, c, 1e-40, 2, "squared")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_independent_of_thread_count(modes):
    w, c = weight(64, 200, torch.float32), centroids(64, 8)
    modes(simd=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(w, c, 2e-4, 3, "squared")
        torch.set_num_threads(2)
        two = run(w, c, 2e-4, 3, "squared")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_nan_weight_is_rejected(modes):
    w, c = weight(4, 20, torch.float32), centroids(4, 4)
    w[2, 5] = float("nan")
    modes(simd=True)
    with pytest.raises(ValueError, match=r"dkm: weight contains NaN or Inf"):
        edkm.dkm(w, c, 1e-3, 3)


def test_recompute_matches_forward(modes):
    """_ndomain_recompute (dkm_linear's backward) rebuilds the forward's clustered weight exactly."""
    w, c = weight(8, 77, torch.float32), centroids(8, 8)
    modes(simd=True)
    clustered, _, it, hist = torch.ops.edkm._ndomain_forward(w, c, 2e-4, 3, 0.0, "squared")
    again = torch.ops.edkm._ndomain_recompute(w, hist, it, 2e-4, "squared")
    assert torch.equal(clustered, again)


def test_opcheck_float32(modes):
    modes(simd=True)
    w, c = weight(8, 12, torch.float32), centroids(8, 4)
    torch.library.opcheck(torch.ops.edkm._ndomain_forward.default, (w, c, 0.01, 3, 0.0, "squared"))
    _, _, it, hist = torch.ops.edkm._ndomain_forward(w, c, 0.01, 3, 0.0, "absolute")
    gw, gc = torch.randn(w.shape), torch.randn(c.shape)
    torch.library.opcheck(torch.ops.edkm._ndomain_backward.default, (gw, gc, w, hist, it, 0.01, "absolute", c.dtype))


def test_auto_rule_follows_dtype_and_setting(modes):
    """float32 weights take the N-domain at every size with the AVX2 kernels; 16-bit weights up to
    65,535 weights per group (the distinct-value path); float64 (and everything without them) up
    to 2,048."""
    modes(ndomain="auto", simd=True)
    assert _C.ndomain_max_group(torch.float32) == 2**63 - 1
    assert _C.ndomain_max_group(torch.bfloat16) == 65535
    assert _C.ndomain_max_group(torch.float16) == 65535
    assert _C.ndomain_max_group(torch.float64) == 2048
    w = weight(1, 20000, torch.float32)
    c = centroids(1, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        edkm.dkm(w.requires_grad_(), c, 1e-3, 3)
    assert (4, 1, 8) in saved and all(s in ((4, 1, 8), (), (1, 20000)) for s in saved), saved
    modes(ndomain="auto", simd=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert _C.ndomain_max_group(dtype) == 2048
    assert _C.simd_attention() is False


# The fused U-domain loops on float32 tables take the same kernels, value by value with counts.


@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize(
    "dtype,rows_per_lut", [(torch.bfloat16, 64), (torch.bfloat16, 192), (torch.float16, 64), (torch.float32, 64)]
)
def test_udomain_matches_float64_loops(modes, distance, dtype, rows_per_lut):
    """Groups with different numbers of distinct values (so the narrowed tables carry padding of
    count 0), one chunk and several chunks per group."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(192, 96, generator=g) * 0.05
    w[:64] *= 0.2  # fewer distinct 16-bit values in the first groups
    w = w.to(dtype)
    groups = 192 // rows_per_lut
    c = centroids(groups, 8)
    tau = 2e-4 if distance == "squared" else 5e-3
    results = {}
    for simd in (True, False):
        modes(ndomain="never", simd=simd)
        results[simd] = run(w, c, tau, 3, distance)
    for name, a, b in zip(("clustered", "centroids", "grad_weight", "grad_centroids"), results[True], results[False]):
        assert torch.isfinite(a).all(), name
        # 16-bit outputs: both round to the weight's dtype, a few elements one ulp apart.
        ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 0.0}[dtype]
        bound = max(ulp, 1e-5) if name in ("clustered", "grad_weight") else 1e-5
        assert rel_error(a.double(), b.double()) <= bound, (name, rel_error(a.double(), b.double()))


def test_udomain_fused_op_against_float64(modes):
    """The fused U-domain op itself on float32 tables with padding (counts 0, values left as
    garbage NaN where no count multiplies them): the AVX2 path against the float64 tables."""
    g = torch.Generator().manual_seed(12)
    groups, width, k = 3, 5000, 8
    values = torch.randn(groups, width, generator=g, dtype=torch.float64).sort(1).values * 0.05
    counts = torch.randint(1, 6, (groups, width), generator=g).double()
    counts[:, -800:] = 0
    c = torch.linspace(-0.1, 0.1, k, dtype=torch.float64).repeat(groups, 1) + 0.002 * torch.randn(
        groups, k, generator=g, dtype=torch.float64
    )
    modes(ndomain="never", simd=True)
    v32 = values.float()
    v32[:, -800:] = float("nan")  # padding: never read where its count 0 would multiply it
    fwd, bwd = torch.ops.edkm._udomain_forward, torch.ops.edkm._udomain_backward
    c32, soft32, hist32, it32 = fwd(v32, counts.float(), c.float(), 2e-4, 3, 0.0, "squared")
    c64, soft64, hist64, it64 = fwd(values, counts, c, 2e-4, 3, 0.0, "squared")
    live = slice(0, width - 800)
    assert int(it32) == int(it64) == 3
    assert rel_error(c32.double(), c64) <= 1e-6
    assert rel_error(soft32[:, live].double(), soft64[:, live]) <= 1e-6
    gs = torch.randn(groups, width, generator=g, dtype=torch.float64)
    gs[:, -800:] = 0
    gct = torch.randn(groups, k, generator=g, dtype=torch.float64)
    d32, i32, gc32 = bwd(v32, counts.float(), hist32, it32, 2e-4, "squared", gs.float(), gct.float())
    d64, i64, gc64 = bwd(values, counts, hist64, it64, 2e-4, "squared", gs, gct)
    assert torch.isfinite(gc32).all() and torch.isfinite(i32[:, live]).all()
    assert rel_error(d32[:, live].double(), d64[:, live]) <= 1e-5
    assert rel_error(i32[:, live].double(), i64[:, live]) <= 1e-5
    assert rel_error(gc32.double(), gc64) <= 1e-5
    assert (i32[:, -800:] == 0).all()  # no count, no gradient through the iterations


# ---- 16-bit groups run over their distinct values (ndomain_kernel.cpp's DistinctGroup) ----


def duplicated_weight(groups, m, dtype, levels, seed=0):
    """Weights on a grid of `levels` steps, so each group holds many copies of few values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-levels, levels + 1, (groups, m), generator=g).double() * (0.1 / levels)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("levels", [3, 40, 4000])
def test_16_bit_distinct_values_match_float64_loops(modes, dtype, distance, levels):
    """A 16-bit group runs the AVX2 passes once per distinct value, each value's terms scaled by
    its count: against the float64 loops over every weight of the same inputs, from 7 distinct
    values per group (counts in the hundreds) to nearly all distinct."""
    w, c = duplicated_weight(12, 1000, dtype, levels), centroids(12, 8)
    tau = 2e-4 if distance == "squared" else 5e-3
    modes(simd=True)
    got = run(w, c, tau, 3, distance)
    modes(simd=False)
    want = run(w, c, tau, 3, distance)
    assert got[0].dtype == dtype and got[2].dtype == dtype
    # the clustered weight and its gradient end rounded to 16 bits: a few elements round apart
    for name, a, b, bound in zip(
        ("clustered", "centroids", "grad_weight", "grad_centroids"), got, want, (1e-3, 1e-6, 1e-3, 1e-5)
    ):
        assert torch.isfinite(a).all(), name
        assert rel_error(a.double(), b.double()) <= bound, (name, rel_error(a.double(), b.double()))


def test_16_bit_distinct_gradient_of_every_copy_is_its_own(modes):
    """Copies of one value share dF/dv and the gradient through the centroids, but each gets its
    own upstream gradient: with upstream gradient on one copy only, the copies' gradients differ
    by exactly that copy's direct term."""
    w = torch.full((1, 64), 0.02, dtype=torch.float32)
    w[0, 32:] = -0.03
    w = w.to(torch.bfloat16)
    c = torch.tensor([[-0.05, 0.0, 0.05, 0.1]])
    modes(simd=True)
    wi = w.clone().requires_grad_()
    out = edkm.dkm(wi, c, 1e-3, 3)
    up = torch.zeros(1, 64, dtype=torch.bfloat16)
    up[0, 5] = 1.0
    (gw,) = torch.autograd.grad((out.clustered * up).sum(), (wi,))
    modes(simd=False)
    wj = w.clone().requires_grad_()
    (gw64,) = torch.autograd.grad((edkm.dkm(wj, c, 1e-3, 3).clustered * up).sum(), (wj,))
    others = torch.cat([gw[0, :5], gw[0, 6:32]])
    assert torch.equal(others, others[:1].expand_as(others))  # the copies without upstream agree
    assert gw[0, 5] != gw[0, 4]
    assert rel_error(gw.double(), gw64.double()) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_clustered_weight_is_the_per_weight_soft_value(modes, dtype):
    """The distinct path's clustered weight is bit-identical to the recompute (which computes it
    the same way) and to the float32 path's soft value of each weight rounded to 16 bits."""
    w, c = duplicated_weight(6, 333, dtype, 50), centroids(6, 8)
    modes(simd=True)
    clustered, _, it, hist = torch.ops.edkm._ndomain_forward(w, c, 2e-4, 3, 0.0, "squared")
    again = torch.ops.edkm._ndomain_recompute(w, hist, it, 2e-4, "squared")
    assert torch.equal(clustered, again)
    per_weight = torch.ops.edkm._ndomain_recompute(w.float(), hist, it, 2e-4, "squared")
    assert torch.equal(clustered, per_weight.to(dtype))


@pytest.mark.parametrize("eps,stops", [(0.0, 3), (1e9, 1)])
def test_16_bit_distinct_early_stop_keeps_history_rule(modes, eps, stops):
    """Each group iterates on its own, then the stop is decided over all groups: the history
    past the stop repeats the final centroids, as in the per-weight path."""
    w, c = duplicated_weight(5, 200, torch.bfloat16, 30), centroids(5, 4)
    modes(simd=True)
    clustered, cf, it, hist = torch.ops.edkm._ndomain_forward(w, c, 2e-4, 3, eps, "squared")
    assert int(it) == stops
    for r in range(stops, 4):
        assert torch.equal(hist[r], cf.float())
    again = torch.ops.edkm._ndomain_recompute(w, hist, it, 2e-4, "squared")
    assert torch.equal(clustered, again)
    modes(simd=False)
    _, cf64, it64, _ = torch.ops.edkm._ndomain_forward(w, c, 2e-4, 3, eps, "squared")
    assert int(it64) == stops and rel_error(cf.double(), cf64.double()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_16_bit_nan_or_inf_weight_is_rejected(modes, dtype, bad):
    w, c = weight(4, 20, dtype), centroids(4, 4)
    w[1, 7] = bad
    modes(simd=True)
    with pytest.raises(ValueError, match=r"dkm: weight contains NaN or Inf"):
        edkm.dkm(w, c, 1e-3, 3)


def test_16_bit_distinct_independent_of_thread_count(modes):
    w, c = duplicated_weight(32, 700, torch.bfloat16, 60), centroids(32, 8)
    modes(simd=True)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(w, c, 2e-4, 3, "squared"))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
