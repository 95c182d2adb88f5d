"""`edkm export --coreml`: the program's graph computes transformers' logits (run on its numpy
backend), and the package read back through coremltools holds, for every clustered weight,
exactly edkm's indices, LUT and dequantized weight (no re-clustering).

The conversion runs in the coremltools environment (numpy + coremltools, created once in the
cache: about a minute, from PyPI); prediction needs macOS, so the package is read, not run."""

import json

import numpy as np
import pytest
import torch

import edkm
from edkm import coreml_export as ec
from edkm.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_export_hf import tiny_hf_dir  # noqa: E402

CASES = {  # name: (tied, compress arguments)
    "3bit-16rowLUTs-tied": (True, ["--bits", "3", "--group-size", "16", "--embedding-bits", "4"]),
    "5bit-vectors-untied": (False, ["--bits", "5", "--cluster-dim", "2", "--embedding-bits", "none"]),
    "2bit-one-LUT-per-matrix": (True, ["--bits", "2"]),
    "4bit-outliers": (True, ["--bits", "4", "--group-size", "8", "--outlier-fraction", "0.02"]),
}


def compressed(tmp_path, case):
    tied, argv = CASES[case]
    d = tiny_hf_dir(tmp_path, tied)
    out = tmp_path / f"{case}.safetensors"
    assert main(["compress", str(d), *argv, "--out", str(out), "--json"]) == 0
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_graph_computes_transformers_logits(tmp_path, case, capsys):
    from edkm.models import load_model

    path = compressed(tmp_path, case)
    capsys.readouterr()
    spec, arrays = ec.prepare(str(path), None, 12)
    ids = np.array([[1, 5, 9, 33, 2, 7, 7, 60, 3, 4, 63, 0]])
    ours = ec.numpy_forward(spec, arrays, ids)
    model, _ = load_model(str(path), torch.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert ours.shape == ref.shape == (1, 12, 64)
    # Both are float32 on the same weights; only the order of the sums differs (numpy's matmul vs
    # torch's kernels, softmax and RMSNorm written out), which moves logits by ~1e-7 of their
    # scale. A wrong graph (RoPE convention, head layout, a missing layer) moves them by O(1).
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # one layer: the same as transformers with the other layers dropped
    spec1, arrays1 = ec.prepare(str(path), 1, 12)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    with torch.no_grad():
        ref1 = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ec.numpy_forward(spec1, arrays1, ids), ref1, rtol=0, atol=1e-5 * np.abs(ref1).max())


@pytest.fixture(scope="module")
def coreml_python():
    return ec.coreml_python()  # creates the environment once (cached afterwards)


@pytest.mark.parametrize("case", list(CASES))
def test_package_holds_edkms_luts_and_indices(tmp_path, case, coreml_python, capsys):
    path = compressed(tmp_path, case)
    capsys.readouterr()
    out = tmp_path / "m.mlpackage"
    assert main(["export", str(path), "--coreml", str(out), "--seq-len", "8"]) == 0
    assert "constexpr_lut_to_dense" in capsys.readouterr().out
    facts, back = ec.read_back(str(out))
    cf = edkm.format.read_header(str(path))
    sd = edkm.load(path)
    clustered = [n for n in cf.layouts]
    assert facts["ops"]["constexpr_lut_to_dense"] == len(clustered)
    assert facts["inputs"] == {"input_ids": [1, 8]} and facts["outputs"] == [[1, 8, 64]]
    # 7 matrices per layer and the head (linear, or matmul where the weight is computed), plus
    # attention's two matmuls per layer
    assert facts["ops"].get("linear", 0) + facts["ops"]["matmul"] == 2 * 7 + 1 + 2 * 2
    from edkm.ops import unpack_indices

    for name, lay in cf.layouts.items():
        d = lay.cluster_dim
        idx = back[name + ".indices"]
        assert idx.shape == (lay.shape[0], lay.shape[1] // d)
        with open(path, "rb") as f:
            packed = edkm.format._read_tensor(f, cf.header_bytes, cf.entries[name + ".indices"])
            lut = edkm.format._read_tensor(f, cf.header_bytes, cf.entries[name + ".lut"])
        want_idx = unpack_indices(packed, lay.bits, lay.n_indices).reshape(idx.shape).numpy()
        assert np.array_equal(idx, want_idx), name
        k = 1 << lay.bits
        got_lut = back[name + ".lut"]
        assert got_lut.dtype == np.float16 and got_lut.shape[:2] == (lay.groups, 1)
        assert np.array_equal(got_lut[:, 0, :k, :], lut.numpy()), name  # the LUT is edkm's, bit for bit
        assert not got_lut[:, :, k:, :].any()  # 5 bits ride in 6-bit indices: padding never indexed
        dense = back[name + ".dense"]
        assert ((name + ".outliers_dense") in back) == bool(lay.outliers)
        if lay.outliers:  # the program's select(sparse != 0, sparse, lut_dense)
            sparse = back[name + ".outliers_dense"]
            assert np.count_nonzero(sparse) == lay.outliers
            dense = np.where(sparse != 0, sparse, dense)
        dense = torch.from_numpy(dense.astype(np.float32))
        assert torch.equal(dense, sd[name].float()), name  # Core ML's weight = edkm's, bit for bit
    assert facts["ops"].get("constexpr_sparse_to_dense", 0) == sum(1 for lay in cf.layouts.values() if lay.outliers)


def test_coreml_export_bad_input(tmp_path, coreml_python, monkeypatch):
    path = compressed(tmp_path, "2bit-one-LUT-per-matrix")
    with pytest.raises(ValueError, match="must end in .mlpackage"):
        edkm.export_coreml(str(path), str(tmp_path / "m.zip"))
    out = tmp_path / "m.mlpackage"
    out.mkdir()
    (out / "mine").write_text("x")
    with pytest.raises(FileExistsError, match="pass --force"):
        edkm.export_coreml(str(path), str(out))
    assert (out / "mine").read_text() == "x"
    with pytest.raises(ValueError, match="layers must be an integer in 1..2"):
        edkm.export_coreml(str(path), str(out), layers=3, force=True)
    # a failed environment names the step
    from edkm import coreml_env

    monkeypatch.setattr(coreml_env, "ensure", lambda *a, **k: {"path": "/x", "error": "pip install exited with 1"})
    with pytest.raises(RuntimeError, match="creating the coremltools environment in /x failed: pip install"):
        edkm.export_coreml(str(path), str(out), force=True)
    assert (out / "mine").read_text() == "x"  # nothing replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edkm-coreml")]


def test_spec_is_json(tmp_path):
    spec, _ = ec.prepare(str(compressed(tmp_path, "3bit-16rowLUTs-tied")), None, 4)
    assert json.loads(json.dumps(spec))["tie"] is True and spec["kv_heads"] == 2
