"""edkm bench accuracy: the variant builders (round-to-nearest grid, k-means, eDKM) store the same
layout, the paired statistics, and one end-to-end run on a tiny LLaMA with fixture data.

A tiny random LlamaForCausalLM (tied embedding / lm_head, as SmolLM2) and a character
tokenizer; no shared data, no network.
"""

import argparse
import json
import math

import pytest
import torch

import edkm
from benchmarks import accuracy as acc
from test_evaluate import char_tokenizer

TOK = char_tokenizer()
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. The state of our union is strong. "
) * 6


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(TOK),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).float().eval()


CFG = edkm.Config(bits=3, group_size=8)  # 8 divides every row count of the tiny model (104, 64, 32, 16)
FT = dict(lr=5e-4, block_len=16, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def clustered(base):
    return acc.palettized(base, CFG)


def leaders(model):
    return [(n, m) for n, m in edkm.clustered_modules(model) if m.edkm_leader is None]


def test_uniform_grid():
    w = torch.tensor([[-1.0, 0.5, 3.0, 2.0], [4.0, 4.0, 4.0, 4.0]])
    g = acc.uniform_grid(w, 2, 4)
    assert g.dtype == torch.float64
    assert g[0].tolist() == pytest.approx([-1.0, 1 / 3, 5 / 3, 3.0], abs=1e-15)
    assert g[0, 0] == -1.0 and g[0, -1] == 3.0  # the ends are the group's min and max exactly
    assert torch.equal(g[1], torch.full((4,), 4.0, dtype=torch.float64))  # a constant group


def test_rtn_is_round_to_nearest_on_the_min_max_grid(clustered):
    model = acc.build_rtn(clustered)
    k = CFG.k
    ref = acc.palettized(tiny_llama(), CFG)  # the same weights, palettized, untouched
    assert len(leaders(model)) == 2 * 7 + 1  # the tied embedding / lm_head is one clustered tensor
    for (name, m), (_, r) in zip(leaders(model), leaders(ref)):
        src = r.edkm_source().detach().double().reshape(m.edkm_groups, -1)  # bf16 rounding, as clustered
        lo, hi = src.amin(1, keepdim=True), src.amax(1, keepdim=True)
        grid = lo + (hi - lo) * torch.arange(k, dtype=torch.float64) / (k - 1)
        # the LUT is the grid, in the file's precision (fp16)
        lut = m.centroids.double()
        assert torch.equal(lut, grid.float().half().double()), name
        assert torch.equal(lut[:, 0:1], lo) and torch.equal(lut[:, -1:], hi), name  # ends exact
        # every weight is its source rounded to the nearest level
        w = m.weight.detach().double().reshape(m.edkm_groups, -1)
        step = (hi - lo) / (k - 1)
        idx = ((src - lo) / step).round().clamp(0, k - 1).long()
        expected = lut.gather(1, idx)
        frac = ((src - lo) / step) % 1.0
        clear = (frac - 0.5).abs() > 1e-3  # away from a midpoint, where fp16 rounding could flip it
        assert clear.float().mean() > 0.95
        assert torch.equal(w[clear], expected[clear]), name
        err = (w - src).abs()
        assert bool((err <= step / 2 * (1 + 1e-2) + 1e-12).all()), name
        # and it is never further than the nearest level
        nearest = (src[:, :, None] - lut[:, None, :]).abs().min(-1).values
        assert bool((err <= nearest + 1e-12).all()), name
    # tied: lm_head computes with the embedding's clustered weight
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_rtn_needs_a_palettized_model(base):
    with pytest.raises(ValueError, match="palettize_"):
        acc.rtn_(tiny_llama())
    with pytest.raises(ValueError, match="finalized"):
        acc.rtn_(acc.build_kmeans(acc.palettized(base, CFG)))


def test_same_layout_and_size_for_rtn_kmeans_edkm(base, clustered, tmp_path):
    texts = [TEXT]
    batch = acc.sample_batch(TOK, [TEXT], 64)
    models = {"rtn": acc.build_rtn(clustered), "kmeans": acc.build_kmeans(clustered)}
    models["edkm"], losses = acc.build_edkm(clustered, TOK, texts, 2, **FT)
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    files = {v: acc.save_and_check(m, tiny_llama(), batch, str(tmp_path)) for v, m in models.items()}
    for v, f in files.items():
        assert f["reload_exact"], v
        assert f["bytes"] == f["file_bytes"] > 0
    assert files["rtn"]["layout"] == files["kmeans"]["layout"] == files["edkm"]["layout"]
    assert files["rtn"]["bytes"] == files["kmeans"]["bytes"] == files["edkm"]["bytes"]
    layout = files["kmeans"]["layout"]
    assert all(bits == 3 for _, _, bits, _, _ in layout)
    assert ("model.embed_tokens.weight", (len(TOK), 32), 3, len(TOK) // 8, 1) in layout
    # the clustered module did not change the palettized start (builders copy it)
    assert not any(m.edkm_finalized for _, m in edkm.clustered_modules(clustered))
    # the methods differ only in their LUTs / assignments
    lut = {v: torch.cat([m.centroids.flatten() for _, m in leaders(models[v])]) for v in models}
    assert not torch.equal(lut["rtn"], lut["kmeans"])
    assert not torch.equal(lut["edkm"], lut["kmeans"])
    # every weight takes one of its group's K values
    for v, model in models.items():
        for name, m in leaders(model):
            w = m.weight.detach().reshape(m.edkm_groups, -1)
            assert all(torch.unique(row).numel() <= CFG.k for row in w), (v, name)


def test_finetune_builder_leaves_the_base_untouched(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m, losses = acc.build_finetune(base, TOK, [TEXT], 2, **FT)
    assert len(losses) == 2
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_mcnemar_and_paired():
    assert acc.mcnemar_p(0, 0) == 1.0
    assert acc.mcnemar_p(5, 5) == 1.0
    assert acc.mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert acc.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    p = acc.paired(a, b)
    assert (p["both_right"], p["a_only"], p["b_only"], p["both_wrong"]) == (1, 2, 1, 1)
    assert p["diff"] == pytest.approx(0.2)
    assert p["diff_stderr"] == pytest.approx(math.sqrt(3 - 1 / 5) / 5)


def write_fixture_data(root):
    for rel in (
        "corpus/sotu/1990_bush_republican.txt",
        "corpus/austen/emma.txt",
        "corpus/sotu/2005_bush_republican.txt",
        "corpus/austen/persuasion.txt",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(TEXT)
    (root / "eval").mkdir()
    mc = [
        {"query": "Question: what is a wife?\nAnswer:", "choices": ["a spouse", "a fish"], "gold": 0},
        {"query": "Question: the union is\nAnswer:", "choices": ["strong", "weak", "blue"], "gold": 0},
        {"query": "Fortune:", "choices": ["good", "bad"], "gold": 1},
    ]
    lam = [
        {"context": "It is a truth universally", "continuation": "acknowledged"},
        {"context": "The state of our union is", "continuation": "strong"},
        {"context": "a single man in", "continuation": "possession"},
    ]
    for name, items in (("piqa", mc), ("arc_easy", mc), ("lambada_openai", lam)):
        (root / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))


def test_zero_shot_items_match_zero_shot(base, tmp_path):
    from edkm.evaluate import zero_shot

    write_fixture_data(tmp_path)
    for task in ("piqa", "lambada_openai"):
        path = tmp_path / "eval" / f"{task}.jsonl"
        result, items = acc.zero_shot_items(base, TOK, path, None, progress=False)
        plain = zero_shot(base, TOK, path, progress=False)
        assert result["acc"] == plain["acc"] == sum(items["acc"]) / 3
        if task == "piqa":
            assert plain["acc_norm"] == sum(items["acc_norm"]) / 3
        else:
            assert math.exp(-sum(items["logprob"]) / 3) == pytest.approx(plain["ppl"])


def args_for(data, out, **changes):
    p = argparse.ArgumentParser()
    acc.add_arguments(p)
    a = p.parse_args(
        [
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--steps",
            "2",
            "--block-len",
            "16",
            "--batch-size",
            "2",
            "--limit",
            "0",
            "--eval-tokens",
            "600",
            "--group-size",
            "8",
        ]
    )
    a.no_progress = True
    for k, v in changes.items():
        setattr(a, k, v)
    return a


def test_run_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_fixture_data(data)
    report = acc.run(args_for(data, out), loaded=(tiny_llama(), TOK))
    assert list(report["variants"]) == list(acc.VARIANTS)
    ck = report["checks"]
    assert all(ck["reload_exact"].values()) and ck["same_layout"] and ck["same_file_bytes"]
    v = report["variants"]
    assert v["rtn"]["bytes"] == v["kmeans"]["bytes"] == v["edkm"]["bytes"] < v["baseline"]["bytes"]
    assert v["baseline"]["bytes"] == 2 * report["n_weights"]
    assert len(v["edkm"]["train_losses"]) == len(v["finetune"]["train_losses"]) == 2
    for r in v.values():
        assert r["metrics"]["piqa"]["n"] == 3 and r["metrics"]["ppl"]["tokens"] > 0
        assert len(r["items"]["piqa"]["acc"]) == 3
    pairs = {(p["a"], p["b"], p["task"], p["metric"]) for p in report["paired"]}
    assert ("edkm", "kmeans", "piqa", "acc") in pairs and ("edkm", "rtn", "lambada_openai", "acc") in pairs
    files = report["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{acc._tag(report['settings'])}.{k}" for k in ("json", "md", "png")
    )
    saved = json.loads(out.joinpath(files["json"].split("/")[-1]).read_text())
    assert saved["settings"]["steps"] == 2 and saved["command"]
    md = out.joinpath(files["md"].split("/")[-1]).read_text()
    assert "command:" in md and "| rtn |" in md and "McNemar" in md and "Nothing was tuned on test" in md
    assert out.joinpath(files["png"].split("/")[-1]).read_bytes()[:4] == b"\x89PNG"
    md_path = out.joinpath(files["md"].split("/")[-1])
    md_path.unlink()
    acc.render(files["json"])  # --render rewrites the markdown (and chart) from the JSON alone
    assert md_path.read_text() == md
    text = acc.summary(report)
    assert text.splitlines()[0].startswith("| variant |")


def test_variant_subset_and_bad_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_fixture_data(data)
    report = acc.run(args_for(data, tmp_path / "out", variants="kmeans,baseline"), loaded=(tiny_llama(), TOK))
    assert list(report["variants"]) == ["baseline", "kmeans"] and report["paired"] == []
    with pytest.raises(ValueError, match="--variants"):
        acc.run(args_for(data, tmp_path / "out", variants="kmeans,gptq"), loaded=(tiny_llama(), TOK))


def test_cli_registers_bench_accuracy():
    from edkm.cli import build_parser

    a = build_parser().parse_args(["bench", "accuracy", "--quick", "--group-size", "64"])
    assert a.run is acc.main and a.quick and a.group_size == 64 and a.limit is None


def test_report_prose_follows_the_run_settings():
    s = {"steps": 7, "batch_size": 2, "block_len": 64, "lr": 1e-3, "bits": 4, "group_size": 16, "seed": 3}
    text = " ".join(acc.reading(s))
    assert "7 steps x 2 x 64 tokens" in text and "learning rate (0.001)" in text and "seed 3" in text
    assert "A LUT per 16 output channels at 4 bits (16 values per LUT)" in text and "40 steps" not in text
    text = " ".join(acc.reading({**s, "group_size": None, "bits": 3}))
    assert "One LUT per matrix at 3 bits" in text and "(8 values for a whole matrix" in text
