"""The U-domain iterations on CPU: fused loops (the default) vs the ATen composition (the
implementation every device runs), dkm forward + backward on bf16 matrices, in one run.

A case is ``ROWSxCOLS:ROWS_PER_LUT``: one LUT per that many rows (``ROWSxCOLS:ROWS`` is one LUT
per matrix). Many small LUT groups are where the U-domain stops being small: every group has
its own distinct values, so the tables grow towards the weight's size. Each variant of each case
runs in a fresh process, so its peak RSS is its own (minus that of a process that only built the
inputs). Times are medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from benchmarks.dkm import _in_fresh_process  # one variant per spawned process, result by queue

VARIANTS = ("fused", "aten")
DEFAULT_CASES = ("4096x4096:4096", "4096x4096:16", "576x1536:16", "49152x576:16")


def parse_case(text: str) -> tuple:
    try:
        shape, rows_per_lut = text.lower().split(":")
        rows, cols = (int(v) for v in shape.split("x"))
        per = int(rows_per_lut)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--case must look like ROWSxCOLS:ROWS_PER_LUT (e.g. 4096x4096:16), got {text!r}"
        )
    if rows <= 0 or cols <= 0 or per <= 0 or rows % per:
        raise argparse.ArgumentTypeError(
            f"--case: sizes must be positive and ROWS_PER_LUT must divide ROWS, got {text!r}"
        )
    return rows, cols, per


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--case",
        type=parse_case,
        action="append",
        default=None,
        help="ROWSxCOLS:ROWS_PER_LUT, repeatable (default: " + ", ".join(DEFAULT_CASES) + ")",
    )
    p.add_argument("--k", type=int, default=8, help="centroids per LUT (default 8)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median; default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def _inputs(case, k):
    rows, cols, per = case
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    groups = rows // per
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    sample = w.float().view(groups, -1)[:, :: max(1, w.numel() // groups // 4096)]
    c = torch.quantile(sample, qs, dim=1).T.contiguous()
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    return w, c, grad


def _worker(variant, case, args, queue) -> None:
    try:
        import edkm

        # a worker process of its own: the settings end with it; small groups would otherwise
        # take the N-domain (bench ndomain)
        edkm.set_settings(fused_udomain=variant == "fused", ndomain="never")
        w, c, grad = _inputs(case, args.k)

        def step():
            wi, ci = w.detach().requires_grad_(), c.detach().requires_grad_()
            out = edkm.dkm(wi, ci, 1e-5, args.iters, 0.0, "squared")
            out.clustered.backward(grad)

        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        queue.put(
            {
                "variant": variant,
                "median_seconds": statistics.median(times),
                "seconds": times,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    except BaseException as e:  # report, never hang the parent
        queue.put({"variant": variant, "error": f"{type(e).__name__}: {e}"})


def _baseline(case, args, queue) -> None:
    import edkm  # noqa: F401

    _inputs(case, args.k)
    queue.put({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def run(args) -> dict:
    from tqdm import tqdm

    from benchmarks import _results

    if args.k < 2 or args.iters < 1 or args.repeats < 1:
        raise ValueError("--k must be >= 2, --iters and --repeats >= 1")
    cases = args.case or [parse_case(c) for c in DEFAULT_CASES]
    rows = []
    with tqdm(total=len(cases) * 3, desc="bench udomain", unit="process") as bar:
        for case in cases:
            base = _in_fresh_process(_baseline, case, args)["peak_rss_bytes"]
            bar.update()
            row = {"case": "%dx%d:%d" % case, "groups": case[0] // case[2]}
            for v in VARIANTS:
                r = _in_fresh_process(_worker, v, case, args)
                bar.update()
                if "error" in r:
                    raise RuntimeError(f"bench udomain: {v} on {row['case']} failed: {r['error']}")
                r["peak_rss_above_inputs_bytes"] = r["peak_rss_bytes"] - base
                row[v] = r
            row["time_ratio"] = row["aten"]["median_seconds"] / row["fused"]["median_seconds"]
            row["memory_ratio"] = max(row["aten"]["peak_rss_above_inputs_bytes"], 2**20) / max(
                row["fused"]["peak_rss_above_inputs_bytes"], 2**20
            )
            rows.append(row)
    report = {
        "benchmark": "udomain_cpu",
        "k": args.k,
        "iters": args.iters,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        **_results.stamp(),
        "cases": rows,
    }
    out = args.out or _results.default_results_dir()
    base = f"{out}/udomain_cpu"
    _results.write_json(base + ".json", report)
    _results.write_atomic(base + ".md", markdown(report))
    report["files"] = {"json": base + ".json", "md": base + ".md"}
    return report


def _mb(b):
    return f"{b / 2**20:,.0f} MiB"


def _memory_ratio(r: dict) -> str:
    """ATen / fused peak RSS growth, or a dash where both are within the noise of RSS (16 MiB)."""
    a, f = r["aten"]["peak_rss_above_inputs_bytes"], r["fused"]["peak_rss_above_inputs_bytes"]
    if max(a, f) < 16 * 2**20:
        return "— (both < 16 MiB)"
    return f"**{a / max(f, 2**20):.2f}x**"


def table(report: dict) -> str:
    lines = [
        "| case (rows x cols : rows per LUT) | LUTs | fused | ATen ops | time ratio | peak RSS fused | "
        "peak RSS ATen | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        lines.append(
            f"| {r['case']} | {r['groups']:,} | {r['fused']['median_seconds'] * 1e3:,.0f} ms | "
            f"{r['aten']['median_seconds'] * 1e3:,.0f} ms | **{r['time_ratio']:.2f}x** | "
            f"{_mb(r['fused']['peak_rss_above_inputs_bytes'])} | {_mb(r['aten']['peak_rss_above_inputs_bytes'])} | "
            f"{_memory_ratio(r)} |"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["machine"]
    return "\n".join(
        [
            f"# U-domain on CPU: fused loops vs ATen ops — dkm forward+backward, bf16, K={report['k']}, "
            f"{report['iters']} iterations",
            "",
            f"- date: {report['date']}",
            f"- command: `{report['command']}`",
            f"- machine: {m.get('cpu_count')} CPUs, torch {m.get('torch')}, {report['torch_threads']} threads",
            f"- medians of {report['repeats']} runs after a warm-up; every variant in its own process; peak RSS "
            "above a process that only built the inputs",
            "",
            table(report),
            "",
            "Ratios are ATen / fused (above 1: the fused loops are faster or smaller). The rest of dkm (slot "
            "table, gather, scatter-add, the [LUTs, 65536] tables) is the same code in both variants.",
            "",
        ]
    )


def main(args) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(table(report))
        print(f"\nresults: {report['files']['md']}")
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("udomain"))
