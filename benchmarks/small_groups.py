"""Small LUT groups on SmolLM2-135M (CPU): per-row initialization time, and the training step
with one LUT per matrix vs per 16 rows vs per row, in one process (so the ratios share the
machine's load; other processes' noise shows up in every variant alike). Times are medians.

Initialization is ``palettize_(model, Config(bits, group_size=1))`` (exact 1-D k-means of every
row, 0 training steps). A step is forward + backward of the whole model on random token ids
(no corpus needed) with the fp32 model clustered by ``palettize_``; which DKM domain each
matrix takes (N-domain for small groups, U-domain otherwise) is the library's own choice unless
``--ndomain`` forces it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

VARIANTS = {"per-matrix": None, "16-row": 16, "per-row": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name for edkm.models.load_model")
    p.add_argument("--bits", type=int, default=3, help="bits per weight (default 3)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step, 1-4 (default 1)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median; default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--skip-init", action="store_true", help="skip the per-row initialization timing")
    p.add_argument(
        "--ndomain",
        choices=("auto", "always", "never"),
        default="auto",
        help="DKM domain for small groups (edkm.settings(ndomain=...); default auto)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def _check(args) -> list:
    if not 1 <= args.batch <= 4:
        raise ValueError(f"--batch must be 1..4, got {args.batch}")
    if args.tokens < 1 or args.steps < 1:
        raise ValueError(f"--tokens and --steps must be >= 1, got {args.tokens}, {args.steps}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ValueError(f"--variants must be a comma-separated subset of {', '.join(VARIANTS)}, got {args.variants!r}")
    return names


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fresh_model(name):
    from edkm.models import load_model

    model, _ = load_model(name, torch.float32)
    return model


def time_init(args) -> dict:
    import edkm

    model = _fresh_model(args.model)
    t0 = time.perf_counter()
    edkm.palettize_(model, edkm.Config(bits=args.bits, group_size=1))
    seconds = time.perf_counter() - t0
    groups = sum(int(m.edkm_groups) for _, m in edkm.palettize.clustered_modules(model))
    del model
    return {"seconds": seconds, "luts": groups, "peak_rss_bytes": _peak_rss()}


def time_steps(args, group_size, progress) -> dict:
    import edkm

    model = _fresh_model(args.model)
    t0 = time.perf_counter()
    edkm.palettize_(model, edkm.Config(bits=args.bits, group_size=group_size))
    init_seconds = time.perf_counter() - t0
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(args.steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        if i:
            times.append(dt)
        progress.update()
    del model
    return {
        "group_size": group_size,
        "init_seconds": init_seconds,
        "median_seconds": statistics.median(times),
        "seconds": times,
        "peak_rss_bytes_so_far": _peak_rss(),
    }


def _max_group_words(limit: int) -> str:
    return "every size" if limit >= 2**62 else f"<= {limit:,} weights"


def run(args) -> dict:
    from tqdm import tqdm

    import edkm
    from edkm import _C
    from benchmarks import _results

    names = _check(args)
    chosen = edkm.set_settings(ndomain=args.ndomain)
    report = {
        "benchmark": "small_groups",
        "model": args.model,
        "bits": args.bits,
        "batch": args.batch,
        "tokens": args.tokens,
        "timed_steps": args.steps,
        "ndomain": args.ndomain,
        "ndomain_max_group": _C.ndomain_max_group(edkm.Config().cluster_dtype),
        "ndomain_simd": _C.simd_attention() and _C.simd_attention_available(),
        "torch_threads": torch.get_num_threads(),
        **_results.stamp(),
    }
    out = args.out or _results.default_results_dir()
    base = f"{out}/small_groups"
    report["steps"] = {}
    try:
        if not args.skip_init:
            report["init_per_row"] = time_init(args)
        with tqdm(total=len(names) * (args.steps + 1), desc="bench small-groups", unit="step") as bar:
            for n in names:
                report["steps"][n] = time_steps(args, VARIANTS[n], bar)
                _write(report, base)  # a slow variant later still leaves these results
    finally:
        edkm.set_settings(**chosen)
    _write(report, base)
    report["files"] = {"json": base + ".json", "md": base + ".md"}
    return report


def _write(report: dict, base: str) -> None:
    from benchmarks import _results

    base_time = report["steps"].get("per-matrix", {}).get("median_seconds")
    for r in report["steps"].values():
        r["ratio_to_per_matrix"] = r["median_seconds"] / base_time if base_time else None
    _results.write_json(base + ".json", report)
    _results.write_atomic(base + ".md", markdown(report))


def table(report: dict) -> str:
    lines = [
        "| LUTs | init (palettize_) | step median | steps | ratio to per-matrix | peak RSS so far |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["steps"].items():
        ratio = r.get("ratio_to_per_matrix")
        lines.append(
            f"| {name} | {r['init_seconds']:.1f} s | {r['median_seconds']:.2f} s | "
            f"{', '.join(f'{s:.2f}' for s in r['seconds'])} | "
            f"{'**%.2fx**' % ratio if ratio else '—'} | {r['peak_rss_bytes_so_far'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Small LUT groups on {report['model']} (CPU), {report['bits']} bits",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m.get('cpu_count')} CPUs, torch {m.get('torch')}, {report['torch_threads']} threads",
        f"- step: forward + backward, batch {report['batch']} x {report['tokens']} tokens, fp32 model "
        f"clustered by palettize_; median of {report['timed_steps']} steps after a warm-up; all variants in one "
        f"process (peak RSS is the process's running maximum)",
        f"- DKM domain: {report['ndomain']} (the fp32 weights are clustered as bfloat16, Config's "
        f"cluster_dtype; under auto the N-domain for bfloat16 groups of "
        f"{_max_group_words(report['ndomain_max_group'])}; N-domain kernels: "
        f"{'float32 AVX2' if report.get('ndomain_simd') else 'scalar float64'})",
        "",
    ]
    if "init_per_row" in report:
        r = report["init_per_row"]
        lines += [
            f"Per-row initialization (`palettize_(model, Config(bits={report['bits']}, group_size=1))`, "
            f"{r['luts']:,} LUTs): **{r['seconds']:.1f} s**",
            "",
        ]
    lines += [table(report), ""]
    return "\n".join(lines)


def main(args) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        if "init_per_row" in report:
            print(f"per-row init: {report['init_per_row']['seconds']:.1f} s")
        print(table(report))
        print(f"\nresults: {report['files']['md']}")
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("small_groups"))
