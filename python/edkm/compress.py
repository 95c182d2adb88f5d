"""`edkm compress` and `edkm info`: a model in, a packed n-bit file out.

Hugging Face models go through the Python API (palettize_ -> optional clustering fine-tune ->
finalize -> save). ``llama-7b-synthetic`` is streamed tensor by tensor straight into the file
(generate, cluster, pack, write), so a 7B model compresses in a few GB of memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from edkm.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a local Hugging Face directory, .safetensors (config.json beside it) "
        "or .gguf file; 'smollm2-135m'; or 'llama-7b-synthetic'",
    )
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--bits", type=int, default=3, help="bits per weight, 1..8 (default 3)")
    p.add_argument(
        "--group-size", type=int, default=None, help="output channels per look-up table (default: one LUT per matrix)"
    )
    p.add_argument("--cluster-dim", type=int, default=1, help="cluster vectors of this many weights (default 1)")
    p.add_argument(
        "--embedding-bits",
        default="same",
        help="bits for the input embedding and lm_head: a number, 'same' (as --bits, "
        "the default) or 'none' (keep them unclustered)",
    )
    p.add_argument(
        "--plain-dtype",
        default="auto",
        choices=("auto", "keep", "bfloat16", "float16", "float32"),
        help="how unclustered tensors (norms, unclustered matrices) are stored: 'auto' (the "
        "default) in the model's 16-bit dtype (its config's float16/bfloat16; bfloat16 "
        "for a float32 model such as a dequantized GGUF), 'keep' in their own dtype",
    )
    p.add_argument(
        "--init",
        default="auto",
        choices=("auto", "optimal", "kmeans++", "sensitivity"),
        help="centroid initialization; 'sensitivity' weights each weight by its Fisher "
        "information from calibration batches (SqueezeLLM)",
    )
    p.add_argument("--temperature", type=float, default=0.02, help="relative to the weight variance")
    p.add_argument(
        "--outlier-fraction",
        type=float,
        default=0.0,
        help="fraction of each matrix's weights kept exactly in 16 bits (0..0.1, default 0)",
    )
    p.add_argument(
        "--outlier-criterion",
        default="magnitude",
        choices=("magnitude", "sensitivity"),
        help="outliers are the largest |w| or the largest Fisher * w^2",
    )
    p.add_argument(
        "--target-bits",
        type=float,
        default=None,
        help="bits/weight for the whole file: bits per matrix (2-8, or 16 to keep one) chosen "
        "by Fisher-weighted clustering error; overrides --bits and --embedding-bits",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=8,
        help="batches (2 x 256 tokens) for the Fisher sensitivity (default 8)",
    )
    p.add_argument(
        "--gptq",
        action="store_true",
        help="error-compensated assignment: each Linear's weights take the centroids that keep "
        "its outputs closest on calibration text (GPTQ over the LUTs), not the nearest ones",
    )
    p.add_argument(
        "--gptq-batches",
        type=int,
        default=32,
        help="batches (2 x 256 tokens) for the input Hessians of --gptq (default 32)",
    )
    t = p.add_argument_group("fine-tuning (--steps N)")
    t.add_argument("--steps", type=int, default=0, help="clustering-aware fine-tuning steps (default 0)")
    t.add_argument(
        "--data", default=None, help="data directory (default ../shared/data when present; 'none': use no corpus)"
    )
    t.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    t.add_argument(
        "--schedule",
        default="constant",
        choices=("constant", "linear", "cosine"),
        help="after the warm-up (10%% of the steps)",
    )
    t.add_argument("--block-len", type=int, default=256, help="tokens per training sequence")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument(
        "--distill",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="weight of KL(teacher || student) in the loss, 0..1 (the rest is next-token loss); "
        "the teacher is the model before clustering",
    )
    t.add_argument("--distill-temperature", type=float, default=1.0)
    t.add_argument(
        "--teacher-top-k",
        type=int,
        default=0,
        help="distil over the teacher's top-k logits computed once (0: run the teacher every step)",
    )
    t.add_argument(
        "--data-free",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of the training blocks sampled from the teacher itself (1: no corpus needed)",
    )
    t.add_argument(
        "--validation-fraction",
        type=float,
        default=0.05,
        help="fraction of the train files held out for validation loss (default 0.05)",
    )
    t.add_argument("--checkpoint", default=None, help="checkpoint file: written during training, resumed from")
    t.add_argument("--cache-dir", default=None, help="folder for the teacher's samples (default: beside --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="llama-7b-synthetic: only this many decoder layers")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def make_config(args) -> Config:
    emb = str(args.embedding_bits).lower()
    if emb == "same":
        emb_cfg = {}
    elif emb == "none":
        emb_cfg = None
    else:
        try:
            emb_cfg = {"bits": int(emb)}
        except ValueError:
            raise SystemExit(f"edkm compress: --embedding-bits must be a number, 'same' or 'none', got {emb!r}")
    try:
        base = Config(
            bits=args.bits,
            group_size=args.group_size,
            cluster_dim=args.cluster_dim,
            init=args.init,
            temperature=args.temperature,
            seed=args.seed,
            outlier_fraction=getattr(args, "outlier_fraction", 0.0),
            outlier_criterion=getattr(args, "outlier_criterion", "magnitude"),
        )
        names = {r"(.*\.)?lm_head": emb_cfg} if emb_cfg != {} else {}
        types = {"Embedding": emb_cfg} if emb_cfg != {} else {}
        return base.replace(module_names=names, module_types=types)
    except ValueError as e:
        raise SystemExit(f"edkm compress: {e}")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the streamed synthetic LLaMA-7B --------------------------------------------------------


def _meta_module(name: str, shape) -> nn.Module:
    if name.endswith("embed_tokens.weight"):
        return nn.Embedding(shape[0], shape[1], device="meta")
    return nn.Linear(shape[1], shape[0], bias=False, device="meta")


@torch.no_grad()
def cluster_tensor(weight: torch.Tensor, cfg: Config, name: str):
    """Post-training clustering of one tensor: (indices, fp16-exact centroids, groups)."""
    from edkm import ops
    from edkm.init import init_centroids
    from edkm.vector_dkm import vector_assign

    rows = weight.shape[0]
    if cfg.group_size is not None and rows % cfg.group_size:
        raise ValueError(f"edkm: group_size {cfg.group_size} must divide {name}'s {rows} rows")
    groups = rows // cfg.group_size if cfg.group_size else 1
    src = (
        weight
        if cfg.cluster_dtype is None or weight.dtype in (torch.bfloat16, torch.float16)
        else weight.to(cfg.cluster_dtype)
    )
    init = init_centroids(src, groups, cfg.k, cfg.cluster_dim, cfg.init, cfg.seed, name=name)
    c = init.centroids.to(torch.float16).to(torch.float32)
    idx = ops.assign(src, c).reshape(-1) if cfg.cluster_dim == 1 else vector_assign(src, c)
    return idx, c, groups


def compress_synthetic(
    out: str, config: Config, layers: Optional[int] = None, seed: int = 0, progress: bool = True
) -> Dict:
    from edkm import models
    from edkm.format import FileWriter, Layout, clustered_entries, metadata_for, pack_clustered

    tensors = list(models.llama7b_synthetic_tensors(layers, seed))
    plan = {}
    entries = []
    layouts = {}
    for name, shape, _ in tensors:
        cfg = config.for_module(name[: -len(".weight")], _meta_module(name, shape)) if len(shape) == 2 else None
        plan[name] = cfg
        if cfg is None:
            entries.append((name, torch.bfloat16, shape))
            continue
        if cfg.group_size is not None and shape[0] % cfg.group_size:
            raise ValueError(f"edkm: group_size {cfg.group_size} must divide {name}'s {shape[0]} rows")
        groups = shape[0] // cfg.group_size if cfg.group_size else 1
        layouts[name] = Layout(cfg.bits, tuple(shape), torch.bfloat16, groups, cfg.cluster_dim)
        entries += clustered_entries(name, layouts[name])
    t0 = time.perf_counter()
    n_weights = 0
    bar = tensors
    if progress:
        from tqdm import tqdm

        bar = tqdm(tensors, desc="edkm: llama-7b-synthetic", unit="tensor")
    meta = dict(metadata_for(layouts, {}), **{"edkm.base_model": models.LLAMA7B_SYNTHETIC})
    with FileWriter(out, entries, meta) as w:
        for name, shape, make in bar:
            t = make()
            n_weights += t.numel()
            cfg = plan[name]
            if cfg is None:
                w.write(name, t)
                continue
            idx, c, _ = cluster_tensor(t, cfg, name)
            packed, lut = pack_clustered(idx, c, layouts[name])
            w.write(f"{name}.indices", packed)
            w.write(f"{name}.lut", lut)
            del t, idx, packed
        size = w.commit()
    return {
        "model": models.LLAMA7B_SYNTHETIC,
        "layers": layers or models.LLAMA7B["layers"],
        "weights": n_weights,
        "seconds": time.perf_counter() - t0,
        "file_bytes": size,
        "bf16_bytes": 2 * n_weights,
        "peak_rss_bytes": _peak_rss(),
    }


# ---- Hugging Face models ----------------------------------------------------------------------


def train_config(args):
    """The fine-tuning hyperparameters of the command line."""
    from edkm.finetune import TrainConfig

    try:
        return TrainConfig(
            lr=args.lr,
            schedule=args.schedule,
            batch_size=args.batch_size,
            accumulate=args.accumulate,
            block_len=args.block_len,
            seed=args.seed,
            alpha=args.distill,
            temperature=args.distill_temperature,
            top_k=args.teacher_top_k,
            data_free_fraction=args.data_free,
            validation_fraction=args.validation_fraction,
        )
    except ValueError as e:
        raise SystemExit(f"edkm compress: {e}")


def training_texts(args, train_cfg, steps: int, needs_texts: bool):
    """(texts, validation_texts) from the corpus train split, or (None, None) without a corpus."""
    from edkm.data import corpus_split, default_data_dir
    from edkm.finetune import pick_train_and_validation_texts

    data_dir = None if args.data is not None and str(args.data).lower() == "none" else (args.data or default_data_dir())
    if data_dir is None:
        if needs_texts:
            raise SystemExit(
                "edkm compress: --steps needs --data DIR (no ../shared/data found), "
                "or --data-free 1 to train on text the model itself writes"
            )
        return None, None
    train, _ = corpus_split(data_dir)
    return pick_train_and_validation_texts(train, max(steps, 1), train_cfg)


def compress_model(args, config: Config) -> Dict:
    from edkm import format as fmt
    from edkm.models import load_model
    from edkm.recipe import compress_model as run_recipe, describe_training, needs_sensitivity

    t0 = time.perf_counter()
    model, tok = load_model(args.model, torch.float32)
    n_weights = sum(p.numel() for p in model.parameters())
    tcfg = train_config(args)
    wants_texts = args.steps > 0 and tcfg.data_free_fraction < 1
    calibrates = args.target_bits is not None or needs_sensitivity(model, config) or args.gptq
    if (args.steps or calibrates) and tok is None:
        raise SystemExit(f"edkm compress: {args.model} has no tokenizer; fine-tuning and calibration need one")
    texts = vtexts = None
    if args.steps or calibrates:
        texts, vtexts = training_texts(args, tcfg, args.steps, wants_texts)
    cache = args.cache_dir or str(Path(args.out).resolve().parent / ".edkm-cache")
    r = run_recipe(
        model,
        tok,
        config,
        steps=args.steps,
        train=tcfg,
        texts=texts,
        validation_texts=vtexts,
        target_bits=args.target_bits,
        calibration_batches=args.calibration_batches,
        gptq=args.gptq,
        gptq_batches=args.gptq_batches,
        checkpoint=args.checkpoint,
        cache_dir=cache,
        progress=True,
    )
    for line in describe_training(r.training):
        print(f"edkm compress: {line}", file=sys.stderr)
    base = args.model if args.model in ("smollm2-135m",) else str(Path(args.model).resolve())
    size = fmt.save(model, args.out, metadata={"edkm.base_model": base}, plain_dtype=args.plain_dtype)
    summary = {
        "model": args.model,
        "weights": n_weights,
        "seconds": time.perf_counter() - t0,
        "file_bytes": size,
        "bf16_bytes": 2 * n_weights,
        "peak_rss_bytes": _peak_rss(),
        "losses": list(r.training or []),
        "stage_seconds": r.seconds,
    }
    if r.training:
        summary.update(validation=r.training.validation, tokens=r.training.tokens)
    if r.gptq:
        from edkm.gptq import median_ratio

        summary["gptq_median_output_error_ratio"] = median_ratio(r.gptq)
        print(
            f"edkm compress: error-compensated assignment of {len(r.gptq)} matrices: median output "
            f"error {median_ratio(r.gptq):.3f}x nearest rounding's on the calibration text",
            file=sys.stderr,
        )
    if r.mixed_precision is not None:
        summary.update(
            target_bits=args.target_bits,
            bits_per_matrix=r.mixed_precision.bits,
            predicted_bits_per_weight=r.mixed_precision.bits_per_weight,
        )
    return summary


def main(args) -> int:
    from edkm import models
    from edkm.format import info

    config = make_config(args)
    if args.model == models.LLAMA7B_SYNTHETIC:
        if (
            args.steps
            or args.target_bits is not None
            or config.init == "sensitivity"
            or config.outlier_fraction
            or args.gptq
        ):
            raise SystemExit(
                "edkm compress: llama-7b-synthetic is streamed without a forward pass: --steps, "
                "--target-bits, --init sensitivity, --outlier-fraction and --gptq do not apply to it"
            )
        summary = compress_synthetic(args.out, config, args.layers, args.seed)
    else:
        if args.layers is not None:
            raise SystemExit("edkm compress: --layers applies to llama-7b-synthetic only")
        if args.target_bits is not None and args.embedding_bits != "same":
            raise SystemExit("edkm compress: --target-bits chooses every matrix's bits; drop --embedding-bits")
        if isinstance(args.gptq_batches, bool) or args.gptq_batches < 1:
            raise SystemExit(f"edkm compress: --gptq-batches must be >= 1, got {args.gptq_batches}")
        summary = compress_model(args, config)
    summary.update(bits=args.bits, group_size=args.group_size, embedding_bits=args.embedding_bits, out=str(args.out))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    info(args.out)
    print(
        f"\nedkm compress: {summary['weights']:,} weights in {summary['seconds']:.1f} s, "
        f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB; "
        f"{summary['file_bytes'] / 2**30:.3f} GiB written "
        f"(bf16: {summary['bf16_bytes'] / 2**30:.2f} GiB, "
        f"{summary['bf16_bytes'] / summary['file_bytes']:.2f}x smaller)"
    )
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a file written by edkm compress / edkm.save")
    p.add_argument("--json", action="store_true")


def info_main(args) -> int:
    from edkm.format import info

    r = info(args.file, verbose=not args.json)
    if args.json:
        print(json.dumps(r, indent=2))
    return 0
