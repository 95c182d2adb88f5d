"""Which CPU path dkm should take for a LUT group size: the N-domain with the float32 AVX2 kernels
(csrc/cpu/attention_avx2.cpp), the N-domain's scalar float64 loops it replaced, and the U-domain
(fused loops over distinct values), dkm forward + backward on one matrix, in one run.

A case is ``ROWSxCOLS:ROWS_PER_LUT`` (``ROWSxCOLS:ROWS`` is one LUT per matrix); every case runs
for each --dtype. Each variant of each case runs in a fresh process, so its peak RSS is its own
(minus that of a process that only built the inputs). Times are medians. The table also says
which path set_ndomain('auto') takes for the case, so the rule in csrc/ndomain.h can be checked
against the times.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from benchmarks.dkm import _in_fresh_process  # one variant per spawned process, result by queue
from benchmarks.udomain import parse_case

VARIANTS = ("avx2", "scalar", "udomain")
LABELS = {"avx2": "N-domain AVX2", "scalar": "N-domain float64 loops", "udomain": "U-domain"}
DEFAULT_CASES = ("1536x576:1", "1536x576:4", "1536x576:16", "1536x576:64", "1536x576:1536")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--case",
        type=parse_case,
        action="append",
        default=None,
        help="ROWSxCOLS:ROWS_PER_LUT, repeatable (default: " + ", ".join(DEFAULT_CASES) + ")",
    )
    p.add_argument(
        "--dtype",
        type=_dtype,
        action="append",
        default=None,
        help="weight dtype, repeatable: float32, bfloat16 (default: both)",
    )
    p.add_argument("--k", type=int, default=8, help="centroids per LUT (default 8)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median; default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def _inputs(case, dtype, k):
    rows, cols, per = case
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(DTYPES[dtype])
    groups = rows // per
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    sample = w.float().view(groups, -1)[:, :: max(1, w.numel() // groups // 4096)]
    c = torch.quantile(sample, qs, dim=1).T.contiguous()
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w.dtype)
    return w, c, grad


def _auto_path(case, dtype) -> str:
    from edkm import _C

    rows, cols, per = case
    return "N-domain" if per * cols <= _C.ndomain_max_group(DTYPES[dtype]) else "U-domain"


def _worker(variant, case, dtype, args, queue) -> None:
    try:
        import edkm

        # a worker process of its own: the settings end with it
        edkm.set_settings(ndomain="never" if variant == "udomain" else "always", simd_attention=variant != "scalar")
        w, c, grad = _inputs(case, dtype, args.k)
        tau = 0.02 * w.float().var().item()  # Config's default temperature, relative to var(w)

        def step():
            wi, ci = w.detach().requires_grad_(), c.detach().requires_grad_()
            out = edkm.dkm(wi, ci, tau, args.iters, 0.0, "squared")
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


def _baseline(case, dtype, args, queue) -> None:
    import edkm  # noqa: F401

    _inputs(case, dtype, args.k)
    queue.put({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def run(args) -> dict:
    from tqdm import tqdm

    from edkm import _C
    from benchmarks import _results

    if args.k < 2 or args.k > 256 or args.iters < 1 or args.repeats < 1:
        raise ValueError("--k must be in 2..256, --iters and --repeats >= 1")
    if not _C.simd_attention_available():
        raise ValueError("edkm bench ndomain: this CPU has no AVX2/FMA, so the AVX2 kernels cannot run")
    cases = args.case or [parse_case(c) for c in DEFAULT_CASES]
    dtypes = args.dtype or list(DTYPES)
    rows = []
    with tqdm(total=len(cases) * len(dtypes) * (1 + len(VARIANTS)), desc="bench ndomain", unit="process") as bar:
        for dtype in dtypes:
            for case in cases:
                base = _in_fresh_process(_baseline, case, dtype, args)["peak_rss_bytes"]
                bar.update()
                row = {
                    "case": "%dx%d:%d" % case,
                    "dtype": dtype,
                    "groups": case[0] // case[2],
                    "weights_per_lut": case[1] * case[2],
                    "auto": _auto_path(case, dtype),
                }
                for v in VARIANTS:
                    r = _in_fresh_process(_worker, v, case, dtype, args)
                    bar.update()
                    if "error" in r:
                        raise RuntimeError(f"bench ndomain: {v} on {dtype} {row['case']} failed: {r['error']}")
                    r["peak_rss_above_inputs_bytes"] = r["peak_rss_bytes"] - base
                    row[v] = r
                fast = row["avx2"]["median_seconds"]
                row["scalar_ratio"] = row["scalar"]["median_seconds"] / fast
                row["udomain_ratio"] = row["udomain"]["median_seconds"] / fast
                rows.append(row)
    report = {
        "benchmark": "ndomain_simd_cpu",
        "k": args.k,
        "iters": args.iters,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        **_results.stamp(),
        "cases": rows,
    }
    out = args.out or _results.default_results_dir()
    base = f"{out}/ndomain_simd_cpu"
    _results.write_json(base + ".json", report)
    _results.write_atomic(base + ".md", markdown(report))
    report["files"] = {"json": base + ".json", "md": base + ".md"}
    return report


def _mb(b):
    return f"{max(b, 0) / 2**20:,.0f} MiB"


def table(report: dict) -> str:
    lines = [
        "| dtype | case (rows x cols : rows per LUT) | weights per LUT | N-domain AVX2 | N-domain float64 loops | "
        "U-domain | float64 loops / AVX2 | U-domain / AVX2 | auto takes | peak RSS AVX2 / loops / U |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        ms = {v: f"{r[v]['median_seconds'] * 1e3:,.0f} ms" for v in VARIANTS}
        rss = " / ".join(_mb(r[v]["peak_rss_above_inputs_bytes"]) for v in VARIANTS)
        lines.append(
            f"| {r['dtype']} | {r['case']} | {r['weights_per_lut']:,} | {ms['avx2']} | {ms['scalar']} | "
            f"{ms['udomain']} | **{r['scalar_ratio']:.1f}x** | **{r['udomain_ratio']:.2f}x** | "
            f"{r['auto']} | {rss} |"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["machine"]
    return "\n".join(
        [
            f"# dkm on CPU by LUT group size: N-domain AVX2 vs its float64 loops vs the U-domain — "
            f"forward+backward, K={report['k']}, {report['iters']} iterations",
            "",
            f"- date: {report['date']}",
            f"- command: `{report['command']}`",
            f"- machine: {m.get('cpu_count')} CPUs, torch {m.get('torch')}, {report['torch_threads']} threads",
            f"- medians of {report['repeats']} runs after a warm-up; every variant in its own process; peak RSS "
            "above a process that only built the inputs; tau = 0.02 var(w) (Config's default)",
            "",
            table(report),
            "",
            "Ratios are other / AVX2 (above 1: the AVX2 N-domain is faster). 'auto takes' is the path "
            "set_ndomain('auto') picks for the case (csrc/ndomain.h).",
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

    sys.exit(run_module("ndomain"))
