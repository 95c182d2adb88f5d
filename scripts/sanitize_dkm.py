"""A small dkm forward + backward on CUDA (every dtype, both paths), for compute-sanitizer."""
import torch

import edkm

for dtype, groups in [(torch.bfloat16, 1), (torch.float16, 4), (torch.float32, 2), (torch.float64, 1)]:
    w = (torch.randn(64, 96, device="cuda") * 0.02).to(dtype).requires_grad_()
    cdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    c = torch.linspace(-0.04, 0.04, 8, device="cuda").repeat(groups, 1).to(cdtype)
    out = edkm.dkm(w, c, 1e-4, 3)
    out.clustered.float().sum().backward()
    idx = edkm.assign(w.detach(), out.centroids)
    edkm.dequantize(idx, out.centroids)
torch.cuda.synchronize()
print("sanitize_dkm: ok")
