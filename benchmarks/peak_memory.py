"""Peak bytes held by tensors while a function runs, above what was held when it started, on
any device: CUDA from the caching allocator's statistics, CPU from the profiler's allocation
events (every tensor allocation and free, by address). Deterministic: it counts tensor bytes,
not the process's resident memory. On CPU, blocks that existed before the call and were freed
during it are not subtracted (callers free what they can first, as the step bench does)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Callable


def peak_bytes(fn: Callable[[], object], device) -> int:
    """Runs fn() once and returns the largest number of tensor bytes allocated during the call
    and alive at the same time (CUDA: allocator peak minus what was allocated before)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
            fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # Blocks allocated during the call, by address: frees of blocks allocated before it are
    # left out (the profiler reports them only when an earlier profile saw them allocated).
    live, total, peak = {}, 0, 0
    for e in memory:
        nbytes, addr = e["args"]["Bytes"], e["args"].get("Addr")
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            total += nbytes
            peak = max(peak, total)
        elif addr in live:
            total -= live.pop(addr)
    return peak
