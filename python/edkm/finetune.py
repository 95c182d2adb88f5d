"""Clustering-aware fine-tuning of a causal LM on text (a short, deterministic loop)."""
from __future__ import annotations

import random
from typing import List, Optional, Sequence

import torch


def pick_texts(files: Sequence, tokens_needed: int, seed: int = 0, chars_per_token: float = 4.0) -> List[str]:
    """Read just enough of ``files`` (shuffled with ``seed``) for ``tokens_needed`` tokens, with
    a 2x margin, so a short run does not tokenize a whole corpus."""
    from edkm.data import read_texts
    order = list(files)
    random.Random(seed).shuffle(order)
    want = 2 * tokens_needed * chars_per_token
    texts, total = [], 0
    for f in order:
        (t,) = read_texts([f])
        texts.append(t)
        total += len(t)
        if total >= want:
            break
    return texts


def finetune(model, tokenizer, texts: Sequence[str], steps: int, *, lr: float = 5e-5, block_len: int = 256,
             batch_size: int = 4, seed: int = 0, max_grad_norm: float = 1.0, warmup: float = 0.1,
             progress: bool = True, desc: str = "edkm: fine-tuning") -> List[float]:
    """``steps`` AdamW steps of next-token loss on blocks cut from ``texts``; returns the losses.
    The learning rate rises linearly over the first ``warmup`` fraction of the steps, then stays.

    Works on any model (clustered or not), so the gain from fine-tuning alone can be measured
    with the same loop. Deterministic for a given seed on a given machine.
    """
    from edkm.data import token_blocks

    if steps < 1:
        raise ValueError(f"edkm.finetune: steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"edkm.finetune: batch_size must be >= 1, got {batch_size}")
    blocks = token_blocks(tokenizer, texts, block_len, max_blocks=steps * batch_size, seed=seed)
    if blocks.shape[0] < steps * batch_size:
        raise ValueError(f"edkm.finetune: the texts give {blocks.shape[0]} blocks of {block_len} tokens; "
                         f"{steps} steps of {batch_size} need {steps * batch_size}")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(round(warmup * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    losses: List[float] = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm
        bar = tqdm(bar, desc=desc, unit="step")
    for step in bar:
        batch = blocks[step * batch_size:(step + 1) * batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"edkm.finetune: loss became {loss.item()} at step {step}")
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
