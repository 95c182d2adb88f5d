"""The memory ablation: what forward+backward of DKM over one LLaMA-7B decoder layer's seven
weight matrices (bf16, K=8, 3 iterations) keeps for backward, per variant:

  reference  naive N x K DKM, autograd as is
  M          + the saved-tensor store offloading to host memory (dedup included)
  M+U        + uniquification (distinct values / rows + narrow index)
  M+U+S      + sharding over 2 data-parallel ranks (gloo, both clustering the same weights):
             each keeps half of every copy; rank 0's numbers are reported
  dkm        edkm's U-domain op (no store)

Each variant runs in a fresh process: its peak memory is its own (CPU: peak RSS above a process
that only built the weights; CUDA: peak allocated above the weights). M+U+S (sharding across
data-parallel ranks) runs 2 ranks on this machine.

The naive reference needs ~260 bytes per weight (49 GiB for the full layer), more than a 24 GB
machine has: by default every matrix keeps 1/16 of its rows, and full-layer numbers are
extrapolated linearly (bytes scale with the number of weights), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

import torch

VARIANTS = ("reference", "M", "M+U", "M+U+S", "dkm")
SHARD_RANKS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale", type=float, default=None, help="fraction of each matrix's rows (default 1/16 on CPU, 1 on CUDA)"
    )
    p.add_argument("--quick", action="store_true", help="a reduced size (1/256 of the rows), under a minute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list, one object per variant (variant, saved_device_bytes, "
        "saved_host_bytes, peak_bytes, seconds)",
    )
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def _weights(scale: float, device: str):
    from benchmarks.layer import LAYER

    gen = torch.Generator().manual_seed(0)
    out = []
    for name, (rows, cols) in LAYER:
        rows = max(8, int(rows * scale))
        out.append((name, (torch.randn(rows, cols, generator=gen) * 0.02).bfloat16().to(device)))
    return out


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(variant: str, scale: float, device: str, queue, rank: int = 0, port: int = 0) -> None:
    try:
        group = None
        if variant == "M+U+S":
            import datetime

            import torch.distributed as dist

            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
            dist.init_process_group("gloo", rank=rank, world_size=SHARD_RANKS, timeout=datetime.timedelta(seconds=300))
            group = dist.group.WORLD
        import edkm
        from benchmarks.layer import quantile_centroids
        from edkm.measure import SavedBytes

        weights = _weights(scale, device)
        params = [w.requires_grad_() for _, w in weights]
        centroids = [quantile_centroids(w.detach(), 8) for w in params]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = 0
        saved = SavedBytes(*params)

        # The whole layer's forward first, then one backward: everything a decoder layer's
        # backward needs is alive at once, as in training.
        t0 = time.perf_counter()
        device_bytes = host_bytes = 0
        if variant in ("reference", "dkm"):
            fn = edkm.dkm_reference if variant == "reference" else edkm.dkm
            with saved.hooks():
                outs = [fn(w, c, 1e-5, 3).clustered for w, c in zip(params, centroids)]
            device_bytes = saved.bytes
        else:
            with edkm.saved_tensors(offload=True, uniquify=variant != "M", shard_group=group) as store:
                outs = [edkm.dkm_reference(w, c, 1e-5, 3).clustered for w, c in zip(params, centroids)]
            counters = store.counters()
            device_bytes, host_bytes = counters["device_bytes"], counters["host_bytes"]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        del outs
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if group is not None:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
            if rank != 0:
                return
        queue.put(
            {
                "variant": variant,
                "saved_device_bytes": device_bytes,
                "saved_host_bytes": host_bytes,
                "peak_bytes": _peak(device) - base,
                "seconds": seconds,
            }
        )
    except BaseException as e:  # report, never hang the parent
        queue.put({"variant": variant, "error": f"{type(e).__name__}: {e}"})


def _baseline(scale: float, device: str, queue) -> None:
    _weights(scale, device)
    queue.put(_peak(device) if not device.startswith("cuda") else 0)


def _fresh(target, *args, ranks: int = 1):
    """Run target(*args, queue[, rank, port]) in fresh processes; rank 0's answer."""
    import socket

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 0
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    extra = (lambda r: (r, port)) if ranks > 1 else (lambda r: ())
    procs = [ctx.Process(target=target, args=(*args, q, *extra(r))) for r in range(ranks)]
    for p in procs:
        p.start()
    result = q.get()
    for p in procs:
        p.join()
    return result


