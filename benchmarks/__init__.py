"""Benchmarks of edkm, in the source checkout only (the installed package holds none).

Run one as `python -m benchmarks.NAME [options]` from the checkout, or as `edkm bench NAME`
(the CLI finds this folder beside python/edkm). Each module has `add_arguments(parser)` and
`main(args)`; results and their exact command go to benchmarks/results/ (see README.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name on the command line -> (module, one-line description)
BENCHMARKS = {
    "dkm": ("dkm", "dkm vs dkm_reference on one matrix, forward+backward"),
    "decode": (
        "decode",
        "SmolLM2-135M decode speed: edkm files run packed vs dense PyTorch vs llama.cpp, same prompt and threads; peak memory",
    ),
    "lut": (
        "lut",
        "edkm.lut_linear on packed 3/4-bit weights vs F.linear on dense fp32/bf16, LLaMA-7B and SmolLM2 matrices, batch 1-64 (any device)",
    ),
    "export": (
        "export",
        "export one compressed file to Hugging Face and Core ML: sizes, and every LUT and index of the package checked against the file",
    ),
    "harness": (
        "harness",
        "edkm eval vs lm-evaluation-harness on the same exported model and items: accuracies, items decided differently",
    ),
    "memory": ("memory", "memory ablation: naive / +M / +M+U / dkm on a LLaMA-7B layer"),
    "layer": ("layer", "cluster one LLaMA-7B-shaped decoder layer to 3 bits: time, saved bytes, peak memory"),
    "gpu": ("gpu", "a LLaMA-7B layer's matrices on the GPU: dkm vs reference, bandwidth floor"),
    "coreml": ("coreml", "coremltools' DKMPalettizer vs edkm.dkm on one matrix (CPU): time, peak memory, agreement"),
    "step": (
        "step",
        "a LLaMA decoder layer's training step, plain vs clustered: step time and peak memory ratios (any device)",
    ),
    "udomain": (
        "udomain",
        "CPU U-domain: fused loops vs ATen ops, dkm forward+backward with one or many LUTs per matrix",
    ),
    "ndomain": (
        "ndomain",
        "CPU dkm by LUT group size: N-domain AVX2 kernels vs their float64 loops vs the U-domain, forward+backward",
    ),
    "accuracy": (
        "accuracy",
        "SmolLM2-135M at 3 bits: baseline / round-to-nearest / k-means / eDKM / plain fine-tune, zero-shot accuracy and perplexity at the same storage",
    ),
    "sensitivity": (
        "sensitivity",
        "cluster one matrix at a time (post-training): KL and perplexity increase per matrix, heatmap, rank correlation with the Fisher proxy",
    ),
    "small-groups": (
        "small_groups",
        "per-row and small-group LUTs on SmolLM2-135M: initialization time, training-step time vs one LUT per matrix",
    ),
    "gptq": (
        "gptq",
        "post-training clustering of SmolLM2-135M with nearest vs error-compensated (GPTQ) assignment: validation KL, top-1 and perplexity",
    ),
    "study": (
        "study",
        "which tool at which size: SmolLM2-135M rows from round-to-nearest, k-means, SqueezeLLM-style, llama.cpp k-quants, HQQ and eDKM, evaluated alike; --report for tables and the Pareto chart",
    ),
}


def add_parsers(sub) -> None:
    """One subparser per benchmark (for `edkm bench`); each runs its module's main."""
    for name, (module, help_) in BENCHMARKS.items():
        m = importlib.import_module(f"benchmarks.{module}")
        p = sub.add_parser(name, help=help_)
        m.add_arguments(p)
        p.set_defaults(run=m.main)


def run_module(module: str) -> int:
    """`python -m benchmarks.MODULE [options]`: parse the options and run the benchmark."""
    from benchmarks import _results

    m = importlib.import_module(f"benchmarks.{module}")
    name = next((n for n, (mod, _) in BENCHMARKS.items() if mod == module), module)
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}", description=BENCHMARKS.get(name, ("", ""))[1]
    )
    m.add_arguments(parser)
    _results.COMMAND_PREFIX = ["python", "-m", f"benchmarks.{module}"]
    args = parser.parse_args(sys.argv[1:])
    return m.main(args)
