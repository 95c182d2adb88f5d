"""Outliers kept exact (dense-and-sparse): which weights are chosen, the training forward and
its gradient, eval / finalize, state_dict resume, the file round trip through both readers,
and that they lower the clustering error on a heavy-tailed matrix."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edkm
from edkm import format as fmt
from edkm.config import Config
from edkm.outliers import choose_outliers, outlier_count
from edkm.palettize import finalize, palettize_

transformers = pytest.importorskip("transformers")

X = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def tiny_llama(dtype=torch.float32, tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def linear(seed=0, out=48, inp=32, dtype=torch.float32, heavy=False):
    torch.manual_seed(seed)
    m = nn.Linear(inp, out).to(dtype)
    if heavy:
        with torch.no_grad():
            m.weight.copy_(torch.distributions.StudentT(2.0).sample(m.weight.shape) * 0.02)
    return m


def brute_force_top(score: torch.Tensor, n: int) -> torch.Tensor:
    """The n highest scores, ties to the lower position, as sorted positions."""
    s = score.reshape(-1).tolist()
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    return torch.tensor(sorted(order[:n]), dtype=torch.int64)


# ---- which weights -------------------------------------------------------------------------


def test_positions_are_the_largest_magnitudes():
    m = linear()
    src = m.weight.detach().bfloat16()  # what is clustered (cluster_dtype rounding)
    palettize_(m, Config(bits=3, outlier_fraction=0.02))
    n = outlier_count(0.02, 48 * 32)
    assert n == 31
    got = m.edkm_outlier_positions
    assert got.dtype == torch.int64 and torch.equal(got, brute_force_top(src.double().abs(), n))
    assert torch.equal(m.edkm_outlier_index, got)  # the buffer the state_dict carries


def test_ties_at_the_threshold_go_to_the_lower_positions():
    w = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5])
    assert choose_outliers(w, 3, "magnitude").tolist() == [1, 2, 3]
    assert choose_outliers(w, 4, "magnitude").tolist() == [1, 2, 3, 4]
    assert choose_outliers(w, 0, "magnitude").numel() == 0


def test_positions_by_sensitivity_times_w_squared():
    m = linear(seed=1)
    src = m.weight.detach().bfloat16().double()
    sens = torch.rand(48, 32, generator=torch.Generator().manual_seed(2)) ** 4
    palettize_(m, Config(bits=3, outlier_fraction=0.05, outlier_criterion="sensitivity"), sensitivity={"": sens})
    n = outlier_count(0.05, 48 * 32)
    want = brute_force_top(sens.double() * src.square(), n)
    assert torch.equal(m.edkm_outlier_positions, want)
    assert not torch.equal(want, brute_force_top(src.abs(), n))  # the criterion matters here


def test_initial_centroids_are_the_exact_k_means_of_the_inliers():
    m = linear(seed=10, heavy=True)
    src = m.weight.detach().bfloat16().double().reshape(-1)
    palettize_(m, Config(bits=2, outlier_fraction=0.05))
    keep = torch.ones(src.numel(), dtype=torch.bool)
    keep[m.edkm_outlier_positions] = False
    vals, counts = torch.unique(src[keep], return_counts=True)
    want, _ = edkm.ops.optimal_kmeans_1d(vals, counts.double(), 4)
    torch.testing.assert_close(m.edkm_centroids.double(), want.reshape(1, 4), rtol=1e-6, atol=0)
    assert m._edkm_state["init_method"] == "optimal"
    # The outliers lie outside the range the LUT covers: none was left to pull a centroid out.
    assert float(src[~keep].abs().min()) > float(m.edkm_centroids.abs().max())


# ---- forward, gradient, eval, finalize -----------------------------------------------------


def test_training_forward_is_clustered_dense_part_plus_exact_outliers():
    m = linear(seed=3, heavy=True)
    palettize_(m, Config(bits=3, outlier_fraction=0.03, cluster_dtype=None))
    m.train()
    idx = m.edkm_outlier_positions
    c0 = m.edkm_centroids.clone()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    y = m(x)

    w = m.weight.detach()
    dense = w.clone().reshape(-1)
    dense[idx] = 0
    cfg = m.edkm_config
    ref = edkm.dkm(dense.view(w.shape), c0, m.edkm_temperature, cfg.max_iter, cfg.epsilon, cfg.distance)
    eff = ref.clustered.detach().clone().reshape(-1)
    eff[idx] = w.reshape(-1)[idx]
    eff = eff.view(w.shape).requires_grad_()
    y_ref = F.linear(x, eff, m.bias)
    assert torch.equal(y, y_ref)
    assert torch.equal(m.edkm_centroids, ref.centroids.detach())  # warm start moved as without

    # Gradient: the outlier positions get theirs directly, d loss / d w_eff.
    y.square().sum().backward()
    y_ref.square().sum().backward()
    g = m.weight.grad.reshape(-1)
    assert torch.equal(g[idx], eff.grad.reshape(-1)[idx])
    assert bool((g[idx] != 0).all())
    rest = torch.ones(g.numel(), dtype=torch.bool)
    rest[idx] = False
    assert float(g[rest].abs().sum()) > 0  # the clustered part still trains


def test_outliers_in_bf16_training_and_eval():
    m = linear(seed=5)
    palettize_(m, Config(bits=2, outlier_fraction=0.05))  # fp32 weight, clustered as bf16
    idx = m.edkm_outlier_positions
    m.train()
    x = torch.randn(3, 32)
    m(x).sum().backward()
    flat = m.weight.detach().reshape(-1)
    m.eval()
    hard = edkm.clustered_weight(m).reshape(-1)
    assert torch.equal(hard[idx], flat[idx].bfloat16().float())  # stored precision
    rest = torch.ones(flat.numel(), dtype=torch.bool)
    rest[idx] = False
    assert torch.unique(hard[rest]).numel() <= 4
    assert m.edkm_outlier_dtype == torch.bfloat16
    finalize(m)  # the LUT is rounded to fp16 there; the outliers are what eval used
    assert torch.equal(m.weight.detach().reshape(-1)[idx], hard[idx])
    assert torch.unique(m.weight.detach().reshape(-1)[rest]).numel() <= 4


def test_outliers_lower_the_error_on_a_heavy_tailed_matrix():
    """Student-t (2 degrees of freedom) weights: a few huge ones drag the 3-bit LUT out; kept
    exact, they leave the centroids to the bulk."""
    errors = {}
    for frac in (0.0, 0.01):
        m = linear(seed=6, out=128, inp=128, heavy=True)
        src = m.weight.detach().bfloat16().double()
        palettize_(m, Config(bits=3, outlier_fraction=frac))
        m.eval()
        errors[frac] = float((edkm.clustered_weight(m).double() - src).square().sum())
    assert errors[0.01] < 0.5 * errors[0.0], errors


def test_fused_linear_path_is_not_taken_with_outliers(monkeypatch):
    m = linear(seed=7, dtype=torch.bfloat16)
    palettize_(m, Config(bits=3, outlier_fraction=0.01))
    m.train()

    def boom(*a, **k):
        raise AssertionError("dkm_linear cannot add outliers back")

    monkeypatch.setattr(edkm.ops, "dkm_linear", boom)
    m(torch.randn(2, 32, dtype=torch.bfloat16))


# ---- resume ---------------------------------------------------------------------------------


def test_state_dict_resume_keeps_the_outliers():
    cfg = Config(bits=3, outlier_fraction=0.02)
    a = palettize_(tiny_llama(seed=0), cfg)
    a.train()
    opt = torch.optim.SGD(a.parameters(), lr=1e-2)
    a(input_ids=X, labels=X).loss.backward()
    opt.step()
    sd = {k: v.clone() for k, v in a.state_dict().items() if isinstance(v, torch.Tensor)}
    sd.update({k: v for k, v in a.state_dict().items() if not isinstance(v, torch.Tensor)})
    key = "model.layers.0.mlp.up_proj.edkm_outlier_index"
    assert key in sd and sd[key].numel() == outlier_count(0.02, 48 * 32)

    b = palettize_(tiny_llama(seed=1), cfg)  # other weights: other outliers at set-up
    assert not torch.equal(b.model.layers[0].mlp.up_proj.edkm_outlier_index, sd[key])
    b.load_state_dict(sd)
    assert torch.equal(b.model.layers[0].mlp.up_proj.edkm_outlier_positions, sd[key])
    a.train(), b.train()
    la, lb = a(input_ids=X, labels=X).loss, b(input_ids=X, labels=X).loss
    assert torch.equal(la, lb)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=X).logits, b(input_ids=X).logits)


def test_outliers_are_chosen_at_the_milestone():
    m = linear(seed=8)
    palettize_(m, Config(bits=3, outlier_fraction=0.02, milestone=1))
    assert m.edkm_outlier_positions is None and m.edkm_outlier_index.numel() == 31
    m.train()
    x = torch.randn(2, 32)
    m(x)  # step 1: unclustered
    with torch.no_grad():
        m.weight[0, 0] = 100.0  # now the largest weight
    m(x)  # step 2: clustering starts, outliers chosen from this weight
    idx = m.edkm_outlier_positions
    assert idx is not None and 0 in idx.tolist()
    assert torch.equal(idx, brute_force_top(m.weight.detach().bfloat16().double().abs(), 31))


# ---- the file --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, cfg, tie",
    [
        (torch.float32, dict(bits=3, outlier_fraction=0.02), True),
        (torch.bfloat16, dict(bits=3, group_size=16, outlier_fraction=0.01), False),
        (torch.float16, dict(bits=2, outlier_fraction=0.05), True),
        (torch.float32, dict(bits=4, outlier_fraction=0.01, cluster_dtype=None), False),
    ],
)
def test_round_trip_through_both_readers_is_bit_exact(tmp_path, dtype, cfg, tie):
    model = palettize_(tiny_llama(dtype, tie), Config(**cfg))
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    finalize(model).eval()
    path = tmp_path / "m.safetensors"
    edkm.save(model, path)

    fresh = tiny_llama(dtype, tie, seed=9)
    edkm.load(path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=X).logits, model(input_ids=X).logits)
    state = model.state_dict()
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, state[name]), name

    from edkm import _C

    cpp = _C._load_compressed_state_dict(str(path))
    py = fmt.load_state_dict(path)
    assert set(cpp) == set(py)
    for name in py:
        assert cpp[name].dtype == py[name].dtype and torch.equal(cpp[name], py[name]), name

    header = fmt.read_header(path)
    assert header.metadata["edkm.version"] == "2"
    up = header.layouts["model.layers.0.mlp.up_proj.weight"]
    assert up.outliers == outlier_count(cfg["outlier_fraction"], 48 * 32)
    assert header.entries["model.layers.0.mlp.up_proj.weight.outlier_index"]["dtype"] == "I32"
    m = model.model.layers[0].mlp.up_proj
    stored = fmt._read_tensor(
        open(path, "rb"), header.header_bytes, header.entries["model.layers.0.mlp.up_proj.weight.outlier_values"]
    )
    assert stored.dtype == m.edkm_outlier_dtype
    assert torch.equal(stored.to(dtype), m.weight.detach().reshape(-1)[m.edkm_outlier_positions])


def test_info_counts_the_outlier_bytes(tmp_path, capsys):
    model = finalize(palettize_(tiny_llama(torch.bfloat16), Config(bits=3, outlier_fraction=0.02)))
    path = tmp_path / "m.safetensors"
    edkm.save(model, path)
    r = edkm.info(path, verbose=False)
    assert r["parts_sum_to_file_size"]
    row = next(t for t in r["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    n = outlier_count(0.02, 48 * 32)
    assert row["outliers"] == n and row["outlier_bytes"] == n * (4 + 2)
    assert row["bytes"] == 48 * 32 * 3 // 8 + 8 * 2 + n * 6
    assert row["bits_per_weight"] == pytest.approx(8 * row["bytes"] / (48 * 32))
    assert row["bits_per_weight"] > 3 + 0.02 * 48 - 0.01  # 48 bits per outlier
    assert "model.layers.0.mlp.up_proj.weight.outlier_index" not in {t["name"] for t in r["tensors"]}
    edkm.info(path)
    out = capsys.readouterr().out
    assert f"{n:,}" in out and "outliers" in out


def test_files_without_outliers_stay_version_1(tmp_path):
    model = finalize(palettize_(tiny_llama(), Config(bits=3)))
    path = tmp_path / "m.safetensors"
    edkm.save(model, path)
    header = fmt.read_header(path)
    assert header.metadata["edkm.version"] == "1"
    assert all("outliers" not in d for d in json.loads(header.metadata["edkm.layout"]).values())


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(outlier_fraction=-0.01), r"outlier_fraction must be a number in \[0, 0.1\]"),
        (dict(outlier_fraction=0.11), r"outlier_fraction must be a number in \[0, 0.1\]"),
        (dict(outlier_fraction=True), r"outlier_fraction must be a number in \[0, 0.1\]"),
        (dict(outlier_fraction="0.01"), r"outlier_fraction must be a number in \[0, 0.1\]"),
        (dict(outlier_fraction=float("nan")), r"outlier_fraction must be a number in \[0, 0.1\]"),
        (dict(outlier_criterion="largest"), r"outlier_criterion must be one of"),
        (dict(outlier_fraction=0.01, cluster_dim=2), r"outlier_fraction must be 0 when cluster_dim > 1"),
    ],
)
def test_bad_config_is_a_clear_error(fields, match):
    with pytest.raises(ValueError, match=match):
        Config(**fields)


def test_sensitivity_criterion_without_sensitivity_is_a_clear_error():
    with pytest.raises(ValueError, match=r"outlier_criterion='sensitivity', which needs its sensitivity"):
        palettize_(linear(), Config(outlier_fraction=0.01, outlier_criterion="sensitivity"))
    with pytest.raises(ValueError, match=r"outlier_criterion='sensitivity' needs a sensitivity tensor"):
        choose_outliers(torch.randn(4, 4), 2, "sensitivity")


def test_non_finite_weight_is_a_clear_error():
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf values; cannot choose its outliers"):
        choose_outliers(w, 2, "magnitude")


def test_outlier_beyond_float16_is_a_clear_error_at_finalize():
    m = linear(seed=9)
    with torch.no_grad():
        m.weight[0, 0] = 1e6  # fp32 clustered as is: its outlier is stored as float16
    palettize_(m, Config(bits=3, outlier_fraction=0.01, cluster_dtype=None))
    with pytest.raises(ValueError, match=r"an outlier exceeds torch.float16's range"):
        finalize(m)
