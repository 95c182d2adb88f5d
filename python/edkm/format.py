"""The compressed-model file (docs/FORMAT.md): :func:`save`, :func:`load`, :func:`info`.

One safetensors file: per clustered matrix its bit-packed indices and fp16 LUT(s) (and, from
format version 2, its outliers: positions and 16-bit values), every other tensor as is. Written through :class:`FileWriter` (temp file in the same directory, fsync,
rename), so an interrupted save never leaves a half-written file under the real name; the
writer also streams, which is how a 7B model is compressed layer by layer.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

FORMAT_VERSION = "2"  # the newest version written; a file without outliers is written as "1"
READ_VERSIONS = ("1", "2")
OUTLIER_SUFFIXES = (".outlier_index", ".outlier_values")

DTYPE_CODES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class FormatError(ValueError):
    """A file that is not a valid edkm/safetensors file, or that does not match the model."""


@dataclass(frozen=True)
class Layout:
    """How one clustered tensor is stored (FORMAT.md)."""

    bits: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    groups: int
    cluster_dim: int
    outliers: int = 0  # weights stored exactly as NAME.outlier_index / NAME.outlier_values (v2)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def outlier_index_dtype(self) -> torch.dtype:
        """int32 when every flat position fits (numel <= 2**31), else int64."""
        return torch.int32 if self.numel <= 2**31 else torch.int64

    def outlier_value_dtypes(self) -> Tuple[torch.dtype, ...]:
        """The weight's own dtype when it is 16-bit (so rebuilding is exact), else fp16 or bf16."""
        if self.dtype in (torch.float16, torch.bfloat16):
            return (self.dtype,)
        return (torch.float16, torch.bfloat16)

    @property
    def n_indices(self) -> int:
        return self.numel // self.cluster_dim

    @property
    def packed_bytes(self) -> int:
        return (self.n_indices * self.bits + 7) // 8

    @property
    def lut_shape(self) -> Tuple[int, int, int]:
        return (self.groups, 1 << self.bits, self.cluster_dim)

    def to_json(self) -> Dict[str, Any]:
        d = {
            "bits": self.bits,
            "shape": list(self.shape),
            "dtype": DTYPE_NAMES[self.dtype],
            "groups": self.groups,
            "cluster_dim": self.cluster_dim,
        }
        if self.outliers:
            d["outliers"] = self.outliers
        return d

    @classmethod
    def from_json(cls, name: str, d: Any, path: str, version: str = FORMAT_VERSION) -> "Layout":
        def bad(what):
            raise FormatError(f"{path}: edkm.layout entry for {name!r}: {what}")

        if not isinstance(d, dict):
            bad("expected an object")
        for key in ("bits", "shape", "dtype", "groups", "cluster_dim"):
            if key not in d:
                bad(f"missing {key!r}")
        bits, shape, groups, cdim = d["bits"], d["shape"], d["groups"], d["cluster_dim"]
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            bad(f"bits must be an integer in 1..8, got {bits!r}")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**40 for s in shape)
        ):
            bad(f"shape must be a non-empty list of positive integers, got {shape!r}")
        if math.prod(shape) >= 2**48:
            bad(f"shape {shape} is absurdly large")
        if d["dtype"] not in NAME_DTYPES:
            bad(f"dtype must be one of {sorted(NAME_DTYPES)}, got {d['dtype']!r}")
        for key, v in (("groups", groups), ("cluster_dim", cdim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{key} must be a positive integer, got {v!r}")
        numel = math.prod(shape)
        if shape[-1] % cdim or numel % (groups * cdim):
            bad(f"shape {shape} cannot be cut into {groups} groups of {cdim}-vectors")
        outliers = d.get("outliers", 0)
        if "outliers" in d and version == "1":
            bad("'outliers' needs edkm format version 2")
        if not isinstance(outliers, int) or isinstance(outliers, bool) or not 0 <= outliers <= numel:
            bad(f"outliers must be an integer in 0..numel ({numel}), got {outliers!r}")
        if outliers and cdim != 1:
            bad(f"outliers need cluster_dim 1, got {cdim}")
        return cls(bits, tuple(shape), NAME_DTYPES[d["dtype"]], groups, cdim, outliers)


def _tensor_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class FileWriter:
    """Streams tensors into a safetensors file whose entries are declared up front.

    ``entries``: (name, dtype, shape) in file order. Call :meth:`write` once per entry, in that
    order, then :meth:`commit`. Until commit the data lives in a temporary file next to
    ``path``; :meth:`abort` (or an exception inside ``with``) removes it.
    """

    def __init__(
        self,
        path: str,
        entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
        metadata: Optional[Mapping[str, str]] = None,
    ):
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"edkm.save: path {self.path!r} is a directory; expected a file name")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"edkm.save: directory {directory!r} does not exist")
        header: Dict[str, Any] = {}
        offset = 0
        self._order: List[Tuple[str, torch.dtype, Tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            if name in header or name == "__metadata__":
                raise ValueError(f"edkm.save: tensor name {name!r} appears twice or is reserved")
            if dtype not in DTYPE_CODES:
                raise ValueError(f"edkm.save: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = _tensor_bytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * ((8 - (8 + len(text)) % 8) % 8)
        self.header_bytes = 8 + len(text)
        self.data_bytes = offset
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise PermissionError(f"edkm.save: cannot write to directory {directory!r} ({e.strerror})") from None
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a saved model gets the usual mode
        self._file = os.fdopen(fd, "wb")
        self._next = 0
        try:
            self._file.write(struct.pack("<Q", len(text)))
            self._file.write(text)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._file is None:
            raise RuntimeError("edkm: FileWriter is closed")
        if self._next >= len(self._order):
            raise ValueError(f"edkm.save: {name!r} was not declared (all declared tensors are written)")
        want, dtype, shape, nbytes = self._order[self._next]
        if name != want:
            raise ValueError(f"edkm.save: expected tensor {want!r} next, got {name!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"edkm.save: tensor {name!r} was declared {dtype} {list(shape)}, got "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._file.write(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def commit(self) -> int:
        """Make the file visible under its real name; returns its size in bytes."""
        if self._next != len(self._order):
            missing = [n for n, *_ in self._order[self._next :]]
            self.abort()
            raise ValueError(f"edkm.save: {len(missing)} declared tensor(s) not written, e.g. {missing[:3]}")
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            f.close()
            self._remove_tmp()
            raise
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return self.header_bytes + self.data_bytes

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._remove_tmp()

    def _remove_tmp(self):
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


# ---- save ------------------------------------------------------------------------------------


def clustered_entries(name: str, layout: Layout, outlier_dtype: torch.dtype = torch.float16):
    """The file entries of a clustered tensor, in file order (outliers only when it has any)."""
    entries = [
        (f"{name}.indices", torch.uint8, (layout.packed_bytes,)),
        (f"{name}.lut", torch.float16, layout.lut_shape),
    ]
    if layout.outliers:
        if outlier_dtype not in layout.outlier_value_dtypes():
            raise ValueError(
                f"edkm.save: {name}: outlier values of a {DTYPE_NAMES[layout.dtype]} weight "
                f"must be stored as {layout.outlier_value_dtypes()}, got {outlier_dtype}"
            )
        entries += [
            (f"{name}.outlier_index", layout.outlier_index_dtype, (layout.outliers,)),
            (f"{name}.outlier_values", outlier_dtype, (layout.outliers,)),
        ]
    return entries


def format_version(layouts: Mapping[str, Layout]) -> str:
    """The lowest version that describes the file: "2" only when some tensor has outliers, so
    files without them stay readable by version-1 readers."""
    return "2" if any(l.outliers for l in layouts.values()) else "1"


def metadata_for(layouts: Mapping[str, Layout], aliases: Mapping[str, str]) -> Dict[str, str]:
    meta = {
        "format": "edkm",
        "edkm.version": format_version(layouts),
        "edkm.layout": json.dumps({n: l.to_json() for n, l in layouts.items()}, separators=(",", ":")),
    }
    if aliases:
        meta["edkm.aliases"] = json.dumps(dict(aliases), separators=(",", ":"))
    return meta


def pack_clustered(indices: torch.Tensor, lut: torch.Tensor, layout: Layout):
    """(packed indices, fp16 LUT [G, K, d]) for a clustered tensor."""
    from edkm import ops

    packed = ops.pack_indices(indices.reshape(-1).cpu(), layout.bits)
    return packed, lut.detach().cpu().to(torch.float16).reshape(layout.lut_shape)


def pack_outliers(index: torch.Tensor, values: torch.Tensor, layout: Layout):
    """(positions in the layout's index dtype, 16-bit values) for a clustered tensor's outliers,
    checked as a reader checks them."""
    index = index.detach().reshape(-1).cpu()
    values = values.detach().reshape(-1).cpu()
    check_outliers(index, values, layout, "edkm.save")
    return index.to(layout.outlier_index_dtype), values


PLAIN_DTYPES = ("auto", "keep", "bfloat16", "float16", "float32")


def model_dtype16(model: nn.Module) -> torch.dtype:
    """The model's 16-bit dtype: its Hugging Face config's ``dtype`` when that is float16 or
    bfloat16, else bfloat16. (A GGUF file dequantized by transformers comes in as float32 and
    records no training dtype; LLaMA-family checkpoints, SmolLM2's included, are bf16.)"""
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = NAME_DTYPES.get(d)
    return d if d in (torch.float16, torch.bfloat16) else torch.bfloat16


def plain_store_dtype(model: nn.Module, plain_dtype) -> Optional[torch.dtype]:
    """The dtype unclustered floating tensors are stored in (None: each tensor's own)."""
    if isinstance(plain_dtype, torch.dtype):
        plain_dtype = DTYPE_NAMES.get(plain_dtype, str(plain_dtype))
    if plain_dtype not in PLAIN_DTYPES:
        raise ValueError(
            f"edkm.save: plain_dtype must be one of {PLAIN_DTYPES} or a float16/bfloat16/"
            f"float32 torch.dtype, got {plain_dtype!r}"
        )
    if plain_dtype == "keep":
        return None
    if plain_dtype == "auto":
        return model_dtype16(model)
    return NAME_DTYPES[plain_dtype]


def stored_plain_dtype(t: torch.Tensor, store: Optional[torch.dtype], auto: bool) -> torch.dtype:
    """The dtype :func:`save` writes unclustered tensor ``t`` in (``store``, ``auto``: from
    :func:`plain_store_dtype` and whether ``plain_dtype`` was "auto")."""
    if store is None or not t.is_floating_point() or t.dtype == store:
        return t.dtype
    if auto and t.dtype in (torch.float16, torch.bfloat16):
        return t.dtype
    return store


def save(model: nn.Module, path: str, metadata: Optional[Mapping[str, str]] = None, plain_dtype="auto") -> int:
    """Write a finalized model to ``path`` (FORMAT.md). Returns the file size in bytes.
    ``metadata``: extra string pairs for the header (e.g. ``edkm.base_model``, which lets
    ``edkm eval FILE`` rebuild the architecture and tokenizer).
    ``plain_dtype``: how unclustered floating tensors (norms, biases, matrices left unclustered)
    are stored: ``"auto"`` (the default) in the model's 16-bit dtype (:func:`model_dtype16`),
    tensors already in 16 bits as they are; ``"keep"``: each in its own dtype; or
    ``"bfloat16"`` / ``"float16"`` / ``"float32"``."""
    from edkm.palettize import clustered_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"edkm.save: model must be an nn.Module, got {type(model).__name__}")
    store = plain_store_dtype(model, plain_dtype)
    auto = plain_dtype == "auto"
    clustered = {}
    for name, m in clustered_modules(model):
        if not m.edkm_finalized:
            raise ValueError(f"edkm.save: {name} is not finalized; call edkm.finalize(model) first")
        if m.edkm_leader is None:
            clustered[f"{name}.weight" if name else "weight"] = m
    state = model.state_dict()
    plain: Dict[str, torch.Tensor] = {}
    layouts: Dict[str, Layout] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[Tuple, str] = {}
    for key, t in state.items():
        if key.endswith("._extra_state") or key == "_extra_state" or _is_edkm_buffer(key):
            continue
        if not isinstance(t, torch.Tensor):
            continue
        ident = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if t.numel()
            else None
        )
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        if key in clustered:
            m = clustered[key]
            cfg = m.edkm_config
            pos = m.edkm_outlier_positions
            layouts[key] = Layout(
                cfg.bits, tuple(t.shape), t.dtype, m.edkm_groups, cfg.cluster_dim, 0 if pos is None else pos.numel()
            )
        else:
            plain[key] = t.detach().to(stored_plain_dtype(t, store, auto))
    for key in list(layouts) + list(plain):
        for suffix in (".indices", ".lut") + OUTLIER_SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] in layouts:
                raise ValueError(
                    f"edkm.save: tensor {key!r} collides with the stored form of clustered {key[: -len(suffix)]!r}"
                )
    entries = []
    for key in state:
        if key in layouts:
            entries += clustered_entries(key, layouts[key], clustered[key].edkm_outlier_dtype)
        elif key in plain:
            entries.append((key, plain[key].dtype, tuple(plain[key].shape)))
    meta = metadata_for(layouts, aliases)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"edkm.save: metadata must map strings to strings, got {k!r}: {type(v).__name__}")
        if k in meta:
            raise ValueError(f"edkm.save: metadata key {k!r} is reserved")
        meta[k] = v
    with FileWriter(path, entries, meta) as w:
        for key in state:
            if key in layouts:
                m = clustered[key]
                idx = m._edkm_indices if m._edkm_indices is not None else m.edkm_indices()
                packed, lut = pack_clustered(idx, m.centroids, layouts[key])
                w.write(f"{key}.indices", packed)
                w.write(f"{key}.lut", lut)
                if layouts[key].outliers:
                    pos = m.edkm_outlier_positions
                    # The finalized weight holds the stored 16-bit values at these positions.
                    values = state[key].detach().reshape(-1).index_select(0, pos).to(m.edkm_outlier_dtype)
                    index, values = pack_outliers(pos, values, layouts[key])
                    w.write(f"{key}.outlier_index", index)
                    w.write(f"{key}.outlier_values", values)
            elif key in plain:
                w.write(key, plain[key])
        return w.commit()


