"""A LLaMA decoder layer (RMSNorm, causal multi-head attention through SDPA, SwiGLU MLP) whose
seven projections go through a chosen linear, for measuring a training step with and without
clustering. Rotary embeddings are left out: they cost the same in every variant."""

from __future__ import annotations

import statistics
from typing import Callable, Dict

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_weights(
    hidden: int, intermediate: int, device, dtype=torch.bfloat16, seed: int = 0
) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    return {
        name: (torch.randn(shape, generator=g) * 0.02).to(dtype).to(device).requires_grad_()
        for name, shape in shapes.items()
    }


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def decoder_layer(x: torch.Tensor, linear: Callable[[torch.Tensor, str], torch.Tensor], heads: int) -> torch.Tensor:
    b, t, h = x.shape
    y = rms_norm(x)
    q, k, v = (linear(y, n).view(b, t, heads, h // heads).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
    x = x + linear(attn, "o_proj")
    y = rms_norm(x)
    return x + linear(F.silu(linear(y, "gate_proj")) * linear(y, "up_proj"), "down_proj")


def linear_variants(weights: Dict[str, torch.Tensor], k: int = 8, temperature: float = 1e-5, iters: int = 3):
    """name -> linear(x, projection) for: plain, dkm_linear (fused), dkm then F.linear."""
    import edkm
    from benchmarks.layer import quantile_centroids

    start = {n: quantile_centroids(w.detach(), k) for n, w in weights.items()}
    fused_c, unfused_c = dict(start), dict(start)  # each variant warm-starts from its own

    def plain(x, n):
        return F.linear(x, weights[n])

    def fused(x, n):
        out, c, _ = edkm.dkm_linear(x, weights[n], fused_c[n], None, temperature, iters)
        fused_c[n] = c.detach()
        return out

    def unfused(x, n):
        clustered, c, _ = edkm.dkm(weights[n], unfused_c[n], temperature, iters)
        unfused_c[n] = c.detach()
        return F.linear(x, clustered)

    # The model API: nn.Linear modules made clustered by edkm.palettize_ (ClusteredLinear ->
    # dkm_linear in training), sharing the weights' storage.
    modules = torch.nn.ModuleDict()
    for n, w in weights.items():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w.detach())
        modules[n] = lin
    edkm.palettize_(modules, edkm.Config(bits=k.bit_length() - 1, max_iter=iters, cluster_dtype=None))
    modules.train()

    def palettized(x, n):
        return modules[n](x)

    palettized.params = list(modules.parameters())
    return {"plain": plain, "dkm_linear": fused, "dkm+linear": unfused, "palettize_": palettized}


def time_steps(
    run: Callable[[], None], zero: Callable[[], None], repeats: int, device, held_bytes: int = 0
) -> tuple[float, int]:
    """Median seconds of a step (`zero` clears the gradients, `run` does forward and backward)
    and the peak memory of one step, in total: weights, gradients, activations and temporaries.
    CUDA: the allocator's peak. CPU: `held_bytes` (held before the step, gradients cleared) plus
    the tensor bytes allocated during one more step (profiler events)."""
    import time

    from benchmarks.peak_memory import peak_bytes

    def step():
        zero()
        run()

    cuda = str(device).startswith("cuda")
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        zero()  # frees of blocks allocated before profiling would not be counted
        peak = held_bytes + peak_bytes(run, device)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def training_step_report(
    hidden=4096, intermediate=11008, heads=32, tokens=2048, repeats=5, device="cuda", progress=None
):
    """Step time and peak memory of a decoder-layer training step, plain and with each clustered
    variant, and their ratios to plain. `progress(name)` is called before each variant."""
    weights = make_weights(hidden, intermediate, device)
    x = (torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(1)) * 0.5).bfloat16().to(device)
    out = {}
    for name, linear in linear_variants(weights).items():
        if progress is not None:
            progress(name)
        params = list(weights.values()) + getattr(linear, "params", [])

        def zero():
            for w in params:
                w.grad = None

        def run():
            y = decoder_layer(x, linear, heads)
            y.float().square().mean().backward()

        held = x.numel() * x.element_size() + sum(
            {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}.values()
        )
        seconds, peak = time_steps(run, zero, repeats, device, held)
        out[name] = {"seconds": seconds, "peak_bytes": peak}
    for name in ("dkm_linear", "dkm+linear", "palettize_"):
        out[name]["time_ratio"] = out[name]["seconds"] / out["plain"]["seconds"]
        out[name]["memory_ratio"] = out[name]["peak_bytes"] / max(out["plain"]["peak_bytes"], 1)
    return out


def training_step_table(steps: dict) -> list:
    """Markdown lines of a training_step_report: one row per variant, and what the variants are."""
    mib = 2**20
    lines = ["| variant | step time | ratio | peak memory | ratio |", "|---|---|---|---|---|"]
    for name, r in steps.items():
        lines.append(
            f"| {name} | {r['seconds'] * 1e3:,.1f} ms | {r.get('time_ratio', 1.0):.2f}x | "
            f"{r['peak_bytes'] / mib:,.1f} MiB | {r.get('memory_ratio', 1.0):.3f}x |"
        )
    return lines + [
        "",
        "dkm_linear keeps no clustered weight for backward (one gather rebuilds it) and "
        "writes the weight's gradient over the clustered weight's; dkm+linear is edkm.dkm "
        "then F.linear, which saves the clustered weight; palettize_ is the model API "
        "(nn.Linear modules made ClusteredLinear, optimal 1-D k-means init, relative "
        "temperature).",
    ]
