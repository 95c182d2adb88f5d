"""coremltools' side of `edkm bench coreml`, run by file path in coremltools' own environment.

It imports torch and coremltools only (never edkm, whose native library is built against
another torch), so it runs as `ENV/bin/python _coreml_side.py REQUEST.json`. The request names
the input directory (weight.pt, centroids.pt, grad.pt written by the parent), the
ModuleDKMPalettizerConfig keyword arguments, the mode and where to write the result; the result
is one JSON file, plus, in mode "run", the outputs (clustered weight, centroids, gradient, hard
labels and hard weight) as .pt files for the parent to compare.

Modes: "baseline" builds everything a run builds (inputs, the prepared model) and runs nothing,
so its peak RSS is subtracted from the run's; "run" does one warm-up and `repeats` timed
forward+backward passes of the layer's FakePalettize module on the weight, each from the same
initial centroids.
"""

import json
import os
import resource
import statistics
import sys
import time
import traceback
from collections import OrderedDict


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    return the current RSS, or None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def main(request_path: str) -> int:
    with open(request_path) as f:
        req = json.load(f)
    result = {"mode": req["mode"], "variant": req.get("variant")}
    try:
        import torch
        import coremltools
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            FakePalettize,
            ModuleDKMPalettizerConfig,
        )

        result["versions"] = {
            "torch": torch.__version__,
            "coremltools": coremltools.__version__,
            "python": sys.version.split()[0],
        }
        result["torch_threads"] = torch.get_num_threads()
        d = req["inputs"]
        w = torch.load(os.path.join(d, "weight.pt"), weights_only=True)
        c0 = torch.load(os.path.join(d, "centroids.pt"), weights_only=True)
        grad = torch.load(os.path.join(d, "grad.pt"), weights_only=True)

        # A one-layer model, as a user would palettize it; the weight is the input tensor itself.
        with torch.device("meta"):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight = torch.nn.Parameter(w)
        model = torch.nn.Sequential(OrderedDict(layer=layer))
        config = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**req["config"]))
        palettizer = DKMPalettizer(model, config)
        model = palettizer.prepare(inplace=True)
        fp = model.layer.weight_fake_quant
        if not isinstance(fp, FakePalettize) or int(fp.fake_palett_enabled[0]) != 1:
            raise RuntimeError(f"prepare() did not attach an enabled FakePalettize: {fp!r}")
        result["fake_palettize"] = repr(fp)

        if req["mode"] == "baseline":
            result["peak_rss_bytes"] = _rss()
            return _write(req, result)

        k = c0.numel()

        def reset():
            # The given initial centroids (a tensor skips their k-means init, which only runs
            # while centroids[0] is a string), as [K, cluster_dim] in the weight's dtype,
            # the dtype their own init produces.
            fp.centroids = [c0.to(w.dtype).view(k, 1).clone()]
            fp.labels = [None]

        def step():
            reset()
            wi = w.detach().requires_grad_()
            out = fp(wi)
            out.backward(grad)
            return wi, out

        fp.train()
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
        result["peak_rss_bytes"] = _rss()
        hwm = _status_bytes("VmHWM")
        if rss0 is not None and hwm is not None:
            result["peak_rss_growth_bytes"] = hwm - rss0
        result["median_seconds"] = statistics.median(times)
        result["seconds"] = times
        result["median_cpu_seconds"] = statistics.median(cpu)
        result["cpu_seconds"] = cpu
        o = req["outputs"]
        torch.save(out.detach(), os.path.join(o, "clustered.pt"))
        torch.save(fp.centroids[0].detach().flatten().float(), os.path.join(o, "centroids.pt"))
        torch.save(wi.grad, os.path.join(o, "grad.pt"))
        # The hard assignment (eval mode: nearest centroid, what finalize() exports).
        fp.eval()
        fp.labels = [None]
        with torch.no_grad():
            t0 = time.perf_counter()
            hard = fp(w.detach().clone())
            result["hard_seconds"] = time.perf_counter() - t0
        torch.save(hard, os.path.join(o, "hard.pt"))
        torch.save(fp.labels[0].flatten().to(torch.int64), os.path.join(o, "labels.pt"))
    except BaseException as e:  # report, never hang the parent
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-3000:]
    return _write(req, result)


def _write(req, result) -> int:
    tmp = req["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, req["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
