"""`edkm bench accuracy`: what clustering a model to n bits costs in accuracy, per method, at the
same storage (issue 6).

Variants of one model (default SmolLM2-135M in fp32), each quantized variant with the SAME bits
per weight and the SAME look-up-table (LUT) layout (``--bits``, default 3; ``--group-size G``
output channels per LUT, default one LUT per matrix; the tied embedding / lm_head is clustered
like every other matrix):

  baseline  the model as loaded (for smollm2-135m: the dequantized Q4_1 GGUF)
  rtn       round-to-nearest on a uniform grid per LUT group: 2^bits levels from the group's
            minimum to its maximum (asymmetric min-max), the usual post-training baseline,
            stored as a LUT so the file is laid out exactly like the others. Built by
            palettize_ (which fixes the layout), then overwriting every LUT with the uniform
            grid (:func:`rtn_`) before finalize: finalize assigns each weight to its nearest
            centroid, which on a uniform grid is rounding to the nearest level.
  kmeans    post-training clustering: palettize_ (exact 1-D k-means per LUT) + finalize
  edkm      clustering-aware fine-tuning (edkm.finetune.finetune on the corpus train split)
            from the k-means start, then finalize
  finetune  the unclustered model fine-tuned with the same loop, data and budget (how much of
            a gain comes from fine-tuning alone)

Each variant: PIQA, ARC-Easy (acc, acc_norm), LAMBADA (acc, ppl) through
:func:`edkm.evaluate.zero_shot`, held-out perplexity through :func:`edkm.evaluate.perplexity`
on the corpus test split; size (quantized: the real file written by edkm.save, whose reload is
checked to give the evaluated model's logits bit for bit; others: the bf16 size); times. A
paired comparison (same items) between edkm and kmeans / rtn. Every setting is fixed in
advance (the demo's); only the train split is trained on and nothing is chosen by looking at
test numbers.

Results: benchmarks/results/accuracy/<model>_<bits>bit_<layout>[_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

VARIANTS = ("baseline", "rtn", "kmeans", "edkm", "finetune")
QUANTIZED = ("rtn", "kmeans", "edkm")
TASKS = ("piqa", "arc_easy", "lambada_openai")
TASK_LABELS = {"piqa": "PIQA", "arc_easy": "ARC-Easy", "lambada_openai": "LAMBADA"}
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "lambada_openai": 0.0}
PAIRS = (("edkm", "kmeans"), ("edkm", "rtn"), ("kmeans", "rtn"))
# (task, metric) pairs that are per-item right/wrong, for the paired comparison
PAIRED_METRICS = (
    ("piqa", "acc"),
    ("piqa", "acc_norm"),
    ("arc_easy", "acc"),
    ("arc_easy", "acc_norm"),
    ("lambada_openai", "acc"),
)
FULL = dict(limit=500, eval_tokens=16384, steps=40)
QUICK = dict(limit=10, eval_tokens=1024, steps=2)
CONTEXT_LEN, STRIDE = 512, 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m, loaded in fp32)")
    p.add_argument("--bits", type=int, default=3, help="bits per weight, every quantized variant (default 3)")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="output channels per LUT, every quantized variant (default: one LUT per matrix)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of %s (default: all)" % ",".join(VARIANTS),
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"fine-tuning steps for edkm and finetune (default {FULL['steps']}; --quick {QUICK['steps']})",
    )
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="fine-tuning batch (default 4)")
    p.add_argument("--block-len", type=int, default=256, help="fine-tuning block length (default 256)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"first N items of each zero-shot task (default {FULL['limit']}; --quick "
        f"{QUICK['limit']}; 0 = the full sets)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help=f"held-out tokens for perplexity (default {FULL['eval_tokens']}; --quick "
        f"{QUICK['eval_tokens']}; context {CONTEXT_LEN}, stride {STRIDE})",
    )
    p.add_argument("--zero-shot-batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data folder (corpus/, eval/); default $EDKM_DATA_DIR, else ../shared/data",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's default, one per core). On a CPU shared "
        "with other busy processes, 1 can be several times faster than 2: every parallel "
        "op waits for its slowest thread to be scheduled",
    )
    p.add_argument("--seed", type=int, default=0, help="k-means++ seed, fine-tuning data order (default 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: limit {QUICK['limit']}, {QUICK['eval_tokens']} tokens, "
        f"{QUICK['steps']} steps (a few minutes); results get a _quick suffix",
    )
    p.add_argument("--json", action="store_true", help="print the JSON results (the table goes to stderr)")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: rewrite the markdown and PNG beside a results JSON this command wrote",
    )
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/accuracy)")


# ----------------------------------------------------------------------------- variant builders


@torch.no_grad()
def uniform_grid(source: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """[groups, k] float64: k evenly spaced levels from each group's minimum to its maximum
    (``groups`` equal contiguous chunks of the flattened weight, as LUT groups are)."""
    flat = source.detach().reshape(groups, -1).double()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    frac = torch.arange(k, dtype=torch.float64, device=flat.device) / max(k - 1, 1)
    return (lo + (hi - lo) * frac).cpu()


@torch.no_grad()
def rtn_(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every LUT of a palettized (not yet finalized) model with the uniform min-max
    grid of its group, in place. The weight each LUT sees is the one clustering sees
    (``edkm_source``: for fp32 weights their bf16 rounding, as for k-means and eDKM), so
    ``edkm.finalize`` afterwards rounds every weight to its nearest grid level and the file
    has exactly the layout the other variants have. Returns ``model``."""
    from edkm.palettize import clustered_modules

    n = 0
    for name, m in clustered_modules(model):
        if m.edkm_leader is not None:  # a tied follower shares its leader's LUT
            continue
        if m.edkm_finalized:
            raise ValueError(f"rtn_: {name} is already finalized")
        cfg = m.edkm_config
        if cfg.cluster_dim != 1:
            raise ValueError(
                f"rtn_: {name} clusters vectors (cluster_dim {cfg.cluster_dim}); "
                f"a uniform scalar grid needs cluster_dim 1"
            )
        grid = uniform_grid(m.edkm_source(), m.edkm_groups, cfg.k)
        m.edkm_centroids.copy_(grid.to(m.edkm_centroids))
        n += 1
    if n == 0:
        raise ValueError("rtn_: the model has no clustered modules; palettize_ it first")
    return model


