"""`edkm bench layer`: cluster one LLaMA-7B-shaped decoder layer to 3 bits (CPU or GPU).

Seven bf16 matrices (q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008), random
with a fixed seed. For each: soft clustering forward + backward with edkm.dkm, then the hard
3-bit assignment; prints time, what autograd saved, peak memory and distinct values.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

LAYER = [
    ("q_proj", (4096, 4096)),
    ("k_proj", (4096, 4096)),
    ("v_proj", (4096, 4096)),
    ("o_proj", (4096, 4096)),
    ("gate_proj", (11008, 4096)),
    ("up_proj", (11008, 4096)),
    ("down_proj", (4096, 11008)),
]

# What naive DKM autograd keeps per weight for K=8 (docs/DESIGN.md section 1), float32, by iterations.
NAIVE_BYTES_PER_WEIGHT = {1: 132, 3: 260, 5: 388}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=3, help="bits per weight (K = 2^bits centroids)")
    p.add_argument("--iters", type=int, default=3, help="DKM iterations")
    p.add_argument(
        "--scale", type=float, default=1.0, help="fraction of each matrix's rows to use (1.0 = the full 7B layer)"
    )
    p.add_argument("--seed", type=int, default=0)


def quantile_centroids(w: torch.Tensor, k: int) -> torch.Tensor:
    """K centroids at the weight's quantiles (from a strided sample): a simple warm start."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    sample = w.flatten()[:: max(1, w.numel() // (1 << 20))].to(dtype)
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k, device=sample.device, dtype=dtype)
    return torch.quantile(sample, qs).view(1, k)


def main(args) -> int:
    from tqdm import tqdm

    import edkm
    from edkm.measure import SavedBytes

    if not 1 <= args.bits <= 8:
        raise SystemExit(f"edkm bench layer: --bits must be in 1..8, got {args.bits}")
    if not 0 < args.scale <= 1:
        raise SystemExit(f"edkm bench layer: --scale must be in (0, 1], got {args.scale}")
    k = 2**args.bits
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    # Warm-up (CUDA context, kernel loading) so the first matrix's time is its own.
    warm = torch.randn(64, 64, device=device).bfloat16().requires_grad_()
    edkm.dkm(warm, quantile_centroids(warm.detach(), k), 1e-5, args.iters).clustered.float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    rows_out = []
    total_n = 0
    total_saved = 0
    t_start = time.perf_counter()
    for name, (rows, cols) in tqdm(LAYER, desc=f"clustering a LLaMA-7B layer to {args.bits} bits"):
        rows = max(1, int(rows * args.scale))
        w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16).to(device)
        w.requires_grad_()
        c = quantile_centroids(w.detach(), k)
        saved = SavedBytes(w)

        t0 = time.perf_counter()
        with saved.hooks():
            out = edkm.dkm(w, c, temperature=1e-5, max_iter=args.iters)
        out.clustered.backward(torch.ones_like(out.clustered))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        indices = edkm.assign(w.detach(), out.centroids)
        hard = edkm.dequantize(indices, out.centroids, torch.bfloat16)
        err = ((hard.float() - w.detach().float()).norm() / w.detach().float().norm()).item()
        n = w.numel()
        rows_out.append(
            (
                name,
                f"{rows}x{cols}",
                torch.unique(w.detach()).numel(),
                torch.unique(hard).numel(),
                seconds,
                saved.bytes,
                err,
            )
        )
        total_n += n
        total_saved += saved.bytes
        del w, out, hard, indices
    elapsed = time.perf_counter() - t_start

    print(
        f"\nedkm bench layer: one LLaMA-7B decoder layer, bf16, {args.bits} bits (K={k}), "
        f"{args.iters} DKM iterations, device {device}\n"
    )
    print(
        f"{'matrix':<10} {'shape':>11} {'distinct':>9} {'after':>6} {'fwd+bwd':>9} "
        f"{'saved for bwd':>14} {'rel. error':>10}"
    )
    for name, shape, distinct, after, seconds, saved_b, err in rows_out:
        print(
            f"{name:<10} {shape:>11} {distinct:>9,} {after:>6} {seconds:>8.2f}s "
            f"{saved_b / 2**20:>11.2f} MiB {err:>10.4f}"
        )
    naive = NAIVE_BYTES_PER_WEIGHT.get(args.iters)
    print(
        f"\n{total_n:,} weights in {elapsed:.1f} s; autograd kept {total_saved / 2**20:.1f} MiB "
        f"({total_saved / total_n:.4f} bytes/weight) besides the weights themselves."
    )
    if naive and k == 8:
        print(
            f"Naive DKM would keep about {naive} bytes/weight: {naive * total_n / 2**30:.1f} GiB "
            f"({naive * total_n / max(total_saved, 1):,.0f}x more)."
        )
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(
        f"Peak {'GPU memory allocated' if device == 'cuda' else 'RSS'}: {peak / 2**30:.2f} GiB. "
        f"Packed size at {args.bits} bits: {total_n * args.bits / 8 / 2**20:,.0f} MiB "
        f"(bf16: {total_n * 2 / 2**20:,.0f} MiB)."
    )
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("layer"))
