"""The C++ reader/writer of the compressed-model file (edkm::load_compressed /
save_compressed, bound as edkm._C._load_compressed / _save_compressed) against the
`safetensors` package and against the Python reader/writer (edkm.format): files written by
either side read back identically on the other."""

import json
import os

import pytest
import torch

import edkm
from edkm import _C

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def clustered(shape, bits, groups, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    idx = torch.randint(0, 2**bits, (numel // d,), generator=g)
    lut = torch.randn(groups, 2**bits, d, generator=g).half()
    return dict(
        lut=lut,
        packed=edkm.pack_indices(idx, bits),
        bits=bits,
        shape=list(shape),
        dtype=dtype,
        groups=groups,
        cluster_dim=d,
    ), idx


def reference_weight(c, idx):
    """FORMAT.md: lut[g, index].to(dtype), groups contiguous, vectors of d consecutive."""
    g, k, d = c["lut"].shape
    idx = idx.view(g, -1)
    out = torch.stack([c["lut"][gi].float()[idx[gi]] for gi in range(g)])
    return out.to(c["dtype"]).reshape(c["shape"])


def sample(tmp_path):
    tensors = {
        "bias": torch.randn(6),
        "norm": torch.randn(4, 3).bfloat16(),
        "step": torch.tensor([7, -1]),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "i16": torch.tensor([300], dtype=torch.int16),
        "i32": torch.tensor([[1, 2]], dtype=torch.int32),
        "f16": torch.tensor([0.5], dtype=torch.float16),
        "f64": torch.tensor([1e-300], dtype=torch.float64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 5),
        "u8": torch.arange(5, dtype=torch.uint8),
    }
    cl, idx = {}, {}
    for name, args in {
        "layer.weight": ((6, 10), 3, 2, 1, torch.bfloat16, 1),
        "emb.weight": ((4, 8), 2, 1, 2, torch.float32, 2),
        "one.weight": ((3, 5), 1, 3, 1, torch.float16, 3),
        "eight.weight": ((2, 9), 8, 1, 1, torch.float64, 4),
    }.items():
        cl[name], idx[name] = clustered(*args)
    path = str(tmp_path / "c.safetensors")
    _C._save_compressed(path, tensors, cl, {"lm_head.weight": "emb.weight"}, {"note": "café"})
    return path, tensors, cl, idx


def test_cpp_file_opens_with_safetensors(tmp_path):
    path, tensors, cl, _ = sample(tmp_path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert (8 + n) % 8 == 0
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "edkm" and meta["edkm.version"] == "1" and meta["note"] == "café"
        assert json.loads(meta["edkm.aliases"]) == {"lm_head.weight": "emb.weight"}
        layout = json.loads(meta["edkm.layout"])
        assert layout["layer.weight"] == {
            "bits": 3,
            "shape": [6, 10],
            "dtype": "bfloat16",
            "groups": 2,
            "cluster_dim": 1,
        }
        assert layout["emb.weight"]["cluster_dim"] == 2
        expected_keys = set(tensors) | {f"{n}{s}" for n in cl for s in (".lut", ".indices")}
        assert set(f.keys()) == expected_keys
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
        for name, c in cl.items():
            assert torch.equal(f.get_tensor(name + ".lut"), c["lut"])
            assert torch.equal(f.get_tensor(name + ".indices"), c["packed"])


def test_cpp_file_reads_with_the_python_reader(tmp_path):
    path, tensors, cl, idx = sample(tmp_path)
    from edkm import format as fmt

    py = fmt.load_state_dict(path)
    cpp = _C._load_compressed_state_dict(path)
    assert set(py) == set(cpp) == set(tensors) | set(cl) | {"lm_head.weight"}
    for name in py:
        assert py[name].dtype == cpp[name].dtype and torch.equal(py[name], cpp[name]), name
    for name, c in cl.items():
        assert torch.equal(cpp[name], reference_weight(c, idx[name])), name
    assert torch.equal(cpp["lm_head.weight"], cpp["emb.weight"])


def test_cpp_round_trip_every_bit_width(tmp_path):
    for bits in range(1, 9):
        c, idx = clustered((5, 7), bits, 5, 1, torch.bfloat16, bits)
        path = str(tmp_path / f"b{bits}.safetensors")
        _C._save_compressed(path, {}, {"w": c})
        back = _C._load_compressed(path)
        got = back["clustered"]["w"]
        assert got["bits"] == bits and got["shape"] == [5, 7] and got["dtype"] == torch.bfloat16
        assert torch.equal(got["packed"], c["packed"]) and torch.equal(got["lut"], c["lut"])
        assert torch.equal(edkm.unpack_indices(got["packed"], bits, 35).long(), idx)
        assert torch.equal(_C._load_compressed_state_dict(path)["w"], reference_weight(c, idx))


def test_python_written_model_reads_in_cpp(tmp_path):
    from edkm import format as fmt
    from edkm.config import Config
    from edkm.palettize import finalize, palettize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(16, 8), torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8, bias=False)
    )
    palettize_(model, Config(bits=3, group_size=4))
    model.train()
    x = torch.randint(0, 16, (3, 5))
    model(x).square().mean().backward()
    finalize(model).eval()
    path = str(tmp_path / "py.safetensors")
    fmt.save(model, path)
    cpp = _C._load_compressed_state_dict(path)
    py = fmt.load_state_dict(path)
    assert set(cpp) == set(py)
    for name in py:
        assert torch.equal(cpp[name], py[name]), name
    raw = _C._load_compressed(path)
    assert set(raw["clustered"]) >= {"1.weight", "3.weight"}
    state = model.state_dict()
    for name in raw["clustered"]:
        assert torch.equal(cpp[name], state[name]), name  # finalized weights, bit for bit


def test_safetensors_written_file_in_any_order_reads_in_cpp(tmp_path):
    tensors = {
        "z": torch.arange(3, dtype=torch.uint8),
        "a": torch.randn(2, 2, dtype=torch.float64),
        "m": torch.randn(3).bfloat16(),
        "b": torch.tensor([1, 2], dtype=torch.int32),
    }
    path = str(tmp_path / "plain.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    got = _C._load_compressed(path)
    assert got["clustered"] == {} and got["metadata"] == {"format": "pt"}
    for name, t in tensors.items():
        assert torch.equal(got["tensors"][name], t)


def test_file_mode_follows_umask(tmp_path):
    path, *_ = sample(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_errors_reach_python_as_value_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10" + b"\0" * 7 + b"{}")
    with pytest.raises(ValueError, match=r"bad\.safetensors: header length 16 exceeds the file"):
        _C._load_compressed(str(bad))
    c, _ = clustered((4, 4), 2, 1, 1, torch.float32, 0)
    with pytest.raises(ValueError, match=r"collides with the stored form"):
        _C._save_compressed(str(tmp_path / "x.safetensors"), {"w.lut": torch.zeros(1)}, {"w": c})
    assert not any(p.name.startswith(".x.safetensors") for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="cannot open"):
        _C._load_compressed(str(tmp_path / "missing.safetensors"))


def test_python_written_outliers_read_in_cpp(tmp_path):
    """Format version 2: the C++ reader rebuilds the outliers at their positions, bit for bit
    as the Python reader and the finalized model."""
    from edkm import format as fmt
    from edkm.config import Config
    from edkm.palettize import finalize, palettize_

    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Embedding(16, 8), torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8, bias=False)
    ).bfloat16()
    palettize_(model, Config(bits=2, group_size=4, outlier_fraction=0.05))
    model.train()
    model(torch.randint(0, 16, (3, 5))).float().square().mean().backward()
    finalize(model).eval()
    path = str(tmp_path / "outliers.safetensors")
    fmt.save(model, path)
    raw = _C._load_compressed(path)
    assert raw["metadata"] == {}
    assert not any(".outlier_" in name for name in raw["tensors"])  # consumed by the layouts
    cpp = _C._load_compressed_state_dict(path)
    py = fmt.load_state_dict(path)
    state = model.state_dict()
    for name in ("0.weight", "1.weight", "3.weight"):
        m = dict(model.named_modules())[name[: -len(".weight")]]
        idx = m.edkm_outlier_positions
        assert idx.numel() == round(0.05 * state[name].numel())
        assert torch.equal(cpp[name], py[name]) and torch.equal(cpp[name], state[name]), name
        # The LUT values alone differ from the rebuilt weight at outlier positions only.
        c = raw["clustered"][name]
        lut_only = fmt.dequantize_clustered(
            c["packed"], c["lut"], fmt.Layout(c["bits"], tuple(c["shape"]), c["dtype"], c["groups"], c["cluster_dim"])
        )
        differs = (lut_only.reshape(-1) != cpp[name].reshape(-1)).nonzero().reshape(-1)
        assert set(differs.tolist()) <= set(idx.tolist()) and differs.numel() > 0