def run(args) -> dict:
    from tqdm import tqdm

    from benchmarks import _results
    from benchmarks.layer import LAYER

    scale = args.scale or (1 / 256 if args.quick else (1.0 if args.device.startswith("cuda") else 1 / 16))
    if not 0 < scale <= 1:
        raise SystemExit(f"edkm bench memory: --scale must be in (0, 1], got {scale}")
    base_rss = _fresh(_baseline, scale, args.device)
    rows = []
    dkm_scale = scale if args.quick else 1.0  # dkm fits at full size: measure it there
    base_rss_full = base_rss if dkm_scale == scale else _fresh(_baseline, dkm_scale, args.device)
    for v in tqdm(VARIANTS, desc="bench memory", disable=args.json):
        vscale = dkm_scale if v == "dkm" else scale
        r = _fresh(_worker, v, vscale, args.device, ranks=SHARD_RANKS if v == "M+U+S" else 1)
        if "error" in r:
            raise SystemExit(f"edkm bench memory: variant {v} failed: {r['error']}")
        if not args.device.startswith("cuda"):
            r["peak_bytes"] -= base_rss_full if v == "dkm" else base_rss
        r["scale"] = vscale
        r["numel"] = sum(max(8, int(rows_ * vscale)) * cols for _, (rows_, cols) in LAYER)
        rows.append(r)
    full = sum(r * c for _, (r, c) in LAYER)
    for r in rows:
        kept = r["saved_device_bytes"] + r["saved_host_bytes"]
        # Bytes kept by the naive variants grow with the weights; dkm's tables do not, so dkm
        # is never extrapolated (it is measured at full size unless --quick).
        factor = 1.0 if r["variant"] == "dkm" else full / r["numel"]
        r["full_layer_kept_bytes"] = kept * factor
        r["full_layer_kept_extrapolated"] = factor != 1.0
    ref_full = rows[0]["full_layer_kept_bytes"]
    for r in rows:
        r["saved_ratio_to_reference"] = ref_full / max(r["full_layer_kept_bytes"], 1)
    report = {
        "benchmark": "memory",
        "device": args.device,
        "scale": scale,
        "full_layer_numel": full,
        "variants": rows,
        **_results.stamp(),
    }
    out_dir = args.out or _results.default_results_dir()
    tag = f"memory_{args.device.split(':')[0]}" + ("_quick" if args.quick else "")
    _results.write_json(os.path.join(out_dir, tag + ".json"), report)
    _results.write_atomic(os.path.join(out_dir, tag + ".md"), table(report))
    _plot(report, os.path.join(out_dir, tag + ".png"))
    return report


def table(report: dict) -> str:
    mib = 2**20
    lines = [
        f"# Memory ablation: DKM on one LLaMA-7B decoder layer (bf16, K=8, 3 iterations), {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        f"- full layer: {report['full_layer_numel']:,} weights; each variant ran on the weights shown "
        "(every matrix keeps that fraction of its rows)",
        "",
        "| variant | weights measured | kept where autograd put it | kept in the store's host copies | peak memory | time | kept, full layer | vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["variants"]:
        if not r["full_layer_kept_extrapolated"]:
            label = " (as measured: does not grow with N)"
        elif "U" in r["variant"]:
            label = " (extrapolated linearly: an upper bound, its tables do not grow)"
        else:
            label = " (extrapolated)"
        lines.append(
            f"| {r['variant']} | {r['numel']:,} | {r['saved_device_bytes'] / mib:,.1f} MiB | "
            f"{r['saved_host_bytes'] / mib:,.1f} MiB | {r['peak_bytes'] / mib:,.0f} MiB | {r['seconds']:.2f} s | "
            f"{r['full_layer_kept_bytes'] / 2**30:,.3f} GiB{label} | {r['saved_ratio_to_reference']:,.0f}x less |"
        )
    lines += [
        "",
        "JSON keys: saved_device_bytes = kept where autograd put it (on a CPU run that is CPU "
        "memory), saved_host_bytes = the store's host copies.",
        "",
        "Kept = bytes held for backward after the whole layer's forward (weights themselves "
        "excluded). Naive variants are measured on a fraction of the layer and extrapolated "
        "linearly (their bytes grow with the weights); dkm's tables do not grow with the weights "
        "and are measured at full size. On a CPU the 'host' copies share memory with everything "
        "else: M shows what offloading moves off a GPU, U what uniquification removes, S what "
        "each of 2 ranks keeps when they shard (rank 0 shown; its peak includes the all-gather).",
    ]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in report["variants"]]

    # Full-layer bytes (naive variants extrapolated), split by where they are kept.
    def part(r, key):
        kept = max(r["saved_device_bytes"] + r["saved_host_bytes"], 1)
        return r["full_layer_kept_bytes"] * r[key] / kept / 2**20

    dev = [part(r, "saved_device_bytes") for r in report["variants"]]
    host = [part(r, "saved_host_bytes") for r in report["variants"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], dev, 0.4, label="kept on device")
    ax.bar([i + 0.2 for i in x], host, 0.4, label="kept on host")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    for i, r in enumerate(report["variants"]):
        total = r["full_layer_kept_bytes"] / 2**20
        ax.annotate(
            f"{total:,.0f} MiB" if total >= 10 else f"{total:.1f} MiB",
            (i, total),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB kept for backward, full layer (log)")
    ax.set_title(f"DKM memory ablation, one LLaMA-7B layer ({report['device']})")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(args) -> int:
    report = run(args)
    if args.json:
        print(
            json.dumps(
                [
                    {k: r[k] for k in ("variant", "saved_device_bytes", "saved_host_bytes", "peak_bytes", "seconds")}
                    for r in report["variants"]
                ]
            )
        )
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("memory"))
