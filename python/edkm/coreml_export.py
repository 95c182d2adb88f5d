"""Export a compressed LLaMA-family file as a Core ML program (:func:`export_coreml`,
``edkm export --coreml``).

Every clustered weight becomes one ``constexpr_lut_to_dense`` op (iOS18 opset) whose indices
and LUT are the file's own: one LUT per block of rows where the file has several, vectors
along the columns for vector clustering. Nothing is clustered again. The rest of the program
(embedding, RMSNorm, RoPE attention with grouped KV heads, SwiGLU MLP, the LM head) is
``edkm._coreml_graph.forward``, fp16, for a fixed sequence length (input ``input_ids``
[1, seq_len] int32, output ``logits`` [1, seq_len, vocab]; no KV cache).

coremltools runs in its own environment (:mod:`edkm.coreml_env`, numpy + coremltools, created
once in the cache): this side prepares the arrays, ``_coreml_export_side.py`` builds and saves
the package. The package is written beside the output under a hidden name and renamed into
place at the end. A weight with outliers is ``select(sparse != 0, sparse, lut_dense)`` with
``sparse`` a ``constexpr_sparse_to_dense`` of the outlier values: exact, at the price of Core ML's
bitmask (one bit per weight of that matrix).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

WHO = "edkm export --coreml"


class ExportError(RuntimeError):
    """A step outside edkm failed: creating the coremltools environment, or coremltools itself."""


SIDE = Path(__file__).with_name("_coreml_export_side.py")
GRAPH = Path(__file__).with_name("_coreml_graph.py")
LAYER_WEIGHTS = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def graph_spec(config, layers: Optional[int], seq_len: int) -> dict:
    """The ``_coreml_graph`` spec of a transformers LLaMA config; refuses what the graph lacks."""

    def refuse(what):
        raise ValueError(
            f"{WHO}: the program covers LLaMA-family models with default RoPE, no "
            f"biases and SiLU; this model has {what}"
        )

    if (
        getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2")
        or getattr(config, "hidden_act", "silu") != "silu"
    ):
        refuse(
            f"model_type {getattr(config, 'model_type', None)!r}, hidden_act {getattr(config, 'hidden_act', None)!r}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        refuse("biases")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope_type {rope.get('rope_type')!r}")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    n = config.num_hidden_layers
    if layers is not None and not (isinstance(layers, int) and 1 <= layers <= n):
        raise ValueError(f"{WHO}: layers must be an integer in 1..{n}, got {layers!r}")
    if not (isinstance(seq_len, int) and 1 <= seq_len <= config.max_position_embeddings):
        raise ValueError(f"{WHO}: seq_len must be an integer in 1..{config.max_position_embeddings}, got {seq_len!r}")
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "intermediate": config.intermediate_size,
        "eps": float(config.rms_norm_eps),
        "rope_theta": float(theta),
        "vocab": config.vocab_size,
        "layers": n if layers is None else layers,
        "seq_len": seq_len,
    }


def prepare(path: str, layers: Optional[int] = None, seq_len: int = 64) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(spec, arrays) of the program for the file ``path``: per clustered weight its indices
    (uint8 [rows, cols / d]) and LUT (fp16 [G, 1, K, d]), per other weight its values (fp16)."""
    from edkm import format as fmt
    from edkm.models import base_config
    from edkm.ops import unpack_indices

    config, _ = base_config(path)
    spec = graph_spec(config, layers, seq_len)
    cf = fmt.read_header(path)
    tie = cf.aliases.get("lm_head.weight") == "model.embed_tokens.weight" or (
        "lm_head.weight" not in cf.entries and "lm_head.weight" not in cf.layouts
    )
    spec["tie"] = tie
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{w}.weight" for i in range(spec["layers"]) for w in LAYER_WEIGHTS]
    names += ["model.norm.weight"] + ([] if tie else ["lm_head.weight"])
    arrays: Dict[str, np.ndarray] = {}
    spec["weights"] = {}
    with open(cf.path, "rb") as f:

        def read(n):
            return fmt._read_tensor(f, cf.header_bytes, cf.entries[n])

        for name in names:
            src = cf.aliases.get(name, name)
            if src in cf.layouts:
                lay = cf.layouts[src]
                rows, cols = lay.shape if len(lay.shape) == 2 else (0, 0)
                d = lay.cluster_dim
                if len(lay.shape) != 2 or cols % d or rows % lay.groups:
                    raise ValueError(
                        f"{WHO}: {name}: a {list(lay.shape)} weight with {lay.groups} LUTs and "
                        f"vectors of {d} does not map onto constexpr_lut_to_dense"
                    )
                if lay.outliers:
                    pos = read(src + ".outlier_index").long()
                    vals = read(src + ".outlier_values").to(torch.float16)
                    if (vals == 0).any():
                        raise ValueError(
                            f"{WHO}: {name} has an outlier equal to 0, which the program's "
                            f"sparse mask cannot tell from an empty position"
                        )
                    order = torch.argsort(pos)
                    arrays[name + ".outlier_index"] = pos[order].numpy()
                    arrays[name + ".outlier_values"] = vals[order].numpy()
                idx = unpack_indices(read(src + ".indices"), lay.bits, lay.n_indices)
                arrays[name + ".indices"] = idx.reshape(rows, cols // d).numpy()
                arrays[name + ".lut"] = read(src + ".lut").reshape(lay.groups, 1, 1 << lay.bits, d).numpy()
                spec["weights"][name] = {
                    "kind": "lut",
                    "bits": lay.bits,
                    "shape": list(lay.shape),
                    "groups": lay.groups,
                    "cluster_dim": d,
                    "outliers": lay.outliers,
                }
            elif src in cf.entries:
                t = read(src)
                if t.is_floating_point() and t.abs().max() > 65504:
                    raise ValueError(f"{WHO}: {name} has values beyond fp16's range")
                arrays[name] = t.to(torch.float16).numpy()
                spec["weights"][name] = {"kind": "dense", "shape": list(t.shape)}
            else:
                raise ValueError(f"{WHO}: {path} has no tensor {name!r} (not a LLaMA-family file?)")
    return spec, arrays


def numpy_forward(spec: dict, arrays: Dict[str, np.ndarray], input_ids: np.ndarray) -> np.ndarray:
    """The exported program's computation in float32 numpy (the graph the tests check)."""
    from edkm import _coreml_graph

    weights = {}
    for n, w in spec["weights"].items():
        if w["kind"] != "lut":
            weights[n] = arrays[n]
        elif w.get("outliers"):
            weights[n] = (
                arrays[n + ".indices"],
                arrays[n + ".lut"],
                arrays[n + ".outlier_index"],
                arrays[n + ".outlier_values"],
            )
        else:
            weights[n] = (arrays[n + ".indices"], arrays[n + ".lut"])
    return _coreml_graph.forward(_coreml_graph.NumpyOps(weights), spec, np.asarray(input_ids))


def _side(env_python: str, *args: str) -> dict:
    # The side script and the graph run from a folder of their own: python/edkm itself on
    # sys.path would let edkm's module names shadow those coremltools imports.
    with tempfile.TemporaryDirectory(prefix="edkm-coreml-side-") as d:
        for src in (SIDE, GRAPH):
            shutil.copy(src, d)
        r = subprocess.run([env_python, "-I", os.path.join(d, SIDE.name), *args], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip()[-2000:]
        raise ExportError(f"{WHO}: coremltools failed ({args[0]} step, exit {r.returncode}): {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def coreml_python(log=None) -> str:
    """The coremltools environment's python (created once); a failure names the step."""
    from edkm import coreml_env

    info = coreml_env.ensure(coreml_env.EXPORT_REQUIREMENTS, check=coreml_env.EXPORT_CHECK, who=WHO, log=log)
    if "error" in info:
        raise ExportError(f"{WHO}: creating the coremltools environment in {info['path']} failed: {info['error']}")
    return info["python"]


def export_coreml(
    path: str, out: str, *, layers: Optional[int] = None, seq_len: int = 64, force: bool = False, log=None
) -> dict:
    """Write ``path`` as the Core ML package ``out`` (``.mlpackage``); returns {"path",
    "weight_bytes", "source_bytes", "clustered", "layers", "seq_len"}. ``layers``: only the first
    N decoder layers (default all); ``force``: replace an existing ``out``."""
    from edkm.hf_export import check_output_dir, replace_dir

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{WHO}: no such file: {path!r}")
    dest = Path(out).absolute()
    if dest.suffix != ".mlpackage":
        raise ValueError(f"{WHO}: the output must end in .mlpackage, got {out!r}")
    if dest.exists() and not force:
        raise FileExistsError(f"{WHO}: {out!r} exists; pass --force (force=True) to replace it")
    check_output_dir(dest, True, WHO)
    spec, arrays = prepare(path, layers, seq_len)
    spec["description"] = f"edkm export of {os.path.basename(path)}"
    python = coreml_python(log)
    with tempfile.TemporaryDirectory(prefix=".edkm-coreml-", dir=dest.parent) as tmp:
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        np.savez(os.path.join(tmp, "weights.npz"), **arrays)
        built = os.path.join(tmp, dest.name)
        r = _side(python, "build", os.path.join(tmp, "spec.json"), os.path.join(tmp, "weights.npz"), built)
        replace_dir(Path(built), dest)
    return {
        "path": str(dest),
        "weight_bytes": r["weight_bytes"],
        "source_bytes": os.path.getsize(path),
        "clustered": r["clustered"],
        "layers": spec["layers"],
        "seq_len": seq_len,
    }


def read_back(package: str, log=None) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(facts, arrays) of an exported package read back through coremltools' MIL proto loader:
    per constexpr_lut_to_dense op NAME.indices, NAME.lut and NAME.dense (decompressed)."""
    python = coreml_python(log)
    with tempfile.TemporaryDirectory(prefix="edkm-coreml-read-") as tmp:
        npz = os.path.join(tmp, "read.npz")
        facts = _side(python, "read", package, npz)
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
    return facts, arrays
