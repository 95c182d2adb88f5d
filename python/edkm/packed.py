"""Run a compressed file as it is: modules that keep the file's bit-packed indices and LUTs.

:func:`load_packed` (or ``edkm.load(path, model, packed=True)``) replaces each clustered
``nn.Linear`` / ``nn.Embedding`` of ``model`` with a :class:`PackedLinear` /
:class:`PackedEmbedding` holding the file's ``.indices`` (uint8), its LUT (in the weight's dtype)
and its outliers, and multiplies through ``edkm.lut_linear`` / ``edkm.lut_embedding``. The dense
weight is never built, so the model takes about the file's size plus activations. Outputs equal
those of the model ``edkm.load`` rebuilds up to float32 summation order (the weight values are
the same).

Build the model without allocating its weights (``accelerate.init_empty_weights()`` or the
``meta`` device) to keep the memory at the file's size; :func:`packed_model` does that for files
whose base model edkm knows.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from edkm import ops
from edkm.format import FormatError, Layout, _internal_names, _is_edkm_buffer, _read_tensor, check_outliers, read_header


class _PackedWeight(nn.Module):
    """The file form of one clustered weight [rows, cols], as buffers (shared between modules
    that tie the same weight)."""

    def __init__(
        self,
        layout: Layout,
        packed: torch.Tensor,
        lut: torch.Tensor,
        outlier_index: Optional[torch.Tensor],
        outlier_values: Optional[torch.Tensor],
    ):
        super().__init__()
        if len(layout.shape) != 2:
            raise FormatError(f"packed modules need a 2-D weight, got shape {list(layout.shape)}")
        self.bits = layout.bits
        self.weight_dtype = layout.dtype
        # The LUT as the weight holds it (the file's fp16 rounded to the weight's dtype, exactly
        # what edkm.load writes into the dense weight), kept in float32 for the kernels.
        self.register_buffer("packed", packed)
        self.register_buffer("lut", lut.to(layout.dtype).to(torch.float32))
        self.register_buffer("outlier_index", outlier_index)
        self.register_buffer("outlier_values", outlier_values)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401
        raise RuntimeError("edkm: packed modules are loaded from edkm files (edkm.load_packed), not from state dicts")

    def dense(self, rows: int, cols: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight this stands for, rebuilt (for checks; the kernels never build it)."""
        eye_rows = torch.arange(rows, device=self.packed.device)
        w = ops.lut_embedding(
            eye_rows,
            self.packed,
            self.lut,
            self.bits,
            rows,
            cols,
            self.outlier_index,
            self.outlier_values,
            torch.float32,
        )
        return w.to(dtype or self.weight_dtype)


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight stays in its file form (bit-packed indices + LUT + outliers)."""

    def __init__(self, weight: _PackedWeight, out_features: int, in_features: int, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_packed = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def bits(self) -> int:
        return self.weight_packed.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_packed
        return ops.lut_linear(
            x, w.packed, w.lut, w.bits, self.out_features, self.bias, w.outlier_index, w.outlier_values
        )

    def dense_weight(self) -> torch.Tensor:
        return self.weight_packed.dense(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        w = self.weight_packed
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={w.bits}, groups={w.lut.shape[0]}, bias={self.bias is not None}, "
            f"outliers={0 if w.outlier_index is None else w.outlier_index.numel()}"
        )


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` whose weight stays in its file form; looks up and unpacks only the rows
    asked for."""

    def __init__(
        self, weight: _PackedWeight, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.weight_packed = weight

    @property
    def bits(self) -> int:
        return self.weight_packed.bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight_packed
        return ops.lut_embedding(
            ids,
            w.packed,
            w.lut,
            w.bits,
            self.num_embeddings,
            self.embedding_dim,
            w.outlier_index,
            w.outlier_values,
            w.weight_dtype,
        )

    def dense_weight(self) -> torch.Tensor:
        return self.weight_packed.dense(self.num_embeddings, self.embedding_dim)

    def extra_repr(self) -> str:
        w = self.weight_packed
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={w.bits}, groups={w.lut.shape[0]}"


def _split(name: str) -> Tuple[str, str]:
    return name.rsplit(".", 1) if "." in name else ("", name)  # type: ignore[return-value]


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put ``t`` at ``name`` (parameter or buffer), replacing the old tensor (meta included), in
    the old tensor's dtype."""
    mod_name, attr = _split(name)
    mod = model.get_submodule(mod_name)
    old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    if old is not None and tuple(old.shape) != tuple(t.shape):
        raise FormatError(f"{name!r} has shape {list(t.shape)}, the model expects {list(old.shape)}")
    if old is not None and old.is_floating_point():
        t = t.to(old.dtype)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        raise FormatError(f"the model has no parameter or buffer {name!r}")


def load_packed(path: str, model: nn.Module) -> nn.Module:
    """Load an edkm file into ``model`` keeping clustered weights packed (module doc). Returns
    ``model`` (changed in place). Clustered weights of other module types are rebuilt dense.
    Every tensor of the file must match the model and every weight of the model must be in it."""
    path = os.fspath(path)
    cf = read_header(path)
    target = {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if not k.endswith("_extra_state") and not _is_edkm_buffer(k)
    }
    internal = _internal_names(cf.layouts)
    names = {n for n in cf.entries if n not in internal} | set(cf.layouts) | set(cf.aliases)
    missing = sorted(k for k in target if k not in names)
    unexpected = sorted(k for k in names if k not in target)
    if missing or unexpected:
        raise FormatError(
            f"{path}: does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    shared: Dict[str, _PackedWeight] = {}
    dense_later: Dict[str, torch.Tensor] = {}
    with open(cf.path, "rb") as f:

        def read(n):
            return _read_tensor(f, cf.header_bytes, cf.entries[n])

        for name, lay in cf.layouts.items():
            packed, lut = read(name + ".indices"), read(name + ".lut")
            if not torch.isfinite(lut).all():
                raise FormatError(f"{cf.path}: {name}.lut has non-finite values")
            o_index = o_values = None
            if lay.outliers:
                o_index, o_values = read(name + ".outlier_index"), read(name + ".outlier_values")
                check_outliers(o_index, o_values, lay, f"{cf.path}: {name}")
            if len(lay.shape) == 2:
                shared[name] = _PackedWeight(lay, packed, lut, o_index, o_values)
            else:
                from edkm.format import dequantize_clustered

                dense_later[name] = dequantize_clustered(packed, lut, lay, o_index, o_values)
        # Replace modules: every name (stored or alias) that points at a packed 2-D weight.
        sources = {n: n for n in shared}
        sources.update({a: t for a, t in cf.aliases.items() if t in shared})
        for name, src in sources.items():
            mod_name, attr = _split(name)
            mod = model.get_submodule(mod_name)
            w = shared[src]
            rows, cols = cf.layouts[src].shape
            if attr == "weight" and isinstance(mod, nn.Linear) and (mod.out_features, mod.in_features) == (rows, cols):
                bias = mod.bias
                new = PackedLinear(w, rows, cols, None if bias is None or bias.is_meta else bias.detach())
                if bias is not None and bias.is_meta:
                    new.bias = nn.Parameter(torch.empty(bias.shape, dtype=bias.dtype), requires_grad=False)
            elif (
                attr == "weight"
                and isinstance(mod, nn.Embedding)
                and (mod.num_embeddings, mod.embedding_dim) == (rows, cols)
            ):
                new = PackedEmbedding(w, rows, cols, mod.padding_idx)
            else:
                dense_later[name] = w.dense(rows, cols)
                continue
            parent_name, child = _split(mod_name)
            setattr(model.get_submodule(parent_name), child, new)
        for name, t in dense_later.items():
            _set_tensor(model, name, t)
        for name, e in cf.entries.items():
            if name not in internal:
                _set_tensor(model, name, read(name))
    for alias, tgt in cf.aliases.items():
        if tgt not in shared and alias not in dense_later:
            _set_tensor(
                model,
                alias,
                model.get_parameter(tgt) if tgt in dict(model.named_parameters()) else model.get_buffer(tgt),
            )
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise FormatError(f"{path}: left without values (still on the meta device): {left[:5]}")
    return model
