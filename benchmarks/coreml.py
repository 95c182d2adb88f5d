"""edkm vs Apple's coremltools DKM (`coremltools.optimize.torch.palettization.DKMPalettizer`).

The same weight matrix, the same initial centroids, K centroids (n_bits = log2 K), the same
number of k-means iterations and the same temperature (see MAPPING); forward+backward of one
matrix on the CPU, in one run. Each side runs in a fresh process (its peak RSS is its own, minus
that of a process of the same side that only built the inputs); coremltools runs in its own
virtual environment with the torch it supports (edkm.coreml_env), through
`_coreml_side.py`, and edkm in ours. Both sides load the same input files, and write their
outputs, which the parent compares with each other and with float64 oracles of each side's
semantics, computed exactly over the distinct values of the weight.

If coremltools cannot be installed or run, the report says exactly why (every step's command
and output) and still measures edkm.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from edkm import coreml_env
from benchmarks.dkm import parse_size

DTYPES = ("bfloat16", "float32")

# How coremltools' options are set, and what each one is on edkm's side.
# (coremltools option, value used, edkm.dkm equivalent / why)
MAPPING = [
    ("n_bits", "log2(K)", "centroids of shape [1, K]: K = 2^n_bits (K=8: 3 bits)"),
    ("granularity / group_size", "per_tensor / None", "one table for the whole matrix: G = centroids.shape[0] = 1"),
    ("cluster_dim", "1", "edkm.dkm clusters scalars"),
    ("quantize_activations", "False", "edkm never quantizes activations"),
    ("enable_per_channel_scale", "False", "no per-channel scaling"),
    ("lut_dtype", "'f32'", "LUT not quantized; edkm's centroids are float32"),
    ("kmeans_max_iter", "max_iter", "max_iter: the same number of centroid updates"),
    (
        "palett_tau",
        "temperature",
        "temperature, absolute, with distance='squared': both use softmax(-(w - c)^2 / tau) "
        "(edkm.Config's temperature is relative to var(w); edkm.dkm's is not)",
    ),
    ("palett_mode", "'dkm'", "softmax attention"),
    (
        "palett_epsilon",
        "-1.0",
        "epsilon=0.0: no early stop on either side (theirs stops when the inertia "
        "changes by <= epsilon, ours when no centroid moves by more than epsilon)",
    ),
    ("prune_threshold", "0.0", "(default 1e-7 is subtracted from every distance to centroid 0: off)"),
    ("zero_threshold", "0.0", "(default 1e-7 clamps the attention from below: off)"),
    ("enforce_zero / add_extra_centroid", "False / False", "no centroid pinned to 0, no extra centroid"),
    ("palett_cluster_tol", "0.0", "(duplicate-centroid repair; the initial centroids are distinct)"),
    (
        "kmeans_init",
        "'auto', overridden",
        "the same initial centroids on both sides: set as a tensor before "
        "the first forward, which skips their k-means init",
    ),
    (
        "palett_max_mem / palett_unique / palett_shard / palett_batch_mode / palett_dist",
        "1.0 / False / False / False / False",
        "their eDKM memory options off (probed separately: variant 'coremltools_edkm_options')",
    ),
    ("milestone / weight_threshold", "0 / 0", "clustering from the first forward, whatever the size"),
    (
        "(not an option) output",
        "attention(C_{T-1}) @ C_T",
        "edkm: attention(C_T) @ C_T; the last attention is recomputed with the final centroids. "
        "Centroids C_T are the same map on both sides.",
    ),
    (
        "(not an option) arithmetic",
        "the weight's dtype (bf16 in, bf16 cdist/softmax/matmul)",
        "float32 for 16-bit weights (float64 for float64)",
    ),
]


def coreml_config(k: int, iters: int, temperature: float) -> dict:
    """ModuleDKMPalettizerConfig keyword arguments that match edkm.dkm(w, c[1, K], temperature,
    iters, epsilon=0.0, distance='squared')."""
    if k < 2 or k & (k - 1):
        raise ValueError(f"--k must be a power of two >= 2 (coremltools takes n_bits = log2 K), got {k}")
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
    return {
        "n_bits": int(math.log2(k)),
        "cluster_dim": 1,
        "granularity": "per_tensor",
        "group_size": None,
        "quantize_activations": False,
        "enable_per_channel_scale": False,
        "lut_dtype": "f32",
        "milestone": 0,
        "weight_threshold": 0,
        "kmeans_max_iter": int(iters),
        "palett_tau": float(temperature),
        "palett_mode": "dkm",
        "palett_epsilon": -1.0,
        "prune_threshold": 0.0,
        "zero_threshold": 0.0,
        "enforce_zero": False,
        "add_extra_centroid": False,
        "palett_cluster_tol": 0.0,
        "palett_max_mem": 1.0,
        "palett_unique": False,
        "palett_shard": False,
        "palett_batch_mode": False,
        "palett_dist": False,
    }


def coreml_edkm_options_config(k: int, iters: int, temperature: float) -> dict:
    """The same, with coremltools' own eDKM memory options on (saved-tensor hooks that offload and
    uniquify: palett_max_mem < 1 turns the hooks on, palett_unique for 16-bit weights)."""
    return {**coreml_config(k, iters, temperature), "palett_max_mem": 0.5, "palett_unique": True}


# --- float64 oracles and comparisons (no coremltools needed) ---------------------------------


def dkm_oracle(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float,
    iters: int,
    final: str = "recompute",
    grad_output: torch.Tensor | None = None,
) -> dict:
    """DKM in float64, exactly, over the distinct values of `weight` with their counts (one table,
    squared distance, no early stop). final="recompute": output attention(C_T) @ C_T (edkm.dkm);
    final="last": the attention of the last iteration, attention(C_{T-1}) @ C_T (coremltools).

    Returns {"soft": output (float64, shape of `weight`), "centroids": C_T, "hard": nearest-centroid
    index of each weight under C_T (ties to the lower index)} and, with `grad_output`, "grad": the
    exact gradient of sum(grad_output * soft) with respect to the weight (the centroids given are
    constants): g_i * D[u(i)] + I[u(i)] / n[u(i)], D the derivative of the output with the
    centroids held, I the gradient that reaches the distinct value u through the centroids."""
    if final not in ("recompute", "last"):
        raise ValueError(f"final must be 'recompute' or 'last', got {final!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    v, inv, n = torch.unique(weight.detach().double().flatten(), return_inverse=True, return_counts=True)
    n = n.double()
    c0 = centroids.detach().double().flatten()

    def attention(values, cent):
        return torch.softmax(-((values.unsqueeze(1) - cent) ** 2) / temperature, dim=1)

    with torch.enable_grad():
        vv = v.clone().requires_grad_(grad_output is not None)
        history = [c0]
        c = c0
        for _ in range(iters):
            a = attention(vv, c)
            den = (a * n.unsqueeze(1)).sum(0)
            num = (a * (n * vv).unsqueeze(1)).sum(0)
            c = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), c)
            history.append(c)
        c_att = history[-1] if final == "recompute" else history[-2]
        c_T = history[-1]
        soft_u = (attention(v, c_att.detach()) * c_T.detach()).sum(1)
        out = {
            "soft": soft_u[inv].view(weight.shape),
            "centroids": c_T.detach(),
            "hard": (v.unsqueeze(1) - c_T.detach()).abs().argmin(1)[inv].view(weight.shape),
        }
        if grad_output is not None:
            g = grad_output.detach().double().flatten()
            G = torch.zeros_like(v).index_add_(0, inv, g)  # upstream gradient per value
            vd = v.clone().requires_grad_()
            direct = (attention(vd, c_att.detach()) * c_T.detach()).sum(1)
            (D,) = torch.autograd.grad(direct.sum(), vd)  # row u depends on v_u only
            through = (attention(v, c_att) * c_T).sum(1)
            (I,) = torch.autograd.grad((G * through).sum(), vv, allow_unused=True)
            if I is None:
                I = torch.zeros_like(v)
            out["grad"] = (g * D[inv] + (I / n)[inv]).view(weight.shape)
    return out


def coreml_dkm_transcription(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float,
    iters: int,
    zero_threshold: float = 0.0,
    prune_threshold: float = 0.0,
    epsilon: float = -1.0,
):
    """A line-by-line transcription of coremltools 9.0 FakePalettize.diff_palettize_seq for one
    partition, cluster_dim 1, palett_mode 'dkm' (N x K tensors, plain autograd), in the dtype of
    `weight`; used by the tests to check that dkm_oracle(final='last') is their map. Returns
    (soft weight, final centroids [K])."""
    cX = weight.reshape(-1, 1)
    cXt = cX.T
    c = centroids.reshape(-1, 1).to(weight.dtype)
    last_inertia = None
    attention = None
    for _ in range(iters):
        x_c_dist = torch.cdist(cX, c).square()
        if prune_threshold > 0:
            x_c_dist[:, :1] -= prune_threshold
        attention = torch.softmax(-x_c_dist / temperature, dim=-1).clamp(min=zero_threshold)
        attention_sum = attention.sum(dim=0).view(-1, 1)
        c = torch.matmul(cXt, attention).T / attention_sum
        inertia = x_c_dist.min(dim=-1)[0].sum()
        if last_inertia and abs(last_inertia - inertia) <= epsilon:
            break
        last_inertia = inertia
    return torch.matmul(attention, c).reshape(weight.shape), c.flatten()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a against b (b the reference), in float64: relative L2 (||a-b|| / ||b||), max |a-b|, and
    max |a-b| / max |b|."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    d = a - b
    nb = float(b.norm())
    mb = float(b.abs().max()) if b.numel() else 0.0
    mx = float(d.abs().max()) if d.numel() else 0.0
    return {
        "rel_l2": float(d.norm()) / nb if nb > 0 else float(d.norm()),
        "max_abs": mx,
        "rel_max": mx / mb if mb > 0 else mx,
    }


def index_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Fraction of positions where two hard assignments pick the same centroid."""
    if a.numel() != b.numel():
        raise ValueError(f"sizes differ: {a.numel()} vs {b.numel()}")
    same = int((a.flatten().long() == b.flatten().long()).sum())
    return {"same": same, "total": a.numel(), "fraction_same": same / max(a.numel(), 1)}


