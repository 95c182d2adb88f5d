"""`edkm compress` / `edkm info` / loading a compressed file as a model, on a tiny local model."""

import json
import math
import os

import pytest
import torch

import edkm
from edkm.cli import main

transformers = pytest.importorskip("transformers")


def fake_corpus(tmp_path):
    """A data folder shaped like ../shared/data: two train and two test files."""
    data = tmp_path / "data"
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20
    for rel in (
        "corpus/sotu/1990_bush_republican.txt",
        "corpus/austen/emma.txt",
        "corpus/sotu/2005_bush_republican.txt",
        "corpus/austen/persuasion.txt",
    ):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    return data


@pytest.fixture
def hf_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    return d


def test_compress_info_and_load_back(hf_dir, tmp_path, capsys):
    out = tmp_path / "tiny-3bit.safetensors"
    assert (
        main(
            [
                "compress",
                str(hf_dir),
                "--bits",
                "3",
                "--group-size",
                "16",
                "--embedding-bits",
                "4",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_bytes"] == os.path.getsize(out)
    r = edkm.info(out, verbose=False)
    bits = {t["name"]: t.get("bits") for t in r["tensors"]}
    assert bits["model.layers.0.mlp.up_proj.weight"] == 3
    assert bits["model.embed_tokens.weight"] == 4 and bits["lm_head.weight"] == 4
    assert bits["model.norm.weight"] is None  # norms stay as they are
    assert main(["info", str(out)]) == 0
    assert "16 bits" in capsys.readouterr().out
    # a compressed file loads as a model (its base model is recorded in the file)
    from edkm.models import load_model

    model, _ = load_model(str(out))
    sd = edkm.load(out)
    for name, t in model.state_dict().items():
        assert torch.equal(t, sd[name].to(t.dtype)), name
    w = model.model.layers[1].self_attn.q_proj.weight
    assert torch.unique(w[:16]).numel() <= 8


def test_compress_keeps_embeddings_when_asked(hf_dir, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert main(["compress", str(hf_dir), "--embedding-bits", "none", "--out", str(out), "--json"]) == 0
    r = edkm.info(out, verbose=False)
    kinds = {t["name"]: t["kind"] for t in r["tensors"]}
    assert kinds["model.embed_tokens.weight"] == "plain" and kinds["lm_head.weight"] == "plain"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "no/such/model", "--out", "x.safetensors"], "neither a known name"),
        (["compress", "HF", "--bits", "9", "--out", "x.safetensors"], "bits must be an integer in 1..8"),
        (["compress", "HF", "--group-size", "5", "--out", "x.safetensors"], "group_size 5 must divide"),
        (["compress", "HF", "--embedding-bits", "many", "--out", "x.safetensors"], "--embedding-bits"),
        (["info", "no/such/file.safetensors"], "no such file"),
    ],
)
def test_cli_bad_input(hf_dir, tmp_path, argv, message):
    argv = [str(hf_dir) if a == "HF" else a for a in argv]
    argv = [str(tmp_path / a) if a == "x.safetensors" else a for a in argv]
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert not (tmp_path / "x.safetensors").exists()


def test_compress_with_clustering_fine_tune(tmp_path, capsys):
    """--steps fine-tunes the clustered model on the corpus train split before export."""
    from test_evaluate import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    d = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    data = fake_corpus(tmp_path)
    outs = {}
    for steps in (0, 3):
        out = tmp_path / f"s{steps}.safetensors"
        assert (
            main(
                [
                    "compress",
                    str(d),
                    "--steps",
                    str(steps),
                    "--data",
                    str(data),
                    "--block-len",
                    "16",
                    "--batch-size",
                    "2",
                    "--out",
                    str(out),
                    "--json",
                ]
            )
            == 0
        )
        summary = json.loads(capsys.readouterr().out)
        assert len(summary["losses"]) == steps and all(l == l and l < 100 for l in summary["losses"])
        outs[steps] = edkm.load(out)
    changed = [n for n in outs[0] if not torch.equal(outs[0][n], outs[3][n])]
    assert "model.layers.0.mlp.up_proj.weight" in changed


