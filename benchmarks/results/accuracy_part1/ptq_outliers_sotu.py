"""Post-training 3-bit clustering of SmolLM2-135M with outlier_fraction 0 / 0.005 / 0.01:
relative weight error over all clustered matrices, file bits/weight and perplexity on
train-split text (SOTU 1990s, 4096 tokens)."""

import sys
import time
import tempfile
import os
import torch
import edkm
from edkm.models import load_model
from edkm.evaluate import perplexity
from edkm.palettize import palettize_, finalize, clustered_modules

torch.set_num_threads(2)
texts = [
    open(f"/work/shared/data/corpus/sotu/{n}").read()
    for n in sorted(os.listdir("/work/shared/data/corpus/sotu"))
    if n.startswith(("1993", "1994"))
]
frac = float(sys.argv[1])
model, tok = load_model("smollm2-135m", torch.float32)
model.eval()
ref = {
    n: m.weight.detach().bfloat16().double().clone()
    for n, m in model.named_modules()
    if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
}
t0 = time.perf_counter()
palettize_(model, edkm.Config(bits=3, outlier_fraction=frac))
t1 = time.perf_counter()
finalize(model)
num = den = 0.0
for n, m in clustered_modules(model):
    if m.edkm_leader is None:
        w = m.weight.detach().double()
        num += float((w - ref[n]).square().sum())
        den += float(ref[n].square().sum())
path = tempfile.mktemp(suffix=".safetensors", dir="/tmp/outl")
size = edkm.save(model, path)
r = edkm.info(path, verbose=False)
cl = [t for t in r["tensors"] if t["kind"] == "clustered"]
bpw = 8 * sum(t["bytes"] for t in cl) / sum(t["bytes_16bit"] / 2 for t in cl)
os.unlink(path)
t2 = time.perf_counter()
ppl = perplexity(model, tok, texts, context_len=512, stride=256, max_tokens=4096, progress=False)["ppl"]
print(
    f"frac={frac} palettize_s={t1 - t0:.1f} rel_weight_err={num / den:.4f} clustered_bits_per_weight={bpw:.3f} file_bytes={size} ppl={ppl}",
    flush=True,
)
