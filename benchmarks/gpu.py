"""GPU benchmark: one LLaMA-7B decoder layer's seven weight matrices (bf16, K=8), dkm vs
dkm_reference forward+backward, in one run: median time (CUDA events), peak memory above the
inputs, and dkm's time against its bandwidth floor.

Bandwidth floor of dkm forward+backward on a 16-bit weight, bytes per weight that must move:
slot table 2 (read the bits) + gather 2+2 (bits in, value out) + backward scatter 2+2 (bits,
gradient) + gradient pass 2+2+2 (bits, gradient in, gradient out) = 16, plus 2 for the
deterministic mode's max-|gradient| pass. Floor = bytes / (device-to-device copy bandwidth,
measured here as bytes read + written per second).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.layer import LAYER, quantile_centroids

FLOOR_BYTES_PER_WEIGHT = {"deterministic": 18, "fast": 16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=10, help="timed runs per matrix and variant")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument(
        "--skip-layer-step", action="store_true", help="skip the decoder-layer training step (plain vs clustered)"
    )
    p.add_argument("--tokens", type=int, default=2048, help="tokens per training step (batch 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy, (read + written bytes) / second, median of `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


def time_fwd_bwd(fn, w, c, grad, iters, repeats):
    def once():
        wi = w.detach().requires_grad_()
        out = fn(wi, c, 1e-5, iters, 0.0, "squared")
        out.clustered.backward(grad)

    once()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    once()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), peak


def run(args) -> dict:
    from tqdm import tqdm

    import edkm
    from benchmarks import _results

    if not torch.cuda.is_available():
        raise SystemExit("edkm bench gpu: no CUDA device")
    bandwidth = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in tqdm(LAYER, desc="bench gpu", disable=args.json):
        w = (torch.randn(shape, generator=gen) * 0.02).bfloat16().cuda()
        c = quantile_centroids(w, 8)
        grad = torch.randn(shape, generator=gen).bfloat16().cuda()
        row = {"matrix": name, "shape": list(shape), "numel": w.numel()}
        for mode in ("deterministic", "fast"):
            with edkm.settings(deterministic_scatter=mode == "deterministic"):
                t, peak = time_fwd_bwd(edkm.dkm, w, c, grad, args.iters, args.repeats)
            floor = FLOOR_BYTES_PER_WEIGHT[mode] * w.numel() / bandwidth
            row[f"dkm_{mode}"] = {
                "seconds": t,
                "peak_bytes": peak,
                "floor_seconds": floor,
                "fraction_of_floor": floor / t,
            }
        if not args.skip_reference:
            t, peak = time_fwd_bwd(edkm.dkm_reference, w, c, grad, args.iters, max(3, args.repeats // 3))
            row["reference"] = {"seconds": t, "peak_bytes": peak}
        rows.append(row)
        del w, grad
        torch.cuda.empty_cache()
    total = {k: sum(r[k]["seconds"] for r in rows) for k in ("dkm_deterministic", "dkm_fast")}
    report = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "iterations": args.iters,
        "matrices": rows,
        "layer_seconds": total,
        "deterministic_cost": total["dkm_deterministic"] / total["dkm_fast"] - 1,
        **_results.stamp(),
    }
    if not args.skip_reference:
        report["layer_seconds"]["reference"] = sum(r["reference"]["seconds"] for r in rows)
        report["time_ratio"] = report["layer_seconds"]["reference"] / total["dkm_deterministic"]
        report["peak_memory_ratio"] = max(r["reference"]["peak_bytes"] for r in rows) / max(
            max(r["dkm_deterministic"]["peak_bytes"] for r in rows), 1
        )
    if not args.skip_layer_step:
        from benchmarks.llama_layer import training_step_report

        report["training_step"] = training_step_report(tokens=args.tokens, repeats=args.repeats)
        torch.cuda.empty_cache()
    out_dir = args.out or _results.default_results_dir()
    tag = "gpu_layer_" + report["device"].replace(" ", "_")
    _results.write_json(os.path.join(out_dir, tag + ".json"), report)
    _results.write_atomic(os.path.join(out_dir, tag + ".md"), table(report))
    return report


def table(report: dict) -> str:
    mib = 2**20
    lines = [
        f"# GPU: one LLaMA-7B decoder layer (bf16, K=8, {report['iterations']} iterations), "
        f"forward+backward — {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        f"- measured copy bandwidth: {report['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + written)",
        "",
        "| matrix | dkm (deterministic) | floor fraction | dkm (fast) | floor fraction | dkm peak | reference | reference peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["matrices"]:
        d, f = r["dkm_deterministic"], r["dkm_fast"]
        ref = r.get("reference")
        lines.append(
            f"| {r['matrix']} {r['shape'][0]}x{r['shape'][1]} | {d['seconds'] * 1e3:.2f} ms | "
            f"{d['fraction_of_floor']:.0%} | {f['seconds'] * 1e3:.2f} ms | {f['fraction_of_floor']:.0%} | "
            f"{d['peak_bytes'] / mib:,.0f} MiB | "
            + (f"{ref['seconds'] * 1e3:.1f} ms | {ref['peak_bytes'] / mib:,.0f} MiB |" if ref else "- | - |")
        )
    ls = report["layer_seconds"]
    lines += [
        "",
        f"Layer: dkm {ls['dkm_deterministic'] * 1e3:.1f} ms deterministic, "
        f"{ls['dkm_fast'] * 1e3:.1f} ms fast (deterministic costs {report['deterministic_cost']:+.0%})",
    ]
    if "time_ratio" in report:
        lines[-1] += (
            f"; reference {ls['reference'] * 1e3:.1f} ms: time ratio **{report['time_ratio']:.1f}x**, "
            f"peak-memory ratio (largest matrix) **{report['peak_memory_ratio']:.1f}x**"
        )
    if "training_step" in report:
        from benchmarks.llama_layer import training_step_table

        lines += [
            "",
            "Decoder-layer training step (batch 1 x tokens, bf16, attention + SwiGLU MLP, "
            "all seven projections clustered to K=8):",
            "",
            *training_step_table(report["training_step"]),
        ]
    lines += [
        "",
        "Floor fraction = bandwidth-floor time / measured time (1.0 = at the floor); "
        "peaks are CUDA peak allocated above the inputs during one forward+backward.",
    ]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    import json

    report = run(args)
    print(json.dumps(report) if args.json else table(report))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("gpu"))