def palettized(model, config, progress: bool = False):
    """A palettized copy of ``model`` (the shared starting point of rtn, kmeans and edkm)."""
    import edkm

    m = copy.deepcopy(model)
    edkm.palettize_(m, config, progress=progress)
    return m


def build_rtn(clustered, progress: bool = False):
    import edkm

    m = copy.deepcopy(clustered)
    rtn_(m)
    return edkm.finalize(m, progress=progress)


def build_kmeans(clustered, progress: bool = False):
    import edkm

    return edkm.finalize(copy.deepcopy(clustered), progress=progress)


def build_edkm(clustered, tokenizer, texts, steps: int, progress: bool = False, **ft):
    """(model, losses): clustering-aware fine-tuning from the k-means start, then finalize."""
    import edkm
    from edkm.finetune import finetune

    m = copy.deepcopy(clustered)
    losses = finetune(m, tokenizer, texts, steps, progress=progress, desc="edkm: eDKM fine-tuning", **ft)
    return edkm.finalize(m, progress=progress), losses


def build_finetune(model, tokenizer, texts, steps: int, progress: bool = False, **ft):
    """(model, losses): the unclustered model, same loop and budget."""
    from edkm.finetune import finetune

    m = copy.deepcopy(model)
    losses = finetune(m, tokenizer, texts, steps, progress=progress, desc="edkm: plain fine-tuning", **ft)
    return m, losses


def weight_count(model) -> int:
    """Parameters, each tied tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def lut_layout(info: dict) -> List[tuple]:
    """(name, shape, bits, groups, cluster_dim) of every clustered tensor of an edkm.info()."""
    return sorted(
        (t["name"], tuple(t["shape"]), t["bits"], t["groups"], t["cluster_dim"])
        for t in info["tensors"]
        if t["kind"] == "clustered"
    )


def sample_batch(tokenizer, texts: Sequence[str], length: int) -> torch.LongTensor:
    """[1, length] (or shorter) tokens from the start of the first text: the reload check's batch."""
    from edkm.data import encode, special_prefix

    ids = (special_prefix(tokenizer) + encode(tokenizer, texts[0][: 20 * length]))[:length]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def _logits(model, batch):
    was = model.training
    model.eval()
    try:
        return model(input_ids=batch, use_cache=False).logits
    finally:
        model.train(was)


def save_and_check(model, fresh, batch, directory, base_model: Optional[str] = None) -> dict:
    """Save a finalized model into ``directory``, load the file into ``fresh`` (an unclustered
    copy of the base model) and compare logits on ``batch``: {"bytes", "layout", "reload_exact",
    "reload_max_abs_diff", "save_seconds"}."""
    import edkm

    path = os.path.join(directory, "model.safetensors")
    t0 = time.perf_counter()
    meta = {"edkm.base_model": base_model} if base_model else None
    # plain_dtype="keep": the file holds the model as evaluated (fine-tuned norms stay float32),
    # so reloading it is exact; the default would store them in bf16 (about 0.004 bits/weight less).
    size = edkm.save(model, path, metadata=meta, plain_dtype="keep")
    seconds = time.perf_counter() - t0
    info = edkm.info(path, verbose=False)
    edkm.load(path, fresh)
    a, b = _logits(model, batch), _logits(fresh, batch)
    os.unlink(path)
    return {
        "bytes": size,
        "file_bytes": info["file_bytes"],
        "clustered_bytes": info["clustered_bytes"],
        "plain_bytes": info["plain_bytes"],
        "layout": lut_layout(info),
        "reload_exact": bool(torch.equal(a, b)),
        "reload_max_abs_diff": float((a.double() - b.double()).abs().max()),
        "save_seconds": seconds,
    }


