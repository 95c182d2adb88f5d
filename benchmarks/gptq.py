"""`edkm bench gptq`: nearest rounding vs error-compensated assignment (GPTQ over the LUTs) in
post-training clustering of SmolLM2-135M, measured on validation text of the TRAIN split.

Every variant clusters the same model with the SqueezeLLM-style recipe (Fisher-weighted exact
k-means, 0.5% Fisher-chosen outliers kept exact, one LUT per matrix or per --group-size rows)
at each of --bits; the Fisher sensitivity and the input Hessians are computed once, on
calibration text from train files. The variants differ only in which centroid each weight takes:

  nearest   each weight's nearest centroid (what palettize_ + finalize do)
  gptq      edkm.gptq_: columns in decreasing Hessian-diagonal order, each column's rounding
            error spread over the columns not yet rounded (damping 1% of the mean diagonal)
  refit     gptq, then twice: refit the LUTs to the assignment by least squares on the output
            error and assign again (edkm.gptq_(..., refit_rounds=2))

Measured on blocks of validation documents (5% of the train files, never the test split):
KL(baseline || variant) and top-1 next-token agreement, and the variant's perplexity on the
same blocks. This is what the recipe's ``gptq`` choice rests on. Results:
benchmarks/results/gptq/gptq_<bits>_<layout>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

SQUEEZELLM_OUTLIERS = 0.005


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", default="3,4", help="comma-separated bit widths (default 3,4)")
    p.add_argument("--group-size", type=int, default=None, help="output rows per LUT (default: one LUT per matrix)")
    p.add_argument("--variants", default="nearest,gptq,refit", help="comma-separated: nearest, gptq, refit")
    p.add_argument("--val-tokens", type=int, default=8192, help="validation tokens (blocks of 512)")
    p.add_argument("--hessian-batches", type=int, default=32, help="calibration batches of 2 x 256 tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/gptq)")
    p.add_argument("--no-progress", action="store_true")


@torch.no_grad()
def block_perplexity(model, blocks: torch.Tensor, batch_size: int = 2) -> float:
    import torch.nn.functional as F

    nll, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i : i + batch_size]
        logits = model(input_ids=b).logits.float()
        nll += float(
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        )
        n += b[:, 1:].numel()
    return math.exp(nll / n)


def main(args) -> int:
    import edkm
    from benchmarks._results import command_line, default_results_dir, stamp, write_atomic
    from edkm.data import corpus_split, default_data_dir, read_texts, token_blocks, train_validation_split
    from edkm.evaluate import teacher_agreement
    from edkm.gptq import gptq_, input_hessians, median_ratio
    from edkm.models import load_model
    from edkm.sensitivity import calibration_batches, fisher

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    bits_list = [int(b) for b in args.bits.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("nearest", "gptq", "refit"):
            raise SystemExit(f"edkm bench gptq: unknown variant {v!r}; expected nearest, gptq or refit")
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    if data_dir is None:
        raise SystemExit("edkm bench gptq: needs the corpus (--data-dir, or ../shared/data beside the checkout)")
    train_files, _test = corpus_split(data_dir)  # the test split is never read here
    train, val = train_validation_split(train_files, 0.05, 0)
    base, tok = load_model("smollm2-135m", torch.float32)
    base.eval()
    calib_texts = read_texts(train[:40])
    val_blocks = token_blocks(tok, read_texts(val), 512, max_blocks=max(1, args.val_tokens // 512), seed=0)
    t0 = time.perf_counter()
    sens = fisher(base, calibration_batches(tok, calib_texts, 8, 2, 256, seed=0), progress=progress)
    fisher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hess = input_hessians(
        base, calibration_batches(tok, calib_texts, args.hessian_batches, 2, 256, seed=7), progress=progress
    )
    hessian_s = time.perf_counter() - t0
    base_ppl = block_perplexity(base, val_blocks)
    rows = [dict(name="baseline", bits=16, variant="-", ppl=base_ppl, kl=0.0, top1=1.0)]
    print(f"baseline: validation ppl {base_ppl:.2f}", flush=True)
    for bits in bits_list:
        for variant in variants:
            m = copy.deepcopy(base)
            cfg = edkm.Config(
                bits=bits,
                init="sensitivity",
                outlier_fraction=SQUEEZELLM_OUTLIERS,
                outlier_criterion="sensitivity",
                group_size=args.group_size,
            )
            t0 = time.perf_counter()
            edkm.palettize_(m, cfg, sensitivity=sens, progress=progress)
            stats = {}
            if variant != "nearest":
                stats = gptq_(m, hess, refit_rounds=2 if variant == "refit" else 0, progress=progress)
            edkm.finalize(m)
            build_s = time.perf_counter() - t0
            m.eval()
            agree = teacher_agreement(m, base, val_blocks, batch_size=2)
            ppl = block_perplexity(m, val_blocks)
            row = dict(
                name=f"{variant}{bits}",
                bits=bits,
                variant=variant,
                ppl=ppl,
                kl=agree["kl"],
                top1=agree["top1"],
                build_seconds=build_s,
                median_output_error_ratio=median_ratio(stats),
            )
            rows.append(row)
            print(
                f"{row['name']}: validation ppl {ppl:.2f} ({ppl / base_ppl:.2f}x), KL {agree['kl']:.4f}, "
                f"top-1 {100 * agree['top1']:.1f}%, built in {build_s:.0f} s"
                + (f", median output error vs nearest {row['median_output_error_ratio']:.3f}" if stats else ""),
                flush=True,
            )
            del m
    layout = f"g{args.group_size}" if args.group_size else "per_matrix"
    out = Path(args.out or os.path.join(default_results_dir(), "gptq"))
    name = f"gptq_{'_'.join(map(str, bits_list))}_{layout}"
    report = dict(
        stamp(),
        command=command_line(),
        settings=dict(
            group_size=args.group_size,
            outlier_fraction=SQUEEZELLM_OUTLIERS,
            val_positions=int(val_blocks.numel()),
            hessian_tokens=args.hessian_batches * 512,
            fisher_seconds=fisher_s,
            hessian_seconds=hessian_s,
            validation_files=[str(Path(f).name) for f in val],
        ),
        rows=rows,
    )
    lines = [
        f"# Post-training clustering of SmolLM2-135M: nearest vs error-compensated ({layout})",
        "",
        f"Command: `{report['command']}`. Validation: {report['settings']['val_positions']:,} positions of "
        f"{len(val)} train-split documents held out (never the test split); Hessians from "
        f"{report['settings']['hessian_tokens']:,} calibration tokens.",
        "",
        "| row | bits | assignment | validation ppl | x baseline | KL to baseline | top-1 | median output error vs nearest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med = r.get("median_output_error_ratio")
        lines.append(
            f"| {r['name']} | {r['bits']} | {r['variant']} | {r['ppl']:.2f} | {r['ppl'] / base_ppl:.2f} | "
            f"{r['kl']:.4f} | {100 * r['top1']:.1f}% | {'-' if med is None else f'{med:.3f}'} |"
        )
    write_atomic(str(out / f"{name}.json"), json.dumps(report, indent=1, default=str))
    write_atomic(str(out / f"{name}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("gptq"))
