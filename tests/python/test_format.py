"""The compressed file: save/load exactness, sizes, atomic writes, corrupted files."""

import json
import os
import struct

import pytest
import torch

import edkm
from edkm import format as fmt
from edkm.config import Config
from edkm.palettize import finalize, palettize_

transformers = pytest.importorskip("transformers")


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


X = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def finalized(dtype=torch.float32, tie=True, **cfg):
    model = palettize_(tiny_llama(dtype, tie), Config(**cfg))
    model.train()
    model(input_ids=X, labels=X).loss.backward()  # one clustering step moves the centroids
    return finalize(model).eval()


@pytest.mark.parametrize(
    "dtype, cfg, tie",
    [
        (torch.float32, dict(bits=3), True),
        (torch.bfloat16, dict(bits=3, group_size=16), False),
        (torch.float16, dict(bits=1), True),
        (torch.float32, dict(bits=8, cluster_dtype=None), True),
        (torch.float32, dict(bits=2, cluster_dim=2, init="kmeans++"), False),
        (
            torch.bfloat16,
            dict(bits=5, group_size=8, module_types={"Embedding": None}, module_names={"lm_head": None}),
            False,
        ),
    ],
)
def test_save_load_round_trip_is_exact(tmp_path, dtype, cfg, tie):
    model = finalized(dtype, tie, **cfg)
    path = tmp_path / "m.safetensors"
    size = edkm.save(model, path)
    assert size == os.path.getsize(path)
    fresh = tiny_llama(dtype, tie, seed=9)
    edkm.load(path, fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=X).logits, model(input_ids=X).logits)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    if tie:
        assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_file_is_plain_safetensors_with_exact_sizes(tmp_path):
    from safetensors import safe_open

    model = finalized(torch.bfloat16, tie=True, bits=3, group_size=16)
    path = tmp_path / "m.safetensors"
    edkm.save(model, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert meta["format"] == "edkm" and meta["edkm.version"] == "1"
        layout = json.loads(meta["edkm.layout"])
        assert json.loads(meta["edkm.aliases"]) == {"lm_head.weight": "model.embed_tokens.weight"}
        up = layout["model.layers.0.mlp.up_proj.weight"]
        assert up == {"bits": 3, "shape": [48, 32], "dtype": "bfloat16", "groups": 3, "cluster_dim": 1}
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight.indices").shape == (48 * 32 * 3 // 8,)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight.lut").shape == (3, 8, 1)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight.lut").dtype == torch.float16
        assert "model.layers.0.input_layernorm.weight" in keys and "lm_head.weight" not in keys
    r = edkm.info(path, verbose=False)
    assert r["parts_sum_to_file_size"]
    assert r["file_bytes"] == os.path.getsize(path)
    row = next(t for t in r["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    assert row["bytes"] == 48 * 32 * 3 // 8 + 3 * 8 * 2


def test_info_prints_a_table(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    edkm.save(finalized(), path)
    edkm.info(path)
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj.weight" in out and "16 bits" in out


def test_save_requires_finalize_and_refuses_directories(tmp_path):
    model = palettize_(tiny_llama(), Config())
    with pytest.raises(ValueError, match="not finalized"):
        edkm.save(model, tmp_path / "m.safetensors")
    finalize(model)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        edkm.save(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        edkm.save(model, tmp_path / "no" / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = finalized()
    edkm.save(model, path)
    old = path.read_bytes()
    calls = {"n": 0}
    real = fmt.FileWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(self, name, tensor)

    monkeypatch.setattr(fmt.FileWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        edkm.save(model, path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_load_mismatched_model_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    edkm.save(finalized(), path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(fmt.FormatError, match="does not match the model"):
        edkm.load(path, other)
    with pytest.raises(FileNotFoundError, match="no such file"):
        edkm.load(tmp_path / "missing.safetensors")
    with pytest.raises(fmt.FormatError, match="directory"):
        edkm.load(tmp_path)


def small_file(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    palettize_(lin, Config(bits=3, init="kmeans++", module_types={"LayerNorm": None}))
    finalize(lin)
    path = tmp_path / "small.safetensors"
    edkm.save(lin, path)
    return path


def test_every_truncation_is_a_clear_error(tmp_path):
    path = small_file(tmp_path)
    data = path.read_bytes()
    edkm.load(path)  # the whole file loads
    bad = tmp_path / "cut.safetensors"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(fmt.FormatError):
            edkm.load(bad)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["0.weight.indices"].update(data_offsets=[0, 10**12]), "outside the data section"),
        (lambda h: h["0.weight.lut"].update(dtype="F32"), "do not hold|must be F16"),
        (lambda h: h["0.weight.lut"].update(shape=[1, 8, 2]), "do not hold|must be F16"),
        (lambda h: h["0.bias"].update(data_offsets=h["0.weight.lut"]["data_offsets"]), "tile|do not hold"),
        (lambda h: h["__metadata__"].update({"edkm.version": "9"}), "version"),
        (lambda h: h["__metadata__"].update({"edkm.layout": "{not json"}), "not valid JSON"),
        (
            lambda h: h["__metadata__"].update(
                {
                    "edkm.layout": json.dumps(
                        {
                            "0.weight": {
                                "bits": 3,
                                "shape": [10**9, 10**9],
                                "dtype": "float32",
                                "groups": 1,
                                "cluster_dim": 1,
                            }
                        }
                    )
                }
            ),
            "absurdly large|must be U8",
        ),
        (
            lambda h: h["__metadata__"].update(
                {
                    "edkm.layout": json.dumps(
                        {"0.weight": {"bits": 0, "shape": [4, 8], "dtype": "float32", "groups": 1, "cluster_dim": 1}}
                    )
                }
            ),
            "bits must be",
        ),
        (lambda h: h["__metadata__"].update({"edkm.aliases": json.dumps({"x": "nothing"})}), "unknown tensor"),
        (
            lambda h: h.update({"extra": {"dtype": "U8", "shape": [10**15], "data_offsets": [0, 10**15]}}),
            "outside the data section|do not hold|bad shape",
        ),
    ],
)
def test_header_lies_are_clear_errors(tmp_path, edit, match):
    path = small_file(tmp_path)
    _rewrite_header(path, edit)
    with pytest.raises(fmt.FormatError, match=match):
        edkm.load(path)


def test_random_bit_flips_never_crash(tmp_path):
    path = small_file(tmp_path)
    data = bytearray(path.read_bytes())
    gen = torch.Generator().manual_seed(0)
    bad = tmp_path / "flip.safetensors"
    for _ in range(300):
        d = bytearray(data)
        pos = int(torch.randint(0, len(d), (1,), generator=gen))
        d[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=gen))
        bad.write_bytes(bytes(d))
        try:
            edkm.load(bad)
        except (fmt.FormatError, FileNotFoundError):
            pass


def test_synthetic_llama_streaming_compress(tmp_path, monkeypatch):
    from edkm import models
    from edkm.compress import compress_synthetic

    monkeypatch.setitem(models.LLAMA7B, "vocab", 64)
    monkeypatch.setitem(models.LLAMA7B, "hidden", 32)
    monkeypatch.setitem(models.LLAMA7B, "intermediate", 48)
    path = tmp_path / "s.safetensors"
    summary = compress_synthetic(str(path), Config(bits=3), layers=2, progress=False)
    assert summary["file_bytes"] == os.path.getsize(path)
    sd = edkm.load(path)
    layout = models.llama7b_layout(2)
    assert set(sd) == {n for n, _ in layout}
    for name, shape in layout:
        ref = models.synthetic_tensor(name, shape)
        got = sd[name]
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        if len(shape) == 1:
            assert torch.equal(got, ref)
        else:
            assert torch.unique(got).numel() <= 8
            assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 0.25


def test_saved_file_gets_the_usual_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    edkm.save(finalized(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# ---- outliers (format version 2) ------------------------------------------------------------


def outlier_file(tmp_path):
    """Linear 8x8 with round(0.1 * 64) = 6 outliers, plus a LayerNorm stored as is."""
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    palettize_(lin, Config(bits=3, outlier_fraction=0.1, module_types={"LayerNorm": None}))
    finalize(lin)
    path = tmp_path / "outliers.safetensors"
    edkm.save(lin, path)
    return path, lin


def test_outlier_file_layout_and_load_into_a_palettized_model(tmp_path):
    path, lin = outlier_file(tmp_path)
    cf = fmt.read_header(path)
    assert cf.metadata["edkm.version"] == "2"
    assert json.loads(cf.metadata["edkm.layout"])["0.weight"]["outliers"] == 6
    assert cf.entries["0.weight.outlier_index"]["dtype"] == "I32"
    assert cf.entries["0.weight.outlier_values"]["dtype"] == "BF16"  # fp32 clustered as bf16
    assert "0.edkm_outlier_index" not in cf.entries  # training state, stored in its own form
    target = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    palettize_(target, Config(bits=3, outlier_fraction=0.1, module_types={"LayerNorm": None}))
    edkm.load(path, target)  # the outlier buffer is not required from the file
    assert torch.equal(target[0].weight, lin[0].weight)


def test_every_truncation_of_an_outlier_file_is_a_clear_error(tmp_path):
    path, _ = outlier_file(tmp_path)
    data = path.read_bytes()
    edkm.load(path)
    bad = tmp_path / "cut.safetensors"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(fmt.FormatError):
            edkm.load(bad)


def _layout_edit(**changes):
    def edit(h):
        layout = json.loads(h["__metadata__"]["edkm.layout"])
        for k, v in changes.items():
            if v is None:
                layout["0.weight"].pop(k)
            else:
                layout["0.weight"][k] = v
        h["__metadata__"]["edkm.layout"] = json.dumps(layout)

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["0.weight.outlier_index"].update(dtype="I64"), "do not hold|must be I32"),
        (lambda h: h["0.weight.outlier_index"].update(dtype="F32"), "must be I32"),
        (lambda h: h["0.weight.outlier_values"].update(dtype="I16"), "must be F16 or BF16"),
        (lambda h: h["0.weight.outlier_values"].update(dtype="U8", shape=[12]), "must be F16 or BF16"),
        (_layout_edit(outliers=7), r"'0.weight.outlier_index' must be I32 \[7\]"),
        (_layout_edit(outliers=-1), r"outliers must be an integer in 0..numel \(64\)"),
        (_layout_edit(outliers=65), r"outliers must be an integer in 0..numel \(64\)"),
        (_layout_edit(outliers=True), r"outliers must be an integer"),
        (
            _layout_edit(outliers=None),
            r"'0.weight.outlier_index' is stored but the layout of '0.weight' has no outliers",
        ),
        (lambda h: h["__metadata__"].update({"edkm.version": "1"}), "'outliers' needs edkm format version 2"),
        (lambda h: h.pop("0.weight.outlier_values"), "tile|has no"),
    ],
)
def test_outlier_header_lies_are_clear_errors(tmp_path, edit, match):
    path, _ = outlier_file(tmp_path)
    _rewrite_header(path, edit)
    with pytest.raises(fmt.FormatError, match=match):
        edkm.load(path)


def _edit_tensor(path, name, edit):
    """Rewrite the data of tensor ``name`` in place through ``edit(tensor)``."""
    cf = fmt.read_header(path)
    data = bytearray(path.read_bytes())
    e = cf.entries[name]
    begin, end = (cf.header_bytes + o for o in e["data_offsets"])
    t = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.uint8).view(fmt.CODE_DTYPES[e["dtype"]]).clone()
    edit(t)
    data[begin:end] = t.view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def _swap01(t):
    t[0], t[1] = t[1].clone(), t[0].clone()


@pytest.mark.parametrize(
    "name, edit, match",
    [
        ("0.weight.outlier_index", _swap01, "strictly increasing"),
        ("0.weight.outlier_index", lambda t: t.__setitem__(1, t[0]), "strictly increasing"),
        ("0.weight.outlier_index", lambda t: t.__setitem__(-1, 64), r"must be in \[0, 64\)"),
        ("0.weight.outlier_index", lambda t: t.__setitem__(0, -1), r"must be in \[0, 64\)"),
        ("0.weight.outlier_values", lambda t: t.__setitem__(2, float("nan")), "must be finite"),
        ("0.weight.outlier_values", lambda t: t.__setitem__(0, float("inf")), "must be finite"),
    ],
)
def test_bad_outlier_data_is_a_clear_error_in_both_readers(tmp_path, name, edit, match):
    from edkm import _C

    path, _ = outlier_file(tmp_path)
    _edit_tensor(path, name, edit)
    with pytest.raises(fmt.FormatError, match=match):
        edkm.load(path)
    with pytest.raises(ValueError, match=match.replace("must be finite", "NaN or Inf")):
        _C._load_compressed(str(path))


def test_outlier_values_rebuild_exactly(tmp_path):
    path, lin = outlier_file(tmp_path)
    _edit_tensor(path, "0.weight.outlier_values", lambda t: t.fill_(3.0))
    w = edkm.load(path)["0.weight"].reshape(-1)
    idx = lin[0].edkm_outlier_positions
    assert bool((w[idx] == 3.0).all())
    rest = torch.ones(64, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(w[rest], lin[0].weight.detach().reshape(-1)[rest])