# ----------------------------------------------------------------------------- evaluation


def zero_shot_items(model, tokenizer, task_file, limit: Optional[int], batch_size: int = 8, progress: bool = True):
    """(edkm.evaluate.zero_shot's result, per-item outcomes): outcomes is {"acc": [bool],
    "acc_norm": [bool]} (multiple choice), {"acc": [bool], "logprob": [float]} (LAMBADA) or
    {"acc": [bool]} (schema), in item order."""
    from edkm.evaluate import zero_shot

    result = zero_shot(
        model, tokenizer, task_file, limit=limit, batch_size=batch_size, progress=progress, per_item=True
    )
    items = result.pop("items")
    out: Dict[str, list] = {"acc": [it["acc"] for it in items]}
    if result["format"] == "multiple_choice":
        out["acc_norm"] = [it["acc_norm"] for it in items]
    elif result["format"] == "lambada":
        out["logprob"] = [it["logprobs"][0] for it in items]
    return result, out


def evaluate_model(
    model,
    tokenizer,
    test_texts,
    task_files: Dict[str, Path],
    limit: Optional[int],
    eval_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
):
    """(metrics {"ppl": perplexity result, task: zero_shot result}, items {task: outcomes})."""
    from edkm.evaluate import perplexity

    metrics, items = {}, {}
    ppl = perplexity(
        model, tokenizer, test_texts, context_len=CONTEXT_LEN, stride=STRIDE, max_tokens=eval_tokens, progress=progress
    )
    metrics["ppl"] = ppl
    for task, path in task_files.items():
        metrics[task], items[task] = zero_shot_items(model, tokenizer, path, limit, batch_size, progress)
    return metrics, items


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test: P(a split at least this uneven of b + c discordant items)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Counts of a right/b wrong etc. on the same items; the paired difference a - b with its
    standard error and the exact McNemar p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} vs {len(b)} items")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    d = a_only - b_only
    se = math.sqrt(max(a_only + b_only - d * d / n, 0.0)) / n if n else 0.0
    return {
        "n": n,
        "both_right": both,
        "a_only": a_only,
        "b_only": b_only,
        "both_wrong": n - both - a_only - b_only,
        "diff": d / n if n else 0.0,
        "diff_stderr": se,
        "mcnemar_p": mcnemar_p(a_only, b_only),
    }


def _hits(s: str) -> List[bool]:
    return [c == "1" for c in s]


def paired_comparisons(variants: Dict[str, dict]) -> List[dict]:
    out = []
    for a, b in PAIRS:
        if a not in variants or b not in variants:
            continue
        for task, metric in PAIRED_METRICS:
            ia = variants[a]["items"].get(task, {}).get(metric)
            ib = variants[b]["items"].get(task, {}).get(metric)
            if ia is None or ib is None:
                continue
            out.append({"a": a, "b": b, "task": task, "metric": metric, **paired(_hits(ia), _hits(ib))})
    return out


# ----------------------------------------------------------------------------- the run


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    s = {
        "model": args.model,
        "bits": args.bits,
        "group_size": args.group_size,
        "steps": base["steps"] if args.steps is None else args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "block_len": args.block_len,
        "limit": base["limit"] if args.limit is None else args.limit,
        "eval_tokens": base["eval_tokens"] if args.eval_tokens is None else args.eval_tokens,
        "zero_shot_batch_size": args.zero_shot_batch_size,
        "seed": args.seed,
        "quick": bool(args.quick),
        "context_len": CONTEXT_LEN,
        "stride": STRIDE,
    }
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    s["variants"] = [v for v in VARIANTS if v in variants]  # fixed order
    if s["limit"] < 0 or s["eval_tokens"] < 1 or s["steps"] < 1:
        raise ValueError("--limit must be >= 0, --eval-tokens and --steps >= 1")
    if not 1 <= args.bits <= 8:
        raise ValueError(f"--bits must be in 1..8, got {args.bits}")
    if getattr(args, "threads", 0) < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    return s


