"""The compression recipe behind `edkm compress` and `edkm demo`, in one call.

    teacher copy -> calibration blocks -> Fisher sensitivity -> bits per matrix for a budget
    -> palettize_ (sensitivity-weighted k-means, outliers) -> error-compensated assignment
    (GPTQ over the LUTs, optional) -> fine-tuning (distillation, data-free blocks) -> finalize

Each stage runs only when something asks for it: the teacher when the fine-tuning distils or
samples data-free blocks (or calibration has no texts); the Fisher sensitivity when a module's
config uses it (``init="sensitivity"``, ``outlier_criterion="sensitivity"``) or a target
bits/weight is given; the input Hessians when ``gptq=True``. Calibration blocks come from the
training texts when there are some, else from the teacher's own samples, so a user with a
model and no corpus can run all of it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from edkm.config import Config
from edkm.finetune import TrainConfig


@dataclass
class RecipeResult:
    """What :func:`compress_model` did: the config applied (with the budget's bits per
    matrix), the fine-tuning result (losses, validation, tokens), and per-stage seconds."""

    config: Config
    training: Optional[list] = None
    mixed_precision: Optional[object] = None
    seconds: Dict[str, float] = field(default_factory=dict)
    teacher: Optional[nn.Module] = None
    gptq: Optional[dict] = None  # weight name -> edkm.gptq.GptqStats, when gptq=True


def needs_sensitivity(model: nn.Module, config: Config) -> bool:
    """True when a module's config uses per-weight sensitivities."""
    from edkm.modules import clustered_class

    for name, m in model.named_modules():
        if clustered_class(type(m)) is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        c = config.for_module(name, m)
        if c is not None and (
            c.init == "sensitivity" or (c.outlier_fraction > 0 and c.outlier_criterion == "sensitivity")
        ):
            return True
    return False


