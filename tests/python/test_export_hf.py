"""`edkm export --hf` / edkm.export_hf: transformers loads the directory offline and computes the
same logits as edkm.load's model, bit for bit in the same dtype; bad outputs are refused."""

import json
import os

import pytest
import torch

import edkm
from edkm.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 64


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_hf_dir(tmp_path, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    d = tmp_path / f"tiny-{'tied' if tie else 'untied'}"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def compressed(request, tmp_path):
    d = tiny_hf_dir(tmp_path, request.param)
    out = tmp_path / "tiny-3bit.safetensors"
    assert (
        main(
            [
                "compress",
                str(d),
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
    return out, request.param


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_export_loads_in_transformers_with_identical_logits(compressed, tmp_path, dtype, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from edkm.models import load_model

    path, tied = compressed
    out = tmp_path / "hf"
    assert main(["export", str(path), "--hf", str(out), "--dtype", dtype]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    torch_dtype = getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch_dtype, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours, _ = load_model(str(path), torch_dtype)  # edkm's own loading, in that dtype
    ours.eval()
    ids = tok("w3 w4 w5 w17 w60 w9 w33", return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 7 and (ids != 0).all()  # the tokenizer round-tripped (no <unk>)
    with torch.no_grad():
        a = hf(ids).logits
        b = ours(ids).logits
    assert a.dtype == torch_dtype and torch.equal(a, b)
    # the weights are the file's dequantized weights, and tied ones are tied again
    sd = edkm.load(path)
    for name, t in hf.state_dict().items():
        assert torch.equal(t, sd[name].to(torch_dtype)), name
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    if dtype == "float32":  # fp16 LUT values are exact in float32: at most 8 values per 16 rows
        w = hf.model.layers[0].mlp.down_proj.weight
        assert torch.unique(w[:16]).numel() <= 8
    # where it came from is recorded
    rec = json.loads((out / "edkm.json").read_text())
    assert rec["edkm.source_bytes"] == str(os.path.getsize(path))
    assert rec["layouts"]["model.layers.0.mlp.up_proj.weight"]["bits"] == 3
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt" and meta["edkm.source"] == path.name
        assert ("lm_head.weight" in f.keys()) == (not tied)


def test_export_refuses_non_empty_dir_and_replaces_with_force(compressed, tmp_path):
    path, _ = compressed
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty; pass --force"):
        main(["export", str(path), "--hf", str(out)])
    assert os.listdir(out) == ["keep.txt"]  # nothing overwritten
    assert main(["export", str(path), "--hf", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # no temporary directories left beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_killed_export_leaves_nothing_loadable(compressed, tmp_path, monkeypatch):
    """A failure in the middle of the export (here: writing the tokenizer) leaves neither the
    output directory nor a temporary one."""
    path, _ = compressed
    out = tmp_path / "hf"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.save_pretrained", boom)
    with pytest.raises(OSError, match="simulated"):
        edkm.export_hf(str(path), str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda t: t / "missing.safetensors", {}, "no such file"),
        (None, {"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_export_bad_input(compressed, tmp_path, make, kwargs, message):
    path, _ = compressed
    src = make(tmp_path) if make else path
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        edkm.export_hf(str(src), str(tmp_path / "hf"), **kwargs)


def test_export_needs_a_base_model(tmp_path):
    from torch import nn

    lin = nn.Linear(32, 16, bias=False)
    edkm.palettize_(lin, edkm.Config(bits=2))
    edkm.finalize(lin)
    p = tmp_path / "lin.safetensors"
    edkm.save(lin, str(p))
    with pytest.raises(ValueError, match="does not record its base model"):
        edkm.export_hf(str(p), str(tmp_path / "hf"))
    with pytest.raises(FileExistsError, match="is not a directory"):
        edkm.export_hf(str(p), str(p))
