"""Data-free training data: token blocks sampled from the teacher itself (as in LLM-QAT).

A user with a model and no corpus can still fine-tune the clustered model on text the model
itself would write. Each block starts from the BOS token (or, as in LLM-QAT, a token drawn
uniformly from the vocabulary) and continues by sampling the teacher's next-token distribution,
a batch of blocks at a time, with the KV cache.

Batch b of a seed is drawn from its own generator (seeded from the seed and b), so a batch's
tokens depend on nothing else: a cache on disk holds one file per finished batch (written
atomically), a run killed mid-way resumes from the batches already there, and the result equals
an uninterrupted run's token for token. Blocks are always made in whole batches and the first
``n_blocks`` returned, so asking for more blocks later reuses the cached ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch

FIRST_TOKENS = ("bos", "random")
_FORMAT = "edkm.datafree/1"


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of batch ``batch`` (a hash, so nearby seeds give unrelated streams)."""
    digest = hashlib.blake2b(f"edkm.datafree|{seed}|{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"edkm.datafree: {name} must be an integer >= {low}, got {value!r}")
    return value


@torch.no_grad()
def sample_batch(
    teacher,
    batch_size: int,
    block_len: int,
    generator: torch.Generator,
    *,
    first_token: str = "bos",
    bos_token_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    on_tokens: Optional[Callable[[int], None]] = None,
) -> torch.LongTensor:
    """One batch [batch_size, block_len] of blocks sampled from ``teacher`` with its KV cache.

    The first token is ``bos_token_id`` (first_token="bos") or uniform over ``vocab_size``
    (first_token="random"); every next token is drawn from softmax(logits / temperature) with
    ``generator`` (a CPU generator: the draws do not depend on the model's device).
    ``on_tokens(n)`` is told of every n tokens made (for a progress bar).
    """
    device = next(teacher.parameters()).device
    if first_token == "bos":
        first = torch.full((batch_size, 1), int(bos_token_id), dtype=torch.long)
    else:
        first = torch.randint(0, int(vocab_size), (batch_size, 1), generator=generator)
    out = torch.empty(batch_size, block_len, dtype=torch.long)
    out[:, :1] = first
    step_ids = first.to(device)
    cache_arg = _cache_argument(teacher)
    past = None
    for pos in range(1, block_len):
        res = teacher(input_ids=step_ids, use_cache=True, **({cache_arg: past} if past is not None else {}))
        past = res.cache if cache_arg == "cache" else res.past_key_values
        probs = torch.softmax(res.logits[:, -1].float().cpu() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out[:, pos : pos + 1] = nxt
        step_ids = nxt.to(device)
        if on_tokens is not None:
            on_tokens(batch_size)
    return out


def _cache_argument(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers 5) or ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def generate_blocks(
    teacher,
    n_blocks: int,
    block_len: int,
    *,
    batch_size: int = 8,
    seed: int = 0,
    first_token: str = "bos",
    bos_token_id: Optional[int] = None,
    temperature: float = 1.0,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    teacher_id: Optional[str] = None,
    progress: bool = True,
    desc: str = "edkm: data-free sampling",
    on_batch: Optional[Callable[[int], None]] = None,
) -> torch.LongTensor:
    """``n_blocks`` token blocks [n_blocks, block_len] sampled from ``teacher`` (see the module docstring).

    ``first_token``: "bos" (needs ``bos_token_id``, else the model config's) or "random"
    (uniform over the teacher's vocabulary, as in LLM-QAT). ``temperature``: the sampling
    temperature (1: the teacher's own distribution). Same arguments and teacher, same tokens.

    ``cache_dir``: keep each finished batch there (in a subfolder named by a hash of the
    settings and the teacher, its ``fingerprint_model`` or ``teacher_id``; files written
    atomically), and reuse what is there. ``on_batch(b)`` is called after batch b is stored.
    The teacher runs in eval mode (its mode is restored afterwards).
    """
    from edkm.distill import fingerprint_model, model_vocab_size

    _check_int("n_blocks", n_blocks, 1)
    _check_int("block_len", block_len, 2)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if first_token not in FIRST_TOKENS:
        raise ValueError(f"edkm.datafree: first_token must be one of {FIRST_TOKENS}, got {first_token!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"edkm.datafree: temperature must be a finite number > 0, got {temperature!r}")
    vocab = model_vocab_size(teacher)
    if first_token == "bos":
        if bos_token_id is None:
            bos_token_id = getattr(getattr(teacher, "config", None), "bos_token_id", None)
        if bos_token_id is None:
            raise ValueError(
                "edkm.datafree: first_token='bos' needs bos_token_id (the tokenizer's BOS); "
                "the model config has none either: pass it, or use first_token='random'"
            )
        if isinstance(bos_token_id, bool) or not isinstance(bos_token_id, int) or not 0 <= bos_token_id < vocab:
            raise ValueError(f"edkm.datafree: bos_token_id must be a token id in [0, {vocab}), got {bos_token_id!r}")

    folder = None
    if cache_dir is not None:
        settings = {
            "format": _FORMAT,
            "block_len": block_len,
            "batch_size": batch_size,
            "seed": seed,
            "first_token": first_token,
            "bos_token_id": bos_token_id if first_token == "bos" else None,
            "temperature": float(temperature),
            "vocab_size": vocab,
            "teacher": teacher_id or fingerprint_model(teacher),
        }
        key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
        folder = Path(cache_dir) / f"datafree-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "settings.json", json.dumps(settings, indent=1, sort_keys=True).encode())

    n_batches = -(-n_blocks // batch_size)
    batches = [None] * n_batches
    if folder is not None:
        for b in range(n_batches):
            batches[b] = _load_batch(folder / f"batch_{b:06d}.pt", batch_size, block_len)
    missing = [b for b in range(n_batches) if batches[b] is None]
    if missing:
        from tqdm import tqdm

        was_training = teacher.training
        teacher.eval()
        try:
            with tqdm(
                total=len(missing) * batch_size * (block_len - 1),
                desc=desc,
                unit="tok",
                unit_scale=True,
                disable=not progress,
            ) as bar:
                for b in missing:
                    g = torch.Generator().manual_seed(batch_seed(seed, b))
                    batches[b] = sample_batch(
                        teacher,
                        batch_size,
                        block_len,
                        g,
                        first_token=first_token,
                        bos_token_id=bos_token_id,
                        vocab_size=vocab,
                        temperature=temperature,
                        on_tokens=bar.update,
                    )
                    if folder is not None:
                        _save_batch(batches[b], folder / f"batch_{b:06d}.pt")
                    if on_batch is not None:
                        on_batch(b)
                    bar.set_postfix(batches=f"{b + 1}/{n_batches}", cached=n_batches - len(missing))
        finally:
            teacher.train(was_training)
    return torch.cat(batches)[:n_blocks].contiguous()


def mix_blocks(corpus: Optional[torch.Tensor], generated: Optional[torch.Tensor], seed: int = 0) -> torch.LongTensor:
    """Corpus and generated blocks of the same length in one shuffled set (a permutation from
    ``torch.Generator().manual_seed(seed)``); either may be None or empty."""
    parts = [t for t in (corpus, generated) if t is not None and t.numel()]
    if not parts:
        raise ValueError("edkm.datafree: no blocks to mix (neither corpus nor generated)")
    if len({t.shape[1] for t in parts}) != 1:
        raise ValueError(f"edkm.datafree: corpus and generated blocks differ in length: {[t.shape[1] for t in parts]}")
    blocks = torch.cat(parts)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order].contiguous()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_batch(tokens: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(tokens.clone(), tmp)
    os.replace(tmp, path)


def _load_batch(path: Path, batch_size: int, block_len: int) -> Optional[torch.Tensor]:
    """A cached batch, or None when absent or not what this run would have written (then it is
    made again and the file replaced)."""
    if not path.is_file():
        return None
    try:
        t = torch.load(path, weights_only=True)
    except Exception:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype != torch.long or tuple(t.shape) != (batch_size, block_len):
        return None
    return t
