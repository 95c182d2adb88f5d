"""Mixed precision by budget (edkm.mixed_precision): the knapsack against brute force, the
predicted size against the real file, the per-matrix costs against palettize_ + finalize."""

import itertools
import math
import random

import pytest
import torch

import edkm
from edkm import mixed_precision as mp
from edkm.config import Config
from edkm.palettize import finalize, palettize_
from edkm.sensitivity import fisher

transformers = pytest.importorskip("transformers")


def tiny_llama(layers=2, tie=True, dtype=torch.float32, seed=0):
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
    return LlamaForCausalLM(cfg).to(dtype)


BATCHES = torch.randint(0, 64, (3, 2, 12), generator=torch.Generator().manual_seed(2))


def saved_data_bytes(model, tmp_path, name="m.safetensors"):
    """(file bytes - header bytes, info) of the file edkm.save writes."""
    path = str(tmp_path / name)
    edkm.save(model, path)
    info = edkm.info(path, verbose=False)
    return info["file_bytes"] - info["header_bytes"], info


# ---- the solver -----------------------------------------------------------------------------------


def brute(costs, sizes, budget):
    best = None
    for pick in itertools.product(*[list(s) for s in sizes]):
        if sum(s[k] for s, k in zip(sizes, pick)) <= budget:
            c = sum(cc[k] for cc, k in zip(costs, pick))
            if best is None or c < best:
                best = c
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solve_equals_brute_force(seed):
    rng = random.Random(seed)
    units = rng.randint(2, 5)
    sizes, costs = [], []
    for _ in range(units):
        keys = rng.sample([2, 3, 4, 5, 8, 16], rng.randint(1, 4))
        sizes.append({k: rng.randint(1, 60) for k in keys})
        costs.append({k: rng.uniform(0, 10) for k in keys})  # not monotone, not convex
    lo = sum(min(s.values()) for s in sizes)
    hi = sum(max(s.values()) for s in sizes)
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)}):
        pick, method = mp.solve(costs, sizes, budget)
        assert method in ("dp", "greedy")
        assert sum(s[k] for s, k in zip(sizes, pick)) <= budget
        assert sum(c[k] for c, k in zip(costs, pick)) == pytest.approx(brute(costs, sizes, budget), rel=1e-12)
        # a coarse DP (sizes rounded up to buckets) and the greedy still fit the budget
        options = [[(s[k], c[k], k) for k in s] for c, s in zip(costs, sizes)]
        for p in (mp._dp(options, budget, 3), mp._greedy(options, budget)):
            assert p is not None and sum(s[k] for s, k in zip(sizes, p)) <= budget


def test_solve_infeasible():
    with pytest.raises(ValueError, match="no choice fits the budget"):
        mp.solve([{2: 1.0}, {2: 1.0, 3: 0.5}], [{2: 10}, {2: 10, 3: 12}], 19)


# ---- sizes: predicted = the file edkm.save writes ------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tie, cfg",
    [
        (torch.float32, True, dict(bits=3)),
        (torch.float32, False, dict(bits=5, group_size=8)),
        (
            torch.bfloat16,
            True,
            dict(bits=2, group_size=16, module_names={r"lm_head": None, r"model\.embed_tokens": None}),
        ),
        (torch.float16, False, dict(bits=1, cluster_dim=2, init="kmeans++")),
        (torch.float32, True, dict(bits=3, outlier_fraction=0.02)),
        (torch.bfloat16, False, dict(bits=4, outlier_fraction=0.05)),
    ],
)
def test_predicted_file_bytes_equals_saved_file(tmp_path, dtype, tie, cfg):
    model = tiny_llama(tie=tie, dtype=dtype)
    config = Config(**cfg)
    predicted = mp.predicted_file_bytes(model, config)
    palettize_(model, config)
    finalize(model)
    real, _ = saved_data_bytes(model, tmp_path)
    assert predicted == real  # to the byte; the header (JSON) is not in either


# ---- the per-matrix costs --------------------------------------------------------------------------


def test_matrix_costs_are_the_fisher_weighted_error_of_palettize_and_finalize():
    model = tiny_llama()
    sens = fisher(model, BATCHES, progress=False)
    costs = mp.matrix_costs(model, sens, (2, 3, 16), progress=False)
    assert set(costs) == set(sens)  # one entry per clusterable weight, the tied one once
    for b in (2, 3):
        m = tiny_llama()
        palettize_(m, Config(bits=b))
        finalize(m)
        mods, orig = dict(m.named_modules()), dict(model.named_modules())
        for name in ("model.embed_tokens", "model.layers.1.mlp.down_proj"):
            err = (orig[name].weight.detach().double() - mods[name].weight.detach().double()).square()
            assert costs[name][b] == pytest.approx(float((sens[name].double() * err).sum()), rel=1e-12)
    for name, c in costs.items():
        assert c[16] == 0.0 and c[2] > c[3] > 0, name


def test_matrix_costs_with_sensitivity_init_are_no_worse():
    model = tiny_llama()
    sens = fisher(model, BATCHES, progress=False)
    opt = mp.matrix_costs(model, sens, (2, 3), Config(init="optimal", cluster_dtype=None), progress=False)
    wtd = mp.matrix_costs(model, sens, (2, 3), Config(init="sensitivity", cluster_dtype=None), progress=False)
    for name in opt:
        for b in (2, 3):
            assert wtd[name][b] <= opt[name][b] * (1 + 1e-3), (name, b)
    assert sum(w[2] for w in wtd.values()) < sum(o[2] for o in opt.values())


# ---- choose_bits ------------------------------------------------------------------------------------


