"""`edkm generate`: text from a model or a compressed file, with prefill and decode speed.

A compressed edkm file runs packed (:mod:`edkm.packed`: the clustered weights stay bit-packed,
multiplied by ``edkm.lut_linear``) unless ``--dense`` rebuilds it. Greedy by default; ``--sample``
draws with a seeded generator. The KV cache is transformers' own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class Generation:
    tokens: List[int]  # the new tokens
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # all decode steps (the first new token comes from prefill)
    decode_steps: int
    step_seconds: List[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _pick(logits: torch.Tensor, gen: Optional[torch.Generator], temperature: float, top_k: int, top_p: float) -> int:
    if gen is None:
        return int(logits.argmax())
    logits = logits.cpu()
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: Optional[int] = None,
) -> Generation:
    """Prefill ``prompt_ids`` [1, T], then ``max_new_tokens - 1`` single-token decode steps with
    the KV cache (stops early at ``eos_token_id``). Times prefill and decode separately."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must be [1, T >= 1], got {list(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    import inspect
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed) if sample else None
    device = prompt_ids.device
    cache = DynamicCache()
    # transformers >= 5.2x names the cache argument `cache` (past_key_values is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    t0 = time.perf_counter()
    out = model(input_ids=prompt_ids, use_cache=True, **{key: cache})
    tok = _pick(out.logits[0, -1], gen, temperature, top_k, top_p)
    prefill = time.perf_counter() - t0
    tokens, steps = [tok], []
    pos = prompt_ids.shape[1]
    while len(tokens) < max_new_tokens and not (eos_token_id is not None and tok == eos_token_id):
        t = time.perf_counter()
        out = model(
            input_ids=torch.tensor([[tok]], device=device),
            use_cache=True,
            position_ids=torch.tensor([[pos]], device=device),
            **{key: cache},
        )
        tok = _pick(out.logits[0, -1], gen, temperature, top_k, top_p)
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
        pos += 1
    return Generation(tokens, prompt_ids.shape[1], prefill, sum(steps), len(steps), steps)


def _peak_rss() -> int:
    """Peak RSS of this process (VmHWM; ru_maxrss carries a parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_bytes(model) -> int:
    """Bytes of every parameter and buffer (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.device.type != "meta" and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def load_for_generation(spec: str, dense: bool = False, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, packed?) for a known model name, a path, or an edkm file (packed unless
    ``dense``)."""
    from pathlib import Path
    from edkm import models

    p = Path(spec)
    if p.is_file() and p.suffix == ".safetensors" and not dense:
        try:
            model, tok = models.load_packed_model(spec, dtype)
            return model, tok, True
        except ValueError as e:
            if "not an edkm file" not in str(e):
                raise
    model, tok = models.load_model(spec, dtype)
    return model.eval(), tok, False


def prompt_ids(tok, text: str, vocab: int) -> torch.Tensor:
    if tok is not None:
        ids = tok(text, return_tensors="pt").input_ids
    else:  # no tokenizer (the synthetic LLaMA): the prompt's bytes as token ids
        ids = torch.tensor([[b % vocab for b in text.encode()]])
    if ids.shape[1] == 0:
        raise ValueError("--prompt: the prompt gives no tokens; give some text")
    return ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an edkm file (runs packed), 'smollm2-135m', or a local model path")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--dense", action="store_true", help="rebuild an edkm file's weights instead of running it packed")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="activations and unclustered weights (default float32)",
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def main(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, tok, packed = load_for_generation(args.model, args.dense, dtype)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(tok, args.prompt, model.config.vocab_size)
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    g = generate(
        model,
        ids,
        args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos,
    )
    text = tok.decode(g.tokens, skip_special_tokens=True) if tok is not None else " ".join(map(str, g.tokens))
    r = {
        "model": args.model,
        "packed": packed,
        "threads": torch.get_num_threads(),
        "prompt_tokens": g.prompt_tokens,
        "new_tokens": len(g.tokens),
        "prefill_tokens_per_second": g.prefill_tokens_per_second,
        "decode_tokens_per_second": g.decode_tokens_per_second,
        "load_seconds": load_s,
        "model_bytes": model_bytes(model),
        "peak_rss_bytes": _peak_rss(),
        "text": text,
    }
    if args.json:
        print(json.dumps(r))
        return 0
    print(args.prompt + text)
    print(
        f"--\n{'packed' if packed else 'dense'} {args.dtype}, {r['threads']} threads: "
        f"prefill {g.prompt_tokens} tokens at {g.prefill_tokens_per_second:.1f} tokens/s, "
        f"decode {g.decode_steps} steps at {g.decode_tokens_per_second:.1f} tokens/s; "
        f"weights in memory {r['model_bytes'] / 2**20:.1f} MiB, peak RSS "
        f"{r['peak_rss_bytes'] / 2**20:.0f} MiB (load {load_s:.1f} s)",
        file=sys.stderr,
    )
    return 0
