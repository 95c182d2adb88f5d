"""`edkm bench study`: which tool keeps SmolLM2-135M best at which file size (issue 14).

Every row starts from the same weights (the Q4_1 GGUF of SmolLM2-135M, dequantized to fp32: the
baseline), is evaluated by the same harness on the same items, and states its size in bits per
weight over all 134,515,008 parameters (the tied embedding / lm_head counted once):

  baseline        the model as loaded, counted at 16 bits (bf16)
  rtnB, kmeansB   round-to-nearest and post-training k-means, one LUT per matrix, B bits
                  (edkm bench accuracy's rows); size = the edkm file
  squeezellmB     SqueezeLLM-style post-training clustering: Fisher-weighted k-means plus 0.5%
                  Fisher-chosen outliers kept exactly (dense-and-sparse), no training
  Q2_K ... Q4_K_S llama.cpp's own quantizer (llama-cpp-python, pinned in requirements-study.txt)
                  requantizes the Q4_1 GGUF (allow_requantize) with its default mix for that
                  type; the result is dequantized by the gguf package (transformers' GGUF
                  loader) and evaluated here; size = the GGUF's tensor data (its tokenizer and
                  metadata not counted). On SmolLM2 (rows of 576, no multiple of the k-quants'
                  256) llama.cpp falls back to Q4_0/Q5_0 for most matrices and keeps the tied
                  embedding in Q8_0, so these land at 5.1-6.0 bits/weight.
  Q4_0-pure       llama.cpp's Q4_0 for every matrix, the embedding included (--pure
                  --token-embedding-type q4_0): 4.5 bits/weight, its smallest layout here.
                  With --llama-cpp-check llama.cpp also scores the held-out text itself, on the
                  same tokens and windows, for the baseline and the GGUF rows.
  hqqB            HQQ (PyPI hqq, pinned) at B bits, groups of 128 consecutive weights (row-major),
                  fp16 scale and zero per group (B + 0.25 bits per weight), every Linear and the
                  embedding; norms stay 16-bit. Run on CPU and dequantized for evaluation.
  edkm-ce         eDKM with the old recipe: k-means start, 40 steps of next-token loss (lr 5e-4,
                  4 x 256 tokens; edkm bench accuracy's edkm row), 3 bits
  finetune        the unclustered model fine-tuned with the same loop, data and steps (control)
  NAME=PATH       an edkm file made elsewhere (the long runs of
                  benchmarks/results/study/train_edkm.py), evaluated as is; size = the file

Metrics: held-out perplexity (corpus test split, context 512, stride 256, --eval-tokens);
KL(baseline || row) and top-1 next-token agreement with the baseline on held-out test-split
blocks (--kl-tokens); PIQA, ARC-Easy and LAMBADA (--limit items of each, 0 = all) with per-item
outcomes, and exact McNemar tests between every eDKM row and the best other row of its size.

Each row is written to OUT/rows/NAME.json as soon as it is done (rows already there are kept,
so a study is built up over several runs and resumed); ``--report`` assembles OUT/study.json,
study.md (a table per size) and study.png (the Pareto chart). Nothing here reads a test-split
number to choose anything: every setting is fixed in advance.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

GGUF_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_0-pure")
GGML_Q4_0 = 2  # ggml_type of Q4_0
SIZE_GROUPS = (("near 3 bits", 3.3), ("near 4 bits", 4.3))
EDKM_CE_STEPS = 40
HQQ_GROUP = 128
SQUEEZELLM_OUTLIERS = 0.005
DEFAULTS = dict(limit=500, eval_tokens=16384, kl_tokens=4096)
KL_BLOCK = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "rows",
        nargs="*",
        help="rows to compute: baseline, rtnB, kmeansB, squeezellmB, gptqB, hqqB (B = bits), "
        + ", ".join(GGUF_TYPES)
        + ", edkm-ce, finetune, or NAME=PATH (an edkm file)",
    )
    p.add_argument("--report", action="store_true", help="assemble the rows done so far into study.{json,md,png}")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/study)")
    p.add_argument("--data-dir", default=None, help="corpus and eval data (default ../shared/data)")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULTS["limit"],
        help=f"items of each zero-shot task (default {DEFAULTS['limit']}; 0 = all)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=DEFAULTS["eval_tokens"],
        help=f"held-out tokens for perplexity (default {DEFAULTS['eval_tokens']})",
    )
    p.add_argument(
        "--kl-tokens",
        type=int,
        default=DEFAULTS["kl_tokens"],
        help=f"held-out positions for KL / top-1 agreement (default {DEFAULTS['kl_tokens']})",
    )
    p.add_argument(
        "--llama-cpp-check",
        action="store_true",
        help="GGUF rows: also let llama.cpp score the held-out text (same tokens and windows)",
    )
    p.add_argument(
        "--import-accuracy",
        default=None,
        metavar="JSON",
        help="take the rtn3, kmeans3, edkm-ce and finetune rows from an `edkm bench accuracy` "
        "result (one LUT per matrix, 3 bits, the same items and tokens) instead of "
        "recomputing them; their KL and top-1 agreement are then not measured",
    )
    p.add_argument(
        "--check-tokens", type=int, default=4096, help="held-out tokens of the llama.cpp harness check (default 4096)"
    )
    p.add_argument("--redo", action="store_true", help="recompute rows that are already done")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- row names


def parse_row(name: str) -> dict:
    """{"name", "kind", "bits"?, "path"?} for a row name; ValueError names what is accepted."""
    if "=" in name:
        label, path = name.split("=", 1)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label) or not path:
            raise ValueError(
                f"edkm bench study: row {name!r}: expected NAME=PATH with NAME of letters, "
                f"digits and _.+- and PATH an edkm file"
            )
        return {"name": label, "kind": "file", "path": path}
    if name in ("baseline", "edkm-ce", "finetune"):
        return {"name": name, "kind": name}
    if name in GGUF_TYPES:
        return {"name": name, "kind": "gguf"}
    m = re.fullmatch(r"(rtn|kmeans|squeezellm|gptq|hqq)([2-8])", name)
    if m:
        return {"name": name, "kind": m.group(1), "bits": int(m.group(2))}
    raise ValueError(
        f"edkm bench study: unknown row {name!r}; expected baseline, rtnB, kmeansB, squeezellmB, "
        f"gptqB, hqqB (B = 2..8), {', '.join(GGUF_TYPES)}, edkm-ce, finetune or NAME=PATH"
    )


def method_of(row_name: str) -> str:
    """The method family a row belongs to (one marker per family in the chart)."""
    if row_name in GGUF_TYPES:
        return "llama.cpp k-quants"
    for prefix, label in (
        ("rtn", "round-to-nearest"),
        ("kmeans", "k-means (post-training)"),
        ("squeezellm", "SqueezeLLM-style (post-training)"),
        ("gptq", "GPTQ over LUTs (post-training)"),
        ("hqq", "HQQ"),
        ("edkm-ce", "eDKM, old recipe (40 steps CE)"),
        ("finetune", "fine-tune control"),
        ("baseline", "baseline"),
    ):
        if row_name.startswith(prefix):
            return label
    return "eDKM, new recipe, GPTQ start" if "gptq" in row_name else "eDKM, new recipe"


def size_group(bits: float) -> Optional[str]:
    for label, limit in SIZE_GROUPS:
        if bits <= limit + 1e-9 and (label != "near 4 bits" or bits > SIZE_GROUPS[0][1]):
            return label
    return None


# ----------------------------------------------------------------------------- builders


def use_study_extras(module: str):
    """Import ``module`` (llama_cpp or hqq.core.quantize), from the folder of the study's extra
    packages (scripts/setup_study_env.sh prints it; pass it as EDKM_STUDY_EXTRAS) when the
    environment itself lacks it."""
    import importlib
    import sys

    extras = os.environ.get("EDKM_STUDY_EXTRAS")
    if extras and extras not in sys.path:
        sys.path.append(extras)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"edkm bench study: {module} is missing ({e}); build the study's extra packages "
            f"once with scripts/setup_study_env.sh and pass their folder: "
            f"EDKM_STUDY_EXTRAS=$(scripts/setup_study_env.sh)"
        ) from None


def gguf_tensor_bytes(path: str) -> Dict[str, int]:
    """{"bytes": tensor data bytes, "types": {quant type: tensors}} of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    types: Dict[str, int] = {}
    total = 0
    for t in r.tensors:
        total += int(t.n_bytes)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"bytes": total, "types": types}