def frozen_copy(model: nn.Module) -> nn.Module:
    """The teacher: a copy of ``model`` as it is now, in eval mode, with no gradients."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def calibration_blocks(
    tokenizer,
    texts: Optional[Sequence[str]],
    teacher: Optional[nn.Module],
    batches: int,
    batch_size: int,
    block_len: int,
    seed: int = 0,
    cache_dir=None,
    progress: bool = True,
) -> torch.Tensor:
    """[batches, batch_size, block_len] token ids for the Fisher sensitivity: cut from
    ``texts`` when given, else sampled from ``teacher`` (edkm.datafree)."""
    from edkm.sensitivity import calibration_batches

    if texts:
        return calibration_batches(tokenizer, texts, batches, batch_size, block_len, seed=seed)
    if teacher is None:
        raise ValueError("edkm: calibration needs texts or a teacher to sample from")
    from edkm.datafree import generate_blocks

    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    blocks = generate_blocks(
        teacher,
        batches * batch_size,
        block_len,
        seed=seed + 1,
        bos_token_id=bos,
        first_token="bos"
        if (bos is not None or getattr(teacher.config, "bos_token_id", None) is not None)
        else "random",
        cache_dir=cache_dir,
        progress=progress,
        desc="edkm: calibration samples",
    )
    return blocks.view(batches, batch_size, block_len)


def compress_model(
    model: nn.Module,
    tokenizer,
    config: Config,
    *,
    steps: int = 0,
    train: Optional[TrainConfig] = None,
    texts: Optional[Sequence[str]] = None,
    validation_texts: Optional[Sequence[str]] = None,
    target_bits: Optional[float] = None,
    calibration_batches: int = 8,
    calibration_batch_size: int = 2,
    calibration_block_len: int = 256,
    teacher: Optional[nn.Module] = None,
    bits_choices: Sequence[int] = (2, 3, 4, 6, 16),
    checkpoint=None,
    cache_dir=None,
    keep_teacher: bool = False,
    gptq: bool = False,
    gptq_batches: int = 32,
    gptq_damp: float = 0.01,
    progress: bool = True,
) -> RecipeResult:
    """Run the recipe on ``model`` in place (palettized, fine-tuned for ``steps``, finalized).

    config: what to cluster and how (``edkm.Config``). target_bits: a bits/weight budget for
    the whole file; bits per matrix are then chosen from the Fisher-weighted error of each
    width (``edkm.mixed_precision``) among ``bits_choices`` (16: left unclustered, stored in
    the model's dtype; each width costs one post-training clustering of every matrix), the
    rest of ``config`` kept. train: the fine-tuning
    hyperparameters (``TrainConfig``; distillation when alpha > 0, teacher-sampled blocks when
    data_free_fraction > 0). texts / validation_texts: training and validation documents (from
    the train split; may be None when data_free_fraction is 1). teacher: the uncompressed model
    (default: a frozen copy of ``model`` made here, before clustering). checkpoint / cache_dir:
    the fine-tuning checkpoint file and the folder for teacher samples (both resume exactly).
    gptq: after clustering, move each clustered Linear weight onto its LUT by error-compensated
    assignment (:mod:`edkm.gptq`) instead of nearest rounding, from the input Hessians of the
    uncompressed model over ``gptq_batches`` calibration batches (``gptq_damp``: the damping,
    a fraction of the Hessian's mean diagonal); fine-tuning then starts from that assignment.
    """
    from edkm.finetune import finetune
    from edkm.palettize import finalize, palettize_

    train = TrainConfig() if train is None else train
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"edkm.compress_model: steps must be an integer >= 0, got {steps!r}")
    if target_bits is not None and (
        isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not target_bits > 0
    ):
        raise ValueError(f"edkm.compress_model: target_bits must be a number > 0, got {target_bits!r}")
    if not isinstance(gptq, bool):
        raise ValueError(f"edkm.compress_model: gptq must be True or False, got {gptq!r}")
    if gptq and (isinstance(gptq_batches, bool) or not isinstance(gptq_batches, int) or gptq_batches < 1):
        raise ValueError(f"edkm.compress_model: gptq_batches must be an integer >= 1, got {gptq_batches!r}")
    result = RecipeResult(config=config)
    sens_needed = target_bits is not None or needs_sensitivity(model, config)
    uses_teacher = steps > 0 and (train.alpha > 0 or train.data_free_fraction > 0)
    if teacher is None and (uses_teacher or ((sens_needed or gptq) and not texts)):
        teacher = frozen_copy(model)

    sensitivity = None
    if sens_needed:
        from edkm.sensitivity import fisher

        t0 = time.perf_counter()
        batches = calibration_blocks(
            tokenizer,
            texts,
            teacher,
            calibration_batches,
            calibration_batch_size,
            calibration_block_len,
            seed=train.seed,
            cache_dir=cache_dir,
            progress=progress,
        )
        sensitivity = fisher(model, batches, progress=progress)
        result.seconds["sensitivity"] = time.perf_counter() - t0
    if target_bits is not None:
        from edkm.mixed_precision import mixed_precision_config

        t0 = time.perf_counter()
        mp = mixed_precision_config(model, target_bits, sensitivity, config, bits_choices, progress=progress)
        result.mixed_precision = mp
        config = result.config = mp.config
        result.seconds["mixed_precision"] = time.perf_counter() - t0

    hessians = None
    if gptq:
        from edkm.gptq import input_hessians

        t0 = time.perf_counter()
        blocks = calibration_blocks(
            tokenizer,
            texts,
            teacher,
            gptq_batches,
            calibration_batch_size,
            calibration_block_len,
            seed=train.seed + 7,
            cache_dir=cache_dir,
            progress=progress,
        )
        hessians = input_hessians(model, blocks, progress=progress)
        result.seconds["hessians"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    palettize_(model, config, sensitivity=sensitivity, progress=progress)
    result.seconds["palettize"] = time.perf_counter() - t0
    del sensitivity
    if hessians is not None:
        from edkm.gptq import gptq_

        t0 = time.perf_counter()
        result.gptq = gptq_(model, hessians, damp=gptq_damp, progress=progress)
        result.seconds["gptq"] = time.perf_counter() - t0
        del hessians
    if steps:
        t0 = time.perf_counter()
        result.training = finetune(
            model,
            tokenizer,
            texts,
            steps,
            config=train,
            teacher=teacher if uses_teacher else None,
            validation_texts=validation_texts,
            checkpoint=checkpoint,
            data_free_cache=cache_dir,
            progress=progress,
        )
        result.seconds["finetune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    finalize(model, progress=progress)
    result.seconds["finalize"] = time.perf_counter() - t0
    if keep_teacher:
        result.teacher = teacher
    return result


def describe_training(training) -> List[str]:
    """Lines summing up a fine-tuning result (losses, validation, throughput)."""
    if not training:
        return []
    lines = [
        f"training loss: first {training[0]:.3f}, last {training[-1]:.3f} "
        f"({len(training)} steps, {training.tokens:,} tokens, {training.tokens_per_second:,.0f} tokens/s)"
    ]
    if training.validation:
        v = training.validation[-1]
        kl = f", KL to the teacher {v['kl']:.4f}" if v.get("kl") is not None else ""
        lines.append(f"validation (train-split documents held out): loss {v['loss']:.3f}{kl} at step {v['step']}")
    return lines
