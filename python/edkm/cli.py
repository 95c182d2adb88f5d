"""The `edkm` command line: demo, compress, info, eval, bench."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from edkm import compress, demo, evaluate, export, generate

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
    bench = sub.add_parser("bench", help="run a benchmark (from a source checkout: benchmarks/)")
    benchmarks = _benchmarks_package()
    if benchmarks is not None:
        benchmarks.add_parsers(bench.add_subparsers(dest="benchmark", required=True))
    else:
        bench.set_defaults(run=_no_benchmarks)
    return parser


def _benchmarks_package():
    """The checkout's benchmarks package (benchmarks/ beside python/), or None in an installed
    package, which ships no benchmarks."""
    import importlib
    import os

    checkout = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    if not os.path.isfile(os.path.join(checkout, "benchmarks", "__init__.py")):
        return None
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    return importlib.import_module("benchmarks")


def _no_benchmarks(args) -> int:
    raise SystemExit(
        "edkm bench: the benchmarks are not part of the installed package; run them from a clone "
        "of the repository (edkm bench NAME, or python -m benchmarks.NAME)"
    )


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