def quantize_gguf(src: str, dst: str, qtype: str, threads: int = 2) -> None:
    """llama.cpp's quantizer (through llama-cpp-python): ``src`` GGUF -> ``dst`` as ``qtype``,
    requantizing if ``src`` is already quantized; written to a temporary name, then renamed."""
    import ctypes

    llama_cpp = use_study_extras("llama_cpp")

    pure = qtype.endswith("-pure")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.removesuffix('-pure')}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = True
    if pure:
        # every matrix, the tied token embedding included, in the one type (llama.cpp's --pure
        # with --token-embedding-type): its only layout under 4.5 bits/weight on a model whose
        # rows of 576 are no multiple of the k-quants' 256
        params.pure = True
        params.token_embedding_type = GGML_Q4_0
        params.output_tensor_type = GGML_Q4_0
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise RuntimeError(f"llama.cpp quantize {src} -> {qtype} failed (return code {rc})")
    os.replace(tmp, dst)


def llama_cpp_perplexity(
    gguf: str, ids: Sequence[int], is_text: Sequence[bool], windows, context_len: int, threads: int = 1
) -> dict:
    """Perplexity computed by llama.cpp itself over the token stream, windows and scored
    positions of edkm.evaluate.perplexity (``windows``: its (begin, end, first scored) triples)."""
    import numpy as np

    Llama = use_study_extras("llama_cpp").Llama

    llm = Llama(
        model_path=gguf, n_ctx=context_len, n_batch=context_len, logits_all=True, n_threads=threads, verbose=False
    )
    nll, n = 0.0, 0
    for b, e, first in windows:
        window = [int(t) for t in ids[b:e]]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        logits = logits - logits.max(-1, keepdims=True)
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for i in range(first, e):
            if is_text[i]:
                nll -= lp[i - 1 - b, ids[i]]
                n += 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}


