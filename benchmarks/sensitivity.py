"""`edkm bench sensitivity`: where the damage of clustering comes from, one matrix at a time.

Every clusterable matrix of the model (each nn.Linear / nn.Embedding weight; the embedding tied
with lm_head is one matrix) is clustered post-training on its own (``--bits``, default 3; one LUT
per matrix unless ``--group-size``; exact k-means, ``--init``), the rest of the model staying
exact. For each, on held-out *validation* text cut from the corpus TRAIN files (never the test
split): the KL divergence from the unclustered model's next-token distribution, mean over
positions, and the perplexity. The baseline log-probabilities and each decoder layer's input are
computed once; a matrix in layer l reruns only layers l.. (checked to reproduce the baseline).

Beside the measurement, the Fisher proxy of :mod:`edkm.mixed_precision` for the same clustering,
sum_i F_i (w_i - q(w_i))**2 with F the diagonal Fisher (:func:`edkm.sensitivity.fisher`) on
calibration text from other train files, and its Spearman rank correlation with the measured KL
(plus the same for the unweighted squared error, as a control): how far the proxy that chooses
bits per matrix can be trusted.

Results: benchmarks/results/sensitivity/<model>_<bits>bit_<layout>[_quick].{json,md,png}: the
table, the exact command, and a heatmap (layers x matrix types, log colour scale) of the KL and
of the proxy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

FULL = dict(seqs=2, seq_len=256, fisher_batches=8, fisher_len=256)
QUICK = dict(seqs=2, seq_len=64, fisher_batches=2, fisher_len=64)
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m, loaded in fp32)")
    p.add_argument("--bits", type=int, default=3, help="bits of the one clustered matrix (default 3)")
    p.add_argument("--group-size", type=int, default=None, help="output channels per LUT (default: one LUT per matrix)")
    p.add_argument(
        "--init",
        default="optimal",
        choices=("optimal", "auto", "kmeans++"),
        help="centroid initialization, i.e. the post-training clustering (default optimal: exact k-means)",
    )
    p.add_argument(
        "--seqs", type=int, default=None, help=f"validation sequences (default {FULL['seqs']}; --quick {QUICK['seqs']})"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"tokens per validation sequence (default {FULL['seq_len']}; --quick {QUICK['seq_len']})",
    )
    p.add_argument(
        "--fisher-batches",
        type=int,
        default=None,
        help=f"calibration sequences for the Fisher proxy, one per batch (default "
        f"{FULL['fisher_batches']}; --quick {QUICK['fisher_batches']}; 0: no proxy)",
    )
    p.add_argument(
        "--fisher-len",
        type=int,
        default=None,
        help=f"tokens per calibration sequence (default {FULL['fisher_len']}; --quick {QUICK['fisher_len']})",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N matrices (smoke runs)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="data folder (corpus/); default $EDKM_DATA_DIR, else ../shared/data"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="which train files become validation / calibration text")
    p.add_argument("--quick", action="store_true", help="smoke run (short sequences); results get a _quick suffix")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: rewrite the markdown and PNG beside a results JSON this command wrote",
    )
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/sensitivity)")


# ---- data ---------------------------------------------------------------------------------------


def split_train_files(train_files: Sequence, val_chars: int, calib_chars: int, seed: int):
    """(validation files, calibration files): the train files in a seeded order, the first ones
    holding at least ``val_chars`` bytes of text for validation, the next ones at least
    ``calib_chars`` for calibration (disjoint, so the proxy is not fitted on the validation text)."""
    order = sorted(train_files)
    random.Random(seed).shuffle(order)
    out, i = [], 0
    for want in (val_chars, calib_chars):
        part, chars = [], 0
        while i < len(order) and chars < want:
            part.append(order[i])
            chars += os.path.getsize(order[i])
            i += 1
        out.append(part)
    return out[0], out[1]


def blocks_from(tokenizer, files: Sequence, n: int, length: int, seed: int) -> torch.Tensor:
    from edkm.data import read_texts, token_blocks

    texts = read_texts(files)
    blocks = token_blocks(tokenizer, texts, length, max_blocks=n, seed=seed)
    if blocks.shape[0] < n:
        raise ValueError(
            f"edkm bench sensitivity: the text gives {blocks.shape[0]} blocks of {length} tokens, {n} are needed"
        )
    return blocks


# ---- one matrix at a time -----------------------------------------------------------------------


def layer_index(name: str) -> Optional[int]:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class LayerRunner:
    """Baseline log-probs once; then the logits with layers l.. rerun from the cached input of
    layer l (a Hugging Face decoder: ``model.model.layers``), or the full model (l = None)."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.ids = model, ids
        self.layers = model.model.layers
        self.inputs: List[torch.Tensor] = [None] * len(self.layers)
        hooks = [
            layer.register_forward_pre_hook(self._keeper(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]
        try:
            with torch.no_grad():
                self.base_logits = model(input_ids=ids, use_cache=False).logits.float()
        finally:
            for h in hooks:
                h.remove()
        self.base_logp = torch.log_softmax(self.base_logits, -1)

    def _keeper(self, i):
        def keep(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.inputs[i] = h.detach().clone()

        return keep

    @torch.no_grad()
    def logits(self, start: Optional[int]) -> torch.Tensor:
        if start is None or start == 0:
            return self.model(input_ids=self.ids, use_cache=False).logits.float()
        inner = self.model.model
        inner.layers = nn.ModuleList(list(self.layers)[start:])
        try:
            return self.model(inputs_embeds=self.inputs[start], use_cache=False).logits.float()
        finally:
            inner.layers = self.layers

    def kl_and_nll(self, logits: torch.Tensor):
        """(mean KL(base || this) over all positions, mean next-token NLL) in float64."""
        logp = torch.log_softmax(logits, -1)
        p = self.base_logp.exp()
        kl = (p * (self.base_logp - logp)).sum(-1).double().mean()
        nll = -logp[:, :-1].gather(-1, self.ids[:, 1:, None]).double().mean()
        return float(kl), float(nll)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank)."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    return pearson(ranks(list(x)), ranks(list(y)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def command(args) -> str:
    """The command that reproduces this run."""
    parts = ["edkm", "bench", "sensitivity"]
    for key, default in (
        ("model", "smollm2-135m"),
        ("bits", 3),
        ("group_size", None),
        ("init", "optimal"),
        ("seqs", None),
        ("seq_len", None),
        ("fisher_batches", None),
        ("fisher_len", None),
        ("limit", None),
        ("data_dir", None),
        ("threads", 0),
        ("seed", 0),
        ("out", None),
    ):
        v = getattr(args, key)
        if v != default:
            parts += ["--" + key.replace("_", "-"), str(v)]
    if args.quick:
        parts.append("--quick")
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> dict:
    from benchmarks import _results
    from edkm.config import Config
    from edkm.data import corpus_split, default_data_dir
    from edkm.mixed_precision import clusterable_units, post_training_weight
    from edkm.models import load_model
    from edkm.sensitivity import fisher
    from tqdm import tqdm

    t0 = time.perf_counter()
    preset = QUICK if args.quick else FULL
    seqs = args.seqs or preset["seqs"]
    seq_len = args.seq_len or preset["seq_len"]
    fb = preset["fisher_batches"] if args.fisher_batches is None else args.fisher_batches
    fl = args.fisher_len or preset["fisher_len"]
    for key, v in (("--seqs", seqs), ("--seq-len", seq_len), ("--fisher-len", fl)):
        if v < 2:
            raise ValueError(f"edkm bench sensitivity: {key} must be >= 2, got {v}")
    if fb < 0:
        raise ValueError(f"edkm bench sensitivity: --fisher-batches must be >= 0, got {fb}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config(bits=args.bits, group_size=args.group_size, init=args.init)

    data_dir = args.data_dir or default_data_dir()
    train, _ = corpus_split(data_dir)  # the test split is never read
    model, tok = load_model(args.model, torch.float32)
    model.eval()
    # ~4 characters per token, twice over: whole files, so blocks never run short
    val_files, calib_files = split_train_files(train, 8 * seqs * seq_len, 8 * fb * fl, args.seed)
    val = blocks_from(tok, val_files, seqs, seq_len, args.seed)
    sens = None
    if fb:
        calib = blocks_from(tok, calib_files, fb, fl, args.seed)
        sens = fisher(model, calib[:, None], progress=True)

    runner = LayerRunner(model, val)
    base_kl, base_nll = runner.kl_and_nll(runner.base_logits)
    check_layer = len(runner.layers) // 2
    replay = runner.logits(check_layer)
    replay_err = float((replay - runner.base_logits).abs().max())
    if replay_err > 1e-3:
        raise RuntimeError(
            f"edkm bench sensitivity: rerunning from layer {check_layer} does not reproduce "
            f"the baseline logits (max diff {replay_err:g}); this model is not supported"
        )

    units = [u for u in clusterable_units(model, config) if u.config is not None]
    if args.limit is not None:
        units = units[: args.limit]
    mods = dict(model.named_modules())
    rows = []
    for u in tqdm(units, desc="edkm: one matrix at a time", unit="matrix"):
        w = mods[u.name].weight
        t1 = time.perf_counter()
        f = sens[u.name] if sens is not None else None
        q = post_training_weight(w, u.config, None, f"{u.name}.weight")
        orig = w.detach().clone()
        err = (orig.double() - q.double()).square()
        try:
            with torch.no_grad():
                w.copy_(q)
            start = None if len(u.names) > 1 or layer_index(u.name) is None else layer_index(u.name)
            kl, nll = runner.kl_and_nll(runner.logits(start))
        finally:
            with torch.no_grad():
                w.copy_(orig)
        rows.append(
            {
                "name": u.name,
                "tied": list(u.names[1:]),
                "layer": layer_index(u.name),
                "type": u.name.rsplit(".", 1)[-1],
                "shape": list(u.shape),
                "kl": kl,
                "ppl": math.exp(nll),
                "sq_error": float(err.sum()),
                "fisher_proxy": float((f.double() * err).sum()) if f is not None else None,
                "seconds": time.perf_counter() - t1,
            }
        )

    summary = {
        "matrices": len(rows),
        "spearman_kl_fisher": None,
        "spearman_kl_sq_error": spearman([r["kl"] for r in rows], [r["sq_error"] for r in rows]),
    }
    if sens is not None:
        kl = [r["kl"] for r in rows]
        proxy = [r["fisher_proxy"] for r in rows]
        summary["spearman_kl_fisher"] = spearman(kl, proxy)
        pos = [(a, b) for a, b in zip(kl, proxy) if a > 0 and b > 0]
        summary["pearson_log_kl_log_fisher"] = pearson([math.log(a) for a, _ in pos], [math.log(b) for _, b in pos])
        # F is the Fisher of a batch's MEAN loss over fl - 1 predictions: about 1/(fl - 1) of the
        # per-token Fisher when per-token gradients are uncorrelated; KL is per token.
        ratios = sorted(a / (b * (fl - 1) / 2) for a, b in pos)
        summary["median_kl_over_second_order"] = ratios[len(ratios) // 2] if ratios else None
        top = lambda key: {r["name"] for r in sorted(rows, key=lambda r: -r[key])[:10]}  # noqa: E731
        summary["top10_overlap"] = len(top("kl") & top("fisher_proxy"))
    suffix = "_quick" if args.quick else ""
    layout = f"g{args.group_size}" if args.group_size else "lut-per-matrix"
    out_dir = args.out or os.path.join(_results.default_results_dir(), "sensitivity")
    base = os.path.join(out_dir, f"{args.model}_{args.bits}bit_{layout}{suffix}")
    report = {
        "benchmark": "sensitivity",
        **_results.stamp(),
        "command": command(args),
        "settings": {
            "model": args.model,
            "bits": args.bits,
            "group_size": args.group_size,
            "init": args.init,
            "seqs": seqs,
            "seq_len": seq_len,
            "fisher_batches": fb,
            "fisher_len": fl,
            "seed": args.seed,
            "quick": bool(args.quick),
            "limit": args.limit,
            "threads": torch.get_num_threads(),
            "validation_files": [Path(f).name for f in val_files],
            "calibration_files": [Path(f).name for f in calib_files] if fb else [],
        },
        "baseline": {
            "ppl": math.exp(base_nll),
            "kl": base_kl,
            "replay_max_abs_diff": replay_err,
            "replay_from_layer": check_layer,
        },
        "summary": summary,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "files": {k: f"{base}.{k}" for k in ("json", "md", "png")},
    }
    _results.write_json(report["files"]["json"], report)
    _plot(report, report["files"]["png"])
    _results.write_atomic(report["files"]["md"], markdown(report))
    return report


# ---- output -------------------------------------------------------------------------------------


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    s, b, sm = report["settings"], report["baseline"], report["summary"]
    layout = f"one LUT per {s['group_size']} rows" if s["group_size"] else "one LUT per matrix"
    lines = [
        f"# Per-matrix sensitivity: {s['model']}, one matrix at {s['bits']} bits ({layout}), the rest exact",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; {report['machine']['platform']}, {s['threads']} threads; "
        f"{report['seconds'] / 60:.1f} min.",
        "",
        f"Validation text: {s['seqs']} sequences x {s['seq_len']} tokens cut from corpus TRAIN files "
        f"({', '.join(s['validation_files'])}); the test split is not read. KL = mean over positions of "
        f"KL(unclustered || one matrix clustered), nats/token. Baseline perplexity on this text: "
        f"{b['ppl']:.3f}. Clustering: post-training, init={s['init']} (exact 1-D k-means), fp16 LUT, as "
        f"`palettize_` + `finalize` do it. Rerunning from layer {b['replay_from_layer']} reproduces the "
        f"baseline logits to {b['replay_max_abs_diff']:.1e}.",
        "",
    ]
    if sm["spearman_kl_fisher"] is not None:
        lines += [
            f"Fisher proxy (item 6's cost): sum F (w - q(w))^2, F = diagonal empirical Fisher over "
            f"{s['fisher_batches']} calibration sequences x {s['fisher_len']} tokens from other train files "
            f"({', '.join(s.get('calibration_files', []))}).",
            "",
            "| agreement with the measured KL (over all matrices) | value |",
            "|---|---|",
            f"| Spearman rank correlation, KL vs Fisher proxy | {sm['spearman_kl_fisher']:.3f} |",
            f"| Spearman rank correlation, KL vs plain squared error (control) | {sm['spearman_kl_sq_error']:.3f} |",
            f"| Pearson correlation of log KL and log proxy | {sm['pearson_log_kl_log_fisher']:.3f} |",
            f"| median KL / (proxy x (tokens - 1) / 2), the diagonal second-order estimate per token | "
            f"{_fmt(sm.get('median_kl_over_second_order'))} |",
            f"| matrices in both top-10 lists | {sm['top10_overlap']} of 10 |",
            "",
        ]
    rows = sorted(report["rows"], key=lambda r: -r["kl"])
    lines += ["## The most damaging matrices", "", "| matrix | KL | ppl | Fisher proxy |", "|---|---|---|---|"]
    for r in rows[:15]:
        tied = f" (tied: {', '.join(r['tied'])})" if r["tied"] else ""
        lines.append(f"| {r['name']}{tied} | {r['kl']:.4g} | {r['ppl']:.3f} | {_fmt(r['fisher_proxy'])} |")
    lines += [
        "",
        "## All matrices",
        "",
        "| matrix | shape | KL | ppl | squared error | Fisher proxy | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        report["rows"],
        key=lambda r: (-1 if r["layer"] is None else r["layer"], TYPES.index(r["type"]) if r["type"] in TYPES else 99),
    ):
        lines.append(
            f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['kl']:.4g} | {r['ppl']:.3f} | "
            f"{r['sq_error']:.4g} | {_fmt(r['fisher_proxy'], '.4g')} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _grid(rows: List[dict], key: str):
    """(row labels, column labels, values): one row per decoder layer, one column per matrix
    type; matrices outside the layers (the embedding, tied with lm_head) get a row of their own
    on top, value in the first column."""
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    types = [t for t in TYPES if any(r["type"] == t for r in rows)] or ["-"]
    others = [r for r in rows if r["layer"] is None]
    labels = [r["type"] + (" (tied)" if r["tied"] else "") for r in others] + [str(l) for l in layers]
    grid = [[float("nan")] * len(types) for _ in labels]
    for i, r in enumerate(others):
        if r[key] is not None:
            grid[i][0] = r[key]
    for r in rows:
        if r["layer"] is not None and r["type"] in types and r[key] is not None:
            grid[len(others) + layers.index(r["layer"])][types.index(r["type"])] = r[key]
    return labels, types, grid


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows = report["rows"]
    keys = [("kl", "measured KL (nats/token)")]
    if report["summary"]["spearman_kl_fisher"] is not None:
        keys.append(("fisher_proxy", "Fisher proxy sum F (w-q)^2"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 1, 9), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        labels, types, grid = _grid(rows, key)
        vals = [v for row in grid for v in row if v == v and v > 0]
        if not vals:
            continue
        im = ax.imshow(
            grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=min(vals), vmax=max(vals)), interpolation="nearest"
        )
        ax.set_xticks(range(len(types)), [t.replace("_proj", "") for t in types])
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("decoder layer")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.06)
    s = report["settings"]
    sm = report["summary"]
    rho = f"; Spearman(KL, proxy) = {sm['spearman_kl_fisher']:.2f}" if sm["spearman_kl_fisher"] is not None else ""
    fig.suptitle(
        f"{s['model']}: one matrix clustered to {s['bits']} bits, the rest exact{rho}"
        + (" (quick)" if s["quick"] else ""),
        fontsize=10,
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
    if report.get("benchmark") != "sensitivity":
        raise ValueError(f"{json_path}: not a results file of edkm bench sensitivity")
    base = json_path.with_suffix("")
    report["files"] = {k: f"{base}.{k}" for k in ("json", "md", "png")}
    _plot(report, report["files"]["png"])
    _results.write_atomic(report["files"]["md"], markdown(report))
    return report


def main(args) -> int:
    report = render(args.render) if args.render is not None else run(args)
    sm = report["summary"]
    worst = sorted(report["rows"], key=lambda r: -r["kl"])[:5]
    print(
        f"baseline ppl {report['baseline']['ppl']:.3f}; {sm['matrices']} matrices; most damaging: "
        + ", ".join(f"{r['name']} (KL {r['kl']:.3g})" for r in worst)
    )
    if sm["spearman_kl_fisher"] is not None:
        print(
            f"Spearman(KL, Fisher proxy) = {sm['spearman_kl_fisher']:.3f}; "
            f"Spearman(KL, squared error) = {sm['spearman_kl_sq_error']:.3f}"
        )
    print("written: " + ", ".join(report["files"].values()))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("sensitivity"))
