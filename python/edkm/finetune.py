"""Clustering-aware fine-tuning of a causal LM: next-token loss and/or distillation from the
uncompressed teacher, on corpus blocks and/or blocks the teacher writes (data-free), with a
learning-rate schedule, gradient accumulation, validation and exact checkpoint/resume.

The hyperparameters are one :class:`TrainConfig`; :func:`finetune` runs the loop. Works on any
model (clustered or not), so the gain from fine-tuning alone can be measured with the same loop.
Deterministic for a given seed on a given machine, across a kill and resume too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

SCHEDULES = ("constant", "linear", "cosine")
_CHECKPOINT_FORMAT = "edkm.finetune/1"
# Blocks sampled per teacher batch for data-free data (part of the cache key: keep it fixed).
DATA_FREE_BATCH = 16


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyperparameters (every field checked on construction; a bad one raises a
    ValueError naming it).

    lr: peak AdamW learning rate. schedule: after warm-up the lr stays ("constant"), or decays
        linearly / along a half cosine ("linear", "cosine") towards min_lr * lr at the last step.
    warmup: fraction of the steps over which the lr rises linearly, (s + 1) / W for step s < W,
        W = max(1, round(warmup * steps)). min_lr: the decay's floor, as a fraction of lr.
    batch_size: blocks per micro-batch. accumulate: micro-batches per optimizer step (their
        gradients are summed with each loss scaled by 1 / accumulate, and every micro-batch of a
        clustered model starts DKM from the same centroids: the update of one batch of
        batch_size * accumulate, to float rounding; with Config.cluster_dtype bf16 (the default)
        each micro-batch's weight gradient comes back through the weight's bf16 rounding, so the
        agreement is to bf16 precision). block_len: tokens per block.
    max_grad_norm: gradient clipping (0: none). weight_decay: AdamW's. seed: data order and sampling.
    alpha: distillation weight: loss = alpha * T^2 KL(teacher || student) + (1 - alpha) * CE
        (0: plain next-token loss, no teacher needed). temperature: T of the distillation.
    top_k: 0 runs the teacher next to the student on every micro-batch (the exact KL); k > 0
        computes the teacher's top-k once for all training blocks and distils over those k tokens
        plus one bucket for the rest (edkm.distill).
    data_free_fraction: fraction of the training blocks sampled from the teacher (edkm.datafree)
        instead of cut from the texts. data_free_first_token: "bos" or "random" (LLM-QAT).
    validation_fraction: fraction of the train *files* held out for validation
        (``pick_train_and_validation_texts``; the test split is never used).
    validation_tokens: at most this many validation tokens are scored.
    validation_interval: validate every this many steps (0: only at the end).
    checkpoint_interval: with a checkpoint path, write it every this many steps (and at the end).
    """

    lr: float = 5e-5
    schedule: str = "constant"
    warmup: float = 0.1
    min_lr: float = 0.0
    batch_size: int = 4
    accumulate: int = 1
    block_len: int = 256
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    alpha: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    data_free_fraction: float = 0.0
    data_free_first_token: str = "bos"
    validation_fraction: float = 0.0
    validation_tokens: int = 8192
    validation_interval: int = 0
    checkpoint_interval: int = 50

    def __post_init__(self):
        from edkm.datafree import FIRST_TOKENS

        def bad(name, expected):
            raise ValueError(f"edkm.TrainConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        def number(name, low, high, low_open=False, high_open=False):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
            if not ok:
                lo, hi = "(" if low_open else "[", ")" if high_open else "]"
                bad(name, f"a finite number in {lo}{low:g}, {high:g}{hi}")

        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                bad(name, f"an integer >= {low}")

        number("lr", 0, math.inf, low_open=True, high_open=True)
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        number("warmup", 0, 1)
        number("min_lr", 0, 1)
        integer("batch_size", 1)
        integer("accumulate", 1)
        integer("block_len", 2)
        number("max_grad_norm", 0, math.inf, high_open=True)
        number("weight_decay", 0, math.inf, high_open=True)
        integer("seed", 0)
        number("alpha", 0, 1)
        number("temperature", 0, math.inf, low_open=True, high_open=True)
        integer("top_k", 0)
        number("data_free_fraction", 0, 1)
        if self.data_free_first_token not in FIRST_TOKENS:
            bad("data_free_first_token", f"one of {FIRST_TOKENS}")
        number("validation_fraction", 0, 1, high_open=True)
        integer("validation_tokens", 0)
        integer("validation_interval", 0)
        integer("checkpoint_interval", 1)
        if self.validation_tokens and self.validation_tokens < self.block_len:
            bad("validation_tokens", f"0 or at least block_len ({self.block_len})")

    def lr_factor(self, step: int, steps: int) -> float:
        """The multiplier of ``lr`` at 0-based optimizer step ``step`` of ``steps``."""
        warm = max(1, int(round(self.warmup * steps)))
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, steps - warm)
        shape = 1.0 - frac if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_lr + (1.0 - self.min_lr) * shape

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


