"""Peak bytes held by tensors while a function runs, above what was held when it started, on
any device: CUDA from the caching allocator's statistics, CPU from the profiler's allocation
events (every tensor allocation and free, with the running total). Deterministic: it counts
tensor bytes, not the process's resident memory."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Callable


def peak_bytes(fn: Callable[[], object], device) -> int:
    """Runs fn() once and returns the largest number of tensor bytes allocated during the call
    beyond those allocated before it."""
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
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # "Total Allocated" is the running total after each event; before the first one it was
    # that total minus the first event's bytes (negative for a free).
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - start)
