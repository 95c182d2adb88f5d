"""`edkm bench decode`: tokens/s of SmolLM2-135M run packed vs dense vs llama.cpp (CPU).

Every row runs in its own process (so its peak RSS is its own), with the same prompt tokens, the
same number of new tokens and the same number of threads:

* ``packed3`` / ``packed4``: edkm files run packed (edkm.lut_linear); by default post-training
  files made here (one LUT per 16 rows; compressing takes a minute), or ``--file3`` /
  ``--file4``;
* ``dense-fp32`` / ``dense-bf16``: the same model with dense weights in PyTorch;
* ``llamacpp-Q4_1`` / ``llamacpp-Q3_K_S``: llama.cpp through llama-cpp-python on the original
  Q4_1 GGUF and its Q3_K_S requantization (needs the study's extra packages:
  EDKM_STUDY_EXTRAS=$(scripts/setup_study_env.sh); rows are skipped with the reason otherwise);
* with ``--llama7b-layers L``: the LLaMA-7B-shaped synthetic model cut to L layers, packed at 3
  bits vs dense bf16.

Reported per row: prefill tokens/s, median decode step (and tokens/s), weights in memory, peak
RSS; the ratios against dense fp32 and bf16 are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = (
    "The history of the city begins with a small settlement by the river, where farmers and "
    "traders met to exchange grain, wool and salt. Over the centuries it grew"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default 32)")
    p.add_argument("--file3", default=None, help="a 3-bit edkm file of smollm2-135m (default: made here)")
    p.add_argument("--file4", default=None, help="a 4-bit edkm file of smollm2-135m (default: made here)")
    p.add_argument(
        "--rows",
        default="packed3,packed4,dense-fp32,dense-bf16,llamacpp-Q4_1,llamacpp-Q3_K_S",
        help="comma-separated rows",
    )
    p.add_argument(
        "--llama7b-layers",
        type=int,
        default=0,
        help="also run the synthetic LLaMA-7B cut to this many layers, packed 3-bit vs dense bf16",
    )
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the result files (decode_cpu_TAG.json)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child process: one row
    p.add_argument("--row-file", default=None, help=argparse.SUPPRESS)


def _peak_rss() -> int:
    from edkm.generate import _peak_rss as peak

    return peak()


def _torch_row(model, tok, args, packed: bool, dtype_name: str) -> dict:
    from edkm.generate import generate, model_bytes, prompt_ids

    ids = prompt_ids(tok, PROMPT, model.config.vocab_size)
    if tok is None:  # the synthetic LLaMA: its prompt is the text's bytes; 16 of them
        ids = ids[:, :16]
    generate(model, ids[:, :8], 2)  # warm-up
    g = generate(model, ids, args.new_tokens)
    return {
        "prompt_tokens": g.prompt_tokens,
        "new_tokens": len(g.tokens),
        "prefill_tokens_per_second": g.prefill_tokens_per_second,
        "decode_step_ms_median": 1e3 * statistics.median(g.step_seconds),
        "decode_tokens_per_second": 1.0 / statistics.median(g.step_seconds),
        "weights_bytes": model_bytes(model),
        "packed": packed,
        "dtype": dtype_name,
        "tokens": g.tokens[:8],
    }


def _llamacpp_row(gguf: str, args) -> dict:
    from benchmarks.study import use_study_extras

    Llama = use_study_extras("llama_cpp").Llama
    llm = Llama(
        model_path=gguf, n_ctx=512, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids[:8])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    import numpy as np

    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    steps, tokens = [], [tok]
    for _ in range(args.new_tokens - 1):
        t = time.perf_counter()
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
    from benchmarks.study import gguf_tensor_bytes

    return {
        "prompt_tokens": len(ids),
        "new_tokens": len(tokens),
        "prefill_tokens_per_second": len(ids) / prefill,
        "decode_step_ms_median": 1e3 * statistics.median(steps),
        "decode_tokens_per_second": 1.0 / statistics.median(steps),
        "weights_bytes": gguf_tensor_bytes(gguf)["bytes"],
        "packed": True,
        "dtype": "gguf",
        "tokens": tokens[:8],
    }


def _gguf(qtype: str) -> str:
    from edkm.models import smollm2_path

    directory, name = smollm2_path()
    if qtype == "Q4_1":
        return os.path.join(directory, name)
    from benchmarks.study import quantize_gguf

    gdir = Path(os.environ.get("EDKM_CACHE") or Path.home() / ".cache" / "edkm") / "study-gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    dst = str(gdir / f"smollm2-135m.{qtype}.gguf")
    if not os.path.exists(dst):
        quantize_gguf(os.path.join(directory, name), dst, qtype)
    return dst


def run_row(row: str, args) -> dict:
    """One row, in this process."""
    torch.set_num_threads(args.threads)
    from edkm import models

    t0 = time.perf_counter()
    if row in ("packed3", "packed4", "llama7b-packed3"):
        model, tok = models.load_packed_model(args.row_file, torch.float32)
        r = _torch_row(model, tok, args, True, "float32")
    elif row in ("dense-fp32", "dense-bf16"):
        dtype = torch.float32 if row == "dense-fp32" else torch.bfloat16
        model, tok = models.load_model(models.SMOLLM2, dtype)
        r = _torch_row(model.eval(), tok, args, False, str(dtype).removeprefix("torch."))
    elif row == "llama7b-dense-bf16":
        model = _llama7b_dense(args.llama7b_layers)
        r = _torch_row(model, None, args, False, "bfloat16")
    elif row.startswith("llamacpp-"):
        r = _llamacpp_row(_gguf(row.removeprefix("llamacpp-")), args)
    else:
        raise ValueError(f"edkm bench decode: unknown row {row!r}")
    r.update(row=row, threads=args.threads, peak_rss_bytes=_peak_rss(), seconds=time.perf_counter() - t0)
    return r


def _llama7b_dense(layers: int):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from edkm import models

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(models.llama7b_config(layers), dtype=torch.bfloat16)
    from edkm.packed import _set_tensor

    for name, _shape, make in models.llama7b_synthetic_tensors(layers):
        _set_tensor(model, name, make())
    return model.eval()


def _make_file(bits: int, directory: str) -> str:
    """A post-training edkm file of SmolLM2 at ``bits`` (one LUT per 16 rows), cached."""
    path = os.path.join(directory, f"smollm2-135m-{bits}bit-g16.safetensors")
    if not os.path.exists(path):
        from edkm.compress import main as compress_main
        import argparse as ap
        from edkm.compress import add_arguments as ca

        p = ap.ArgumentParser()
        ca(p)
        compress_main(
            p.parse_args(["smollm2-135m", "--bits", str(bits), "--group-size", "16", "--out", path, "--data", "none"])
        )
    return path


def _child(row: str, args, row_file=None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edkm",
        "bench",
        "decode",
        "--row",
        row,
        "--threads",
        str(args.threads),
        "--new-tokens",
        str(args.new_tokens),
        "--llama7b-layers",
        str(args.llama7b_layers),
    ]
    if row_file:
        cmd += ["--row-file", row_file]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": row, "skipped": last}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(args) -> int:
    if args.threads < 1 or args.new_tokens < 2:
        raise ValueError("--threads must be >= 1 and --new-tokens >= 2")
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return 0
    from benchmarks._results import default_results_dir, stamp, write_atomic, write_json
    from tqdm import tqdm

    cache = Path(os.environ.get("EDKM_CACHE") or Path.home() / ".cache" / "edkm") / "decode-bench"
    cache.mkdir(parents=True, exist_ok=True)
    files = {"packed3": args.file3, "packed4": args.file4}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows and not args.llama7b_layers:
        raise ValueError("--rows: no rows to run (and no --llama7b-layers)")
    for r in rows:
        if r in files and files[r] is None:
            files[r] = _make_file(3 if r == "packed3" else 4, str(cache))
    jobs = [(r, files.get(r)) for r in rows]
    if args.llama7b_layers:
        from edkm.compress import compress_synthetic
        from edkm.config import Config

        f7 = str(cache / f"llama7b-{args.llama7b_layers}layers-3bit.safetensors")
        if not os.path.exists(f7):
            compress_synthetic(f7, Config(bits=3), layers=args.llama7b_layers)
        jobs += [("llama7b-packed3", f7), ("llama7b-dense-bf16", None)]
    results = []
    for row, f in tqdm(jobs, desc="edkm bench decode", unit="row"):
        results.append(_child(row, args, f))
    by = {r["row"]: r for r in results}
    for r in results:
        for base in ("dense-fp32", "dense-bf16", "llama7b-dense-bf16"):
            b = by.get(base)
            if "decode_tokens_per_second" in r and b and "decode_tokens_per_second" in b:
                if base.startswith("llama7b") != r["row"].startswith("llama7b"):
                    continue
                r[f"decode_speedup_vs_{base}"] = r["decode_tokens_per_second"] / b["decode_tokens_per_second"]
                r[f"memory_ratio_vs_{base}"] = b["weights_bytes"] / r["weights_bytes"]
    payload = {
        **stamp(),
        "prompt": PROMPT,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "files": files,
        "rows": results,
    }
    out = args.out or default_results_dir()
    stem = "decode_cpu" + (f"_{args.tag}" if args.tag else "")
    write_json(os.path.join(out, stem + ".json"), payload)
    lines = [
        f"# Decode speed on CPU ({args.threads} threads, {args.new_tokens} new tokens)",
        "",
        f"`{payload['command']}` ({payload['date']})",
        "",
        "| row | prefill tok/s | decode step ms (median) | decode tok/s | weights MiB | peak RSS MiB | decode vs dense fp32 | vs dense bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped']} | | | | | | |")
            continue
        f32 = r.get("decode_speedup_vs_dense-fp32") or r.get("decode_speedup_vs_llama7b-dense-bf16")
        b16 = r.get("decode_speedup_vs_dense-bf16")
        lines.append(
            f"| {r['row']} | {r['prefill_tokens_per_second']:.1f} | {r['decode_step_ms_median']:.1f} | "
            f"{r['decode_tokens_per_second']:.1f} | {r['weights_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {'' if f32 is None else f'{f32:.2f}x'} | "
            f"{'' if b16 is None else f'{b16:.2f}x'} |"
        )
    lines.append("")
    lines.append("llama7b rows: the speedup column is against llama7b-dense-bf16.")
    write_atomic(os.path.join(out, stem + ".md"), "\n".join(lines) + "\n")
    _plot([r for r in results if "decode_tokens_per_second" in r], os.path.join(out, stem + ".png"), args)
    print(json.dumps(payload) if args.json else "\n".join(lines))
    return 0


def _plot(rows, path: str, args) -> None:
    """Decode tokens/s per row (bar chart), written atomically."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["row"] for r in rows]
    vals = [r["decode_tokens_per_second"] for r in rows]
    colors = [
        "tab:green"
        if n.startswith(("packed", "llama7b-packed"))
        else "tab:orange"
        if n.startswith("llamacpp")
        else "tab:gray"
        for n in names
    ]
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    for i, (v, r) in enumerate(zip(vals[::-1], rows[::-1])):
        ax.text(v, i, f" {v:.1f} tok/s, {r['weights_bytes'] / 2**20:.0f} MiB", va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s (median step)")
    ax.set_title(f"Decode on CPU, {args.threads} threads (green: edkm packed, orange: llama.cpp)", fontsize=9)
    ax.set_xlim(0, max(vals) * 1.6)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("decode"))
