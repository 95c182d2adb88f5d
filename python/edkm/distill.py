"""Knowledge distillation from the uncompressed teacher: the loss, and the teacher's top-k cache.

The loss on one token position, with teacher logits t and student logits s over a vocabulary of
V tokens and a temperature T, is

    p = softmax(t / T),  q = softmax(s / T)
    full:   T^2 * KL(p || q) = T^2 * sum_v p_v (log p_v - log q_v)

and is averaged over positions (every position of a block: each one has a teacher distribution
for the next token, the last one included). The T^2 factor keeps the gradient's scale
independent of T (Hinton et al., 2015).

To keep memory flat the teacher can instead be kept as its top-k (``TeacherTopK``): for each
position the k tokens S with the largest teacher logits, their teacher log-probabilities at
temperature T, and the teacher's log-probability of the rest R = V minus S, all computed once.
The loss is then the KL between the two distributions coarsened to k + 1 buckets (each token of
S, and R as one bucket):

    top-k:  T^2 * [ sum_{i in S} p_i (log p_i - log q_i) + p_R (log p_R - log q_R) ],
            p_R = sum_{v in R} p_v,  q_R = sum_{v in R} q_v

computed from the cached log p_i, log p_R and the student's full logits (log q_R is a
log-sum-exp over R). It is at most the full KL (coarsening never increases a KL divergence), and
equals it when k = V or when, within R, the student's distribution is proportional to the
teacher's. The cache holds k values, k indices and one rest value per position, instead of V.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

_CACHE_FORMAT = "edkm.teacher_topk/1"


@dataclass
class TeacherTopK:
    """A teacher's top-k next-token distribution, per position, at one temperature.

    ``logprobs`` [..., k] float32 (float64 from float64 logits): log p_i of the k most likely tokens (descending),
    ``indices`` [..., k] int64: those tokens, ``rest`` [...] float32: log p_R of all other tokens,
    ``temperature``: the T of p = softmax(logits / T), ``vocab_size``: V.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    temperature: float
    vocab_size: int

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    def __getitem__(self, item) -> "TeacherTopK":
        """The positions of some blocks (indexing the leading dimensions)."""
        return TeacherTopK(self.logprobs[item], self.indices[item], self.rest[item], self.temperature, self.vocab_size)

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(
            self.logprobs.to(device), self.indices.to(device), self.rest.to(device), self.temperature, self.vocab_size
        )


def _check_temperature(temperature) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
        or temperature == float("inf")
    ):
        raise ValueError(f"distillation temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """One clear error when the teacher predicts over a different vocabulary than the student."""
    if int(student_vocab) != int(teacher_vocab):
        raise ValueError(
            f"distillation: the teacher's vocabulary has {int(teacher_vocab)} tokens, the "
            f"student's {int(student_vocab)}; teacher and student must share one tokenizer "
            f"and vocabulary"
        )


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
    """The top-k summary of full teacher logits [..., V] (see the module docstring)."""
    temperature = _check_temperature(temperature)
    V = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"top_k must be an integer in [1, {V}] (the vocabulary), got {k!r}")
    dt = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    logp = F.log_softmax(teacher_logits.to(dt) / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    if k == V:
        rest = torch.full(values.shape[:-1], float("-inf"), dtype=values.dtype, device=values.device)
    else:
        # log p_R straight from the logits (not log1p(-sum p_i), which loses p_R when it is tiny)
        rest = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return TeacherTopK(values, indices, rest, temperature, V)


def distillation_loss(
    student_logits: torch.Tensor, teacher: Union[torch.Tensor, TeacherTopK], temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over positions (a scalar).

    ``student_logits`` [..., V]; ``teacher`` is either full logits of the same shape (the exact
    KL) or a :class:`TeacherTopK` for the same positions (the KL over the top-k tokens plus one
    bucket for the rest; see the module docstring for exactly what is computed). Computed in
    float32 (float64 for float64 inputs). Raises ValueError when the vocabularies differ.
    """
    temperature = _check_temperature(temperature)
    V = student_logits.shape[-1]
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    if isinstance(teacher, TeacherTopK):
        check_vocab(V, teacher.vocab_size)
        if abs(teacher.temperature - temperature) > 1e-12 * temperature:
            raise ValueError(
                f"distillation: the teacher's top-k was computed at temperature "
                f"{teacher.temperature:g}, the loss asks for {temperature:g}"
            )
        if tuple(teacher.indices.shape[:-1]) != tuple(student_logits.shape[:-1]):
            raise ValueError(
                f"distillation: teacher top-k positions {tuple(teacher.indices.shape[:-1])} "
                f"do not match the student's {tuple(student_logits.shape[:-1])}"
            )
        idx = teacher.indices.to(device=log_q.device, dtype=torch.long)
        log_p = teacher.logprobs.to(device=log_q.device, dtype=dt)
        kl = (log_p.exp() * (log_p - log_q.gather(-1, idx))).sum(-1)
        if teacher.k < V:
            log_p_rest = teacher.rest.to(device=log_q.device, dtype=dt)
            log_q_rest = log_q.scatter(-1, idx, float("-inf")).logsumexp(-1)
            kl = kl + log_p_rest.exp() * (log_p_rest - log_q_rest)
    else:
        check_vocab(V, teacher.shape[-1])
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"distillation: teacher logits {tuple(teacher.shape)} do not match the "
                f"student's {tuple(student_logits.shape)}"
            )
        log_p = F.log_softmax(teacher.to(device=log_q.device, dtype=dt) / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2


def model_vocab_size(model) -> int:
    """The number of logits the model predicts per position."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    raise ValueError(
        "distillation: cannot tell the model's vocabulary size (no output embeddings, no config.vocab_size)"
    )


def fingerprint_tensor(t: torch.Tensor, h=None):
    """Feed a tensor's dtype, shape and bytes to a blake2b hash (returns the hash object)."""
    h = h or hashlib.blake2b(digest_size=16)
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def fingerprint_model(model) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values): which teacher it is."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        fingerprint_tensor(t, h)
    return h.hexdigest()


