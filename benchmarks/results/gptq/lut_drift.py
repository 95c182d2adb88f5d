"""Does the validation KL of a GPTQ-start model move at lr ~ 0? (DKM's centroid update alone.)

SmolLM2-135M, 3 bits everywhere, a LUT per 16 rows, 0.5% Fisher-chosen outliers, GPTQ assignment;
validation KL on the 4,096 train-split positions train_edkm.py's runs score, before and after six
distillation steps at lr 1e-12, and how far the centroids moved. Output: lut_drift.txt.

usage: PYTHONPATH=python python benchmarks/results/gptq/lut_drift.py gptq
"""

import sys
import torch
import edkm
from edkm.data import corpus_split, default_data_dir, token_blocks
from edkm.finetune import TrainConfig, pick_train_and_validation_texts, finetune
from edkm.models import load_model
from edkm.recipe import calibration_blocks, frozen_copy
from edkm.sensitivity import fisher
from edkm.gptq import input_hessians, gptq_
from edkm.evaluate import teacher_agreement

torch.set_num_threads(2)
use_gptq = sys.argv[1] == "gptq"
model, tok = load_model("smollm2-135m", torch.float32)
train_files, _ = corpus_split(default_data_dir())
tc = TrainConfig(
    lr=1e-12,
    schedule="constant",
    warmup=0.0,
    batch_size=4,
    block_len=256,
    alpha=1.0,
    temperature=1.0,
    validation_fraction=0.05,
    validation_tokens=4096,
    validation_interval=100,
    seed=0,
)
texts, vtexts = pick_train_and_validation_texts(train_files, 6, tc)
vblocks = token_blocks(tok, vtexts, 256, max_blocks=16, seed=0)
teacher = frozen_copy(model)
cfg = edkm.Config(bits=3, init="sensitivity", outlier_fraction=0.005, outlier_criterion="sensitivity", group_size=16)
# 3 bits in every matrix (no bits budget); Hessians from 16 x 2 x 256 train-split tokens
sens = fisher(model, calibration_blocks(tok, texts, None, 8, 2, 256, seed=0), progress=False)
hs = (
    input_hessians(model, calibration_blocks(tok, texts, None, 16, 2, 256, seed=7), progress=False)
    if use_gptq
    else None
)
edkm.palettize_(model, cfg, sensitivity=sens)
if use_gptq:
    gptq_(model, hs)


def val(tag):
    model.eval()
    a = teacher_agreement(model, teacher, vblocks, batch_size=4)
    print(tag, "val KL %.4f top1 %.3f" % (a["kl"], a["top1"]), flush=True)


c0 = {n: m.centroids.clone() for n, m in edkm.clustered_modules(model) if m.edkm_leader is None}
val("step 0")
finetune(model, tok, texts, 6, config=tc, teacher=teacher, progress=False)
val("after 6 steps at lr 1e-12")
moves = [
    float((m.centroids - c0[n]).abs().max() / c0[n].abs().max())
    for n, m in edkm.clustered_modules(model)
    if m.edkm_leader is None
]
moves.sort()
print("relative centroid move: median %.2e max %.2e" % (moves[len(moves) // 2], moves[-1]))
