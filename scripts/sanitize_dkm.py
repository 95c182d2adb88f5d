"""A small dkm forward + backward on CUDA (every dtype, both paths), for compute-sanitizer."""

import torch

import edkm
from edkm import _C

cases = [(torch.bfloat16, 1), (torch.float16, 4), (torch.bfloat16, 128), (torch.float32, 2), (torch.float64, 1)]
for dtype, groups in cases:
    w = (torch.randn(64, 96, device="cuda") * 0.02).to(dtype).requires_grad_()
    cdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    c = torch.linspace(-0.04, 0.04, 8, device="cuda").repeat(groups, 1).to(cdtype)
    out = edkm.dkm(w, c, 1e-4, 3)
    out.clustered.float().sum().backward()
    idx = edkm.assign(w.detach(), out.centroids)
    edkm.dequantize(idx, out.centroids)
_C.set_deterministic_scatter(False)  # the float64-atomic scatter too
w = torch.randn(64, 96, device="cuda").bfloat16().requires_grad_()
edkm.dkm(w, torch.linspace(-2, 2, 8, device="cuda").view(1, 8), 0.1).clustered.float().sum().backward()
torch.cuda.synchronize()
# The CUDA U-domain kernels (off by default), last: every dtype and group count again.
_C.set_deterministic_scatter(True)
_C.set_fused_udomain_cuda(True)
for dtype, groups in cases + [(torch.float32, 3)]:
    w = (torch.randn(64, 96, device="cuda") * 0.02).to(dtype).requires_grad_()
    cdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    k = 8 if groups != 3 else 32  # 32: the large-K path
    c = torch.linspace(-0.04, 0.04, k, device="cuda").repeat(groups, 1).to(cdtype)
    edkm.dkm(w, c, 1e-4, 3, 1e-6).clustered.float().sum().backward()
_C.set_fused_udomain_cuda(False)
torch.cuda.synchronize()
# The privatized slot atomics (off by default): shared-memory histogram (racecheck's main
# target), warp-aggregated scatter-adds in both modes, tiles cut by group ends.
_C.set_privatized_slot_atomics(True)
for deterministic in (True, False):
    _C.set_deterministic_scatter(deterministic)
    for dtype, groups, shape in [
        (torch.bfloat16, 1, (64, 96)),
        (torch.float16, 2, (4, 40000)),
        (torch.bfloat16, 128, (64, 96)),
    ]:
        w = (torch.randn(shape, device="cuda") * 0.02).to(dtype).requires_grad_()
        c = torch.linspace(-0.04, 0.04, 8, device="cuda").repeat(groups, 1)
        edkm.dkm(w, c, 1e-4, 3).clustered.float().sum().backward()
_C.set_deterministic_scatter(True)
_C.set_privatized_slot_atomics(False)
torch.cuda.synchronize()
print("sanitize_dkm: ok")
