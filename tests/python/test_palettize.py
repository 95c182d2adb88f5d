"""The model API: Config, palettize_, clustered modules, init, finalize, resume."""

import copy
import itertools

import pytest
import torch
from torch import nn

import edkm
from edkm.config import Config
from edkm.init import init_centroids, kmeans_plus_plus, optimal_1d
from edkm.measure import SavedBytes
from edkm.modules import ClusteredEmbedding, ClusteredLinear
from edkm.palettize import clustered_modules, finalize, palettize_
from edkm.vector_dkm import vector_dkm, vector_dkm_reference

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32, tie=True, seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def tokens(seed=1, batch=2, length=12):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- Config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(bits=0), "bits"),
        (dict(bits=9), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(cluster_dim=0), "cluster_dim"),
        (dict(temperature=0.0), "temperature"),
        (dict(max_iter=0), "max_iter"),
        (dict(distance="cosine"), "distance"),
        (dict(cluster_dtype=torch.float32), "cluster_dtype"),
        (dict(init="random"), "init"),
        (dict(milestone=-1), "milestone"),
        (dict(cluster_dim=2, init="optimal"), "init"),
        (dict(module_names={"(": None}), "regular expression"),
    ],
)
def test_config_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Config(**kwargs)


def test_config_unknown_keys_are_named():
    with pytest.raises(ValueError, match="unknown config key.*'bitz'"):
        Config.from_dict({"bitz": 3})
    with pytest.raises(ValueError, match="unknown config key.*'grp'"):
        Config(module_names={"lm_head": {"grp": 2}})
    assert Config.from_dict({"bits": 4, "cluster_dtype": "float16"}).cluster_dtype == torch.float16


def test_config_resolution_order():
    cfg = Config(
        bits=3, module_types={nn.Embedding: {"bits": 6}}, module_names={r"lm_head": None, r".*\.q_proj": {"bits": 5}}
    )
    assert cfg.for_module("lm_head", nn.Linear(2, 2)) is None
    assert cfg.for_module("layers.0.q_proj", nn.Linear(2, 2)).bits == 5
    assert cfg.for_module("embed", nn.Embedding(3, 2)).bits == 6
    assert cfg.for_module("layers.0.k_proj", nn.Linear(2, 2)).bits == 3


# ---- palettize_ ------------------------------------------------------------------------------