def hqq_(model: torch.nn.Module, bits: int, group_size: int = HQQ_GROUP) -> dict:
    """Replace every Linear / Embedding weight of ``model`` by its HQQ quantize-dequantize
    (hqq's Quantizer: half-quadratic optimized zero point, scale and zero in fp16, per group of
    ``group_size`` along the input dimension). Returns {"bits": storage bits, "weights": n}."""
    Quantizer = use_study_extras("hqq.core.quantize").Quantizer

    total_bits, n, seen = 0, 0, set()
    for mod in model.modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        w = mod.weight
        if id(w) in seen:
            continue
        seen.add(id(w))
        W = w.data.float()
        if W.numel() % group_size:
            raise ValueError(f"hqq: {tuple(W.shape)} has no whole number of groups of {group_size}")
        # like HQQLinear: groups of group_size consecutive row-major weights (rows of 576 hold
        # 4.5 groups, so some groups span two rows)
        W_q, meta = Quantizer.quantize(
            W,
            nbits=bits,
            channel_wise=True,
            group_size=group_size,
            optimize=True,
            round_zero=False,
            axis=1,
            bitpack=False,
            compute_dtype=torch.float32,
            device="cpu",
        )
        # HQQ keeps scale and zero in the compute dtype, fp16 here as in its size accounting
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        meta["compute_dtype"] = torch.float32
        deq = Quantizer.dequantize(W_q, meta).reshape(W.shape)
        with torch.no_grad():
            w.copy_(deq.to(w.dtype))
        groups = W.numel() // group_size
        total_bits += W.numel() * bits + groups * 2 * 16
        n += W.numel()
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    return {"bits": total_bits + 16 * other, "weights": n + other, "quantized_weights": n}


# ----------------------------------------------------------------------------- one row