# --- inputs and the two sides -----------------------------------------------------------------


def make_inputs(size, k: int, dtype: str, directory: str) -> None:
    """weight (seed 0, N(0, 0.02^2), rounded to bf16 then cast to `dtype`, so the float32 case is
    the same matrix), initial centroids (the K quantile midpoints of the weight, rounded to bf16
    so both dtypes and both sides start from the same values; float32 [K]) and the upstream
    gradient (seed 1, in `dtype`)."""
    rows, cols = size
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    sample = w.flatten()[:: max(1, w.numel() // (1 << 20))].float()
    c = torch.quantile(sample, qs).to(torch.bfloat16).float()
    if len(set(c.tolist())) != k:
        raise ValueError(f"the {k} initial centroids are not distinct after bf16 rounding")
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    dt = getattr(torch, dtype)
    os.makedirs(directory, exist_ok=True)
    torch.save(w.to(dt), os.path.join(directory, "weight.pt"))
    torch.save(c, os.path.join(directory, "centroids.pt"))
    torch.save(grad.to(dt), os.path.join(directory, "grad.pt"))


def _status_bytes(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5) and
    return the current RSS, or None where that is not possible (same as _coreml_side.py)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _edkm_worker(req: dict, queue) -> None:
    result = {"mode": req["mode"]}
    try:
        import edkm

        result["torch_threads"] = torch.get_num_threads()
        d = req["inputs"]
        w = torch.load(os.path.join(d, "weight.pt"), weights_only=True)
        c = torch.load(os.path.join(d, "centroids.pt"), weights_only=True).view(1, -1)
        grad = torch.load(os.path.join(d, "grad.pt"), weights_only=True)
        if req["mode"] == "baseline":
            result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            queue.put(result)
            return

        def step():
            wi = w.detach().requires_grad_()
            out = edkm.dkm(wi, c, req["temperature"], req["iters"], 0.0, "squared")
            out.clustered.backward(grad)
            return wi, out

        import gc

        gc.collect()
        rss0 = _reset_peak()
        step()  # warm-up
        times, cpu = [], []
        for _ in range(req["repeats"]):
            t0, p0 = time.perf_counter(), time.process_time()
            wi, out = step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - p0)  # all threads: less sensitive to a busy machine
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm = _status_bytes("VmHWM")
        if rss0 is not None and hwm is not None:
            result["peak_rss_growth_bytes"] = hwm - rss0
        result["median_seconds"] = statistics.median(times)
        result["seconds"] = times
        result["median_cpu_seconds"] = statistics.median(cpu)
        result["cpu_seconds"] = cpu
        result["iterations"] = int(out.iterations)
        o = req["outputs"]
        cent = out.centroids.detach()
        torch.save(out.clustered.detach(), os.path.join(o, "clustered.pt"))
        torch.save(cent.flatten().float(), os.path.join(o, "centroids.pt"))
        torch.save(wi.grad, os.path.join(o, "grad.pt"))
        t0 = time.perf_counter()
        idx = edkm.assign(w, cent)
        hard = edkm.dequantize(idx, cent, w.dtype)
        result["hard_seconds"] = time.perf_counter() - t0
        torch.save(hard, os.path.join(o, "hard.pt"))
        torch.save(idx.flatten().to(torch.int64), os.path.join(o, "labels.pt"))
    except BaseException as e:  # report, never hang the parent
        result["error"] = f"{type(e).__name__}: {e}"
    queue.put(result)


def _run_edkm(req: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_edkm_worker, args=(req, q))
    p.start()
    r = q.get()
    p.join()
    return r


_SIDE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_coreml_side.py")


def _run_coreml(python: str, req: dict, workdir: str, timeout: float) -> dict:
    req = dict(req, result=os.path.join(workdir, f"result-{req['mode']}-{req.get('variant')}.json"))
    path = os.path.join(workdir, f"request-{req['mode']}-{req.get('variant')}.json")
    with open(path, "w") as f:
        json.dump(req, f)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        p = subprocess.run([python, _SIDE_SCRIPT, path], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"coremltools side timed out after {timeout:.0f} s"}
    if not os.path.exists(req["result"]):
        tail = (p.stdout + p.stderr)[-3000:]
        return {
            "error": f"coremltools side exited with {p.returncode} and wrote no result (killed for memory?): {tail}"
        }
    with open(req["result"]) as f:
        r = json.load(f)
    stderr = p.stderr.strip()
    if stderr:
        r["stderr_tail"] = stderr[-2000:]
    return r


def _load(directory: str, name: str) -> torch.Tensor:
    return torch.load(os.path.join(directory, name + ".pt"), weights_only=True)


def agreement(inputs: str, ours: str, theirs: str | None, temperature: float, iters: int) -> dict:
    """Every comparison of the two sides' outputs (either may be missing) with each other and with
    the float64 oracles of each side's map (soft weight, centroids, weight gradient, hard
    assignment)."""
    w = _load(inputs, "weight")
    c0 = _load(inputs, "centroids")
    g = _load(inputs, "grad")
    exact = {
        "edkm": dkm_oracle(w, c0, temperature, iters, "recompute", g),
        "coremltools": dkm_oracle(w, c0, temperature, iters, "last", g),
    }
    rec = exact["edkm"]
    out = {
        # the two maps against each other, both exact: what the semantics alone change
        "exact_maps_coremltools_vs_edkm": {
            "soft": compare(exact["coremltools"]["soft"], rec["soft"]),
            "grad": compare(exact["coremltools"]["grad"], rec["grad"]),
        },
        "exact_centroids": rec["centroids"].tolist(),
    }
    hard_exact = rec["centroids"][rec["hard"]]
    loaded = {}
    for side, d in (("edkm", ours), ("coremltools", theirs)):
        if d is None or not os.path.exists(os.path.join(d, "clustered.pt")):
            continue
        loaded[side] = {n: _load(d, n) for n in ("clustered", "centroids", "grad", "hard", "labels")}
    for side, t in loaded.items():
        own = exact[side]
        out[side] = {
            "soft_vs_exact": compare(t["clustered"], own["soft"]),
            "centroids_vs_exact": compare(t["centroids"], own["centroids"]),
            "grad_vs_exact": compare(t["grad"], own["grad"]),
            "hard_vs_exact": compare(t["hard"], hard_exact),
            "labels_vs_exact": index_agreement(t["labels"], rec["hard"]),
            "centroids": t["centroids"].tolist(),
        }
    if len(loaded) == 2:
        a, b = loaded["coremltools"], loaded["edkm"]
        out["coremltools_vs_edkm"] = {
            "soft": compare(a["clustered"], b["clustered"]),
            "centroids": compare(a["centroids"], b["centroids"]),
            "grad": compare(a["grad"], b["grad"]),
            "hard": compare(a["hard"], b["hard"]),
            "labels": index_agreement(a["labels"], b["labels"]),
        }
    return out


# --- the benchmark -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=parse_size, default=(4096, 4096), help="weight shape ROWSxCOLS")
    p.add_argument("--k", type=int, default=8, help="centroids per table, a power of two (2^n_bits)")
    p.add_argument("--iters", type=int, default=3, help="k-means iterations (no early stop)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1e-5,
        help="softmax temperature on the squared distance (absolute: palett_tau)",
    )
    p.add_argument(
        "--dtypes",
        default="bfloat16,float32",
        help="comma-separated: bfloat16 and/or float32 (the same matrix's values)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of coremltools (median)")
    p.add_argument("--edkm-repeats", type=int, default=10, help="timed runs of edkm (median)")
    p.add_argument("--coremltools-version", default=coreml_env.COREMLTOOLS_VERSION)
    p.add_argument(
        "--coreml-torch", default=coreml_env.COREML_TORCH_VERSION, help="torch version of coremltools' environment"
    )
    p.add_argument("--coreml-numpy", default=coreml_env.COREML_NUMPY_VERSION)
    p.add_argument("--skip-coreml", action="store_true", help="measure edkm only")
    p.add_argument(
        "--skip-edkm-options",
        action="store_true",
        help="do not try coremltools' own eDKM options (palett_max_mem/palett_unique)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each coremltools process")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def parse_dtypes(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in DTYPES]
    if not items or bad:
        raise ValueError(f"--dtypes takes a comma-separated subset of {', '.join(DTYPES)}, got {text!r}")
    return list(dict.fromkeys(items))


def check_args(args) -> dict:
    """Validate the arguments; return the coremltools config they map to."""
    if args.repeats < 1 or args.edkm_repeats < 1:
        raise ValueError(f"--repeats and --edkm-repeats must be >= 1, got {args.repeats}, {args.edkm_repeats}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    cfg = coreml_config(args.k, args.iters, args.temperature)
    rows, cols = args.size
    if rows * cols < args.k:
        raise ValueError(f"--size {rows}x{cols} has fewer weights than --k {args.k}")
    parse_dtypes(args.dtypes)
    coreml_env.requirements(args.coremltools_version, args.coreml_torch, args.coreml_numpy)
    return cfg


def _log(args, msg: str) -> None:
    if not args.json:
        print(msg, file=sys.stderr, flush=True)


def _finish_variant(r: dict, baseline: dict | None) -> dict:
    if "error" not in r and baseline is not None and "peak_rss_bytes" in baseline:
        r["baseline_peak_rss_bytes"] = baseline["peak_rss_bytes"]
        r["peak_rss_above_inputs_bytes"] = r["peak_rss_bytes"] - baseline["peak_rss_bytes"]
    return r


def run(args) -> dict:
    from benchmarks import _results
    import edkm

    cfg = check_args(args)
    dtypes = parse_dtypes(args.dtypes)
    rows, cols = args.size
    report: dict = {
        "benchmark": "coreml",
        "size": f"{rows}x{cols}",
        "numel": rows * cols,
        "k": args.k,
        "n_bits": cfg["n_bits"],
        "iterations": args.iters,
        "temperature": args.temperature,
        "device": "cpu",
        "repeats": {"coremltools": args.repeats, "edkm": args.edkm_repeats},
        "load_average_start": list(os.getloadavg()),
        "dtypes": dtypes,
        "mapping": [{"coremltools": a, "value": b, "edkm": c} for a, b, c in MAPPING],
        "coremltools_config": cfg,
        "coremltools_edkm_options_config": coreml_edkm_options_config(args.k, args.iters, args.temperature),
        "environments": {
            "edkm": {
                "torch": torch.__version__,
                "edkm": edkm.__version__,
                "python": sys.version.split()[0],
                "torch_threads": torch.get_num_threads(),
            }
        },
        "cases": {},
    }
    reqs = coreml_env.requirements(args.coremltools_version, args.coreml_torch, args.coreml_numpy)
    ct = None
    if args.skip_coreml:
        report["environments"]["coremltools"] = {"skipped": "--skip-coreml"}
    else:
        t0 = time.perf_counter()
        ct = coreml_env.ensure(reqs, log=lambda m: _log(args, m))
        ct["setup_seconds"] = time.perf_counter() - t0
        report["environments"]["coremltools"] = ct
        if "error" in ct:
            _log(args, f"edkm bench coreml: coremltools environment failed: {ct['error']}")
    ct_ok = ct is not None and "error" not in ct

    with tempfile.TemporaryDirectory(prefix="edkm-coreml-") as tmp:
        for dtype in dtypes:
            _log(args, f"edkm bench coreml: {dtype}: inputs")
            case: dict = {"variants": {}}
            inputs = os.path.join(tmp, dtype, "inputs")
            make_inputs(args.size, args.k, dtype, inputs)
            dirs = {}
            for side in ("edkm", "coremltools"):
                dirs[side] = os.path.join(tmp, dtype, side)
                os.makedirs(dirs[side], exist_ok=True)
            common = {"inputs": inputs, "repeats": args.repeats, "temperature": args.temperature, "iters": args.iters}

            _log(args, f"edkm bench coreml: {dtype}: edkm")
            base = _run_edkm({**common, "mode": "baseline"})
            r = _run_edkm({**common, "mode": "run", "outputs": dirs["edkm"], "repeats": args.edkm_repeats})
            case["variants"]["edkm"] = _finish_variant(r, base)

            if ct_ok:
                wd = os.path.join(tmp, dtype)
                _log(args, f"edkm bench coreml: {dtype}: coremltools (a few minutes: N x K tensors)")
                creq = {**common, "config": cfg, "variant": "coremltools"}
                base = _run_coreml(ct["python"], {**creq, "mode": "baseline"}, wd, args.timeout)
                r = _run_coreml(ct["python"], {**creq, "mode": "run", "outputs": dirs["coremltools"]}, wd, args.timeout)
                if "error" in base and "error" not in r:
                    r["baseline_error"] = base["error"]
                case["variants"]["coremltools"] = _finish_variant(r, base)
                if not args.skip_edkm_options and dtype in ("bfloat16",):
                    _log(args, f"edkm bench coreml: {dtype}: coremltools with its eDKM options")
                    opt_dir = os.path.join(tmp, dtype, "coremltools_edkm_options")
                    os.makedirs(opt_dir, exist_ok=True)
                    oreq = {
                        **common,
                        "config": report["coremltools_edkm_options_config"],
                        "variant": "coremltools_edkm_options",
                        "repeats": 1,
                    }
                    r = _run_coreml(ct["python"], {**oreq, "mode": "run", "outputs": opt_dir}, wd, args.timeout)
                    case["variants"]["coremltools_edkm_options"] = _finish_variant(r, base)
            elif ct is not None:
                case["variants"]["coremltools"] = {"error": f"environment: {ct['error']}"}

            d, t = case["variants"]["edkm"], case["variants"].get("coremltools", {})
            if "error" in d:
                raise SystemExit(f"edkm bench coreml: edkm failed ({dtype}): {d['error']}")
            if "median_seconds" in t:
                case["time_ratio"] = t["median_seconds"] / d["median_seconds"]
                case["cpu_time_ratio"] = t["median_cpu_seconds"] / d["median_cpu_seconds"]
                case["time_ratio_min"] = min(t["seconds"]) / min(d["seconds"])
                for key, name in (
                    ("peak_rss_growth_bytes", "peak_memory_ratio"),
                    ("peak_rss_above_inputs_bytes", "peak_memory_ratio_vs_baseline_process"),
                ):
                    # below 1 MiB the denominator is measurement noise: no ratio
                    if t.get(key) is not None and d.get(key) is not None and d[key] >= 2**20:
                        case[name] = t[key] / d[key]
            _log(args, f"edkm bench coreml: {dtype}: agreement (float64 oracles)")
            case["agreement"] = agreement(
                inputs,
                dirs["edkm"],
                dirs["coremltools"] if "median_seconds" in t else None,
                args.temperature,
                args.iters,
            )
            report["cases"][dtype] = case

    report["load_average_end"] = list(os.getloadavg())
    report.update(_results.stamp())
    out_dir = args.out or _results.default_results_dir()
    _results.write_json(os.path.join(out_dir, "coreml_vs_edkm.json"), report)
    _results.write_atomic(os.path.join(out_dir, "coreml_vs_edkm.md"), table(report))
    return report


# --- the table ---------------------------------------------------------------------------------


def _mb(b):
    return "-" if b is None else f"{b / 2**20:,.1f} MiB"


def _e(x: float) -> str:
    return f"{x:.2e}"


def _raised_in(tb: str) -> str:
    """'file:line in function' of the innermost coremltools frame of a traceback, or ''."""
    import re

    frames = re.findall(r'File "([^"]*coremltools/[^"]*)", line (\d+), in (\S+)', tb)
    if not frames:
        return ""
    path, line, fn = frames[-1]
    return f"`coremltools/{path.split('coremltools/', 1)[1]}:{line}` in `{fn}`"


def table(report: dict) -> str:
    ct_env = report["environments"].get("coremltools", {})
    ours = report["environments"]["edkm"]
    lines = [
        f"# coremltools DKMPalettizer vs edkm.dkm — {report['size']}, K={report['k']} "
        f"({report['n_bits']} bits), {report['iterations']} iterations, temperature "
        f"{report['temperature']:g}, forward+backward, {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        f"- edkm {ours['edkm']} on torch {ours['torch']} ({ours['torch_threads']} threads)",
    ]
    if "versions" in ct_env:
        v = ct_env["versions"]
        lines.append(
            f"- coremltools {v['coremltools']} on torch {v['torch']}, numpy {v['numpy']} "
            f"(own environment: `{ct_env['path']}`)"
        )
    elif "skipped" in ct_env:
        lines.append(f"- coremltools: skipped ({ct_env['skipped']})")
    elif "error" in ct_env:
        lines.append(f"- coremltools: **could not be set up**: {ct_env['error']}")
    lines += [
        "",
        "| dtype | side | median time (fastest) | median CPU time | peak RSS growth in the run | "
        "peak RSS above a baseline process | time ratio (theirs / ours): medians (fastest) | CPU-time ratio | "
        "peak-memory ratio (growth) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for dtype, case in report["cases"].items():
        for side, r in case["variants"].items():
            if "error" in r:
                first = r["error"].splitlines()[0][:300]
                lines.append(f"| {dtype} | {side} | failed | - | - | - | - | - | - |")
                where = _raised_in(r.get("traceback", ""))
                notes.append(f"- {dtype} {side} failed: `{first}`" + (f" (raised from {where})" if where else ""))
                continue
            ratio_t = ratio_c = ratio_m = ""
            if side == "coremltools" and "time_ratio" in case:
                ratio_t = f"**{case['time_ratio']:.1f}x** ({case['time_ratio_min']:.1f}x)"
                ratio_c = f"{case['cpu_time_ratio']:.1f}x"
                if "peak_memory_ratio" in case:
                    ratio_m = f"**{case['peak_memory_ratio']:.1f}x**"
            n = len(r.get("seconds", []))
            lines.append(
                f"| {dtype} | {side} | {r['median_seconds'] * 1e3:,.1f} ms ({min(r['seconds']) * 1e3:,.1f} ms, n={n}) | "
                f"{r['median_cpu_seconds'] * 1e3:,.1f} ms | "
                f"{_mb(r.get('peak_rss_growth_bytes'))} | {_mb(r.get('peak_rss_above_inputs_bytes'))} | "
                f"{ratio_t} | {ratio_c} | {ratio_m} |"
            )
    lines += [
        "",
        "Agreement: relative L2 error ||a - b|| / ||b|| in float64 (labels: fraction of "
        'weights given the same centroid). "exact": each side\'s own map computed exactly '
        "(float64, over the distinct values with their counts, from the same initial centroids).",
        "",
        "| dtype | quantity | coremltools vs edkm | edkm vs its exact map | "
        "coremltools vs its exact map | exact maps: coremltools vs edkm |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, case in report["cases"].items():
        ag = case["agreement"]
        x, o, t = ag.get("coremltools_vs_edkm"), ag.get("edkm"), ag.get("coremltools")
        gap = ag["exact_maps_coremltools_vs_edkm"]

        def cell(block, key):
            if block is None or key is None:
                return "-"
            v = block[key]
            return f"{v['fraction_same']:.6f}" if "fraction_same" in v else _e(v["rel_l2"])

        rows_ = [
            ("soft-clustered weight", "soft", "soft_vs_exact", "soft"),
            (f"centroids after {report['iterations']} iterations", "centroids", "centroids_vs_exact", None),
            ("weight gradient", "grad", "grad_vs_exact", "grad"),
            ("hard-assigned weight", "hard", "hard_vs_exact", None),
            ("hard labels (same centroid)", "labels", "labels_vs_exact", None),
        ]
        for name, kx, ko, kg in rows_:
            g = cell(gap, kg) if kg else "same map"
            lines.append(f"| {dtype} | {name} | {cell(x, kx)} | {cell(o, ko)} | {cell(t, ko)} | {g} |")
    lines += [
        "",
        "The maps differ in one place: coremltools returns attention(C_(T-1)) @ C_T (the "
        "attention of the last iteration), edkm attention(C_T) @ C_T (recomputed with the final "
        "centroids); the centroids C_T and the hard assignment are the same map on both sides. "
        "Hard-assigned weights are compared with the exact C_T's nearest-centroid weights.",
        "",
    ]
    lines += notes
    la, lb = report.get("load_average_start"), report.get("load_average_end")
    if la and lb:
        lines.append(
            f"- load average (1, 5, 15 min) at start {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, "
            f"at end {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}"
        )
    lines += [
        "",
        "Times: wall clock of one forward+backward (after one warm-up): median of n runs, and "
        "the fastest run; CPU time: the process's CPU time over the same pass (all threads). On "
        "a machine that other work keeps busy (see the load average) the median and the CPU "
        "time are inflated (threads wait for a core, and spin); the fastest run is the nearest "
        "to an idle machine.",
        "",
        "Each side runs in its own fresh process. Peak RSS growth in the run: the kernel's "
        "peak-RSS mark (VmHWM) is reset once the inputs are loaded (and, for coremltools, the "
        "model prepared), then read after the warm-up and the timed forward+backward passes; "
        "it is the ratio's measure. Peak RSS above a baseline process (as `edkm bench dkm`): "
        "the process's peak RSS minus that of a process of the same side that only loaded the "
        "inputs; it cannot go below the loading's own transient peak, so it under-counts runs "
        "that need less than that.",
        "",
        "Option mapping (coremltools `ModuleDKMPalettizerConfig` -> `edkm.dkm`):",
        "",
        "| coremltools | value | edkm |",
        "|---|---|---|",
    ]
    for m in report["mapping"]:
        lines.append(f"| `{m['coremltools']}` | `{m['value']}` | {m['edkm']} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    import sys

    from benchmarks import run_module

    sys.exit(run_module("coreml"))