def _is_edkm_buffer(key: str) -> bool:
    """Training state that the file does not store (centroids; outlier positions are stored in
    their own form)."""
    return key.endswith("edkm_centroids") or key.endswith("edkm_outlier_index")


# ---- load ------------------------------------------------------------------------------------


@dataclass
class CompressedFile:
    path: str
    header_bytes: int
    file_bytes: int
    entries: Dict[str, Dict[str, Any]]  # safetensors header entries (dtype, shape, data_offsets)
    layouts: Dict[str, Layout]
    aliases: Dict[str, str]
    metadata: Dict[str, str]


def read_header(path: str) -> CompressedFile:
    """Parse and validate the header (FORMAT.md) without reading tensor data."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory; expected an edkm .safetensors file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"edkm: no such file: {path!r}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: too short ({size} bytes) to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise FormatError(f"{path}: header length {n} exceeds the file ({size} bytes) or 100 MiB")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        if e["dtype"] not in CODE_DTYPES:
            raise FormatError(f"{path}: tensor {name!r}: unsupported dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**48 for s in shape
        ):
            raise FormatError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise FormatError(
                f"{path}: tensor {name!r}: data_offsets {offs!r} outside the data section ({data_len} bytes)"
            )
        if math.prod(shape) > 2**48 or offs[1] - offs[0] != _tensor_bytes(CODE_DTYPES[e["dtype"]], shape):
            raise FormatError(f"{path}: tensor {name!r}: {offs[1] - offs[0]} bytes do not hold {e['dtype']} {shape}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise FormatError(
                f"{path}: tensor {name!r} starts at {begin}, expected {pos} "
                f"(tensors must tile the data section without gaps or overlaps)"
            )
        pos = end
    if pos != data_len:
        raise FormatError(
            f"{path}: the data section has {data_len} bytes but tensors cover {pos} (truncated or trailing data)"
        )
    layouts: Dict[str, Layout] = {}
    aliases: Dict[str, str] = {}
    if meta.get("format") == "edkm":
        version = meta.get("edkm.version")
        if version not in READ_VERSIONS:
            raise FormatError(
                f"{path}: edkm format version {version!r}; this edkm reads versions {', '.join(READ_VERSIONS)}"
            )
        try:
            raw_layout = json.loads(meta.get("edkm.layout", "{}"))
            raw_alias = json.loads(meta.get("edkm.aliases", "{}"))
        except (json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"{path}: edkm metadata is not valid JSON ({e})") from None
        if not isinstance(raw_layout, dict) or not isinstance(raw_alias, dict):
            raise FormatError(f"{path}: edkm.layout and edkm.aliases must be JSON objects")
        for name, d in raw_layout.items():
            lay = Layout.from_json(name, d, path, version)
            if name in header:
                raise FormatError(f"{path}: {name!r} is both a clustered and a plain tensor")
            expected = [(".indices", ("U8",), [lay.packed_bytes]), (".lut", ("F16",), list(lay.lut_shape))]
            if lay.outliers:
                expected += [
                    (".outlier_index", (DTYPE_CODES[lay.outlier_index_dtype],), [lay.outliers]),
                    (".outlier_values", tuple(DTYPE_CODES[t] for t in lay.outlier_value_dtypes()), [lay.outliers]),
                ]
            elif version != "1":
                stray = [name + s for s in OUTLIER_SUFFIXES if name + s in header]
                if stray:
                    raise FormatError(f"{path}: {stray[0]!r} is stored but the layout of {name!r} has no outliers")
            for suffix, dtypes, shape in expected:
                e = header.get(name + suffix)
                if e is None:
                    raise FormatError(f"{path}: clustered tensor {name!r} has no {name + suffix!r}")
                if e["dtype"] not in dtypes or e["shape"] != shape:
                    raise FormatError(
                        f"{path}: {name + suffix!r} must be {' or '.join(dtypes)} {shape}, got "
                        f"{e['dtype']} {e['shape']}"
                    )
            layouts[name] = lay
        for alias, target in raw_alias.items():
            if not isinstance(target, str) or (target not in layouts and target not in header):
                raise FormatError(f"{path}: alias {alias!r} points to unknown tensor {target!r}")
            aliases[alias] = target
    return CompressedFile(path, 8 + n, size, header, layouts, aliases, meta)


def _read_tensor(f, data_start: int, e: Dict[str, Any]) -> torch.Tensor:
    begin, end = e["data_offsets"]
    f.seek(data_start + begin)
    buf = bytearray(end - begin)
    if f.readinto(buf) != len(buf):
        raise FormatError(f"{f.name}: file ended inside a tensor")
    dtype = CODE_DTYPES[e["dtype"]]
    return (
        torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(e["shape"])
        if buf
        else torch.empty(e["shape"], dtype=dtype)
    )


def check_outliers(index: torch.Tensor, values: torch.Tensor, layout: Layout, who: str) -> None:
    """FORMAT.md's rules for a clustered tensor's outliers: ``layout.outliers`` positions,
    strictly increasing, in [0, numel); as many finite 16-bit values. Raises FormatError."""
    if index.dim() != 1 or values.dim() != 1 or index.numel() != layout.outliers or values.numel() != layout.outliers:
        raise FormatError(
            f"{who}: expected {layout.outliers} outlier positions and values, got "
            f"{list(index.shape)} and {list(values.shape)}"
        )
    if values.dtype not in layout.outlier_value_dtypes():
        raise FormatError(f"{who}: outlier values must be {layout.outlier_value_dtypes()}, got {values.dtype}")
    if index.is_floating_point() or index.dtype == torch.bool:
        raise FormatError(f"{who}: outlier positions must be integers, got {index.dtype}")
    if index.numel():
        i = index.long()
        if int(i[0]) < 0 or int(i[-1]) >= layout.numel:
            raise FormatError(
                f"{who}: outlier positions must be in [0, {layout.numel}), got {int(i.min())}..{int(i.max())}"
            )
        if not bool((i[1:] > i[:-1]).all()):
            raise FormatError(f"{who}: outlier positions must be strictly increasing (sorted, no repeats)")
        if not bool(torch.isfinite(values).all()):
            raise FormatError(f"{who}: outlier values must be finite")


def dequantize_clustered(
    packed: torch.Tensor,
    lut: torch.Tensor,
    layout: Layout,
    outlier_index: Optional[torch.Tensor] = None,
    outlier_values: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rebuild a clustered weight (FORMAT.md) from its packed indices and fp16 LUT, then its
    outliers (checked first) at their positions."""
    from edkm import ops
    from edkm.vector_dkm import vector_dequantize

    if layout.outliers:
        if outlier_index is None or outlier_values is None:
            raise FormatError(f"{layout.outliers} outliers declared but no positions or values given")
        check_outliers(outlier_index, outlier_values, layout, "outliers")
    idx = ops.unpack_indices(packed, layout.bits, layout.n_indices)
    c = lut.to(torch.float32)
    if layout.cluster_dim == 1:
        w = ops.dequantize(idx.reshape(layout.shape), c[:, :, 0], layout.dtype)
    else:
        w = vector_dequantize(idx, c, layout.shape, layout.dtype)
    if layout.outliers:
        w.view(-1).index_copy_(0, outlier_index.long(), outlier_values.to(layout.dtype))
    return w


