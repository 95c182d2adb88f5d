"""Per-weight sensitivity: the diagonal empirical Fisher information of the next-token loss.

SqueezeLLM's second-order view of quantization: perturbing a weight w_i by d_i raises the loss
by about 1/2 F_ii d_i^2, with F_ii the mean squared gradient over calibration data. edkm uses it
to weight the k-means (``Config(init="sensitivity")``), to pick outliers
(``outlier_criterion="sensitivity"``) and to price each bit width per matrix
(:mod:`edkm.mixed_precision`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


def sensitivity_targets(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(module name, weight) for every nn.Linear / nn.Embedding weight of ``model``, a weight
    tied between modules once, under the first module (``named_modules`` order) that holds it."""
    out, seen = [], set()
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in seen:
            continue
        seen.add(id(w))
        out.append((name, w))
    return out


def next_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, over the batch's
    B * (L - 1) positions (what Hugging Face's ``labels=input_ids`` loss computes)."""
    out = model(input_ids=input_ids)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a 16-bit log-softmax over a large vocabulary loses the small terms
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def _vocab_size(model: nn.Module) -> Optional[int]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def _as_batch(batch, index: int, vocab: Optional[int]) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor):
        raise ValueError(
            f"edkm.fisher: batches must yield token-id tensors [B, L]; batch {index} is a {type(batch).__name__}"
        )
    if batch.dim() == 1:
        batch = batch[None]
    if batch.dim() != 2 or batch.dtype not in (torch.int64, torch.int32) or batch.shape[1] < 2 or batch.shape[0] < 1:
        raise ValueError(
            f"edkm.fisher: batch {index} must be an integer tensor [B, L] with L >= 2, "
            f"got {batch.dtype} {list(batch.shape)}"
        )
    if vocab is not None and (int(batch.min()) < 0 or int(batch.max()) >= vocab):
        raise ValueError(
            f"edkm.fisher: batch {index} holds token ids outside the model's vocabulary "
            f"0..{vocab - 1} (min {int(batch.min())}, max {int(batch.max())})"
        )
    return batch.long()


def fisher(
    model: nn.Module,
    batches: Union[torch.Tensor, Iterable[torch.Tensor]],
    *,
    num_batches: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """Diagonal empirical Fisher information of every nn.Linear / nn.Embedding weight.

    ``batches``: token-id blocks, an iterable of [B, L] tensors or a tensor [n, B, L] (a 2-D
    tensor [n, L] is n batches of one sequence). For each batch the gradient g of the mean
    next-token loss (:func:`next_token_loss`) is taken; the result is the mean of g**2 over the
    batches, per weight, float32 on the CPU, keyed by module name (a tied weight once, under
    its first module's name; :func:`sensitivity_targets`). ``num_batches``: use exactly this
    many batches; a calibration set with fewer is a ValueError.

    The Fisher of a batch's mean loss is about 1/(B * (L - 1)) of the per-token Fisher when the
    per-token gradients are uncorrelated: scale (not ranking) depends on the batch shape, so
    compare sensitivities computed with the same B and L.

    The model runs in eval mode (no dropout) and is left as it was: its weights, their
    ``.grad`` and ``requires_grad`` flags and its train/eval mode are not changed.
    """
    from edkm.modules import ClusteredMixin

    if not isinstance(model, nn.Module):
        raise TypeError(f"edkm.fisher: model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, ClusteredMixin) for m in model.modules()):
        raise ValueError(
            "edkm.fisher: the model is palettized; compute the sensitivity of the "
            "unclustered model, before edkm.palettize_"
        )
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"edkm.fisher: num_batches must be None or an integer >= 1, got {num_batches!r}")
    if isinstance(batches, torch.Tensor) and batches.dim() not in (2, 3):
        raise ValueError(
            f"edkm.fisher: batches as one tensor must be [n, B, L] or [n, L], got shape {list(batches.shape)}"
        )
    targets = sensitivity_targets(model)
    if not targets:
        raise ValueError("edkm.fisher: the model has no nn.Linear or nn.Embedding weight")
    weights = [w for _, w in targets]
    device = weights[0].device
    vocab = _vocab_size(model)
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    if num_batches is not None and hasattr(batches, "__len__") and len(batches) < num_batches:
        raise ValueError(
            f"edkm.fisher: the calibration set has {len(batches)} batches, fewer than the "
            f"num_batches={num_batches} requested"
        )

    sums = [torch.zeros(w.shape, dtype=torch.float32) for w in weights]
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    was_training = model.training
    count = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="edkm: Fisher sensitivity", unit="batch")
    try:
        # Only the target weights need gradients; torch.autograd.grad leaves every .grad alone.
        for p in all_params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.eval()
        for i, batch in enumerate(batches):
            if num_batches is not None and count >= num_batches:
                break
            ids = _as_batch(batch, i, vocab).to(device)
            loss = next_token_loss(model, ids)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"edkm.fisher: the loss of batch {i} is {loss.item()}")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g.detach().float().cpu().square())
            count += 1
            if bar is not None:
                bar.update(1)
    finally:
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
        model.train(was_training)
        if bar is not None:
            bar.close()
    if count == 0:
        raise ValueError("edkm.fisher: the calibration set is empty; pass at least one batch of token ids")
    if num_batches is not None and count < num_batches:
        raise ValueError(
            f"edkm.fisher: the calibration set has {count} batches, fewer than the num_batches={num_batches} requested"
        )
    return {name: s.div_(count) for (name, _), s in zip(targets, sums)}


def calibration_batches(
    tokenizer, texts, num_batches: int, batch_size: int, block_len: int, seed: int = 0
) -> torch.Tensor:
    """[num_batches, batch_size, block_len] token ids cut from ``texts`` (edkm.data.token_blocks:
    concatenated documents, non-overlapping blocks in a seeded order). Texts too short for that
    many blocks: a ValueError saying how many they give."""
    from edkm.data import token_blocks

    for key, v in (("num_batches", num_batches), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"edkm.calibration_batches: {key} must be an integer >= 1, got {v!r}")
    need = num_batches * batch_size
    try:
        blocks = token_blocks(tokenizer, texts, block_len, max_blocks=need, seed=seed)
    except ValueError as e:
        raise ValueError(
            f"edkm.calibration_batches: the calibration set is too short for "
            f"{num_batches} batches of {batch_size} x {block_len} tokens: {e}"
        ) from None
    if blocks.shape[0] < need:
        raise ValueError(
            f"edkm.calibration_batches: the calibration set is too short: it gives "
            f"{blocks.shape[0]} blocks of {block_len} tokens, {num_batches} batches of "
            f"{batch_size} need {need}"
        )
    return blocks.view(num_batches, batch_size, block_len)