class FinetuneResult(list):
    """The per-step training losses (a list, as ``finetune`` always returned), with more:

    ce / kd: per-step next-token and distillation losses (kd None without distillation);
    lr: the learning rate of each step; validation: [{"step", "loss", "kl"}] (loss = next-token
    cross-entropy of the hard-assigned model on the validation blocks, kl = KL(teacher ||
    student) at T = 1 over the full vocabulary, None without a teacher); tokens: training tokens
    seen in all (resumed runs included); seconds and tokens_per_second: of this call;
    resumed_from: the step a checkpoint resumed at (0: a fresh start); config: the TrainConfig.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.ce: List[float] = []
        self.kd: List[Optional[float]] = []
        self.lr: List[float] = []
        self.validation: List[Dict] = []
        self.tokens = 0
        self.seconds = 0.0
        self.tokens_per_second = 0.0
        self.resumed_from = 0
        self.config: Optional[TrainConfig] = None


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


def pick_train_and_validation_texts(
    train_files: Sequence, steps: int, config: TrainConfig
) -> Tuple[List[str], List[str]]:
    """(texts, validation_texts) for ``finetune``: ``config.validation_fraction`` of the *train*
    files (whole documents, ``edkm.data.train_validation_split``) held out for validation, and
    just enough of each read for the steps and ``config.validation_tokens``."""
    from edkm.data import train_validation_split

    train, val = train_validation_split(train_files, config.validation_fraction, config.seed)
    n_corpus = _block_counts(steps, config)[0]
    texts = pick_texts(train, n_corpus * config.block_len, seed=config.seed) if n_corpus else []
    vtexts = pick_texts(val, config.validation_tokens, seed=config.seed) if val and config.validation_tokens else []
    return texts, vtexts


def _block_counts(steps: int, cfg: TrainConfig) -> Tuple[int, int]:
    """(corpus blocks, generated blocks) for ``steps`` optimizer steps."""
    n = steps * cfg.batch_size * cfg.accumulate
    n_gen = int(round(cfg.data_free_fraction * n))
    return n - n_gen, n_gen


def _resolve_config(config, overrides: Dict) -> TrainConfig:
    if config is None:
        config = TrainConfig()
    elif not isinstance(config, TrainConfig):
        raise ValueError(f"edkm.finetune: config must be an edkm.finetune.TrainConfig, got {type(config).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


def _check_teacher(model, tokenizer, teacher, teacher_tokenizer) -> None:
    from edkm.distill import check_vocab, model_vocab_size

    if teacher is model:
        raise ValueError(
            "edkm.finetune: teacher is the model being trained; pass a frozen copy made "
            "before palettize_ (e.g. copy.deepcopy(model))"
        )
    check_vocab(model_vocab_size(model), model_vocab_size(teacher))
    if teacher_tokenizer is not None and tokenizer is not None and teacher_tokenizer is not tokenizer:
        a, b = teacher_tokenizer.get_vocab(), tokenizer.get_vocab()
        if a != b:
            raise ValueError(
                f"distillation: the teacher's tokenizer has {len(a)} tokens, the student's "
                f"{len(b)}"
                + (" (same size, different tokens)" if len(a) == len(b) else "")
                + "; teacher and student must share one tokenizer"
            )


def _bos_token_id(tokenizer, teacher) -> Optional[int]:
    tid = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if tid is None:
        tid = getattr(getattr(teacher, "config", None), "bos_token_id", None)
    return None if tid is None else int(tid)


def training_blocks(
    tokenizer, texts, steps: int, config: "TrainConfig", teacher=None, data_free_cache=None, progress=True
):
    """The [n, block_len] token blocks :func:`finetune` trains on for ``steps`` steps with
    ``config`` (corpus blocks, teacher samples, mixed as finetune mixes them). With the same
    ``data_free_cache`` the samples are made once: finetune then reads them from the cache."""
    from edkm.distill import fingerprint_model

    teacher_id = fingerprint_model(teacher) if teacher is not None and data_free_cache is not None else None
    return _training_blocks(tokenizer, texts, steps, config, teacher, teacher_id, data_free_cache, progress)


def _training_blocks(tokenizer, texts, steps, cfg, teacher, teacher_id, data_free_cache, progress):
    from edkm.data import token_blocks
    from edkm.datafree import generate_blocks, mix_blocks

    n_corpus, n_gen = _block_counts(steps, cfg)
    corpus = generated = None
    if n_corpus:
        if tokenizer is None or not texts:
            raise ValueError(
                f"edkm.finetune: {n_corpus} of the training blocks come from texts "
                f"(data_free_fraction={cfg.data_free_fraction:g}) but no texts/tokenizer were given"
            )
        corpus = token_blocks(tokenizer, texts, cfg.block_len, max_blocks=n_corpus, seed=cfg.seed)
        if corpus.shape[0] < n_corpus:
            raise ValueError(
                f"edkm.finetune: the texts give {corpus.shape[0]} blocks of {cfg.block_len} tokens; "
                f"{steps} steps of {cfg.batch_size}"
                + (f" x {cfg.accumulate} micro-batches" if cfg.accumulate > 1 else "")
                + (f" with data_free_fraction={cfg.data_free_fraction:g}" if n_gen else "")
                + f" need {n_corpus}"
            )
    if n_gen:
        generated = generate_blocks(
            teacher,
            n_gen,
            cfg.block_len,
            batch_size=DATA_FREE_BATCH,
            seed=cfg.seed,
            first_token=cfg.data_free_first_token,
            bos_token_id=_bos_token_id(tokenizer, teacher) if cfg.data_free_first_token == "bos" else None,
            cache_dir=data_free_cache,
            teacher_id=teacher_id,
            progress=progress,
        )
    if generated is None:
        return corpus  # as the plain loop always cut them (no reshuffle)
    return mix_blocks(corpus, generated, seed=cfg.seed)


def _centroid_snapshot(model) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The warm-start centroids of every initialized clustered module: each forward in training
    mode moves them, and the micro-batches of one step must all start from the same ones."""
    from edkm.palettize import clustered_modules

    return [
        (m.edkm_centroids, m.edkm_centroids.detach().clone())
        for _, m in clustered_modules(model)
        if m.edkm_leader is None and m.edkm_initialized and not m.edkm_finalized
    ]