def test_choose_bits_is_optimal_on_a_brute_forceable_model():
    model = tiny_llama(layers=1)
    sens = fisher(model, BATCHES, progress=False)
    choices = (2, 4, 16)
    costs = mp.matrix_costs(model, sens, choices, progress=False)
    units, sizes, fixed, weights = mp.unit_sizes(model, Config(), choices)
    assert len(units) == 8  # 7 matrices + the tied embedding: 3**8 assignments
    unit_costs = [costs[u.name] for u in units]
    lo = 8 * (fixed + sum(min(s.values()) for s in sizes)) / weights
    hi = 8 * (fixed + sum(max(s.values()) for s in sizes)) / weights
    for target in (lo + 0.01, 3.0, 4.5, 8.0, hi):
        r = mp.choose_bits(model, target, costs)
        budget = math.floor(target * weights / 8 + 1e-9) - fixed
        assert r.bits_per_weight <= target + 1e-12 and r.data_bytes - fixed <= budget
        assert r.cost == pytest.approx(brute(unit_costs, sizes, budget), rel=1e-12, abs=1e-300)
        assert r.min_bits_per_weight == pytest.approx(lo)


def test_choose_bits_config_gives_the_predicted_file_and_info_shows_the_bits(tmp_path):
    model = tiny_llama()
    sens = fisher(model, BATCHES, progress=False)
    costs = mp.matrix_costs(model, sens, progress=False)
    r = mp.choose_bits(model, 3.5, costs, Config(group_size=16))
    assert r.bits_per_weight <= 3.5 and len(set(r.bits.values())) > 1  # a real mix
    assert mp.predicted_file_bytes(model, r.config) == r.data_bytes
    palettize_(model, r.config)
    finalize(model)
    real, info = saved_data_bytes(model, tmp_path)
    assert real == r.data_bytes  # to the byte, header excluded
    assert 8 * real / r.weights == pytest.approx(r.bits_per_weight)
    shown = {
        t["name"][: -len(".weight")]: t.get("bits", 16)
        for t in info["tensors"]
        if t["name"].endswith(".weight") and t["name"][: -len(".weight")] in r.bits
    }
    assert shown == r.bits  # edkm info reports each tensor's bits (16: stored as is)
    assert all(t["groups"] == t["shape"][0] // 16 for t in info["tensors"] if t["kind"] == "clustered")


def test_choose_bits_keeps_what_the_config_skips():
    model = tiny_llama()
    sens = fisher(model, BATCHES, progress=False)
    cfg = Config(module_names={r"model\.embed_tokens|lm_head": None})
    costs = mp.matrix_costs(model, sens, (2, 3), cfg, progress=False)
    assert costs["model.embed_tokens"] == {16: 0.0}
    r = mp.choose_bits(model, 32.0, costs, cfg)  # room for everything: the best offered, 3 bits
    assert r.bits["model.embed_tokens"] == 16 and all(b == 3 for n, b in r.bits.items() if n != "model.embed_tokens")
    palettize_(model, r.config)
    assert not isinstance(model.lm_head, edkm.ClusteredLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, edkm.ClusteredLinear)


def test_unreachable_target_states_the_smallest_achievable():
    model = tiny_llama()
    costs = {u.name: {2: 1.0, 3: 0.5} for u in mp.clusterable_units(model)}
    smallest = 8 * mp.predicted_file_bytes(model, Config(bits=2)) / sum(p.numel() for p in model.parameters())
    with pytest.raises(
        ValueError,
        match=rf"target_bits 2 cannot be met: the smallest achievable file is "
        rf"{smallest:.4f} bits/weight",
    ):
        mp.choose_bits(model, 2, costs)
    r = mp.choose_bits(model, smallest + 1e-9, costs)
    assert set(r.bits.values()) == {2}


def test_mixed_precision_config_in_one_call():
    model = tiny_llama(layers=1)
    sens = fisher(model, BATCHES, progress=False)
    r = mp.mixed_precision_config(model, 4.0, sens, bits_choices=(2, 3, 4), progress=False)
    assert r.bits_per_weight <= 4.0 and set(r.bits.values()) <= {2, 3, 4}


def test_bad_input():
    model = tiny_llama(layers=1)
    sens = fisher(model, BATCHES, progress=False)
    costs = {u.name: {2: 1.0} for u in mp.clusterable_units(model)}
    for bad in ([], [9], [0], [2, "3"], None, [True]):
        with pytest.raises(ValueError, match=r"bits_choices must be a non-empty sequence of integers in 1..8 or 16"):
            mp.matrix_costs(model, sens, bad, progress=False)
    for bad in (0, -1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match=r"target_bits must be a finite number > 0"):
            mp.choose_bits(model, bad, costs)
    with pytest.raises(ValueError, match=r"costs has no entry for model.layers.0.mlp.up_proj"):
        mp.choose_bits(model, 4.0, {k: v for k, v in costs.items() if k != "model.layers.0.mlp.up_proj"})
    with pytest.raises(ValueError, match=r"no sensitivity for model.layers.0.self_attn.q_proj"):
        mp.matrix_costs(model, {k: v for k, v in sens.items() if "q_proj" not in k}, (2,), progress=False)
    with pytest.raises(ValueError, match=r"sensitivity\['model.embed_tokens'\] must be a tensor of the weight's shape"):
        mp.matrix_costs(model, {**sens, "model.embed_tokens": torch.ones(3)}, (2,), progress=False)
    palettize_(model, Config(bits=2))
    with pytest.raises(ValueError, match=r"already palettized"):
        mp.choose_bits(model, 4.0, costs)
    with pytest.raises(ValueError, match=r"already palettized"):
        mp.matrix_costs(model, sens, (2,), progress=False)
