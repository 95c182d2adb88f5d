"""dkm_linear == F.linear(x, dkm(...).clustered, b), and it keeps no clustered weight."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import edkm
from conftest import DEVICES, rel_error, sample_weight, spread_centroids


def grads(fn, x, w, c, b):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, c, b)]
    out, cent, _ = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    loss = (out * g.to(out.device, out.dtype)).sum() + cent.square().sum()
    return (out, cent) + torch.autograd.grad(loss, leaves)


def reference_linear(x, w, c, b, tau=0.05):
    clustered, cent, it = edkm.dkm_reference(w, c, tau, 3)
    return F.linear(x, clustered, b), cent, it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("repeats", [True, False], ids=["repeated", "distinct"])
@pytest.mark.parametrize("groups", [1, 3])
def test_matches_linear_of_reference_float64(device, repeats, groups):
    x = sample_weight((2, 5, 24), False, device, seed=3)
    w = sample_weight((12, 24), repeats, device)
    c = spread_centroids(groups, 8, device)
    b = sample_weight((12,), False, device, seed=4)
    ours = grads(lambda *a: edkm.dkm_linear(*a, 0.05, 3), x, w, c, b)
    ref = grads(reference_linear, x, w, c, b)
    for a, r in zip(ours, ref):
        assert rel_error(a, r) <= 1e-10


def test_without_bias_and_gradcheck():
    x = sample_weight((3, 8), False, seed=5).requires_grad_()
    w = sample_weight((4, 8), True).requires_grad_()
    c = spread_centroids(1, 4).requires_grad_()
    f = lambda x, w, c: torch.ops.edkm.dkm_linear(x, w, c, None, 0.3, 3, 0.0, "squared")[:2]
    assert torch.autograd.gradcheck(f, (x, w, c), eps=1e-6, atol=1e-7, rtol=1e-6)
    b = sample_weight((4,), False, seed=6).requires_grad_()
    fb = lambda x, w, c, b: torch.ops.edkm.dkm_linear(x, w, c, b, 0.3, 3, 0.0, "absolute")[0]
    assert torch.autograd.gradcheck(fb, (x, w, c, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype, cdtype in [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]:
        x = sample_weight((4, 16), False, device, seed=1).to(dtype).requires_grad_()
        w = sample_weight((8, 16), True, device).to(dtype).requires_grad_()
        c = spread_centroids(2, 4, device).to(cdtype)
        b = sample_weight((8,), False, device).to(dtype).requires_grad_()
        torch.library.opcheck(torch.ops.edkm.dkm_linear.default, (x, w, c, b, 0.2, 3, 0.0, "squared"))
        torch.library.opcheck(torch.ops.edkm.dkm_linear.default, (x, w, c, None, 0.2, 3, 0.0, "squared"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def loss(x, w, c):
        out = torch.ops.edkm.dkm_linear(x, w, c, None, 0.1, 3, 0.0, "squared")[0]
        return out.double().square().sum()

    x = sample_weight((6, 16), False, seed=2).bfloat16()
    w = sample_weight((8, 16), True).bfloat16()
    c = spread_centroids(1, 8, dtype=torch.float32)
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        value = fn(xi, wi, c)
        results.append((value.detach(),) + torch.autograd.grad(value, (xi, wi)))
    for a, b in zip(*results):
        assert torch.equal(a, b) or rel_error(a, b) <= 1e-12


class saved_storages:
    """Context: the bytes of every storage autograd saves inside it (storage -> bytes), besides
    those of the tensors given (referenced, not copied)."""

    def __init__(self, *besides):
        self.skip = {t.untyped_storage().data_ptr() for t in besides}
        self.saved = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.saved[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self.saved

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)


def test_saves_no_clustered_weight():
    """Besides the input (which F.linear saves too) and the weight (referenced), only tables."""
    w = (torch.randn(1024, 1024) * 0.02).bfloat16().requires_grad_()
    x = torch.randn(16, 1024).bfloat16()
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8)
    with saved_storages(w, x) as saved:
        out = edkm.dkm_linear(x, w, c, None, 1e-5)[0]
    out.float().sum().backward()
    assert sum(saved.values()) < 0.5 * w.numel() * w.element_size()
    assert w.grad is not None and torch.isfinite(w.grad.float()).all()


@pytest.fixture
def udomain():
    """Every dkm on CPU in the U-domain for one test; the setting comes back afterwards."""
    with edkm.settings(ndomain="never"):
        yield


@pytest.mark.parametrize("groups", [1, 36], ids=["one-LUT", "36-LUTs"])
@pytest.mark.parametrize("fn", ["dkm", "dkm_linear"])
def test_saved_tables_keep_only_the_used_columns(fn, groups, udomain):
    """The tables are padded to min(M, 65536) columns while computing; what is saved is the
    columns some group uses: 12 bytes (slot, value, count) per column per group, where 36 LUTs
    of 16 rows padded would be 12 bytes a weight. Backward matches the padded tables. (The
    U-domain is forced: under 'auto' 36 bf16 LUTs of 24,576 weights take the N-domain, which
    saves only the centroid history, test_ndomain.py.)"""
    torch.manual_seed(0)
    w = (torch.randn(576, 1536) * 0.02).bfloat16().requires_grad_()
    x = torch.randn(4, 1536).bfloat16()
    c = torch.linspace(-0.05, 0.05, 8).repeat(groups, 1)

    def run(hooks):
        w.grad = None
        with hooks:
            out = (
                edkm.dkm_linear(x, w, c, None, 1e-5)[0]
                if fn == "dkm_linear"
                else torch.nn.functional.linear(x, edkm.dkm(w, c, 1e-5).clustered)
            )
        out.float().square().sum().backward()
        return w.grad.clone()

    hooks = saved_storages(w, x)
    grad = run(hooks)
    table_bytes = sum(hooks.saved.values()) - (
        w.numel() * 2 if fn == "dkm" else 0
    )  # F.linear keeps the clustered weight
    used = max(len(torch.unique(g)) for g in w.detach().view(groups, -1))
    history = 4 * groups * 8 * 4 + 8  # 3 iterations + the start, G x K float32; iterations int64
    assert table_bytes <= 12 * groups * used + history
    # The same gradient as with the static (padded) tables torch.compile keeps.
    compiled = torch.compile(lambda: run(contextlib.nullcontext()), fullgraph=False)
    assert torch.equal(compiled(), grad)


def test_create_graph_does_not_take_the_in_place_backward():
    """Under create_graph the gradient of the clustered weight has a history; writing the weight's
    gradient over it would leave that history claiming the result is a plain product. dkm's
    backward has no double backward, so the second order must warn, as it did before."""
    torch.manual_seed(0)
    w = (torch.randn(64, 32) * 0.02).bfloat16().requires_grad_()
    x = torch.randn(4, 32).bfloat16().requires_grad_()
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8)
    (first,) = torch.autograd.grad(edkm.dkm_linear(x, w, c, None, 1e-5)[0].float().square().sum(), w)
    (graph,) = torch.autograd.grad(edkm.dkm_linear(x, w, c, None, 1e-5)[0].float().square().sum(), w, create_graph=True)
    assert torch.equal(graph.detach(), first)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        torch.autograd.grad(graph.float().sum(), x, allow_unused=True)


def test_backward_needs_no_second_weight_sized_buffer():
    """The weight's gradient is written over the clustered weight's (one buffer, as F.linear
    allocates), and the recomputed clustered weight is freed before that buffer exists: the
    backward's peak stays within half a weight of F.linear's."""
    from benchmarks.peak_memory import peak_bytes

    torch.manual_seed(0)
    w = (torch.randn(1024, 1024) * 0.02).bfloat16().requires_grad_()
    x = torch.randn(2, 8, 1024).bfloat16()
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8)
    weight_bytes = w.numel() * w.element_size()

    def backward_peak(forward):
        w.grad = None
        out = forward()
        return peak_bytes(lambda: out.float().sum().backward(), "cpu"), w.grad.clone()

    plain, _ = backward_peak(lambda: torch.nn.functional.linear(x, w))
    fused, fused_grad = backward_peak(lambda: edkm.dkm_linear(x, w, c, None, 1e-5)[0])
    assert fused - plain < weight_bytes // 2, (fused, plain)
    # The same gradient as dkm then F.linear (same product, same bits).
    _, unfused_grad = backward_peak(lambda: torch.nn.functional.linear(x, edkm.dkm(w, c, 1e-5).clustered))
    assert torch.equal(fused_grad, unfused_grad)


def test_bad_input():
    w = torch.randn(4, 8)
    c = torch.linspace(-1, 1, 4).view(1, 4)
    with pytest.raises(ValueError, match="input's last dimension must be in_features = 8"):
        edkm.dkm_linear(torch.randn(2, 7), w, c, None, 0.1)
    with pytest.raises(ValueError, match="bias must have shape \\[4\\]"):
        edkm.dkm_linear(torch.randn(2, 8), w, c, torch.zeros(3), 0.1)
    with pytest.raises(TypeError, match="input must have weight's dtype"):
        edkm.dkm_linear(torch.randn(2, 8).double(), w, c, None, 0.1)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        edkm.dkm_linear(torch.randn(2, 8), w.view(2, 2, 8), c, None, 0.1)


def test_inside_a_llama_decoder_layer_fused_equals_unfused():
    from benchmarks.llama_layer import decoder_layer, linear_variants, make_weights

    weights = make_weights(64, 160, "cpu", dtype=torch.float64)
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for name, linear in linear_variants(weights, temperature=1e-4).items():
        if name not in ("dkm_linear", "dkm+linear"):
            continue
        for w in weights.values():
            w.grad = None
        loss = decoder_layer(x, linear, heads=4).square().mean()
        loss.backward()
        results[name] = [loss.detach()] + [w.grad.clone() for w in weights.values()]
    for a, b in zip(results["dkm_linear"], results["dkm+linear"]):
        assert rel_error(a, b) <= 1e-10