def _machine() -> dict:
    from benchmarks import _results

    m = _results.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            m["cpu_model"] = names[0]
    except OSError:
        pass
    m["torch_threads"] = torch.get_num_threads()
    m["node"] = platform.node()
    return m


def _tag(s: dict) -> str:
    name = Path(s["model"]).stem if os.path.sep in s["model"] else s["model"]
    layout = f"g{s['group_size']}" if s["group_size"] else "matrix"
    return f"{name}_{s['bits']}bit_{layout}" + ("_quick" if s["quick"] else "")


def run(args, loaded=None) -> dict:
    """Run the study; write the JSON, markdown and PNG; return the report. ``loaded``: an
    already loaded (model, tokenizer) to use instead of loading ``args.model`` (tests)."""
    from tqdm import tqdm

    import edkm
    from benchmarks import _results
    from edkm.data import corpus_split, default_data_dir, read_texts
    from edkm.evaluate import resolve_task
    from edkm.finetune import pick_texts

    t_start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    s = _settings(args)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    s["threads"] = torch.get_num_threads()
    progress = not getattr(args, "no_progress", False)
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    train_files, test_files = corpus_split(data_dir)  # fails early, before loading the model
    if not test_files or not train_files:
        raise FileNotFoundError(f"{data_dir}: the corpus split needs both train and test files")
    task_files = {t: resolve_task(t, data_dir)[1] for t in TASKS}
    limit = s["limit"] or None
    cfg = edkm.Config(bits=s["bits"], group_size=s["group_size"], seed=s["seed"])
    s["config"] = cfg.to_dict()

    def log(msg):
        tqdm.write(f"edkm bench accuracy: {msg}")

    if loaded is None:
        from edkm.models import load_model

        log(f"loading {s['model']} (fp32)")
        model, tok = load_model(s["model"], torch.float32)
    else:
        model, tok = loaded
    if tok is None:
        raise ValueError(f"model {s['model']!r} has no tokenizer")
    model.eval()
    n_weights = weight_count(model)
    test_texts = read_texts(test_files)
    batch = sample_batch(tok, test_texts, min(256, getattr(model.config, "max_position_embeddings", 256)))
    ft = dict(lr=s["lr"], block_len=s["block_len"], batch_size=s["batch_size"], seed=s["seed"])
    ft_texts = None
    if {"edkm", "finetune"} & set(s["variants"]):
        ft_texts = pick_texts(train_files, s["steps"] * s["batch_size"] * s["block_len"], seed=s["seed"])
        s["finetune_tokens"] = s["steps"] * s["batch_size"] * s["block_len"]
        s["finetune_texts"] = len(ft_texts)
    log(
        f"{n_weights:,} weights; variants {','.join(s['variants'])}; {s['bits']} bits, "
        f"{'one LUT per %d output channels' % s['group_size'] if s['group_size'] else 'one LUT per matrix'}; "
        f"zero-shot limit {limit or 'none (full sets)'}, {s['eval_tokens']} held-out tokens, "
        f"{s['steps']} fine-tuning steps; {torch.get_num_threads()} threads"
    )

    results: Dict[str, dict] = {}
    clustered = None
    palettize_seconds = 0.0
    remaining_quantized = [v for v in s["variants"] if v in QUANTIZED]
    bar = tqdm(s["variants"], desc="bench accuracy", unit="variant", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="edkm-accuracy-") as tmp:
        for v in bar:
            bar.set_postfix(variant=v)
            t0 = time.perf_counter()
            losses = None
            r: dict = {"variant": v}
            if v == "baseline":
                m = model
            elif v == "finetune":
                m, losses = build_finetune(model, tok, ft_texts, s["steps"], progress=progress, **ft)
            else:
                if clustered is None:
                    log("palettize_ (k-means initialization of every LUT), shared by rtn/kmeans/edkm")
                    tp = time.perf_counter()
                    clustered = palettized(model, cfg, progress=progress)
                    palettize_seconds = time.perf_counter() - tp
                    t0 = time.perf_counter()
                if v == "rtn":
                    m = build_rtn(clustered)
                elif v == "kmeans":
                    m = build_kmeans(clustered)
                else:
                    m, losses = build_edkm(clustered, tok, ft_texts, s["steps"], progress=progress, **ft)
                remaining_quantized.remove(v)
                if not remaining_quantized:
                    clustered = None
            r["build_seconds"] = time.perf_counter() - t0 + (palettize_seconds if v in QUANTIZED else 0.0)
            if losses is not None:
                r["train_losses"] = losses
            if v in QUANTIZED:
                r["file"] = save_and_check(m, copy.deepcopy(model), batch, tmp, s["model"] if loaded is None else None)
                r["bytes"] = r["file"]["bytes"]
                r["size_kind"] = "edkm file"
                if not r["file"]["reload_exact"]:
                    log(
                        f"WARNING: {v}: the saved file's logits differ from the evaluated model's "
                        f"(max |diff| {r['file']['reload_max_abs_diff']:.3g})"
                    )
            else:
                r["bytes"] = 2 * n_weights
                r["size_kind"] = "bf16"
            r["bits_per_weight"] = 8 * r["bytes"] / n_weights
            te = time.perf_counter()
            metrics, items = evaluate_model(
                m, tok, test_texts, task_files, limit, s["eval_tokens"], s["zero_shot_batch_size"], progress
            )
            r["eval_seconds"] = time.perf_counter() - te
            r["metrics"] = metrics
            r["items"] = {
                t: {k: ("".join("1" if x else "0" for x in vals) if k != "logprob" else vals) for k, vals in o.items()}
                for t, o in items.items()
            }
            results[v] = r
            loads.append(os.getloadavg()[0])
            log(
                f"{v}: ppl {metrics['ppl']['ppl']:.2f}, "
                + ", ".join(f"{TASK_LABELS[t]} {metrics[t]['acc']:.3f}" for t in TASKS)
                + f" (build {r['build_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s)"
            )
            if m is not model:
                del m
    report = {
        "benchmark": "accuracy",
        "settings": s,
        "n_weights": n_weights,
        "palettize_seconds": palettize_seconds,
        "variants": results,
        "paired": paired_comparisons(results),
        "checks": _checks(results),
        "data": {
            "data_dir": str(data_dir),
            "train_files": len(train_files),
            "test_files": len(test_files),
            "tasks": {t: str(p) for t, p in task_files.items()},
        },
        **_results.stamp(),
    }
    report["machine"] = _machine()
    if s["model"] == "smollm2-135m":
        from edkm.models import smollm2_path

        d, name = smollm2_path()
        report["source_file_bytes"] = os.path.getsize(os.path.join(d, name))
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["seconds"] = time.perf_counter() - t_start
    report["loadavg"] = loads
    out_dir = args.out or os.path.join(_results.default_results_dir(), "accuracy")
    tag = _tag(s)
    report["files"] = {k: os.path.join(out_dir, f"{tag}.{k}") for k in ("json", "md", "png")}
    _results.write_json(report["files"]["json"], report)
    _plot(report, report["files"]["png"])
    _results.write_atomic(report["files"]["md"], markdown(report))
    return report


