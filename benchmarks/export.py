"""`edkm bench export FILE`: the exports of one compressed file, their sizes and their check.

Writes the Hugging Face directory (bf16) and the Core ML package (whole model, and one decoder
layer), reads the package back through coremltools and checks every clustered weight's indices,
LUT and decompressed values against the edkm file; records the sizes next to the file's own.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="an edkm file of a LLaMA-family model")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def check_package(path: str, package: str) -> dict:
    """Every clustered weight of ``path`` in ``package``: indices, LUT and dequantized values equal."""
    import torch
    from edkm import coreml_export, format as fmt
    from edkm.ops import unpack_indices

    facts, back = coreml_export.read_back(package)
    cf = fmt.read_header(path)
    sd = fmt.load_state_dict(path)
    names = sorted(n[: -len(".lut")] for n in back if n.endswith(".lut"))
    equal = 0
    with open(path, "rb") as f:
        for name in names:
            src = cf.aliases.get(name, name)
            lay = cf.layouts[src]
            packed = fmt._read_tensor(f, cf.header_bytes, cf.entries[src + ".indices"])
            lut = fmt._read_tensor(f, cf.header_bytes, cf.entries[src + ".lut"]).numpy()
            idx = unpack_indices(packed, lay.bits, lay.n_indices).numpy().reshape(back[name + ".indices"].shape)
            dense = back[name + ".dense"]
            if name + ".outliers_dense" in back:  # the program's select(sparse != 0, sparse, lut_dense)
                sparse = back[name + ".outliers_dense"]
                dense = np.where(sparse != 0, sparse, dense)
            ok = (
                np.array_equal(back[name + ".indices"], idx)
                and np.array_equal(back[name + ".lut"][:, 0, : 1 << lay.bits, :], lut)
                and torch.equal(torch.from_numpy(dense.astype(np.float32)), sd[src].float())
            )
            equal += ok
    return {"ops": facts["ops"], "clustered_ops": len(names), "clustered_equal": equal}


def main(args) -> int:
    from edkm import format as fmt
    from benchmarks._results import default_results_dir, stamp, write_atomic, write_json
    from edkm.coreml_export import export_coreml
    from edkm.hf_export import export_hf

    info = fmt.info(args.file, verbose=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edkm-bench-export-") as tmp:
        t0 = time.perf_counter()
        hf = export_hf(args.file, os.path.join(tmp, "hf"), dtype="bfloat16")
        rows.append(
            {
                "export": "Hugging Face directory (bf16, dequantized)",
                "seconds": time.perf_counter() - t0,
                "weight_bytes": os.path.getsize(os.path.join(hf, "model.safetensors")),
                "total_bytes": _dir_bytes(hf),
            }
        )
        for layers, label in ((None, "Core ML package, whole model"), (1, "Core ML package, one decoder layer")):
            t0 = time.perf_counter()
            r = export_coreml(args.file, os.path.join(tmp, f"m{layers}.mlpackage"), layers=layers, seq_len=args.seq_len)
            secs = time.perf_counter() - t0
            check = check_package(args.file, r["path"])
            rows.append(
                {
                    "export": label,
                    "seconds": secs,
                    "weight_bytes": r["weight_bytes"],
                    "total_bytes": _dir_bytes(r["path"]),
                    "layers": r["layers"],
                    **check,
                }
            )
    payload = {
        **stamp(),
        "file": os.path.basename(args.file),
        "file_bytes": info["file_bytes"],
        "bits_per_weight": info["bits_per_weight"],
        "weights": info["weights"],
        "seq_len": args.seq_len,
        "rows": rows,
    }
    out = args.out or default_results_dir()
    write_json(os.path.join(out, "export_sizes.json"), payload)
    lines = [
        f"# Exports of `{payload['file']}`",
        "",
        f"The edkm file: {info['file_bytes']:,} bytes, {info['bits_per_weight']:.2f} bits/weight over "
        f"{info['weights']:,} weights.",
        "",
        "| export | weights (bytes) | vs edkm file | all files (bytes) | clustered ops checked | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        checked = f"{r['clustered_equal']} of {r['clustered_ops']} equal" if "clustered_ops" in r else "-"
        lines.append(
            f"| {r['export']} | {r['weight_bytes']:,} | {r['weight_bytes'] / info['file_bytes']:.3f}x | "
            f"{r['total_bytes']:,} | {checked} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Checked: for every `constexpr_lut_to_dense` op read back from the package, its indices and "
        "its LUT equal the edkm file's, and the weight the program computes (the LUT's values, and "
        "where the file has outliers, theirs through `constexpr_sparse_to_dense` + `select`) equals "
        "the file's dequantized weight, bit for bit.",
        "",
        f"Command: `{payload['command']}`",
        "",
    ]
    write_atomic(os.path.join(out, "export_sizes.md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("export"))
