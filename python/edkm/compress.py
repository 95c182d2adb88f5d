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
    p.add_argument("model", help="a local Hugging Face directory, .safetensors (config.json beside it) "
                   "or .gguf file; 'smollm2-135m'; or 'llama-7b-synthetic'")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--bits", type=int, default=3, help="bits per weight, 1..8 (default 3)")
    p.add_argument("--group-size", type=int, default=None,
                   help="output channels per look-up table (default: one LUT per matrix)")
    p.add_argument("--cluster-dim", type=int, default=1, help="cluster vectors of this many weights (default 1)")
    p.add_argument("--embedding-bits", default="same",
                   help="bits for the input embedding and lm_head: a number, 'same' (as --bits, "
                        "the default) or 'none' (keep them unclustered)")
    p.add_argument("--init", default="auto", choices=("auto", "optimal", "kmeans++"))
    p.add_argument("--temperature", type=float, default=0.02, help="relative to the weight variance")
    p.add_argument("--steps", type=int, default=0, help="clustering-aware fine-tuning steps (default 0)")
    p.add_argument("--data", default=None, help="data directory for --steps (default ../shared/data when present)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (linear warm-up over 10%% of the steps)")
    p.add_argument("--block-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=4)
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
        base = Config(bits=args.bits, group_size=args.group_size, cluster_dim=args.cluster_dim,
                      init=args.init, temperature=args.temperature, seed=args.seed)
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
    src = weight if cfg.cluster_dtype is None or weight.dtype in (torch.bfloat16, torch.float16) \
        else weight.to(cfg.cluster_dtype)
    init = init_centroids(src, groups, cfg.k, cfg.cluster_dim, cfg.init, cfg.seed, name=name)
    c = init.centroids.to(torch.float16).to(torch.float32)
    idx = ops.assign(src, c).reshape(-1) if cfg.cluster_dim == 1 else vector_assign(src, c)
    return idx, c, groups


def compress_synthetic(out: str, config: Config, layers: Optional[int] = None, seed: int = 0,
                       progress: bool = True) -> Dict:
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
    with FileWriter(out, entries, metadata_for(layouts, {})) as w:
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
    return {"model": models.LLAMA7B_SYNTHETIC, "layers": layers or models.LLAMA7B["layers"],
            "weights": n_weights, "seconds": time.perf_counter() - t0, "file_bytes": size,
            "bf16_bytes": 2 * n_weights, "peak_rss_bytes": _peak_rss()}


# ---- Hugging Face models ----------------------------------------------------------------------

def compress_model(args, config: Config) -> Dict:
    from edkm import format as fmt
    from edkm.models import load_model
    from edkm.palettize import finalize, palettize_

    t0 = time.perf_counter()
    model, tok = load_model(args.model, torch.float32)
    n_weights = sum(p.numel() for p in model.parameters())
    palettize_(model, config, progress=True)
    losses = []
    if args.steps:
        from edkm.data import corpus_split, default_data_dir
        from edkm.finetune import finetune, pick_texts
        if tok is None:
            raise SystemExit(f"edkm compress: {args.model} has no tokenizer; --steps needs one")
        data_dir = args.data or default_data_dir()
        if data_dir is None:
            raise SystemExit("edkm compress: --steps needs --data DIR (no ../shared/data found)")
        train, _ = corpus_split(data_dir)
        texts = pick_texts(train, args.steps * args.batch_size * args.block_len, seed=args.seed)
        losses = finetune(model, tok, texts, args.steps, lr=args.lr, block_len=args.block_len,
                          batch_size=args.batch_size, seed=args.seed)
    finalize(model, progress=True)
    base = args.model if args.model in ("smollm2-135m",) else str(Path(args.model).resolve())
    size = fmt.save(model, args.out, metadata={"edkm.base_model": base})
    return {"model": args.model, "weights": n_weights, "seconds": time.perf_counter() - t0,
            "file_bytes": size, "bf16_bytes": 2 * n_weights, "peak_rss_bytes": _peak_rss(),
            "losses": losses}


def main(args) -> int:
    from edkm import models
    from edkm.format import info

    config = make_config(args)
    if args.model == models.LLAMA7B_SYNTHETIC:
        summary = compress_synthetic(args.out, config, args.layers, args.seed)
    else:
        if args.layers is not None:
            raise SystemExit("edkm compress: --layers applies to llama-7b-synthetic only")
        summary = compress_model(args, config)
    summary.update(bits=args.bits, group_size=args.group_size, embedding_bits=args.embedding_bits,
                   out=str(args.out))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    info(args.out)
    print(f"\nedkm compress: {summary['weights']:,} weights in {summary['seconds']:.1f} s, "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB; "
          f"{summary['file_bytes'] / 2**30:.3f} GiB written "
          f"(bf16: {summary['bf16_bytes'] / 2**30:.2f} GiB, "
          f"{summary['bf16_bytes'] / summary['file_bytes']:.2f}x smaller)")
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
