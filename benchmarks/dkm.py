"""dkm vs dkm_reference, forward + backward on one weight matrix, in one run.

Each variant runs in a fresh process so its peak memory (CPU: peak RSS; CUDA: peak allocated)
is its own. Reports medians, the time ratio (reference / dkm) and the ratio of bytes saved
for backward (reference / dkm), counted with a saved-tensor hook (the weight itself, which
autograd references, is not counted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch

VARIANTS = ("dkm", "reference")


def parse_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like ROWSxCOLS (e.g. 4096x4096), got {text!r}")
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return rows, cols


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=parse_size, default=(4096, 4096), help="weight shape ROWSxCOLS")
    p.add_argument("--k", type=int, default=8, help="centroids per table (2^bits)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations (no early stop)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    p.add_argument("--skip-reference", action="store_true", help="time dkm only (the reference may not fit in memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def _inputs(args):
    rows, cols = args.size
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(getattr(torch, args.dtype)).to(args.device)
    qs = torch.linspace(0.5 / args.k, 1 - 0.5 / args.k, args.k)
    sample = w.flatten()[:: max(1, w.numel() // (1 << 20))].float().cpu()
    c = torch.quantile(sample, qs).view(1, args.k).to(args.device)
    return w, c


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _worker(variant: str, args, queue) -> None:
    try:
        import edkm
        from edkm.measure import SavedBytes

        torch.manual_seed(0)
        w, c = _inputs(args)
        fn = edkm.dkm if variant == "dkm" else edkm.dkm_reference
        tau = 1e-5
        grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w.dtype).to(w.device)
        cuda = str(args.device).startswith("cuda")
        saved = SavedBytes(w)

        def step(count_saved: bool):
            wi = w.detach().requires_grad_()
            if count_saved:
                with saved.hooks():
                    out = fn(wi, c, tau, args.iters, 0.0, "squared")
            else:
                out = fn(wi, c, tau, args.iters, 0.0, "squared")
            out.clustered.backward(grad)
            return out

        base_alloc = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step(True)  # warm-up, and the saved-bytes count
        _sync(args.device)
        peak = (torch.cuda.max_memory_allocated() - base_alloc) if cuda else None
        times = []
        for _ in range(args.repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            step(False)
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put(
            {
                "variant": variant,
                "median_seconds": statistics.median(times),
                "seconds": times,
                "saved_bytes": saved.bytes,
                "peak_rss_bytes": rss,
                "peak_cuda_bytes": peak,
            }
        )
    except BaseException as e:  # report, never hang the parent
        queue.put({"variant": variant, "error": f"{type(e).__name__}: {e}"})


def _baseline_rss(args, queue) -> None:
    """Peak RSS of a process that builds what every variant's process builds (inputs, the
    upstream gradient, the library) and runs nothing: subtracted from each variant's peak."""
    import edkm  # noqa: F401

    w, _ = _inputs(args)
    torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(w.dtype)
    queue.put({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def _in_fresh_process(target, *a):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*a, q))
    p.start()
    result = q.get()
    p.join()
    return result


def run(args) -> dict:
    from tqdm import tqdm

    from benchmarks import _results

    if args.k < 2:
        raise SystemExit("edkm bench dkm: --k must be >= 2")
    if args.iters < 1 or args.repeats < 1:
        raise SystemExit("edkm bench dkm: --iters and --repeats must be >= 1")
    variants = ["dkm"] if args.skip_reference else list(VARIANTS)
    baseline = _in_fresh_process(_baseline_rss, args)["peak_rss_bytes"]
    results = {}
    for v in tqdm(variants, desc="bench dkm", disable=args.json):
        r = _in_fresh_process(_worker, v, args)
        if "error" in r:
            raise SystemExit(f"edkm bench dkm: variant {v} failed: {r['error']}")
        r["peak_rss_above_inputs_bytes"] = r["peak_rss_bytes"] - baseline
        results[v] = r
    rows, cols = args.size
    report = {
        "benchmark": "dkm",
        "size": f"{rows}x{cols}",
        "numel": rows * cols,
        "k": args.k,
        "iterations": args.iters,
        "dtype": args.dtype,
        "device": str(args.device),
        "repeats": args.repeats,
        "variants": results,
        **_results.stamp(),
    }
    if "reference" in results:
        d, r = results["dkm"], results["reference"]
        report["time_ratio"] = r["median_seconds"] / d["median_seconds"]
        report["saved_bytes_ratio"] = r["saved_bytes"] / max(d["saved_bytes"], 1)
        key = "peak_cuda_bytes" if d["peak_cuda_bytes"] is not None else "peak_rss_above_inputs_bytes"
        report["peak_memory_ratio"] = r[key] / max(d[key], 1)
    out_dir = args.out or _results.default_results_dir()
    tag = f"dkm_{report['device'].split(':')[0]}_{rows}x{cols}_{args.dtype}"
    _results.write_json(os.path.join(out_dir, tag + ".json"), report)
    _results.write_atomic(os.path.join(out_dir, tag + ".md"), table(report))
    return report


def _mb(b):
    return "-" if b is None else f"{b / 2**20:,.1f} MiB"


def table(report: dict) -> str:
    n = report["numel"]
    lines = [
        f"# dkm vs dkm_reference — {report['size']} {report['dtype']}, K={report['k']}, "
        f"{report['iterations']} iterations, forward+backward, {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        "",
        "| variant | median time | saved for backward | bytes/weight | peak memory |",
        "|---|---|---|---|---|",
    ]
    for v, r in report["variants"].items():
        peak = r["peak_cuda_bytes"] if r["peak_cuda_bytes"] is not None else r["peak_rss_above_inputs_bytes"]
        lines.append(
            f"| {v} | {r['median_seconds'] * 1e3:,.1f} ms | {_mb(r['saved_bytes'])} | "
            f"{r['saved_bytes'] / n:.3f} | {_mb(peak)} |"
        )
    if "time_ratio" in report:
        lines += [
            "",
            f"time ratio (reference / dkm): **{report['time_ratio']:.1f}x**; "
            f"saved-bytes ratio: **{report['saved_bytes_ratio']:,.0f}x**; "
            f"peak-memory ratio: **{report['peak_memory_ratio']:.1f}x**",
        ]
    lines += [
        "",
        "Peak memory: CUDA peak allocated above the inputs, or (CPU) peak RSS of the "
        "variant's own process minus that of a process that only built the inputs.",
    ]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("dkm"))