def _tiny_with_tokenizer(tmp_path, tie=True):
    from test_evaluate import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer(bos=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    d = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_compress_full_recipe_without_a_corpus(tmp_path, capsys):
    """Data-free distillation, Fisher-weighted init, sensitive outliers and a bits budget, with
    no corpus at all: every stage runs and the file meets the budget."""
    d = _tiny_with_tokenizer(tmp_path)
    out = tmp_path / "r.safetensors"
    assert (
        main(
            [
                "compress",
                str(d),
                "--out",
                str(out),
                "--steps",
                "2",
                "--block-len",
                "16",
                "--batch-size",
                "2",
                "--distill",
                "1",
                "--data-free",
                "1",
                "--init",
                "sensitivity",
                "--outlier-fraction",
                "0.01",
                "--outlier-criterion",
                "sensitivity",
                "--data",
                "none",
                "--target-bits",
                "5",
                "--calibration-batches",
                "2",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["losses"]) == 2 and all(math.isfinite(l) for l in summary["losses"])
    r = edkm.info(out, verbose=False)
    n = sum(p for p in [summary["weights"]])
    assert 8 * (r["file_bytes"] - r["header_bytes"]) / n <= 5.0
    assert summary["predicted_bits_per_weight"] <= 5.0
    bits = {t["name"]: t.get("bits") for t in r["tensors"] if t["kind"] == "clustered"}
    assert bits and set(bits.values()) <= set(range(2, 9))
    assert any(t.get("outliers") for t in r["tensors"] if t["kind"] == "clustered")


def test_compress_steps_without_corpus_asks_for_data_free(tmp_path):
    d = _tiny_with_tokenizer(tmp_path)
    with pytest.raises(SystemExit, match="--data-free 1"):
        main(["compress", str(d), "--out", str(tmp_path / "x.safetensors"), "--steps", "2", "--data", "none"])
    assert not (tmp_path / "x.safetensors").exists()


def test_demo_runs_data_free_on_a_tiny_model(tmp_path, capsys):
    """make demo's path without a corpus, end to end on a tiny random LLaMA: post-training
    (nearest and GPTQ assignment) and eDKM rows with KL and top-1 agreement, perplexity skipped and said so, prompts side by side."""
    d = _tiny_with_tokenizer(tmp_path)
    out = tmp_path / "demo" / "m.safetensors"
    assert (
        main(
            [
                "demo",
                "--model",
                str(d),
                "--data",
                "none",
                "--steps",
                "3",
                "--block-len",
                "16",
                "--batch-size",
                "2",
                "--eval-blocks",
                "2",
                "--bits",
                "3",
                "--outlier-fraction",
                "0.01",
                "--gptq-blocks",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "held-out perplexity is skipped" in text and "skipped" in text.split("prompt completions")[0]
    assert "n/a" not in text
    for label in (
        "original",
        "post-training, nearest centroid",
        "post-training, GPTQ assignment",
        "error-compensated assignment of 8 matrices",
        "eDKM, 3 steps (from the file)",
    ):
        assert label in text
    assert text.count("\n    compressed: ") == 3 and text.count("\n    original:   ") == 3
    assert out.exists() and edkm.info(out, verbose=False)["file_bytes"] == out.stat().st_size


def test_compress_finds_the_default_corpus_without_data(tmp_path, monkeypatch, capsys):
    """No --data: the default data folder is used (a missing --data is not '--data none')."""
    d = _tiny_with_tokenizer(tmp_path)
    data = fake_corpus(tmp_path)
    monkeypatch.setenv("EDKM_DATA_DIR", str(data))
    out = tmp_path / "c.safetensors"
    assert (
        main(
            ["compress", str(d), "--steps", "1", "--block-len", "16", "--batch-size", "2", "--out", str(out), "--json"]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["losses"]) == 1


def test_compress_gptq_without_a_corpus(tmp_path, capsys):
    """--gptq: input Hessians from the teacher's own samples, error-compensated assignment of
    every Linear; the file holds weights on their LUTs, and the output error went down."""
    d = _tiny_with_tokenizer(tmp_path)
    out = tmp_path / "g.safetensors"
    argv = ["compress", str(d), "--out", str(out), "--bits", "2", "--data", "none", "--json"]
    assert main(argv + ["--gptq", "--gptq-batches", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gptq_median_output_error_ratio"] < 1.0
    assert "hessians" in summary["stage_seconds"] and "gptq" in summary["stage_seconds"]
    r = edkm.info(out, verbose=False)
    assert all(t.get("bits") == 2 for t in r["tensors"] if t["kind"] == "clustered")
    with pytest.raises(SystemExit, match="--gptq-batches must be >= 1"):
        main(argv + ["--gptq", "--gptq-batches", "0"])
