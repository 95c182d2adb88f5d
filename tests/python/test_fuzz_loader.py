"""Fuzzing the compressed-file loaders (Python edkm.load, its packed path with a forward pass, and
the C++ reader) with hypothesis.

Inputs: byte edits and truncations of a valid file (format version 2: its matrices keep outliers,
so edits also land in outlier positions and values), and headers built from random JSON (lying
offsets, overlapping tensors, wrong dtypes, huge shapes, bad metadata, outlier counts). Either loader may accept
an input (an edit inside tensor data is still a valid file) but must otherwise raise its clear
error type: a crash, a hang or any other exception fails the test. Bounded: a fixed number of
derandomized examples per property in CI (EDKM_FUZZ_EXAMPLES raises it for longer local runs).
"""

import json
import os
import struct

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edkm  # noqa: E402
from edkm import _native  # noqa: E402

EXAMPLES = int(os.environ.get("EDKM_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _model():
    return nn.Sequential(nn.Embedding(6, 8), nn.Linear(8, 6), nn.LayerNorm(6))


def _valid_file(path):
    torch.manual_seed(0)
    model = _model()
    edkm.palettize_(model, edkm.Config(bits=3, init="kmeans++", outlier_fraction=0.1, module_types={"LayerNorm": None}))
    edkm.finalize(model)
    edkm.save(model, path)
    data = path.read_bytes()
    assert b'"edkm.version":"2"' in data and b".outlier_values" in data
    return data


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    return _valid_file(path)


def check_loaders(data: bytes, path) -> None:
    path.write_bytes(data)
    try:
        edkm.load(path)
    except edkm.FormatError:
        pass
    try:
        _native._C._load_compressed(str(path))
    except ValueError:
        pass
    # The packed path: a file it accepts must also run (the kernels see what the loader let in).
    try:
        packed = edkm.load(path, _model(), packed=True)
    except edkm.FormatError:
        return
    with torch.no_grad():
        out = packed(torch.tensor([[0, 5, 3]]))
    assert out.shape == (1, 3, 6)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_edits(valid, tmp_path, edits):
    data = bytearray(valid)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    check_loaders(bytes(data), tmp_path / "edit.safetensors")


@FUZZ
@given(cut=st.integers(0, 10**6), tail=st.binary(max_size=64))
def test_truncations_with_garbage(valid, tmp_path, cut, tail):
    check_loaders(valid[: cut % len(valid)] + tail, tmp_path / "cut.safetensors")


def _outlier_data_span(data: bytes):
    """Byte range (in the file) of the outlier positions and values of the first matrix."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    spans = [header[k]["data_offsets"] for k in header if k.endswith((".outlier_index", ".outlier_values"))]
    return 8 + n + min(b for b, _ in spans), 8 + n + max(e for _, e in spans)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_outlier_data_edits_both_readers_agree(valid, tmp_path, edits):
    """Edits inside the outlier positions and values: both readers apply the same rules (sorted,
    in range, finite), so they accept or reject together and rebuild the same weights."""
    begin, end = _outlier_data_span(valid)
    data = bytearray(valid)
    for pos, byte in edits:
        data[begin + pos % (end - begin)] = byte
    path = tmp_path / "outl.safetensors"
    path.write_bytes(bytes(data))
    try:
        py = edkm.load(path)
    except edkm.FormatError:
        py = None
    try:
        cpp = _native._C._load_compressed_state_dict(str(path))
    except ValueError:
        cpp = None
    assert (py is None) == (cpp is None)
    if py is not None:
        assert set(py) == set(cpp) and all(torch.equal(py[k], cpp[k]) for k in py)


_ints = st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70))
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["U8", "F16", "BF16", "F32", "F64", "I32", "I64", "BOOL", "X9", ""]),
        "shape": st.lists(_ints, max_size=4),
        "data_offsets": st.lists(_ints, min_size=0, max_size=3),
    }
)
_layout = st.fixed_dictionaries(
    {
        "bits": _ints,
        "shape": st.lists(_ints, max_size=3),
        "dtype": st.sampled_from(["bfloat16", "float32", "int8"]),
        "groups": _ints,
        "cluster_dim": _ints,
    },
    optional={"outliers": st.one_of(_ints, st.just("2"), st.just(None))},
)


@FUZZ
@given(
    entries=st.dictionaries(
        st.sampled_from(["a", "w.indices", "w.lut", "w.outlier_index", "w.outlier_values", "b"]), _entry, max_size=6
    ),
    layout=st.dictionaries(st.just("w"), _layout, max_size=1),
    aliases=st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["a", "w", "zz"]), max_size=2),
    version=st.sampled_from(["1", "2", ""]),
    data=st.binary(max_size=256),
)
def test_lying_headers(tmp_path, entries, layout, aliases, version, data):
    header = dict(entries)
    header["__metadata__"] = {
        "format": "edkm",
        "edkm.version": version,
        "edkm.layout": json.dumps(layout),
        "edkm.aliases": json.dumps(aliases),
    }
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    check_loaders(struct.pack("<Q", len(text)) + text + data, tmp_path / "lie.safetensors")


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=128))
def test_header_lengths(tmp_path, length, body):
    check_loaders(struct.pack("<Q", length) + body, tmp_path / "len.safetensors")