def _objective(model, batch, cfg: TrainConfig, teacher, teacher_topk):
    """(loss, ce, kd) of one micro-batch; kd None without distillation."""
    from edkm.distill import distillation_loss, teacher_logits

    out = model(input_ids=batch, labels=batch)
    ce = out.loss
    if cfg.alpha == 0:
        return ce, ce, None
    target = teacher_topk if teacher_topk is not None else teacher_logits(teacher, batch)
    kd = distillation_loss(out.logits, target, cfg.temperature)
    loss = kd if cfg.alpha == 1 else cfg.alpha * kd + (1 - cfg.alpha) * ce
    return loss, ce, kd


@torch.no_grad()
def validate(model, blocks: torch.Tensor, batch_size: int = 4, teacher=None) -> Dict[str, Optional[float]]:
    """{"loss": next-token cross-entropy per predicted token, "kl": KL(teacher || model) per
    position at T = 1 over the full vocabulary (None without a teacher)} on ``blocks`` [N, L],
    with the model in eval mode (a clustered model computes with its hard-assigned weights).
    The model's train/eval mode is restored."""
    from edkm.distill import distillation_loss, teacher_logits

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ce_sum = kl_sum = 0.0
    n_pred = n_pos = 0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            b = blocks[i : i + batch_size].to(device)
            out = model(input_ids=b, labels=b)
            k = b.shape[0] * (b.shape[1] - 1)
            ce_sum += float(out.loss) * k
            n_pred += k
            if teacher is not None:
                kl_sum += float(distillation_loss(out.logits, teacher_logits(teacher, b), 1.0)) * b.numel()
                n_pos += b.numel()
    finally:
        model.train(was_training)
    return {"loss": ce_sum / n_pred, "kl": kl_sum / n_pos if teacher is not None else None}


