"""Fisher sensitivity (edkm.sensitivity.fisher) against a hand computation, and the
sensitivity-weighted exact 1-D k-means (init="sensitivity") against brute force."""

import itertools

import pytest
import torch
from torch import nn

from edkm.config import Config
from edkm.init import init_centroids
from edkm.palettize import finalize, palettize_
from edkm.sensitivity import calibration_batches, fisher, sensitivity_targets

transformers = pytest.importorskip("transformers")


class TinyLM(nn.Module):
    """logits = head(emb(ids)): small enough to differentiate by hand."""

    def __init__(self, vocab=11, dim=5, tie=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim).double()
        self.head = nn.Linear(dim, vocab).double()
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def hand_gradients(model: TinyLM, ids: torch.Tensor):
    """d(mean next-token cross-entropy)/d(head.weight) and d/d(emb.weight), written out:
    with h_t = E[x_t], p_t = softmax(W h_t + b), e_t = p_t - onehot(x_{t+1}) over the N
    predicted positions, dL/dW = sum_t e_t h_t^T / N and dL/dE[x_t] += W^T e_t / N."""
    E, W, b = model.emb.weight.detach(), model.head.weight.detach(), model.head.bias.detach()
    x, y = ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)
    n = x.numel()
    h = E[x]
    p = torch.softmax(h @ W.T + b, dim=-1)
    e = p.clone()
    e[torch.arange(n), y] -= 1
    gW = e.T @ h / n
    gE = torch.zeros_like(E).index_add_(0, x, e @ W / n)
    return gW, gE


BATCHES = torch.randint(0, 11, (3, 2, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True])
def test_fisher_equals_hand_computation(tie):
    model = TinyLM(tie=tie)
    got = fisher(model, BATCHES, progress=False)
    sq_w, sq_e = 0, 0
    for batch in BATCHES:
        gW, gE = hand_gradients(model, batch)
        if tie:
            gW = gE = gW + gE  # one tensor: both uses add up
        sq_w, sq_e = sq_w + gW.square(), sq_e + gE.square()
    if tie:
        assert set(got) == {"emb"}  # the tied weight once, under its first module
        torch.testing.assert_close(got["emb"].double(), sq_e / 3, rtol=1e-6, atol=0)
    else:
        assert set(got) == {"emb", "head"}
        torch.testing.assert_close(got["head"].double(), sq_w / 3, rtol=1e-6, atol=0)
        torch.testing.assert_close(got["emb"].double(), sq_e / 3, rtol=1e-6, atol=0)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in got.values())


def tiny_llama(seed=0, layers=2, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).float()


LLAMA_BATCHES = torch.randint(0, 64, (4, 2, 12), generator=torch.Generator().manual_seed(2))


def test_fisher_on_llama_matches_hf_loss_and_leaves_the_model_alone():
    model = tiny_llama()
    model.train()
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, 7.0)  # an existing .grad stays
    model.model.norm.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = fisher(model, list(LLAMA_BATCHES[:3]), progress=False)

    names = [n for n, _ in sensitivity_targets(model)]
    assert list(got) == names and "lm_head" not in got and "model.embed_tokens" in got  # tied once
    assert "model.layers.1.mlp.down_proj" in got
    # the model as it was: weights, grads, flags, mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.lm_head.weight.grad, torch.full_like(model.lm_head.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert not model.model.norm.weight.requires_grad and model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.training

    # reference: Hugging Face's own loss, backward per batch, in eval mode
    ref = tiny_llama()
    ref.eval()
    mods = dict(ref.named_modules())
    acc = {n: torch.zeros_like(mods[n].weight) for n in names}
    for batch in LLAMA_BATCHES[:3]:
        ref.zero_grad()
        ref(input_ids=batch, labels=batch).loss.backward()
        for n in names:
            acc[n] += mods[n].weight.grad.square()
    for n in names:
        torch.testing.assert_close(got[n], acc[n] / 3, rtol=1e-4, atol=1e-12)
    assert all(float(t.sum()) > 0 for t in got.values())