class Context:
    """What every row needs: the baseline model, tokenizer, data and settings."""

    def __init__(self, args):
        from edkm.data import corpus_split, default_data_dir, read_texts, token_blocks
        from edkm.evaluate import resolve_task
        from benchmarks.accuracy import TASKS, weight_count
        from edkm.models import load_model, smollm2_path

        self.args = args
        self.progress = not args.no_progress
        self.data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
        self.train_files, self.test_files = corpus_split(self.data_dir)
        if not self.train_files or not self.test_files:
            raise FileNotFoundError(f"{self.data_dir}: the corpus split needs both train and test files")
        self.task_files = {t: resolve_task(t, self.data_dir)[1] for t in TASKS}
        self.model, self.tok = load_model("smollm2-135m", torch.float32)
        self.model.eval()
        self.n_weights = weight_count(self.model)
        self.test_texts = read_texts(self.test_files)
        n_blocks = max(1, args.kl_tokens // KL_BLOCK)
        self.kl_blocks = token_blocks(self.tok, self.test_texts, KL_BLOCK, max_blocks=n_blocks, seed=0)
        d, name = smollm2_path()
        self.source_gguf = os.path.join(d, name)
        self.out = Path(args.out)

    def fresh(self):
        return copy.deepcopy(self.model)


def build(spec: dict, ctx: Context, tmp: str) -> dict:
    """(the row's model, its size facts, build facts) for one row spec."""
    import edkm
    from benchmarks import accuracy as acc

    kind, info = spec["kind"], {}
    t0 = time.perf_counter()
    ft = dict(lr=5e-4, block_len=256, batch_size=4, seed=0)
    if kind == "baseline":
        m = ctx.model
        info.update(
            bytes=2 * ctx.n_weights,
            size_kind="bf16 (the Q4_1 GGUF dequantized)",
            source_gguf=gguf_tensor_bytes(ctx.source_gguf),
        )
    elif kind in ("rtn", "kmeans", "edkm-ce"):
        bits = spec.get("bits", 3)
        clustered = acc.palettized(ctx.model, edkm.Config(bits=bits), progress=False)
        if kind == "rtn":
            m = acc.build_rtn(clustered)
        elif kind == "kmeans":
            m = acc.build_kmeans(clustered)
        else:
            from edkm.finetune import pick_texts

            texts = pick_texts(ctx.train_files, EDKM_CE_STEPS * 4 * 256, seed=0)
            m, losses = acc.build_edkm(clustered, ctx.tok, texts, EDKM_CE_STEPS, progress=ctx.progress, **ft)
            info["train_losses"] = list(losses)
            info["train_tokens"] = EDKM_CE_STEPS * 4 * 256
        del clustered
        path = os.path.join(tmp, "row.safetensors")
        info.update(bytes=edkm.save(m, path, plain_dtype="keep"), size_kind="edkm file")
    elif kind == "finetune":
        from edkm.finetune import pick_texts

        texts = pick_texts(ctx.train_files, EDKM_CE_STEPS * 4 * 256, seed=0)
        m, losses = acc.build_finetune(ctx.model, ctx.tok, texts, EDKM_CE_STEPS, progress=ctx.progress, **ft)
        info.update(
            bytes=2 * ctx.n_weights, size_kind="bf16", train_losses=list(losses), train_tokens=EDKM_CE_STEPS * 4 * 256
        )
    elif kind in ("squeezellm", "gptq"):
        from edkm.finetune import TrainConfig
        from edkm.recipe import compress_model

        m = ctx.fresh()
        cfg = edkm.Config(
            bits=spec["bits"], init="sensitivity", outlier_fraction=SQUEEZELLM_OUTLIERS, outlier_criterion="sensitivity"
        )
        from edkm.data import read_texts, train_validation_split

        train, _val = train_validation_split(ctx.train_files, 0.05, 0)
        res = compress_model(
            m,
            ctx.tok,
            cfg,
            steps=0,
            train=TrainConfig(),
            texts=read_texts(train[:40]),
            gptq=kind == "gptq",
            progress=ctx.progress,
        )
        info["stage_seconds"] = res.seconds
        path = os.path.join(tmp, "row.safetensors")
        info.update(bytes=edkm.save(m, path, plain_dtype="keep"), size_kind="edkm file (with outliers)")
    elif kind == "gguf":
        from edkm.models import load_model

        # the quantized GGUFs (~100 MB each) are kept in the cache, not in the results
        gdir = Path(os.environ.get("EDKM_CACHE") or Path.home() / ".cache" / "edkm") / "study-gguf"
        gdir.mkdir(parents=True, exist_ok=True)
        dst = str(gdir / f"smollm2-135m.{spec['name']}.gguf")
        if not os.path.exists(dst):
            quantize_gguf(ctx.source_gguf, dst, spec["name"])
        m, _tok = load_model(dst, torch.float32)
        g = gguf_tensor_bytes(dst)
        info.update(bytes=g["bytes"], size_kind="GGUF tensor data", gguf_types=g["types"], gguf=dst)
    elif kind == "hqq":
        m = ctx.fresh()
        h = hqq_(m, spec["bits"])
        if h["weights"] != ctx.n_weights:
            raise RuntimeError(f"hqq counted {h['weights']} weights, the model has {ctx.n_weights}")
        info.update(bytes=h["bits"] / 8, size_kind=f"HQQ {spec['bits']}-bit, group {HQQ_GROUP}, fp16 scale+zero")
    elif kind == "file":
        from edkm.models import load_model

        m, _tok = load_model(spec["path"], torch.float32)
        info.update(bytes=os.path.getsize(spec["path"]), size_kind="edkm file", path=spec["path"])
        side = Path(spec["path"]).with_name("train.json")
        if side.is_file():
            tr = json.loads(side.read_text())
            info["training"] = {
                k: tr.get(k)
                for k in (
                    "target_bits",
                    "steps",
                    "planned_steps",
                    "stopped_early",
                    "lr_at_stop",
                    "tokens",
                    "tokens_per_second",
                    "seconds",
                    "train_seconds",
                    "stage_seconds",
                    "validation",
                    "train",
                    "bits",
                    "command",
                )
            }
            info["train_losses"] = tr.get("losses")
    else:
        raise AssertionError(kind)
    info["build_seconds"] = time.perf_counter() - t0
    info["bits_per_weight"] = 8 * info["bytes"] / ctx.n_weights
    return m, info


def run_row(spec: dict, ctx: Context) -> dict:
    from benchmarks.accuracy import evaluate_model
    from edkm.evaluate import teacher_agreement

    with tempfile.TemporaryDirectory(prefix="edkm-study-") as tmp:
        m, info = build(spec, ctx, tmp)
    m.eval()
    t0 = time.perf_counter()
    limit = ctx.args.limit or None
    metrics, items = evaluate_model(
        m, ctx.tok, ctx.test_texts, ctx.task_files, limit, ctx.args.eval_tokens, 8, ctx.progress
    )
    agreement = teacher_agreement(m, ctx.model, ctx.kl_blocks, batch_size=2, progress=ctx.progress)
    row = {
        "name": spec["name"],
        "method": method_of(spec["name"]),
        **info,
        "metrics": metrics,
        "agreement": agreement,
        "eval_seconds": time.perf_counter() - t0,
        "items": {
            t: {k: ("".join("1" if x else "0" for x in vals) if k != "logprob" else vals) for k, vals in o.items()}
            for t, o in items.items()
        },
    }
    return row


def llama_cpp_check(ctx: Context, name: str, gguf: str, tokens: int) -> dict:
    """Perplexity of the first ``tokens`` held-out tokens by both harnesses: llama.cpp running
    the GGUF itself, and edkm.evaluate.perplexity on the GGUF as transformers dequantizes it
    (the model every other metric of the row comes from), on the same tokens and windows."""
    from benchmarks.accuracy import CONTEXT_LEN, STRIDE
    from edkm.evaluate import perplexity, scored_stream, sliding_windows
    from edkm.models import load_model

    ids, is_text = scored_stream(ctx.tok, ctx.test_texts, tokens)
    t0 = time.perf_counter()
    ours = perplexity(
        ctx.model if name == "baseline" else load_model(gguf, torch.float32)[0],
        ctx.tok,
        ctx.test_texts,
        context_len=CONTEXT_LEN,
        stride=STRIDE,
        max_tokens=tokens,
        progress=ctx.progress,
    )
    t1 = time.perf_counter()
    theirs = llama_cpp_perplexity(
        gguf,
        ids,
        is_text,
        sliding_windows(len(ids), CONTEXT_LEN, STRIDE),
        CONTEXT_LEN,
        threads=max(1, torch.get_num_threads()),
    )
    return {
        "tokens": tokens,
        "edkm_ppl": ours["ppl"],
        "edkm_tokens": ours["tokens"],
        "llama_cpp_ppl": theirs["ppl"],
        "llama_cpp_tokens": theirs["tokens"],
        "edkm_seconds": t1 - t0,
        "llama_cpp_seconds": time.perf_counter() - t1,
    }


ACCURACY_VARIANTS = {"rtn": "rtn3", "kmeans": "kmeans3", "edkm": "edkm-ce", "finetune": "finetune"}


def import_accuracy(path: str, settings: dict) -> List[dict]:
    """Study rows from an ``edkm bench accuracy`` report made with the same evaluation settings
    (3 bits, one LUT per matrix, the same zero-shot limit and perplexity tokens): its rtn,
    kmeans, edkm and finetune variants, with ``agreement`` None (not measured there)."""
    rep = json.loads(Path(path).read_text())
    s = rep["settings"]
    want = {
        "bits": 3,
        "group_size": None,
        "limit": settings["limit"],
        "eval_tokens": settings["eval_tokens"],
        "context_len": 512,
        "stride": 256,
        "steps": EDKM_CE_STEPS,
    }
    diff = {k: (s.get(k), v) for k, v in want.items() if s.get(k) != v}
    if diff:
        raise ValueError(
            f"edkm bench study: --import-accuracy {path}: its settings differ from the study's "
            f"(setting: (theirs, ours)) {diff}"
        )
    rows = []
    for variant, name in ACCURACY_VARIANTS.items():
        v = rep["variants"].get(variant)
        if v is None:
            continue
        row = {
            "name": name,
            "method": method_of(name),
            "bytes": v["bytes"],
            "bits_per_weight": v["bits_per_weight"],
            "size_kind": v["size_kind"],
            "build_seconds": v["build_seconds"],
            "eval_seconds": v["eval_seconds"],
            "metrics": v["metrics"],
            "items": v["items"],
            "agreement": None,
            "imported_from": {"file": str(path), "date": rep["date"], "command": rep["command"]},
            "date": rep["date"],
            "command": rep["command"],
            "settings": settings,
        }
        if v.get("train_losses"):
            row["train_losses"] = v["train_losses"]
            row["train_tokens"] = EDKM_CE_STEPS * s["batch_size"] * s["block_len"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the report


def load_rows(out: Path) -> Dict[str, dict]:
    rows = {}
    for p in sorted((out / "rows").glob("*.json")):
        r = json.loads(p.read_text())
        rows[r["name"]] = r
    return rows


def _acc(r, task, metric="acc"):
    return r["metrics"][task][metric]


def best_other(rows: Dict[str, dict], group: str) -> Optional[str]:
    """The non-eDKM row of a size group with the lowest held-out perplexity."""
    cands = [
        r
        for r in rows.values()
        if size_group(r["bits_per_weight"]) == group and not r["method"].startswith("eDKM") and r["name"] != "baseline"
    ]
    return min(cands, key=lambda r: r["metrics"]["ppl"]["ppl"])["name"] if cands else None


def paired_tests(rows: Dict[str, dict]) -> List[dict]:
    from benchmarks.accuracy import PAIRED_METRICS, paired

    out = []
    for r in rows.values():
        if not r["method"].startswith("eDKM"):
            continue
        group = size_group(r["bits_per_weight"])
        other = best_other(rows, group) if group else None
        if other is None:
            continue
        for task, metric in PAIRED_METRICS:
            a = r["items"].get(task, {}).get(metric)
            b = rows[other]["items"].get(task, {}).get(metric)
            if a is None or b is None or len(a) != len(b):
                continue
            out.append(
                {
                    "a": r["name"],
                    "b": other,
                    "group": group,
                    "task": task,
                    "metric": metric,
                    **paired([c == "1" for c in a], [c == "1" for c in b]),
                }
            )
    return out


def _fmt_ppl(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:,.1f}" if x < 1e5 else f"{x:.2e}"


def _fmt_ratio(x: float) -> str:
    return f"{x:,.2f}" if x < 1e5 else f"{x:.1e}"


def _agreement(r: dict) -> str:
    a = r.get("agreement")
    if a is None:
        return "not measured&dagger; | not measured&dagger;"
    return f"{a['kl']:.3f} | {100 * a['top1']:.1f}%"


def table(rows: Sequence[dict], base: dict) -> str:
    lines = [
        "| row | method | bits/weight | held-out ppl | x baseline | KL to baseline | top-1 agreement "
        "| PIQA acc | ARC-Easy acc | LAMBADA acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bp = base["metrics"]["ppl"]["ppl"] if base else float("nan")
    for r in sorted(rows, key=lambda r: r["metrics"]["ppl"]["ppl"]):
        p = r["metrics"]["ppl"]["ppl"]
        lines.append(
            f"| {r['name']} | {r['method']} | {r['bits_per_weight']:.2f} | {_fmt_ppl(p)} | "
            f"{_fmt_ratio(p / bp)} | {_agreement(r)} | "
            f"{100 * _acc(r, 'piqa'):.1f} | {100 * _acc(r, 'arc_easy'):.1f} | "
            f"{100 * _acc(r, 'lambada_openai'):.1f} |"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    rows = report["rows"]
    base = rows.get("baseline")
    s = report["settings"]
    out = [
        f"# Which tool at which size: SmolLM2-135M ({report['date'][:10]})",
        "",
        f"Held-out perplexity on {s['eval_tokens']:,} test-split tokens (context 512, stride 256); KL and "
        f"top-1 agreement with the baseline on {s['kl_tokens']:,} test-split positions; zero-shot on the "
        f"first {s['limit'] or 'all'} items of each task. Sizes count every parameter (tied ones once).",
        "",
    ]
    for label, _limit in SIZE_GROUPS:
        grp = [r for r in rows.values() if size_group(r["bits_per_weight"]) == label]
        if grp:
            out += [f"## {label} (<= {_limit} bits/weight)", "", table(grp, base), ""]
    rest = [r for r in rows.values() if size_group(r["bits_per_weight"]) is None]
    if rest:
        out += ["## other sizes", "", table(rest, base), ""]
    if report["paired"]:
        out += [
            "## paired tests (exact McNemar) against the best other row of the same size",
            "",
            "| eDKM row | vs | task | metric | n | eDKM only right | other only right | diff | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in report["paired"]:
            out.append(
                f"| {t['a']} | {t['b']} | {t['task']} | {t['metric']} | {t['n']} | {t['a_only']} | "
                f"{t['b_only']} | {100 * t['diff']:+.1f} pp | {t['mcnemar_p']:.3g} |"
            )
        out.append("")
    imported = [r for r in rows.values() if r.get("imported_from")]
    if imported:
        src = imported[0]["imported_from"]
        out += [
            f"&dagger; {', '.join(r['name'] for r in imported)}: taken from `{src['command']}` "
            f"({src['date'][:10]}; same model, items, tokens and harness), which does not measure "
            f"KL or top-1 agreement.",
            "",
        ]
    checks = [r for r in rows.values() if "llama_cpp_check" in r]
    if checks:
        n = checks[0]["llama_cpp_check"]["tokens"]
        out += [
            f"## harness check: llama.cpp's own perplexity on the first {n:,} held-out tokens",
            "",
            "| row | edkm harness (GGUF dequantized by the gguf package) | llama.cpp | ratio |",
            "|---|---|---|---|",
        ]
        for r in checks:
            c = r["llama_cpp_check"]
            out.append(
                f"| {r['name']} | {c['edkm_ppl']:.3f} | {c['llama_cpp_ppl']:.3f} | "
                f"{c['llama_cpp_ppl'] / c['edkm_ppl']:.4f} |"
            )
        out.append("")
    out += ["## rows", "", "| row | size accounting | build s | eval s | notes |", "|---|---|---|---|---|"]
    for r in rows.values():
        note = ""
        if r.get("gguf_types"):
            note = "tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["gguf_types"].items()))
        if r.get("training"):
            t = r["training"]
            secs = t.get("train_seconds") or t.get("seconds") or 0
            stop = (
                f" (stopped at step {t['steps']} of a {t['planned_steps']}-step schedule, lr {t['lr_at_stop']:.2g})"
                if t.get("stopped_early")
                else ""
            )
            note = (
                f"{t.get('steps')} steps{stop}, {t.get('tokens') or 0:,} training tokens, "
                f"{t.get('tokens_per_second') or 0:.1f} tokens/s, {secs / 60:.0f} min of training"
            )
        elif r.get("train_tokens"):
            note = f"{r['train_tokens']:,} training tokens"
        out.append(f"| {r['name']} | {r['size_kind']} | {r['build_seconds']:.0f} | {r['eval_seconds']:.0f} | {note} |")
    out += ["", f"Commands: {'; '.join(report['commands'])}", ""]
    return "\n".join(out)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    markers = dict(
        zip(
            [
                "round-to-nearest",
                "k-means (post-training)",
                "SqueezeLLM-style (post-training)",
                "GPTQ over LUTs (post-training)",
                "llama.cpp k-quants",
                "HQQ",
                "eDKM, old recipe (40 steps CE)",
                "eDKM, new recipe",
                "eDKM, new recipe, GPTQ start",
                "fine-tune control",
                "baseline",
            ],
            "v^s<DPXo>*h",
        )
    )
    fig, ax = plt.subplots(figsize=(8, 5.5))
    # 16-bit rows are drawn as lines, and perplexities above CAP at the top edge with their
    # value, so that the compressed rows below 7 bits/weight fill the chart
    cap = 1e6
    quantized = [r for r in rows.values() if r["bits_per_weight"] < 15]
    for method in dict.fromkeys(r["method"] for r in quantized):
        pts = [r for r in quantized if r["method"] == method]
        ax.scatter(
            [r["bits_per_weight"] for r in pts],
            [min(r["metrics"]["ppl"]["ppl"], cap) for r in pts],
            marker=markers.get(method, "o"),
            s=70,
            label=method,
        )
        for r in pts:
            p = r["metrics"]["ppl"]["ppl"]
            label = r["name"] if p <= cap else f"{r['name']} (ppl {p:.0e}, off scale)"
            ax.annotate(
                label, (r["bits_per_weight"], min(p, cap)), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
    for r in rows.values():
        if r["bits_per_weight"] >= 15:
            p = r["metrics"]["ppl"]["ppl"]
            ax.axhline(p, color="grey" if r["name"] == "baseline" else "lightgrey", lw=0.8, ls="--")
            ax.annotate(
                f"{r['name']} (16-bit): {p:.1f}",
                (ax.get_xlim()[0], p),
                fontsize=7,
                xytext=(2, 2),
                textcoords="offset points",
                color="grey",
            )
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole model, every tensor)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M: size vs quality")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def report(out: Path, settings: dict) -> dict:
    from benchmarks import _results

    rows = load_rows(out)
    if not rows:
        raise FileNotFoundError(f"{out / 'rows'}: no rows computed yet")
    commands = sorted({r["command"] for r in rows.values() if r.get("command")})
    rep = {
        "benchmark": "study",
        "settings": settings,
        "rows": rows,
        "paired": paired_tests(rows),
        "commands": commands,
        **_results.stamp(),
    }
    _results.write_json(str(out / "study.json"), rep)
    _results.write_atomic(str(out / "study.md"), markdown(rep))
    plot(rep, str(out / "study.png"))
    return rep


def main(args) -> int:
    from tqdm import tqdm

    from benchmarks import _results

    specs = [parse_row(r) for r in args.rows]  # fail on a bad name before loading anything
    out = Path(args.out or os.path.join(_results.default_results_dir(), "study"))
    args.out = str(out)
    settings = {"limit": args.limit, "eval_tokens": args.eval_tokens, "kl_tokens": args.kl_tokens}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.import_accuracy:
        (out / "rows").mkdir(parents=True, exist_ok=True)
        for row in import_accuracy(args.import_accuracy, settings):
            _results.write_json(str(out / "rows" / f"{row['name']}.json"), row)
            tqdm.write(f"edkm bench study: {row['name']}: imported from {args.import_accuracy}")
    todo = [s for s in specs if args.redo or not (out / "rows" / f"{s['name']}.json").exists()]
    if todo:
        ctx = Context(args)
        (out / "rows").mkdir(parents=True, exist_ok=True)
        for spec in tqdm(todo, desc="bench study", unit="row", disable=args.no_progress):
            t0 = time.perf_counter()
            row = run_row(spec, ctx)
            row.update(_results.stamp())  # date, command, machine
            row.update(settings=settings, seconds=time.perf_counter() - t0, threads=torch.get_num_threads())
            _results.write_json(str(out / "rows" / f"{spec['name']}.json"), row)
            tqdm.write(
                f"edkm bench study: {spec['name']}: {row['bits_per_weight']:.2f} bits/weight, ppl "
                f"{row['metrics']['ppl']['ppl']:.2f}, KL {row['agreement']['kl']:.3f}, top-1 "
                f"{100 * row['agreement']['top1']:.1f}% ({row['seconds']:.0f} s)"
            )
    if args.llama_cpp_check:
        # llama.cpp scores the held-out text of every GGUF row (and the baseline, whose GGUF is the
        # source) that does not have it yet
        rows = [
            r
            for r in load_rows(out).values()
            if "llama_cpp_check" not in r and (r["name"] == "baseline" or r["name"] in GGUF_TYPES)
        ]
        if rows:
            ctx = Context(args) if not todo else ctx
            for r in rows:
                r["llama_cpp_check"] = llama_cpp_check(
                    ctx, r["name"], r.get("gguf", ctx.source_gguf), args.check_tokens
                )
                _results.write_json(str(out / "rows" / f"{r['name']}.json"), r)
                c = r["llama_cpp_check"]
                tqdm.write(
                    f"edkm bench study: {r['name']}: llama.cpp ppl {c['llama_cpp_ppl']:.3f}, "
                    f"edkm harness {c['edkm_ppl']:.3f} ({c['tokens']} tokens)"
                )
    if args.report:
        rep = report(out, settings)
        print(markdown(rep))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("study"))
