"""Where dkm's time goes on the GPU: torch.profiler over dkm forward+backward on one
4096x4096 bf16 matrix (K=8, 3 iterations), run by scripts/gpu_check.sh.

Prints, per call: wall time, GPU kernel time, host syncs (cudaStreamSynchronize and
cudaMemcpy device-to-host), kernel launches, and the top kernels by GPU time: first with the
defaults (U-domain as ATen ops, one global atomic per weight), then with the privatized slot
atomics, then with those and the CUDA U-domain kernels (both off by default until they have
run on a GPU).
"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import edkm

if not torch.cuda.is_available():
    sys.exit("profile_dkm: needs a CUDA device")

CALLS = 5
g = torch.Generator().manual_seed(0)
w = (torch.randn(4096, 4096, generator=g) * 0.02).bfloat16().cuda().requires_grad_()
c = torch.linspace(-0.04, 0.04, 8).view(1, 8).cuda().requires_grad_()
grad = torch.randn(w.shape, generator=g).bfloat16().cuda()


def step():
    out = edkm.dkm(w, c, 1e-5, 3)
    out.clustered.backward(grad)


def measure(label):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    copies = sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy"))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    print(f"== {label}")
    print(f"wall per call (median of 10, no profiler): {statistics.median(walls) * 1e3:.2f} ms")
    print(f"GPU kernel time per call: {gpu_us / CALLS / 1e3:.2f} ms")
    print(
        f"per call: {syncs / CALLS:.1f} stream syncs, {copies / CALLS:.1f} memcpy calls, "
        f"{launches / CALLS:.0f} kernel launches"
    )
    print("top kernels by GPU time (per call):")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
        print(f"  {e.self_device_time_total / CALLS / 1e3:8.3f} ms  x{e.count // CALLS:<4d} {e.key[:90]}")
    sys.stdout.flush()


print(f"profile_dkm: 4096x4096 bf16, K=8, 3 iterations, forward+backward, {torch.cuda.get_device_name()}")
measure("defaults: ATen U-domain, global slot atomics")
# Each later configuration adds kernels that had not run on a GPU when written: last, so that a
# fault in them cannot hide the numbers above.
edkm._C.set_privatized_slot_atomics(True)
measure("privatized slot atomics (edkm._C.set_privatized_slot_atomics(True))")
edkm._C.set_fused_udomain_cuda(True)
measure("privatized slot atomics + cuda/udomain_kernels.cu (edkm._C.set_fused_udomain_cuda(True))")