def _rng_state() -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> Optional[Dict]:
    """The checkpoint ``finetune`` wrote at ``path``, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"edkm.finetune: {path} is not a checkpoint edkm.finetune wrote")
    return ckpt


def _check_same_run(ckpt: Dict, path, **now) -> None:
    for key, value in now.items():
        if ckpt.get(key) != value:
            if key == "config":
                diff = sorted(k for k in value if ckpt["config"].get(k) != value[k])
                what = "config fields " + ", ".join(
                    f"{k} ({ckpt['config'].get(k)!r} there, {value[k]!r} now)" for k in diff
                )
            else:
                what = f"{key} ({ckpt.get(key)!r} there, {value!r} now)"
            raise ValueError(
                f"edkm.finetune: the checkpoint {path} is of another run: {what}; "
                f"delete it or pass another checkpoint path"
            )


def finetune(
    model,
    tokenizer,
    texts: Optional[Sequence[str]],
    steps: int,
    *,
    config: Optional[TrainConfig] = None,
    teacher=None,
    teacher_tokenizer=None,
    validation_texts: Optional[Sequence[str]] = None,
    checkpoint=None,
    teacher_cache=None,
    data_free_cache=None,
    on_step: Optional[Callable[[int, "FinetuneResult"], None]] = None,
    lr: Optional[float] = None,
    block_len: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    warmup: Optional[float] = None,
    progress: bool = True,
    desc: str = "edkm: fine-tuning",
) -> FinetuneResult:
    """``steps`` AdamW steps on blocks cut from ``texts``; returns the per-step losses (a
    :class:`FinetuneResult`, a list with more attributes).

    ``config`` holds the hyperparameters (:class:`TrainConfig`, default TrainConfig());
    ``lr``, ``block_len``, ``batch_size``, ``seed``, ``max_grad_norm`` and ``warmup``, when
    given, override its fields. With the defaults this is the plain loop: next-token loss,
    linear warm-up over 10% of the steps, then a constant lr.

    teacher: the uncompressed model (a frozen copy made before ``palettize_``), needed for
        config.alpha > 0 (distillation) or config.data_free_fraction > 0; it runs in eval mode
        under no_grad and is never updated. When given it is also scored in validation (kl).
        Its vocabulary (and ``teacher_tokenizer``'s, when given) must equal the student's.
    validation_texts: documents held out from training (see ``pick_train_and_validation_texts``);
        validated every config.validation_interval steps and at the end (result.validation).
    checkpoint: a path: written atomically every config.checkpoint_interval steps and at the
        end (model state_dict with the edkm state, optimizer, scheduler, RNG states, step, the
        losses so far, fingerprints of the data and teacher, the cache paths); when it exists,
        the run resumes from it and reaches the same weights, bit for bit, as an uninterrupted
        run. A checkpoint of a different run (config, steps, data or teacher) is refused.
    teacher_cache: a file for the teacher's top-k (config.top_k > 0); data_free_cache: a folder
        for the data-free blocks. On resume the paths recorded in the checkpoint are used when
        these are None.
    on_step(step, result): called after each step (and its checkpoint), step counting from 1.
    """
    from edkm.distill import compute_teacher_topk, fingerprint_model, fingerprint_tensor

    cfg = _resolve_config(
        config,
        dict(lr=lr, block_len=block_len, batch_size=batch_size, seed=seed, max_grad_norm=max_grad_norm, warmup=warmup),
    )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"edkm.finetune: steps must be an integer >= 1, got {steps!r}")
    needs_teacher = [f"{n}={getattr(cfg, n):g}" for n in ("alpha", "data_free_fraction") if getattr(cfg, n) > 0]
    if needs_teacher and teacher is None:
        raise ValueError(
            f"edkm.finetune: {' and '.join(needs_teacher)} needs a teacher (the model before palettize_): pass teacher="
        )
    if teacher is not None:
        _check_teacher(model, tokenizer, teacher, teacher_tokenizer)
        teacher.eval()

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None:
        teacher_cache = teacher_cache if teacher_cache is not None else ckpt.get("teacher_cache")
        data_free_cache = data_free_cache if data_free_cache is not None else ckpt.get("data_free_cache")
    cache_paths = (
        teacher_cache if cfg.alpha > 0 and cfg.top_k else None,
        data_free_cache if cfg.data_free_fraction > 0 else None,
    )
    teacher_id = None
    if teacher is not None and (ckpt_path is not None or any(p is not None for p in cache_paths)):
        teacher_id = fingerprint_model(teacher)

    blocks = _training_blocks(tokenizer, texts, steps, cfg, teacher, teacher_id, cache_paths[1], progress)
    val_blocks = None
    if validation_texts:
        from edkm.data import token_blocks

        if not cfg.validation_tokens:
            raise ValueError("edkm.finetune: validation_texts given but config.validation_tokens is 0")
        val_blocks = token_blocks(
            tokenizer, validation_texts, cfg.block_len, max_blocks=cfg.validation_tokens // cfg.block_len, seed=cfg.seed
        )
    topk = None
    if cfg.alpha > 0 and cfg.top_k:
        topk = compute_teacher_topk(
            teacher,
            blocks,
            cfg.top_k,
            cfg.temperature,
            batch_size=cfg.batch_size,
            cache_path=cache_paths[0],
            teacher_id=teacher_id,
            progress=progress,
        )

    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_factor(s, steps))
    result = FinetuneResult()
    result.config = cfg
    identity = dict(
        config=cfg.to_dict(),
        steps=steps,
        data=fingerprint_tensor(blocks).hexdigest(),
        validation_data=fingerprint_tensor(val_blocks).hexdigest() if val_blocks is not None else None,
        teacher=teacher_id,
    )
    start = 0
    if ckpt is not None:
        _check_same_run(ckpt, ckpt_path, **identity)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        result.extend(ckpt["losses"])
        result.ce, result.kd, result.lr = list(ckpt["ce"]), list(ckpt["kd"]), list(ckpt["lr"])
        result.validation = list(ckpt["validation"])
        result.resumed_from = start

    def write_checkpoint(step_done: int) -> None:
        _save_checkpoint(
            ckpt_path,
            dict(
                format=_CHECKPOINT_FORMAT,
                step=step_done,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                rng=_rng_state(),
                losses=list(result),
                ce=result.ce,
                kd=result.kd,
                lr=result.lr,
                validation=result.validation,
                teacher_cache=str(cache_paths[0]) if cache_paths[0] is not None else None,
                data_free_cache=str(cache_paths[1]) if cache_paths[1] is not None else None,
                **identity,
            ),
        )

    def run_validation(step_done: int) -> None:
        if val_blocks is not None and not (result.validation and result.validation[-1]["step"] == step_done):
            result.validation.append(dict(step=step_done, **validate(model, val_blocks, cfg.batch_size, teacher)))

    tokens_per_step = cfg.batch_size * cfg.accumulate * cfg.block_len
    per_step = cfg.batch_size * cfg.accumulate
    t0 = time.perf_counter()
    model.train()
    bar = None
    if progress and start < steps:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, unit="step")
    try:
        for step in range(start, steps):
            result.lr.append(opt.param_groups[0]["lr"])
            snapshot = _centroid_snapshot(model) if cfg.accumulate > 1 else []
            loss_sum, ce_sum, kd_sum = 0.0, 0.0, 0.0
            for m in range(cfg.accumulate):
                if m:
                    with torch.no_grad():
                        for live, saved in snapshot:
                            live.copy_(saved)
                lo = step * per_step + m * cfg.batch_size
                batch = blocks[lo : lo + cfg.batch_size].to(device)
                loss, ce, kd = _objective(
                    model, batch, cfg, teacher, topk[lo : lo + cfg.batch_size] if topk is not None else None
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"edkm.finetune: loss became {loss.item()} at step {step}")
                (loss / cfg.accumulate if cfg.accumulate > 1 else loss).backward()
                loss_sum += loss.item()
                ce_sum += ce.item()
                kd_sum += kd.item() if kd is not None else 0.0
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            result.append(loss_sum / cfg.accumulate)
            result.ce.append(ce_sum / cfg.accumulate)
            result.kd.append(kd_sum / cfg.accumulate if cfg.alpha > 0 else None)
            done = step + 1
            if cfg.validation_interval and done % cfg.validation_interval == 0 or done == steps:
                run_validation(done)
            if ckpt_path is not None and (done % cfg.checkpoint_interval == 0 or done == steps):
                write_checkpoint(done)
            elapsed = time.perf_counter() - t0
            if bar is not None:
                post = dict(
                    loss=f"{result[-1]:.3f}",
                    lr=f"{result.lr[-1]:.2e}",
                    tok_s=f"{(done - start) * tokens_per_step / max(elapsed, 1e-9):,.0f}",
                )
                if result.validation:
                    post["val"] = f"{result.validation[-1]['loss']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if on_step is not None:
                on_step(done, result)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    if start == steps:
        run_validation(steps)  # a finished checkpoint: its final validation is already there
    result.seconds = time.perf_counter() - t0
    result.tokens = len(result) * tokens_per_step
    result.tokens_per_second = (steps - start) * tokens_per_step / max(result.seconds, 1e-9)
    return result