def _checks(results: Dict[str, dict]) -> dict:
    q = [v for v in QUANTIZED if v in results]
    layouts = {v: results[v]["file"]["layout"] for v in q}
    sizes = {v: results[v]["bytes"] for v in q}
    return {
        "reload_exact": {v: results[v]["file"]["reload_exact"] for v in q},
        "same_layout": len({json.dumps(x) for x in layouts.values()}) <= 1,
        "same_file_bytes": len(set(sizes.values())) <= 1,
        "luts": ({v: sum(g for _, _, _, g, _ in lay) for v, lay in layouts.items()}),
        "clustered_tensors": ({v: len(lay) for v, lay in layouts.items()}),
    }


# ----------------------------------------------------------------------------- output


def _pct(x):
    return f"{100 * x:.1f}"


def _num(x):
    """A perplexity: thousands separators up to 1e5, then 3 significant digits."""
    return f"{x:,.2f}" if x < 1e5 else f"{x:.3g}"


def _size(b):
    return f"{b / 2**20:,.1f} MiB"


def table(report: dict) -> str:
    """The main table (markdown)."""
    lines = [
        "| variant | size | bits/weight | held-out ppl | PIQA acc | PIQA acc_norm | ARC-E acc | "
        "ARC-E acc_norm | LAMBADA acc | LAMBADA ppl | build | eval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in report["variants"].items():
        m = r["metrics"]
        size = _size(r["bytes"]) + (" (file)" if r["size_kind"] == "edkm file" else " (bf16)")
        lines.append(
            f"| {v} | {size} | {r['bits_per_weight']:.2f} | {_num(m['ppl']['ppl'])} | "
            f"{_pct(m['piqa']['acc'])} | {_pct(m['piqa']['acc_norm'])} | {_pct(m['arc_easy']['acc'])} | "
            f"{_pct(m['arc_easy']['acc_norm'])} | {_pct(m['lambada_openai']['acc'])} | "
            f"{_num(m['lambada_openai']['ppl'])} | {r['build_seconds']:.0f} s | {r['eval_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def paired_table(report: dict) -> str:
    lines = [
        "| A vs B | task, metric | n | both right | A right, B wrong | B right, A wrong | both wrong | "
        "A - B (paired s.e.) | McNemar exact p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["paired"]:
        lines.append(
            f"| {p['a']} vs {p['b']} | {TASK_LABELS[p['task']]} {p['metric']} | {p['n']} | {p['both_right']} | "
            f"{p['a_only']} | {p['b_only']} | {p['both_wrong']} | {100 * p['diff']:+.1f} pp "
            f"(±{100 * p['diff_stderr']:.1f}) | {p['mcnemar_p']:.3g} |"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    s = report["settings"]
    ck = report["checks"]
    layout = f"one LUT per {s['group_size']} output channels" if s["group_size"] else "one LUT per matrix"
    n_items = {t: next(iter(report["variants"].values()))["metrics"][t]["n"] for t in TASKS}
    any_v = next(iter(report["variants"].values()))
    stderr = {t: any_v["metrics"][t]["acc_stderr"] for t in TASKS}
    lines = [
        f"# Accuracy at {s['bits']} bits: round-to-nearest vs k-means vs eDKM ({s['model']}, {layout})"
        + (" — QUICK smoke run, not a measurement" if s["quick"] else ""),
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine'].get('cpu_model', '?')}, {report['machine']['cpu_count']} CPUs, "
        f"torch threads: {report['machine']['torch_threads']}, torch {report['machine']['torch']}, "
        f"Python {report['machine']['python']}, {report['machine']['platform']}",
        f"- total time: {report['seconds'] / 60:.1f} min (palettize_, shared by rtn/kmeans/edkm: "
        f"{report['palettize_seconds']:.0f} s, included in their build times); peak RSS "
        f"{report['peak_rss_bytes'] / 2**30:.2f} GiB; 1-minute load average sampled at the start and "
        f"after each variant: {', '.join('%.1f' % x for x in report['loadavg'])}"
        + (
            " (above the CPU count: other processes shared the CPU, times are inflated)"
            if max(report["loadavg"]) > report["machine"]["cpu_count"] + 1
            else ""
        )
        + (
            f"; --threads {s['threads']}: on a CPU shared with other busy processes fewer threads run "
            f"faster (each parallel op waits for its slowest thread to be scheduled)"
            if s.get("threads", 0) < (report["machine"]["cpu_count"] or 0)
            else ""
        ),
        f"- quantized variants: {s['bits']} bits per weight, {layout}, tied embedding/lm_head clustered "
        f"like the rest (config {json.dumps(s['config'])})",
        f"- fine-tuning (edkm and finetune alike): {s['steps']} AdamW steps, lr {s['lr']:g} (10% linear "
        f"warm-up), batch {s['batch_size']} x {s['block_len']} tokens = {s['steps'] * s['batch_size'] * s['block_len']:,} "
        f"tokens from the corpus train split, seed {s['seed']}",
        f"- held-out perplexity: first {s['eval_tokens']:,} tokens of the corpus test split (SOTU 2000+, "
        f"Persuasion), windows of {s['context_len']}, stride {s['stride']}",
        f"- zero-shot: first {n_items['piqa']} PIQA, {n_items['arc_easy']} ARC-Easy, "
        f"{n_items['lambada_openai']} LAMBADA items (chance: 50%, 25%, 0%); accuracies in %, one standard "
        f"error about {100 * stderr['piqa']:.1f} / {100 * stderr['arc_easy']:.1f} / "
        f"{100 * stderr['lambada_openai']:.1f} pp",
        "",
        table(report),
        "",
        "Size: quantized variants = the file edkm.save wrote (bit-packed indices, fp16 LUTs, fp32 norms); "
        "baseline and finetune = the same weights in bf16.",
    ]
    if "source_file_bytes" in report:
        lines.append(
            f"The baseline's source, the Q4_1 GGUF, is {_size(report['source_file_bytes'])} "
            f"({8 * report['source_file_bytes'] / report['n_weights']:.2f} bits per weight: Q4_1, "
            f"5.0 bits per weight, for the decoder matrices; Q8_0, 8.5, for the tied embedding)."
        )
    lines += ["", "Checks:", ""]
    for v, ok in ck["reload_exact"].items():
        r = report["variants"][v]["file"]
        lines.append(
            f"- {v}: the saved file, loaded into a fresh model, gives the evaluated model's logits "
            + ("bit for bit" if ok else f"NOT exactly (max |diff| {r['reload_max_abs_diff']:.3g})")
        )
    if ck["reload_exact"]:
        lines.append(
            f"- same LUT layout in every quantized file: {'yes' if ck['same_layout'] else 'NO'} "
            f"({next(iter(ck['clustered_tensors'].values()))} clustered tensors, "
            f"{next(iter(ck['luts'].values()))} LUTs); same file size: "
            f"{'yes' if ck['same_file_bytes'] else 'NO'}"
        )
    if report["paired"]:
        lines += [
            "",
            "## Paired comparison (the same items)",
            "",
            f"With n = {n_items['piqa']} items a single accuracy has a standard error of about "
            f"{100 * max(stderr.values()):.0f} pp, so differences between two variants are judged on "
            "the items where they disagree: counts, the paired difference with its standard error, and "
            "the exact McNemar test on the disagreements.",
            "",
            paired_table(report),
        ]
    losses = {v: r["train_losses"] for v, r in report["variants"].items() if "train_losses" in r}
    if losses:
        lines += [
            "",
            "Training loss (first -> last step): "
            + "; ".join(f"{v} {l[0]:.3f} -> {l[-1]:.3f}" for v, l in losses.items()),
        ]
    lines += ["", "## Key numbers", ""] + [f"- {x}" for x in key_numbers(report)]
    lines += ["", "## What these numbers show and do not show", ""] + [f"- {x}" for x in reading(report["settings"])]
    lines += [
        "",
        f"Raw numbers, per-item outcomes and losses: `{os.path.basename(report['files']['json'])}`; "
        f"chart: `{os.path.basename(report['files']['png'])}`.",
    ]
    return "\n".join(lines) + "\n"


def key_numbers(report: dict) -> List[str]:
    """Facts read off the results (no interpretation): NLL per token, distance from chance, the
    paired differences that pass p < 0.05, and how many comparisons were made."""
    V = report["variants"]
    out = [
        "Held-out NLL per token (nats; ppl = exp(NLL), so ppl differences of orders of magnitude are "
        "differences of a few nats): " + ", ".join(f"{v} {r['metrics']['ppl']['nll']:.2f}" for v, r in V.items())
    ]
    for t in ("piqa", "arc_easy"):
        out.append(
            f"{TASK_LABELS[t]} acc minus chance ({100 * CHANCE[t]:.0f}%), in standard errors: "
            + ", ".join(
                f"{v} {(r['metrics'][t]['acc'] - CHANCE[t]) / max(r['metrics'][t]['acc_stderr'], 1e-12):+.1f}"
                for v, r in V.items()
            )
        )
    if "finetune" in V and "baseline" in V:
        f, b = V["finetune"]["metrics"], V["baseline"]["metrics"]
        out.append(
            "finetune minus baseline (what the loop does without clustering): held-out NLL "
            f"{f['ppl']['nll'] - b['ppl']['nll']:+.2f} nats, "
            + ", ".join(f"{TASK_LABELS[t]} acc {100 * (f[t]['acc'] - b[t]['acc']):+.1f} pp" for t in TASKS)
        )
    pairs = report["paired"]
    if pairs:
        m = len(pairs)
        sig = [p for p in pairs if p["mcnemar_p"] < 0.05]
        listed = (
            "; ".join(
                f"{p['a']} vs {p['b']} {TASK_LABELS[p['task']]} {p['metric']} {100 * p['diff']:+.1f} pp "
                f"(p = {p['mcnemar_p']:.2g})"
                for p in sig
            )
            or "none"
        )
        out.append(
            f"Paired differences with McNemar p < 0.05, out of {m} comparisons: {listed}. With {m} "
            f"comparisons about {0.05 * m:.1f} would pass by chance alone; a Bonferroni threshold is "
            f"p < {0.05 / m:.2g}."
        )
    return out


def reading(settings: dict) -> List[str]:
    """What the numbers show and do not show, built from the run's own settings."""
    steps, batch, block = settings["steps"], settings["batch_size"], settings["block_len"]
    tokens = steps * batch * block
    gs = settings.get("group_size")
    layout = (
        (
            "One LUT per matrix at {b} bits is the harshest layout there is ({k} values for a whole matrix, "
            "including the 49152 x 576 embedding). Finer LUT groups (--group-size) are the usual remedy for "
            "post-training quantization; this run does not use them."
        )
        if gs is None
        else (
            "A LUT per {gs} output channels at {b} bits ({k} values per LUT): finer groups than one LUT per "
            "matrix, at the cost of more LUT bytes (counted in the file sizes)."
        )
    )
    return [
        "Every quantized variant stores the same thing: the same bits per weight and LUT layout, "
        "checked on the files; only how the LUTs and assignments are chosen differs.",
        "The baseline is not an fp16 original: it is the dequantized Q4_1 GGUF (5 bits per weight in the "
        "decoder, 8.5 for the embedding). The quantized variants re-quantize an already 4-bit-ish model; "
        "their distance to the baseline is not the distance to the original SmolLM2.",
        "The corpus (State of the Union addresses, Jane Austen) is public and old; it may well be in "
        "SmolLM2's pretraining data. The test split is held out from our fine-tuning only, not "
        "necessarily unseen by the model.",
        f"The fine-tuning budget of this run: {steps} steps x {batch} x {block} tokens, about {tokens / 1000:.0f}k "
        "tokens. eDKM as published trains far longer; this measures what a clustering-aware fine-tune of "
        "this length recovers, not eDKM's ceiling. The corpus (speeches, novels) is also off-domain for "
        "the zero-shot tasks.",
        f"The finetune control runs the same loop with the same learning rate ({settings['lr']:g}) and no "
        "tuning: it shows what this loop does to an unclustered model, not the best a plain fine-tune could "
        "do. Where it is worse than the baseline, the loop itself costs accuracy, and the edkm variant pays "
        "that cost too.",
        layout.format(b=settings["bits"], k=2 ** settings["bits"], gs=gs),
        f"Nothing was tuned on test data: the settings were fixed before this run, seed {settings['seed']}; "
        "the test split and the zero-shot items were only evaluated. One seed, one run: no run-to-run "
        "variance is shown.",
        "The model is an instruct model evaluated without a chat template, the same way for every "
        "variant; absolute accuracies are those of a 135M model, the comparisons between variants are "
        "the point.",
        "A few hundred items per task give about ±2 pp per accuracy: read the paired comparison "
        "(McNemar on the items where two variants disagree) before calling a difference real; with many "
        "comparisons, a p around 0.05 is weak evidence.",
    ]


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(report["variants"])
    acc_metrics = [
        ("piqa", "acc"),
        ("piqa", "acc_norm"),
        ("arc_easy", "acc"),
        ("arc_easy", "acc_norm"),
        ("lambada_openai", "acc"),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
        m = report["variants"][v]["metrics"]
        vals = [100 * m[t][k] for t, k in acc_metrics]
        errs = [100 * m[t][k + "_stderr"] for t, k in acc_metrics]
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(acc_metrics))]
        ax1.bar(xs, vals, width, yerr=errs, capsize=2, label=v, color=f"C{j}")
        ppl = [m["ppl"]["ppl"], m["lambada_openai"]["ppl"]]
        ax2.bar([i + (j - (len(variants) - 1) / 2) * width for i in range(2)], ppl, width, color=f"C{j}")
    for i, (t, _) in enumerate(acc_metrics):
        if CHANCE[t]:
            ax1.hlines(100 * CHANCE[t], i - 0.45, i + 0.45, colors="gray", linestyles="dotted")
    ax1.set_xticks(range(len(acc_metrics)), [f"{TASK_LABELS[t]}\n{k}" for t, k in acc_metrics])
    ax1.set_ylabel("accuracy, % (±1 s.e.; dotted: chance)")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xticks(range(2), ["held-out ppl", "LAMBADA ppl"])
    ax2.set_ylabel("perplexity (log)")
    s = report["settings"]
    layout = f"LUT per {s['group_size']} rows" if s["group_size"] else "one LUT per matrix"
    fig.suptitle(
        f"{s['model']}, {s['bits']} bits ({layout}), {s['steps']} fine-tuning steps"
        + (" — quick smoke run" if s["quick"] else "")
    )
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def render(json_path) -> dict:
    """Rewrite the markdown and PNG of a results JSON (from this command) beside it; returns it."""
    from benchmarks import _results

    json_path = Path(json_path)
    report = json.loads(json_path.read_text())
    if report.get("benchmark") != "accuracy":
        raise ValueError(f"{json_path}: not a results file of edkm bench accuracy")
    base = json_path.with_suffix("")
    report["files"] = {k: f"{base}.{k}" for k in ("json", "md", "png")}
    _plot(report, report["files"]["png"])
    _results.write_atomic(report["files"]["md"], markdown(report))
    return report


def summary(report: dict) -> str:
    """The console summary (printed last)."""
    lines = [table(report)]
    if report["paired"]:
        lines += ["", paired_table(report)]
    ck = report["checks"]
    if ck["reload_exact"]:
        lines += [
            "",
            f"files reload bit-exact: {all(ck['reload_exact'].values())}; same LUT layout: "
            f"{ck['same_layout']}; same file size: {ck['same_file_bytes']}",
        ]
    lines += [
        f"written: {', '.join(report['files'].values())}",
        f"total {report['seconds'] / 60:.1f} min; tuned on the train split only, nothing chosen "
        "by looking at test numbers",
    ]
    return "\n".join(lines)


def main(args) -> int:
    import sys

    if args.render is not None:
        report = render(args.render)
    else:
        report = run(args)
    text = summary(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
    ck = report["checks"]
    ok = all(ck["reload_exact"].values()) and ck["same_layout"] and ck["same_file_bytes"]
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("accuracy"))
