"""`edkm bench step`: one LLaMA decoder layer's training step (RMSNorm, attention, SwiGLU MLP,
bf16) with plain linears vs with all seven projections clustered to K=8 (dkm_linear, dkm then
F.linear, and the model API palettize_), on any device: median step time and peak memory, as
ratios to plain measured in the same run. On CPU the peak counts tensor bytes (profiler
allocation events), so it is exact and repeatable; on CUDA it is the allocator's peak.

The default size is LLaMA-7B's layer on CUDA and a 1/4-width one on CPU (a 7B step takes
minutes on two cores); --hidden/--intermediate/--heads/--tokens choose any other."""

from __future__ import annotations

import argparse
import json
import os

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=None, help="model width (default 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 11008 on CUDA, 2752 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 32 on CUDA, 8 on CPU)")
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per step, batch 1 (default 2048 on CUDA, 512 on CPU)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> dict:
    from tqdm import tqdm

    from benchmarks import _results
    from benchmarks.llama_layer import training_step_report

    cuda = str(args.device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("edkm bench step: --device cuda but no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"edkm bench step: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    defaults = {"hidden": (4096, 1024), "intermediate": (11008, 2752), "heads": (32, 8), "tokens": (2048, 512)}
    size = {
        name: getattr(args, name) if getattr(args, name) is not None else both[0 if cuda else 1]
        for name, both in defaults.items()
    }
    for name, value in size.items():
        if value < 1:
            raise SystemExit(f"edkm bench step: --{name} must be >= 1, got {value}")
    if size["hidden"] % size["heads"]:
        raise SystemExit(
            f"edkm bench step: --hidden ({size['hidden']}) must be a multiple of --heads ({size['heads']})"
        )
    bar = tqdm(total=4, desc="bench step", disable=args.json)

    def progress(name):
        bar.set_postfix_str(name)
        bar.update(0 if bar.n == 0 and name == "plain" else 1)

    steps = training_step_report(repeats=args.repeats, device=args.device, progress=progress, **size)
    bar.update(bar.total - bar.n)
    bar.close()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report = {
        "benchmark": "step",
        "device": device_name,
        **size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "training_step": steps,
        **_results.stamp(),
    }
    out_dir = args.out or _results.default_results_dir()
    tag = f"step_{device_name.replace(' ', '_')}_{size['hidden']}x{size['intermediate']}_t{size['tokens']}"
    _results.write_json(os.path.join(out_dir, tag + ".json"), report)
    _results.write_atomic(os.path.join(out_dir, tag + ".md"), table(report))
    return report


def table(report: dict) -> str:
    from benchmarks.llama_layer import training_step_table

    peak = (
        "tensor bytes allocated (profiler events) plus weights and input"
        if report["device"] == "cpu"
        else "CUDA peak allocated"
    )
    lines = [
        f"# Decoder-layer training step, plain vs clustered — {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        f"- layer: hidden {report['hidden']}, MLP {report['intermediate']}, {report['heads']} heads, "
        f"batch 1 x {report['tokens']} tokens, bf16; seven projections clustered to K=8, 3 DKM iterations",
        f"- median of {report['repeats']} steps; peak memory = {peak}",
        "",
        *training_step_table(report["training_step"]),
    ]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    report = run(args)
    print(json.dumps(report) if args.json else table(report))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("step"))
