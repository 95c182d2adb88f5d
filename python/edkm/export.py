"""`edkm export FILE --hf DIR | --coreml OUT.mlpackage`: the compressed model for other tools."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a file written by edkm compress / edkm.save")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--hf", metavar="DIR", help="a Hugging Face directory (transformers loads it offline)")
    to.add_argument(
        "--coreml",
        metavar="OUT.mlpackage",
        help="a Core ML program whose weights are edkm's LUTs and indices (constexpr_lut_to_dense)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="--hf: dtype of the dequantized weights (default bfloat16; float16 keeps the fp16 LUT values exact)",
    )
    p.add_argument(
        "--layers", type=int, default=None, help="--coreml: only the first N decoder layers (default: the whole model)"
    )
    p.add_argument("--seq-len", type=int, default=64, help="--coreml: the program's fixed sequence length")
    p.add_argument("--force", action="store_true", help="replace a non-empty output")


def main(args) -> int:
    if args.hf:
        from edkm.hf_export import export_hf

        out = export_hf(args.file, args.hf, dtype=args.dtype, force=args.force)
        print(f"edkm export: wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({out!r}))")
        return 0
    from edkm.coreml_export import export_coreml

    r = export_coreml(args.file, args.coreml, layers=args.layers, seq_len=args.seq_len, force=args.force)
    print(
        f"edkm export: wrote {r['path']}: {r['clustered']} clustered weights as constexpr_lut_to_dense, "
        f"weights file {r['weight_bytes']:,} bytes (edkm file {r['source_bytes']:,} bytes)"
    )
    return 0
