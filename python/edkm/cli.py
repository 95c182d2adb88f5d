"""The `edkm` command line: demo, compress, info, eval, bench."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from edkm import compress, demo, evaluate, export, generate
    from edkm.bench import accuracy as bench_accuracy
    from edkm.bench import coreml as bench_coreml
    from edkm.bench import decode as bench_decode
    from edkm.bench import lut as bench_lut
    from edkm.bench import dkm as bench_dkm
    from edkm.bench import export as bench_export
    from edkm.bench import gpu as bench_gpu
    from edkm.bench import harness as bench_harness
    from edkm.bench import layer as bench_layer
    from edkm.bench import memory as bench_memory
    from edkm.bench import ndomain as bench_ndomain
    from edkm.bench import sensitivity as bench_sensitivity
    from edkm.bench import small_groups as bench_small_groups
    from edkm.bench import step as bench_step
    from edkm.bench import study as bench_study
    from edkm.bench import udomain as bench_udomain

    parser = argparse.ArgumentParser(prog="edkm", description="Train-time weight clustering (eDKM).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo",
        help="compress SmolLM2-135M (4 bits, outliers, data-free distillation): sizes, KL and top-1 agreement with the original, prompts side by side",
    )
    demo.add_arguments(p)
    p.set_defaults(run=demo.main)
    p = sub.add_parser("compress", help="compress a model to n-bit indices + LUTs in one file")
    compress.add_arguments(p)
    p.set_defaults(run=compress.main)
    p = sub.add_parser("info", help="sizes per tensor and in total of a compressed file")
    compress.add_info_arguments(p)
    p.set_defaults(run=compress.info_main)
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or compressed file")
    evaluate.add_arguments(p)
    p.set_defaults(run=evaluate.main)
    p = sub.add_parser(
        "export",
        help="write a compressed file for other tools: a Hugging Face directory (--hf) or a Core ML package with edkm's LUTs (--coreml)",
    )
    export.add_arguments(p)
    p.set_defaults(run=export.main)
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a model or a compressed file (run packed): text, prefill and decode tokens/s",
    )
    generate.add_arguments(p)
    p.set_defaults(run=generate.main)
    bench = sub.add_parser("bench", help="run a benchmark")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    p = bench_sub.add_parser("dkm", help="dkm vs dkm_reference on one matrix, forward+backward")
    bench_dkm.add_arguments(p)
    p.set_defaults(run=bench_dkm.main)
    p = bench_sub.add_parser(
        "decode",
        help="SmolLM2-135M decode speed: edkm files run packed vs dense PyTorch vs llama.cpp, same prompt and threads; peak memory",
    )
    bench_decode.add_arguments(p)
    p.set_defaults(run=bench_decode.main)
    p = bench_sub.add_parser(
        "lut",
        help="edkm.lut_linear on packed 3/4-bit weights vs F.linear on dense fp32/bf16, LLaMA-7B and SmolLM2 matrices, batch 1-64 (any device)",
    )
    bench_lut.add_arguments(p)
    p.set_defaults(run=bench_lut.main)
    p = bench_sub.add_parser(
        "export",
        help="export one compressed file to Hugging Face and Core ML: sizes, and every LUT and index of the package checked against the file",
    )
    bench_export.add_arguments(p)
    p.set_defaults(run=bench_export.main)
    p = bench_sub.add_parser(
        "harness",
        help="edkm eval vs lm-evaluation-harness on the same exported model and items: accuracies, items decided differently",
    )
    bench_harness.add_arguments(p)
    p.set_defaults(run=bench_harness.main)
    p = bench_sub.add_parser("memory", help="memory ablation: naive / +M / +M+U / dkm on a LLaMA-7B layer")
    bench_memory.add_arguments(p)
    p.set_defaults(run=bench_memory.main)
    p = bench_sub.add_parser(
        "layer", help="cluster one LLaMA-7B-shaped decoder layer to 3 bits: time, saved bytes, peak memory"
    )
    bench_layer.add_arguments(p)
    p.set_defaults(run=bench_layer.main)
    p = bench_sub.add_parser("gpu", help="a LLaMA-7B layer's matrices on the GPU: dkm vs reference, bandwidth floor")
    bench_gpu.add_arguments(p)
    p.set_defaults(run=bench_gpu.main)
    p = bench_sub.add_parser(
        "coreml", help="coremltools' DKMPalettizer vs edkm.dkm on one matrix (CPU): time, peak memory, agreement"
    )
    bench_coreml.add_arguments(p)
    p.set_defaults(run=bench_coreml.main)
    p = bench_sub.add_parser(
        "step",
        help="a LLaMA decoder layer's training step, plain vs clustered: step time and peak memory ratios (any device)",
    )
    bench_step.add_arguments(p)
    p.set_defaults(run=bench_step.main)
    p = bench_sub.add_parser(
        "udomain", help="CPU U-domain: fused loops vs ATen ops, dkm forward+backward with one or many LUTs per matrix"
    )
    bench_udomain.add_arguments(p)
    p.set_defaults(run=bench_udomain.main)
    p = bench_sub.add_parser(
        "ndomain",
        help="CPU dkm by LUT group size: N-domain AVX2 kernels vs their float64 loops vs the U-domain, forward+backward",
    )
    bench_ndomain.add_arguments(p)
    p.set_defaults(run=bench_ndomain.main)
    p = bench_sub.add_parser(
        "accuracy",
        help="SmolLM2-135M at 3 bits: baseline / round-to-nearest / k-means / eDKM / plain fine-tune, zero-shot accuracy and perplexity at the same storage",
    )
    bench_accuracy.add_arguments(p)
    p.set_defaults(run=bench_accuracy.main)
    p = bench_sub.add_parser(
        "sensitivity",
        help="cluster one matrix at a time (post-training): KL and perplexity increase per matrix, heatmap, rank correlation with the Fisher proxy",
    )
    bench_sensitivity.add_arguments(p)
    p.set_defaults(run=bench_sensitivity.main)
    p = bench_sub.add_parser(
        "small-groups",
        help="per-row and small-group LUTs on SmolLM2-135M: initialization time, training-step time vs one LUT per matrix",
    )
    bench_small_groups.add_arguments(p)
    p.set_defaults(run=bench_small_groups.main)
    p = bench_sub.add_parser(
        "study",
        help="which tool at which size: SmolLM2-135M rows from round-to-nearest, k-means, SqueezeLLM-style, llama.cpp k-quants, HQQ and eDKM, evaluated alike; --report for tables and the Pareto chart",
    )
    bench_study.add_arguments(p)
    p.set_defaults(run=bench_study.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from edkm.coreml_export import ExportError

    try:
        return args.run(args)
    except (ValueError, OSError, TypeError, ExportError) as e:
        # Bad input of any kind: one clear line, no traceback (EDKM_TRACEBACK=1 shows it).
        import os

        if os.environ.get("EDKM_TRACEBACK"):
            raise
        raise SystemExit(f"edkm {args.command}: error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