def test_fisher_num_batches_takes_the_first_batches():
    model = tiny_llama()
    a = fisher(model, LLAMA_BATCHES, num_batches=2, progress=False)
    b = fisher(model, LLAMA_BATCHES[:2], progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fisher_bad_input():
    model = tiny_llama()
    gen = (b for b in LLAMA_BATCHES[:2])
    with pytest.raises(ValueError, match=r"calibration set has 2 batches, fewer than the num_batches=3"):
        fisher(model, gen, num_batches=3, progress=False)
    with pytest.raises(ValueError, match=r"calibration set has 4 batches, fewer than the num_batches=5"):
        fisher(model, LLAMA_BATCHES, num_batches=5, progress=False)
    with pytest.raises(ValueError, match=r"calibration set is empty"):
        fisher(model, [], progress=False)
    with pytest.raises(ValueError, match=r"num_batches must be None or an integer >= 1"):
        fisher(model, LLAMA_BATCHES, num_batches=0, progress=False)
    with pytest.raises(ValueError, match=r"batch 0 must be an integer tensor \[B, L\]"):
        fisher(model, [torch.zeros(2, 5)], progress=False)
    with pytest.raises(ValueError, match=r"token ids outside the model's vocabulary 0..63"):
        fisher(model, [torch.full((1, 4), 64)], progress=False)
    with pytest.raises(ValueError, match=r"batches as one tensor must be"):
        fisher(model, torch.zeros(2, 2, 2, 2, dtype=torch.long), progress=False)
    palettize_(model, Config(bits=2))
    with pytest.raises(ValueError, match=r"model is palettized"):
        fisher(model, LLAMA_BATCHES, progress=False)


class CharTok:
    """A stand-in tokenizer: one id per character, EOS = 0."""

    eos_token_id, bos_token_id = 0, None

    def __call__(self, text, add_special_tokens=True, verbose=False):
        return {"input_ids": [1 + (ord(c) % 60) for c in text]}


def test_calibration_batches_shape_and_too_short():
    texts = ["the quick brown fox jumps over the lazy dog " * 3]
    b = calibration_batches(CharTok(), texts, 2, 3, 8)
    assert b.shape == (2, 3, 8) and b.dtype == torch.long
    with pytest.raises(
        ValueError,
        match=r"calibration set is too short: it gives 16 blocks of 8 tokens, "
        r"5 batches of 4 need 20",
    ):
        calibration_batches(CharTok(), texts, 5, 4, 8)
    with pytest.raises(ValueError, match=r"calibration set is too short for 1 batches of 1 x 400 tokens"):
        calibration_batches(CharTok(), texts, 1, 1, 400)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        calibration_batches(CharTok(), texts, 1, 0, 8)


# ---- weighted exact 1-D k-means against brute force ---------------------------------------------


def brute_force(values: torch.Tensor, mass: torch.Tensor, k: int):
    """min over all ways to cut the sorted distinct values into k contiguous runs (fewer when
    there are fewer values) of sum mass * (value - run's weighted mean)**2; (cost, centroids)."""
    order = torch.argsort(values)
    v, m = values[order].tolist(), mass[order].tolist()
    u = len(v)
    best = (float("inf"), None)
    for cuts in itertools.combinations(range(1, u), min(k, u) - 1):
        bounds = (0,) + cuts + (u,)
        cost, cents = 0.0, []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mm = sum(m[lo:hi])
            c = sum(a * b for a, b in zip(v[lo:hi], m[lo:hi])) / mm if mm > 0 else v[lo]
            cost += sum(b * (a - c) ** 2 for a, b in zip(v[lo:hi], m[lo:hi]))
            cents.append(c)
        if cost < best[0]:
            best = (cost, cents)
    return best


def distinct_with_mass(w: torch.Tensor, s: torch.Tensor):
    vals, inv = torch.unique(w.double().reshape(-1), return_inverse=True)
    return vals, torch.zeros(vals.numel(), dtype=torch.float64).index_add_(0, inv, s.double().reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "k, groups, zero_frac, seed",
    [
        (3, 1, 0.0, 0),
        (4, 1, 0.0, 1),
        (4, 2, 0.0, 2),
        (2, 3, 0.0, 3),
        (4, 1, 0.3, 4),
        (3, 2, 0.3, 5),
        (8, 1, 0.0, 6),
    ],
)
def test_sensitivity_init_equals_brute_force(dtype, k, groups, zero_frac, seed):
    g = torch.Generator().manual_seed(seed)
    w = ((torch.randn(6, 8, generator=g, dtype=torch.float64) * 3).round() / 4).to(dtype)  # repeats
    s = torch.rand(6, 8, generator=g, dtype=torch.float64) ** 3  # uneven importances
    s[torch.rand(6, 8, generator=g) < zero_frac] = 0.0
    init = init_centroids(w, groups, k, 1, "sensitivity", name="w", weights=s)
    assert init.method == "sensitivity" and init.centroids.shape == (groups, k)
    for gi in range(groups):
        rows = slice(gi * 6 // groups, (gi + 1) * 6 // groups)
        vals, mass = distinct_with_mass(w[rows], s[rows])
        assert vals.numel() >= k
        cost, cents = brute_force(vals, mass, k)
        # init's cost is the weighted within-cluster error of its centroids
        c = init.centroids[gi]
        own = float((mass * (vals[:, None] - c[None]).square().min(1).values).sum())
        assert own == pytest.approx(cost, rel=1e-9, abs=1e-12)
        assert float(init.cost[gi]) == pytest.approx(cost, rel=1e-9, abs=1e-9)
        if zero_frac == 0:  # a unique optimum: the same centroids
            torch.testing.assert_close(c, torch.tensor(sorted(cents), dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_sensitivity_init_differs_from_counts_when_weights_are_uneven():
    # the same values, one of them made important: the weighted optimum moves a centroid onto it
    w = torch.tensor([0.0, 0.1, 0.2, 1.0, 1.1, 5.0], dtype=torch.float64).repeat(2)
    s = torch.ones_like(w)
    s[3] = s[9] = 1000.0  # value 1.0
    plain = init_centroids(w, 1, 2, 1, "optimal", name="w").centroids[0]
    weighted = init_centroids(w, 1, 2, 1, "sensitivity", name="w", weights=s).centroids[0]
    vals, mass = distinct_with_mass(w, s)
    cost = lambda c: float((mass * (vals[:, None] - c[None]).square().min(1).values).sum())  # noqa: E731
    assert cost(weighted) < 0.5 * cost(plain)
    assert float((weighted - 1.0).abs().min()) < 0.01 < float((plain - 1.0).abs().min())


def fisher_errors(model, sens, orig):
    """Per clustered matrix: F * (w - q(w))**2 summed, q = the finalized weight."""
    mods = dict(model.named_modules())
    return {n: float((sens[n].double() * (orig[n] - mods[n].weight.detach().double()).square()).sum()) for n in sens}


def test_sensitivity_init_beats_optimal_on_fisher_weighted_error():
    base = tiny_llama(seed=3)
    sens = fisher(base, LLAMA_BATCHES, progress=False)
    orig = {n: dict(base.named_modules())[n].weight.detach().double().clone() for n in sens}
    errors = {}
    for init in ("optimal", "sensitivity"):
        model = tiny_llama(seed=3)
        palettize_(
            model, Config(bits=2, init=init, cluster_dtype=None), sensitivity=sens if init == "sensitivity" else None
        )
        finalize(model)
        errors[init] = fisher_errors(model, sens, orig)
    # the weighted k-means minimizes exactly this error per matrix (up to the fp16 LUT rounding)
    for n in sens:
        assert errors["sensitivity"][n] <= errors["optimal"][n] * (1 + 1e-3), n
    total = {k: sum(v.values()) for k, v in errors.items()}
    assert total["sensitivity"] < 0.995 * total["optimal"], total


# ---- edkm bench sensitivity: its parts on a tiny model ------------------------------------------


def test_layer_runner_reruns_from_a_layer_exactly_as_the_full_model():
    from benchmarks.sensitivity import LayerRunner

    model = tiny_llama(layers=3).eval()
    ids = LLAMA_BATCHES[0]
    runner = LayerRunner(model, ids)
    for start in (None, 1, 2):
        torch.testing.assert_close(runner.logits(start), runner.base_logits, rtol=0, atol=1e-5)
    assert len(model.model.layers) == 3  # the layer list is put back
    w = model.model.layers[2].mlp.up_proj.weight
    with torch.no_grad():
        w.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))  # a change the logits feel
        full = model(input_ids=ids).logits
    torch.testing.assert_close(runner.logits(2), full, rtol=0, atol=1e-5)
    kl, nll = runner.kl_and_nll(full)
    logp, base = torch.log_softmax(full.double(), -1), torch.log_softmax(runner.base_logits.double(), -1)
    assert kl == pytest.approx(float((base.exp() * (base - logp)).sum(-1).mean()), rel=1e-3) and kl > 1e-3
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 64).double(), ids[:, 1:].reshape(-1))
    assert nll == pytest.approx(float(ref), rel=1e-5)
    assert runner.kl_and_nll(runner.base_logits)[0] == pytest.approx(0.0, abs=1e-6)


