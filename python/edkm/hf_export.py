"""Export a compressed file as a Hugging Face directory (:func:`export_hf`, ``edkm export --hf``).

The directory is what ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load offline: ``config.json``, the generation config,
the tokenizer files and ``model.safetensors`` with the dequantized weights (bf16 unless asked
otherwise; tied tensors stored once and tied again by transformers). Where it came from is
recorded twice: in the safetensors header (``edkm.*`` keys) and in ``edkm.json`` (the source
file's name, size, SHA-256 and its clustered layouts).

Nothing half-written is ever left under the real name: the directory is built beside it under
a hidden temporary name and renamed into place at the end; a killed export leaves only that
hidden directory, which holds no ``config.json`` until its last step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: Path, force: bool, who: str) -> None:
    """Refuse an output that is a file, or a non-empty directory without ``force``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{who}: output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{who}: output directory {str(out)!r} is not empty; pass --force (force=True) to replace it"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{who}: the parent of the output, {str(out.parent)!r}, does not exist")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out`` (replacing what is there)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.edkm-old-", dir=out.parent))
        os.rename(out, old / "d")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def export_hf(path: str, out_dir: str, *, dtype="bfloat16", force: bool = False, model=None, tokenizer=None) -> str:
    """Write the compressed file ``path`` as a Hugging Face directory ``out_dir``; returns it.

    ``dtype``: of the weights in the directory, ``"bfloat16"`` (default), ``"float16"`` or
    ``"float32"``. The file's LUTs are fp16, so ``"float16"`` and ``"float32"`` keep every
    clustered weight exact and bf16 rounds it to 8 significant bits.
    ``model`` / ``tokenizer``: the architecture to load the file into, when the file does not
    record its base model (``edkm.base_model``, written by ``edkm compress``).
    ``force``: replace a non-empty ``out_dir``."""
    from edkm import format as fmt
    from edkm.models import load_model

    who = "edkm export"
    if isinstance(dtype, torch.dtype):
        dtype = fmt.DTYPE_NAMES.get(dtype, str(dtype))
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"{who}: dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    torch_dtype = EXPORT_DTYPES[dtype]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: no such file: {path!r}")
    out = Path(out_dir).absolute()
    check_output_dir(out, force, who)
    cf = fmt.read_header(path)
    if model is None:
        base = cf.metadata.get("edkm.base_model")
        if base is None:
            raise ValueError(
                f"{who}: {path} does not record its base model (edkm.base_model); "
                f"pass model= (and tokenizer=) to edkm.export_hf"
            )
        model, tok = load_model(path, torch.float32)
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        fmt.load(path, model)
    if tokenizer is None:
        raise ValueError(f"{who}: {path}'s base model has no tokenizer; pass tokenizer= to edkm.export_hf")
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"{who}: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model = model.to(torch_dtype)

    # The weights: every state_dict tensor once (a tied tensor under its first name, which is
    # the one transformers keeps when it ties them again).
    tensors = {}
    seen = set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        tensors[key] = t.detach().contiguous()
    tied = sorted(set(model.state_dict()) - set(tensors))
    source = {
        "edkm.source": os.path.basename(path),
        "edkm.source_bytes": str(os.path.getsize(path)),
        "edkm.source_sha256": _sha256(path),
        "edkm.dtype": dtype,
    }
    layouts = {name: lay.to_json() for name, lay in cf.layouts.items()}

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.edkm-partial-", dir=out.parent))
    try:
        from safetensors.torch import save_file

        model.config.dtype = torch_dtype
        if hasattr(model.config, "quantization_config"):
            # The weights written are dense: a GGUF (or other) quantization record of the base
            # model would make transformers look for the quantized checkpoint instead.
            del model.config.quantization_config
        save_file(
            tensors,
            str(tmp / "model.safetensors"),
            metadata={"format": "pt", **source, "edkm.layouts": json.dumps(layouts)},
        )
        tokenizer.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        with open(tmp / "edkm.json", "w") as f:
            json.dump(
                {**source, "base_model": cf.metadata.get("edkm.base_model"), "tied": tied, "layouts": layouts},
                f,
                indent=1,
            )
        # config.json last: a directory without it is not a model transformers would load.
        model.config.save_pretrained(str(tmp))
        _fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def exported_source(out_dir: str) -> Optional[dict]:
    """The ``edkm.json`` record of an exported directory (None if it has none)."""
    p = Path(out_dir) / "edkm.json"
    return json.loads(p.read_text()) if p.is_file() else None