def test_palettize_keeps_parameters_and_state_dict_names():
    model = tiny_llama()
    before = [(n, id(p)) for n, p in model.named_parameters()]
    keys = set(model.state_dict())
    palettize_(model, Config(bits=3))
    assert [(n, id(p)) for n, p in model.named_parameters()] == before
    new_keys = set(model.state_dict())
    assert keys <= new_keys
    assert all(k.endswith(("edkm_centroids", "_extra_state")) for k in new_keys - keys)
    assert isinstance(model.model.layers[0].self_attn.q_proj, ClusteredLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(model.model.embed_tokens, ClusteredEmbedding)
    # the tied lm_head follows the embedding: one weight, one set of centroids
    assert model.lm_head.edkm_leader is model.model.embed_tokens
    assert model.lm_head.centroids is model.model.embed_tokens.edkm_centroids


def test_palettize_rejects_bad_configs():
    with pytest.raises(ValueError, match="matches no module"):
        palettize_(tiny_llama(), Config(module_names={"decoder\\.nothing": None}))
    with pytest.raises(ValueError, match="group_size 5 must divide"):
        palettize_(tiny_llama(), Config(group_size=5))
    with pytest.raises(ValueError, match="cluster_dim 3 must divide"):
        palettize_(tiny_llama(), Config(cluster_dim=3, init="kmeans++"))
    with pytest.raises(ValueError, match="tied tensor but got different configs"):
        palettize_(tiny_llama(), Config(module_names={"lm_head": {"bits": 4}}))
    model = palettize_(tiny_llama(), Config())
    with pytest.raises(ValueError, match="already palettized"):
        palettize_(model, Config())
    with pytest.raises(TypeError, match="edkm.Config"):
        palettize_(tiny_llama(), {"bits": 3})


def test_skips_and_overrides():
    model = tiny_llama(tie=False)
    palettize_(
        model,
        Config(
            bits=3, module_types={"Embedding": None}, module_names={"lm_head": {"bits": 6}, r".*\.0\.mlp\..*": None}
        ),
    )
    names = {n: m for n, m in clustered_modules(model)}
    assert "model.embed_tokens" not in names
    assert names["lm_head"].edkm_config.bits == 6 and names["lm_head"].centroids.shape == (1, 64)
    assert "model.layers.0.mlp.up_proj" not in names
    assert names["model.layers.1.mlp.up_proj"].edkm_config.bits == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_train_eval_finalize_generate(dtype):
    model = palettize_(tiny_llama(dtype), Config(bits=2, group_size=8))
    x = tokens()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    c0 = model.model.layers[0].mlp.up_proj.centroids.clone()
    model.train()
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None
        opt.step()
        opt.zero_grad()
    up = model.model.layers[0].mlp.up_proj
    copy.deepcopy(model)  # mid-training copies (EMA, checkpoints) work: no graph tensors kept
    assert not torch.equal(up.weight.detach(), w0), "the optimizer must train the original weight"
    assert not torch.equal(up.centroids, c0), "centroids move during training"
    assert up.edkm_step == 2
    finalize(model)
    for name, m in clustered_modules(model):
        w = m.weight.detach().reshape(m.edkm_groups, -1)
        for g in range(w.shape[0]):
            assert torch.unique(w[g]).numel() <= 4, name
    out = model.generate(x[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_eval_uses_hard_assignment_and_finalize_matches_it_up_to_lut_rounding():
    model = palettize_(tiny_llama(), Config(bits=3))
    model.eval()
    up = model.model.layers[1].mlp.up_proj
    hard = up.clustered_weight()
    assert torch.unique(hard).numel() <= 8
    idx = edkm.assign(up.edkm_source().detach(), up.centroids)
    assert torch.equal(hard, edkm.dequantize(idx, up.centroids, hard.dtype))
    finalize(model)
    assert (up.weight - hard).abs().max() <= 1e-3 * hard.abs().max()


def test_milestone_trains_unclustered_until_then():
    plain = tiny_llama()
    model = palettize_(copy.deepcopy(plain), Config(bits=3, milestone=2))
    x = tokens()
    up = model.model.layers[0].mlp.up_proj
    assert not up.edkm_initialized
    model.train()
    plain.train()
    for step in range(2):
        assert torch.equal(model(input_ids=x).logits, plain(input_ids=x).logits)
    assert not up.edkm_initialized
    out = model(input_ids=x).logits  # third forward: clustering starts
    assert up.edkm_initialized
    assert not torch.equal(out, plain(input_ids=x).logits)


def test_linear_does_not_keep_the_clustered_weight_for_backward():
    # the saved U-domain tables are [G, 65536] at most: small next to a 2048 x 2048 weight
    lin = nn.Linear(2048, 2048, bias=False).to(torch.bfloat16)
    palettize_(lin, Config(bits=3))
    lin.train()
    x = torch.randn(4, 2048, dtype=torch.bfloat16)
    counter = SavedBytes(lin.weight, x)
    with counter.hooks():
        y = lin(x)
    y.float().sum().backward()
    assert lin.weight.grad is not None
    weight_bytes = lin.weight.numel() * lin.weight.element_size()
    assert counter.bytes < weight_bytes / 4, (counter.bytes, weight_bytes)


def test_resume_from_state_dict_gives_the_same_next_step():
    torch.manual_seed(0)
    x = tokens()

    def make():
        model = palettize_(tiny_llama(seed=3), Config(bits=3, milestone=1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(model, opt):
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = make()
    for _ in range(3):
        step(a, opt_a)
    ckpt = copy.deepcopy((a.state_dict(), opt_a.state_dict()))
    step(a, opt_a)

    b, opt_b = make()
    b.load_state_dict(ckpt[0])
    opt_b.load_state_dict(ckpt[1])
    step(b, opt_b)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        if isinstance(pa, torch.Tensor):
            assert torch.equal(pa, pb), na
        else:
            assert pa == pb, na


def test_state_dict_with_another_config_is_refused():
    a = palettize_(tiny_llama(), Config(bits=3, temperature=0.02))
    b = palettize_(tiny_llama(), Config(bits=3, temperature=0.05))
    with pytest.raises(ValueError, match="saved with config"):
        b.load_state_dict(a.state_dict())


# ---- init ------------------------------------------------------------------------------------


def brute_force_1d(values, counts, k):
    best = None
    u = values.numel()
    for cuts in itertools.combinations(range(1, u), min(k, u) - 1):
        bounds = (0,) + cuts + (u,)
        cost = 0.0
        for a, b in zip(bounds[:-1], bounds[1:]):
            v, c = values[a:b], counts[a:b]
            mean = (v * c).sum() / c.sum()
            cost += float((c * (v - mean) ** 2).sum())
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_optimal_init_is_optimal_and_not_worse_than_kmeanspp(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(10, generator=g, dtype=torch.float64).sort().values
    counts = torch.randint(1, 20, (10,), generator=g).double()
    c, cost = optimal_1d(values, counts, 3)
    assert float(cost) == pytest.approx(brute_force_1d(values, counts, 3), rel=1e-9, abs=1e-12)
    _, cost_pp = kmeans_plus_plus(values, counts, 3, seed=seed)
    assert float(cost) <= float(cost_pp) + 1e-12


def test_init_centroids_groups_and_auto_choice():
    w = (torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * 0.1).to(torch.bfloat16)
    init = init_centroids(w, 4, 8, method="auto")
    assert init.centroids.shape == (4, 8)
    assert torch.all(init.centroids[:, 1:] >= init.centroids[:, :-1])
    opt = init_centroids(w, 4, 8, method="optimal")
    pp = init_centroids(w, 4, 8, method="kmeans++")
    assert float(init.cost.sum()) == min(float(opt.cost.sum()), float(pp.cost.sum()))
    again = init_centroids(w, 4, 8, method="kmeans++")
    assert torch.equal(pp.centroids, again.centroids), "k-means++ is seeded"
    # group g's centroids come from group g's rows only
    for gi in range(4):
        vals = w[4 * gi : 4 * gi + 4].double()
        assert opt.centroids[gi].min() >= vals.min() - 1e-12 and opt.centroids[gi].max() <= vals.max() + 1e-12


def test_init_with_fewer_distinct_values_than_k():
    w = torch.tensor([[0.5, 0.5, -0.25, -0.25]], dtype=torch.bfloat16)
    init = init_centroids(w, 1, 8, method="auto")
    assert float(init.cost.sum()) == 0.0
    assert set(init.centroids[0].tolist()) == {0.5, -0.25}


def test_init_rejects_nan():
    w = torch.tensor([[0.5, float("nan")]], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        init_centroids(w, 1, 2, name="layer.weight")


# ---- vector clustering -----------------------------------------------------------------------


def test_vector_dkm_matches_naive_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g, dtype=torch.float64)
    w = torch.cat([base, base[:3], base[1:4]]).reshape(2, -1)  # rows of repeated 2-vectors
    w = w.reshape(-1, 8).clone().requires_grad_()
    c = torch.randn(2, 4, 2, generator=g, dtype=torch.float64)
    up = torch.randn(w.shape, generator=g, dtype=torch.float64)
    out, cf = vector_dkm(w, c, 0.7, max_iter=3)
    ref, cr = vector_dkm_reference(w, c, 0.7, max_iter=3)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(cf, cr, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad((out * up).sum() + cf.square().sum(), w)
    (gb,) = torch.autograd.grad((ref * up).sum() + cr.square().sum(), w)
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)


def test_vector_dkm_gradcheck():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = torch.cat([w, w[:2]]).requires_grad_()
    c = torch.randn(1, 3, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: vector_dkm(x, c, 0.9, max_iter=2)[0], (w,))


def test_vector_clustering_palettize_and_finalize():
    model = palettize_(tiny_llama(), Config(bits=2, cluster_dim=2, init="kmeans++"))
    x = tokens()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    finalize(model)
    up = model.model.layers[0].mlp.up_proj
    vecs = up.weight.detach().reshape(-1, 2)
    assert torch.unique(vecs, dim=0).shape[0] <= 4


@pytest.mark.parametrize("cluster_dtype", [torch.bfloat16, None])
def test_float64_weights_cluster_through_bf16_or_as_they_are(cluster_dtype):
    lin = nn.Linear(16, 8).double()
    palettize_(lin, Config(bits=2, cluster_dtype=cluster_dtype))
    assert lin.centroids.dtype == (torch.float32 if cluster_dtype else torch.float64)
    lin.train()
    lin(torch.randn(3, 16, dtype=torch.float64)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float64