def test_spearman_and_layer_index():
    from benchmarks.sensitivity import layer_index, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their average rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert layer_index("model.layers.12.mlp.up_proj") == 12 and layer_index("model.embed_tokens") is None


def test_bench_report_renders(tmp_path):
    from benchmarks import sensitivity as bench

    rows = [
        {
            "name": "model.embed_tokens",
            "tied": ["lm_head"],
            "layer": None,
            "type": "embed_tokens",
            "shape": [64, 32],
            "kl": 0.5,
            "ppl": 30.0,
            "sq_error": 3.0,
            "fisher_proxy": 0.01,
            "seconds": 1.0,
        }
    ]
    rows += [
        {
            "name": f"model.layers.{l}.{t}",
            "tied": [],
            "layer": l,
            "type": t.split(".")[-1],
            "shape": [32, 32],
            "kl": 1e-3 * (l + 1) * (i + 1),
            "ppl": 20.0,
            "sq_error": 1.0,
            "fisher_proxy": 1e-5 * (l + 1) * (i + 1),
            "seconds": 0.5,
        }
        for l in range(2)
        for i, t in enumerate(["self_attn.q_proj", "mlp.down_proj"])
    ]
    report = {
        "benchmark": "sensitivity",
        "date": "today",
        "machine": {"platform": "test"},
        "command": "edkm bench sensitivity",
        "settings": {
            "model": "tiny",
            "bits": 3,
            "group_size": None,
            "init": "optimal",
            "seqs": 2,
            "seq_len": 8,
            "fisher_batches": 2,
            "fisher_len": 8,
            "quick": True,
            "threads": 1,
            "validation_files": ["a.txt"],
            "calibration_files": ["b.txt"],
        },
        "baseline": {"ppl": 20.0, "kl": 0.0, "replay_max_abs_diff": 0.0, "replay_from_layer": 1},
        "summary": {
            "matrices": 5,
            "spearman_kl_fisher": 1.0,
            "spearman_kl_sq_error": 0.5,
            "pearson_log_kl_log_fisher": 1.0,
            "median_kl_over_second_order": 2.0,
            "top10_overlap": 5,
        },
        "rows": rows,
        "seconds": 1.0,
    }
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps(report))
    bench.render(path)
    md = (tmp_path / "r.md").read_text()
    assert (
        "| model.embed_tokens (tied: lm_head) | 0.5 |" in md
        and "Spearman rank correlation, KL vs Fisher proxy | 1.000" in md
    )
    assert (tmp_path / "r.png").stat().st_size > 1000
    labels, types, grid = bench._grid(rows, "kl")
    assert labels == ["embed_tokens (tied)", "0", "1"] and types == ["q_proj", "down_proj"]
    assert grid[0][0] == 0.5 and grid[2][1] == pytest.approx(4e-3) and grid[0][1] != grid[0][1]
