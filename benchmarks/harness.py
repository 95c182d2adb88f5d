"""`edkm bench harness`: our zero-shot harness vs lm-evaluation-harness on the same model and items.

A compressed file is exported to a Hugging Face directory (``edkm export --hf``, bf16), and both
harnesses evaluate that directory in float32 on the first ``--limit`` items of PIQA and ARC-Easy
(``edkm eval`` vs lm-eval's ``hf`` model through ``edkm/lm_eval_tasks``). Per task: both
accuracies, their difference in standard errors, how many items the two decide differently and
the largest difference of a choice's log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="an edkm file (or a Hugging Face directory) to evaluate")
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task (default 500)")
    p.add_argument("--data-dir", default=None, help="data folder (default ../shared/data)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def compare(ours: dict, theirs: dict, samples: list) -> dict:
    """Agreement of one task: accuracies, difference in standard errors, items decided
    differently, largest log-likelihood difference."""
    row = {"n": ours["n"], "n_lm_eval": theirs["n"]}
    for metric in ("acc", "acc_norm"):
        a, b = ours[metric], theirs[metric]
        se = ours[f"{metric}_stderr"]
        row[metric] = {
            "edkm": a,
            "lm_eval": b,
            "stderr": se,
            "diff_in_stderr": (b - a) / se if se else 0.0,
            "items_decided_differently": sum(bool(s[metric]) != it[metric] for s, it in zip(samples, ours["items"])),
        }
    row["max_abs_logprob_diff"] = max(
        abs(r[0] - lp) for s, it in zip(samples, ours["items"]) for r, lp in zip(s["filtered_resps"], it["logprobs"])
    )
    return row


def main(args) -> int:
    import torch
    from edkm import evaluate, lm_eval_harness
    from benchmarks._results import default_results_dir, stamp, write_atomic, write_json
    from edkm.data import default_data_dir
    from edkm.hf_export import export_hf
    from edkm.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        raise ValueError("edkm bench harness: no data folder (--data-dir, EDKM_DATA_DIR or ../shared/data)")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edkm-bench-harness-") as tmp:
        model_dir = args.file
        if os.path.isfile(args.file):
            model_dir = export_hf(args.file, os.path.join(tmp, "hf"), dtype="bfloat16")
        t0 = time.perf_counter()
        theirs = lm_eval_harness.run(
            model_dir, tasks, data_dir, limit=args.limit, batch_size=args.batch_size, dtype="float32", log_samples=True
        )
        theirs_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok = load_model(model_dir, torch.float32)
        ours = {
            t: evaluate.zero_shot(
                model,
                tok,
                evaluate.resolve_task(t, data_dir)[1],
                limit=args.limit,
                batch_size=args.batch_size,
                per_item=True,
            )
            for t in tasks
        }
        ours_s = time.perf_counter() - t0
        del model
    for t in tasks:
        rows[t] = compare(ours[t], theirs["tasks"][t], theirs["samples"][t])
    payload = {
        **stamp(),
        "file": os.path.basename(args.file),
        "limit": args.limit,
        "harness": theirs["settings"]["harness"],
        "seconds": {"edkm": ours_s, "lm_eval": theirs_s},
        "tasks": rows,
    }
    out = args.out or default_results_dir()
    write_json(os.path.join(out, "harness_agreement.json"), payload)
    lines = [
        f"# Zero-shot harness agreement: edkm eval vs {payload['harness']}",
        "",
        f"Model: `{payload['file']}` exported with `edkm export --hf` (bf16), both harnesses in float32; "
        f"first {args.limit} items of each task; zero-shot.",
        "",
        "| task | metric | edkm eval | lm-eval | stderr | diff / stderr | items decided differently |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in rows.items():
        for metric in ("acc", "acc_norm"):
            m = r[metric]
            lines.append(
                f"| {t} | {metric} | {m['edkm']:.4f} | {m['lm_eval']:.4f} | {m['stderr']:.4f} | "
                f"{m['diff_in_stderr']:+.2f} | {m['items_decided_differently']} of {r['n']} |"
            )
    lines += [
        "",
        "Largest difference of one choice's log-likelihood: "
        + ", ".join(f"{t} {r['max_abs_logprob_diff']:.2e}" for t, r in rows.items())
        + ".",
        f"Time: edkm eval {ours_s:.0f} s, lm-eval {theirs_s:.0f} s.",
        "",
        f"Command: `{payload['command']}`",
        "",
    ]
    write_atomic(os.path.join(out, "harness_agreement.md"), "\n".join(lines))
    print("\n".join(lines))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("harness"))