@torch.no_grad()
def teacher_logits(teacher, blocks: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for token blocks [B, L] (eval mode, no grad), on the blocks' device."""
    device = next(teacher.parameters()).device
    return teacher(input_ids=blocks.to(device)).logits.to(blocks.device)


def compute_teacher_topk(
    teacher,
    blocks: torch.Tensor,
    k: int,
    temperature: float,
    *,
    batch_size: int = 4,
    cache_path: Optional[Union[str, os.PathLike]] = None,
    teacher_id: Optional[str] = None,
    progress: bool = True,
) -> TeacherTopK:
    """The teacher's top-k (see :class:`TeacherTopK`) for every block of ``blocks`` [N, L].

    Runs the teacher once over all blocks, ``batch_size`` at a time, in eval mode under no_grad.
    With ``cache_path``, a cache written for the same blocks, k, temperature and teacher (its
    ``fingerprint_model``, or ``teacher_id``) is loaded instead, and a new one is written
    atomically (a temporary file, then ``os.replace``); a cache for anything else is recomputed
    and overwritten.
    """
    temperature = _check_temperature(temperature)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be [N, L] token ids, got shape {tuple(blocks.shape)}")
    V = model_vocab_size(teacher)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"top_k must be an integer in [1, {V}] (the teacher's vocabulary), got {k!r}")
    key = None
    if cache_path is not None:
        teacher_id = teacher_id or fingerprint_model(teacher)
        h = fingerprint_tensor(blocks)
        h.update(f"{k}|{temperature!r}|{V}|{teacher_id}".encode())
        key = h.hexdigest()
        cached = load_teacher_topk(cache_path, key)
        if cached is not None:
            return cached
    was_training = teacher.training
    teacher.eval()
    parts = []
    from tqdm import tqdm

    try:
        with tqdm(
            total=blocks.numel(),
            desc="edkm: teacher top-k",
            unit="tok",
            unit_scale=True,
            disable=not progress,
            leave=False,
        ) as bar:
            for i in range(0, blocks.shape[0], batch_size):
                chunk = blocks[i : i + batch_size]
                parts.append(teacher_topk(teacher_logits(teacher, chunk), k, temperature))
                bar.update(chunk.numel())
    finally:
        teacher.train(was_training)
    out = TeacherTopK(
        torch.cat([p.logprobs for p in parts]),
        torch.cat([p.indices for p in parts]),
        torch.cat([p.rest for p in parts]),
        temperature,
        V,
    )
    if cache_path is not None:
        save_teacher_topk(out, cache_path, key)
    return out


def save_teacher_topk(topk: TeacherTopK, path, key: str) -> None:
    """Write the cache atomically (a temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {
            "format": _CACHE_FORMAT,
            "key": key,
            "logprobs": topk.logprobs.cpu(),
            "indices": topk.indices.to(torch.int32).cpu(),
            "rest": topk.rest.cpu(),
            "temperature": topk.temperature,
            "vocab_size": topk.vocab_size,
        },
        tmp,
    )
    os.replace(tmp, path)


def load_teacher_topk(path, key: Optional[str] = None) -> Optional[TeacherTopK]:
    """The cache at ``path`` when it exists and was written for ``key`` (any key when None), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        d = torch.load(path, weights_only=True)
    except Exception:  # an unreadable cache is only a cache: recompute it
        return None
    if not isinstance(d, dict) or d.get("format") != _CACHE_FORMAT or (key is not None and d.get("key") != key):
        return None
    return TeacherTopK(d["logprobs"], d["indices"].long(), d["rest"], float(d["temperature"]), int(d["vocab_size"]))
