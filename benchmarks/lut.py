"""`edkm bench lut`: edkm.lut_linear on packed weights vs F.linear on dense ones, per matrix.

Shapes of LLaMA-7B and SmolLM2-135M, 3 and 4 bits with a LUT per 16 rows, batch rows 1 (decode)
to 64 (prefill). Each cell: median ms of lut_linear (float32 input) and of F.linear with the dense
weight in float32 and in bfloat16 (bfloat16 input), measured in one run; the weight's bytes read
per call (packed: indices + LUTs; dense: 4 or 2 bytes per weight).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "llama7b.q_proj": (4096, 4096),
    "llama7b.up_proj": (11008, 4096),
    "llama7b.down_proj": (4096, 11008),
    "llama7b.lm_head": (32000, 4096),
    "smollm2.up_proj": (1536, 576),
    "smollm2.lm_head": (49152, 576),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--bits", default="3,4")
    p.add_argument("--batch", default="1,4,16,64")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"some of {', '.join(SHAPES)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--json", action="store_true")


def _time(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main(args) -> int:
    from edkm import ops
    from benchmarks._results import default_results_dir, stamp, write_atomic, write_json
    from tqdm import tqdm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    bits_list = [int(b) for b in args.bits.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {s!r}; expected some of {', '.join(SHAPES)}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    cells = [(s, b) for s in shapes for b in bits_list]
    for name, bits in tqdm(cells, desc="edkm bench lut", unit="matrix"):
        out_f, in_f = SHAPES[name]
        k = 1 << bits
        idx = torch.randint(0, k, (out_f * in_f,), generator=gen)
        packed = ops.pack_indices(idx, bits).to(device)
        lut = (torch.randn(out_f // 16, k, 1, generator=gen) * 0.02).to(device)
        dense = ops.lut_embedding(
            torch.arange(out_f, device=device), packed, lut, bits, out_f, in_f, dtype=torch.float32
        )
        dense16 = dense.to(torch.bfloat16)
        del idx
        for m in batches:
            x = torch.randn(m, in_f, generator=gen).to(device)
            x16 = x.to(torch.bfloat16)
            t_lut = _time(lambda: ops.lut_linear(x, packed, lut, bits, out_f), args.repeats, device)
            t32 = _time(lambda: F.linear(x, dense), args.repeats, device)
            t16 = _time(lambda: F.linear(x16, dense16), args.repeats, device)
            rows.append(
                {
                    "matrix": name,
                    "shape": [out_f, in_f],
                    "bits": bits,
                    "batch": m,
                    "lut_ms": t_lut,
                    "dense_fp32_ms": t32,
                    "dense_bf16_ms": t16,
                    "speedup_vs_fp32": t32 / t_lut,
                    "speedup_vs_bf16": t16 / t_lut,
                    "packed_bytes": packed.numel() + lut.numel() * 4,
                    "dense_bf16_bytes": 2 * out_f * in_f,
                }
            )
        packed = dense = dense16 = None  # free them before the next matrix
    threads = torch.get_num_threads() if device.type == "cpu" else None
    payload = {**stamp(), "device": str(device), "threads": threads, "repeats": args.repeats, "rows": rows}
    out = args.out or default_results_dir()
    stem = f"lut_linear_{device.type}"
    write_json(os.path.join(out, stem + ".json"), payload)
    where = f"{threads} threads" if threads else torch.cuda.get_device_name()
    lines = [
        f"# lut_linear vs F.linear per matrix ({device.type}, {where}; median of {args.repeats})",
        "",
        f"`{payload['command']}` ({payload['date']})",
        "",
        "| matrix | bits | batch | lut_linear ms | dense fp32 ms | dense bf16 ms | vs fp32 | vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['matrix']} {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['batch']} | "
            f"{r['lut_ms']:.3f} | {r['dense_fp32_ms']:.3f} | {r['dense_bf16_ms']:.3f} | "
            f"{r['speedup_vs_fp32']:.2f}x | {r['speedup_vs_bf16']:.2f}x |"
        )
    write_atomic(os.path.join(out, stem + ".md"), "\n".join(lines) + "\n")
    print(json.dumps(payload) if args.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("lut"))