def _internal_names(layouts: Mapping[str, Layout]) -> set:
    """The file entries that store clustered tensors (not model tensors of their own)."""
    out = set()
    for n, lay in layouts.items():
        out |= {n + ".indices", n + ".lut"}
        if lay.outliers:
            out |= {n + s for s in OUTLIER_SUFFIXES}
    return out


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the file under its model name, clustered ones rebuilt, aliases included."""
    cf = read_header(path)
    internal = _internal_names(cf.layouts)
    out: Dict[str, torch.Tensor] = {}
    with open(cf.path, "rb") as f:
        for name, e in cf.entries.items():
            if name not in internal:
                out[name] = _read_tensor(f, cf.header_bytes, e)
        for name, lay in cf.layouts.items():
            packed = _read_tensor(f, cf.header_bytes, cf.entries[name + ".indices"])
            lut = _read_tensor(f, cf.header_bytes, cf.entries[name + ".lut"])
            if not torch.isfinite(lut).all():
                raise FormatError(f"{cf.path}: {name}.lut has non-finite values")
            o_index = o_values = None
            if lay.outliers:
                o_index = _read_tensor(f, cf.header_bytes, cf.entries[name + ".outlier_index"])
                o_values = _read_tensor(f, cf.header_bytes, cf.entries[name + ".outlier_values"])
                check_outliers(o_index, o_values, lay, f"{cf.path}: {name}")
            try:
                out[name] = dequantize_clustered(packed, lut, lay, o_index, o_values)
            except (RuntimeError, ValueError) as e:
                raise FormatError(f"{cf.path}: cannot rebuild {name!r}: {e}") from None
    for alias, target in cf.aliases.items():
        out[alias] = out[target]
    return out


def load(path: str, model: Optional[nn.Module] = None, packed: bool = False):
    """Load a file written by :func:`save`. With ``model`` (same architecture, unclustered or
    palettized), copies every tensor into it and returns it; without, returns the state dict.
    ``packed=True`` keeps clustered Linear/Embedding weights in their file form instead
    (:func:`edkm.packed.load_packed`: about the file's size in memory)."""
    if packed:
        if model is None:
            raise ValueError("edkm.load: packed=True needs the model to load into")
        from edkm.packed import load_packed

        return load_packed(path, model)
    sd = load_state_dict(path)
    if model is None:
        return sd
    target = model.state_dict()
    missing = [k for k in target if k not in sd and not k.endswith("_extra_state") and not _is_edkm_buffer(k)]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise FormatError(
            f"{path}: does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, t in sd.items():
        if tuple(target[k].shape) != tuple(t.shape):
            raise FormatError(f"{path}: {k!r} has shape {list(t.shape)}, the model expects {list(target[k].shape)}")
    with torch.no_grad():
        for k, t in sd.items():
            target[k].copy_(t.to(target[k].dtype))
    return model


# ---- info ------------------------------------------------------------------------------------


def info(path: str, *, file=None, verbose: bool = True) -> Dict[str, Any]:
    """Sizes per tensor and in total; the same model in 16 bits. Prints a table unless
    ``verbose`` is False. The parts (header + every tensor) add up to the file size."""
    cf = read_header(path)
    internal = _internal_names(cf.layouts)
    rows = []
    for name, lay in cf.layouts.items():
        parts = (".indices", ".lut") + (OUTLIER_SUFFIXES if lay.outliers else ())
        nbytes = sum(cf.entries[name + s]["data_offsets"][1] - cf.entries[name + s]["data_offsets"][0] for s in parts)
        outlier_bytes = (
            sum(
                cf.entries[name + s]["data_offsets"][1] - cf.entries[name + s]["data_offsets"][0]
                for s in OUTLIER_SUFFIXES
            )
            if lay.outliers
            else 0
        )
        rows.append(
            {
                "name": name,
                "kind": "clustered",
                "shape": list(lay.shape),
                "bits": lay.bits,
                "weights": lay.numel,
                "groups": lay.groups,
                "cluster_dim": lay.cluster_dim,
                "outliers": lay.outliers,
                "outlier_bytes": outlier_bytes,
                "bytes": nbytes,
                "bytes_16bit": lay.numel * 2,
                "bits_per_weight": 8 * nbytes / lay.numel,
            }
        )
    for name, e in cf.entries.items():
        if name in internal:
            continue
        nbytes = e["data_offsets"][1] - e["data_offsets"][0]
        numel = math.prod(e["shape"])
        is_float = CODE_DTYPES[e["dtype"]].is_floating_point
        rows.append(
            {
                "name": name,
                "kind": "plain",
                "shape": e["shape"],
                "dtype": e["dtype"],
                "bytes": nbytes,
                "bytes_16bit": numel * 2 if is_float else nbytes,
                "weights": numel if is_float else 0,
                "bits_per_weight": 8 * nbytes / numel if is_float and numel else None,
            }
        )
    total_parts = cf.header_bytes + sum(r["bytes"] for r in rows)
    result = {
        "path": cf.path,
        "file_bytes": cf.file_bytes,
        "header_bytes": cf.header_bytes,
        "tensors": rows,
        "aliases": cf.aliases,
        "clustered_bytes": sum(r["bytes"] for r in rows if r["kind"] == "clustered"),
        "plain_bytes": sum(r["bytes"] for r in rows if r["kind"] == "plain"),
        "bytes_16bit": sum(r["bytes_16bit"] for r in rows),
        "parts_sum_to_file_size": total_parts == cf.file_bytes,
    }
    # Every floating tensor of the file is a weight; a tied tensor is stored (and counted) once.
    weights = sum(r["weights"] for r in rows)
    result.update(
        weights=weights,
        bits_per_weight=8 * cf.file_bytes / weights if weights else None,
        clustered_weights=sum(r["weights"] for r in rows if r["kind"] == "clustered"),
    )
    if total_parts != cf.file_bytes:
        raise FormatError(f"{cf.path}: parts add up to {total_parts} bytes but the file has {cf.file_bytes}")
    if verbose:
        _print_info(result, file)
    return result


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def _print_info(r: Dict[str, Any], file=None) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"{r['path']}")
    p(f"{'tensor':<48} {'shape':>16} {'bits':>5} {'LUTs':>5} {'outliers':>9} {'bits/w':>7} {'size':>12} {'16-bit':>12}")
    for t in r["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        clustered = t["kind"] == "clustered"
        bits = str(t["bits"]) if clustered else t["dtype"]
        luts = str(t["groups"]) if clustered else "-"
        outliers = f"{t['outliers']:,}" if clustered and t["outliers"] else "-"
        bpw = f"{t['bits_per_weight']:.2f}" if t.get("bits_per_weight") is not None else "-"
        p(
            f"{t['name']:<48} {shape:>16} {bits:>5} {luts:>5} {outliers:>9} {bpw:>7} {_fmt(t['bytes']):>12} "
            f"{_fmt(t['bytes_16bit']):>12}"
        )
    for alias, target in r["aliases"].items():
        p(f"{alias:<48} (same tensor as {target})")
    p(
        f"header: {_fmt(r['header_bytes'])}; clustered tensors: {_fmt(r['clustered_bytes'])}; "
        f"other tensors: {_fmt(r['plain_bytes'])}"
    )
    if r["weights"]:
        p(
            f"bits/weight over all {r['weights']:,} weights (tied tensors counted once; header, LUTs, "
            f"outliers and unclustered tensors included): {r['bits_per_weight']:.2f}; "
            f"{r['clustered_weights'] / r['weights']:.1%} of the weights are clustered"
        )
    p(
        f"file: {r['file_bytes']:,} bytes ({_fmt(r['file_bytes'])}) = header + tensors (checked); "
        f"the same model in 16 bits: {_fmt(r['bytes_16bit'])} "
        f"({r['bytes_16bit'] / max(r['file_bytes'], 1):.2f}x larger)"
    )
