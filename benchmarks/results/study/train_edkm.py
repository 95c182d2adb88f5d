"""The study's long eDKM rows: SmolLM2-135M with the issue-13 recipe (Fisher-budgeted mixed
precision with sensitivity-weighted init and 0.5% sensitivity-chosen outliers kept exact, then
distillation from the uncompressed model on train-split text), saved as an edkm file that
study.py evaluates. Every setting is fixed before the run (lr as in the demo, KD alpha=1 T=1 as
chosen on validation loss in accuracy_part1/distill_study); validation = 5% of the *train* files.

usage: python train_edkm.py TARGET_BITS STEPS OUT_DIR [THREADS] [GROUP_SIZE] [--gptq] [--lr LR]
(TARGET_BITS: a bits/weight budget for the mixed precision, or uB for B bits in every matrix;
GROUP_SIZE: output rows per LUT; default one LUT per matrix. --gptq: start the fine-tuning
from the error-compensated assignment, edkm.gptq, on 32 x 2 x 256 calibration tokens. --lr: the
peak learning rate, default 1e-4)
"""

import json
import sys
import time
from pathlib import Path

import torch

import edkm
from edkm.data import corpus_split, default_data_dir
from edkm.finetune import TrainConfig, pick_train_and_validation_texts
from edkm.models import load_model
from edkm.recipe import compress_model

use_gptq = "--gptq" in sys.argv
argv = [a for a in sys.argv if a != "--gptq"]
lr = 1e-4
if "--lr" in argv:
    i = argv.index("--lr")
    lr = float(argv[i + 1])
    del argv[i : i + 2]
uniform = int(argv[1][1:]) if argv[1].startswith("u") else None
target, steps, out = (None if uniform else float(argv[1])), int(argv[2]), Path(argv[3])
torch.set_num_threads(int(argv[4]) if len(argv) > 4 else 1)
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
model, tok = load_model("smollm2-135m", torch.float32)
train_files, _test = corpus_split(default_data_dir())  # the test split is never read here
train = TrainConfig(
    lr=lr,
    schedule="cosine",
    warmup=0.1,
    batch_size=4,
    block_len=256,
    alpha=1.0,
    temperature=1.0,
    validation_fraction=0.05,
    validation_tokens=4096,
    validation_interval=max(1, steps // 10),
    checkpoint_interval=5,
    seed=0,
)
# STEPS 0 (post-training): the texts of 40 steps still serve the calibration (Fisher, Hessians)
texts, vtexts = pick_train_and_validation_texts(train_files, max(steps, 40), train)
group_size = int(argv[5]) if len(argv) > 5 else None
cfg = edkm.Config(
    bits=uniform or 3,
    init="sensitivity",
    outlier_fraction=0.005,
    outlier_criterion="sensitivity",
    group_size=group_size,
)
res = compress_model(
    model,
    tok,
    cfg,
    steps=steps,
    train=train,
    texts=texts,
    validation_texts=vtexts,
    target_bits=target,
    gptq=use_gptq,
    checkpoint=out / "checkpoint.pt",
    cache_dir=out / "cache",
    progress=True,
)
path = out / "model.safetensors"
size = edkm.save(model, str(path), metadata={"edkm.base_model": "smollm2-135m"})
tr = res.training
report = dict(
    target_bits=target,
    steps=steps,
    group_size=group_size,
    gptq=use_gptq,
    file_bytes=size,
    seconds=time.perf_counter() - t0,
    stage_seconds=res.seconds,
    train=train.to_dict(),
    bits={k: v for k, v in (res.mixed_precision.bits.items() if res.mixed_precision else [])},
    losses=list(tr) if tr else [],
    tokens=tr.tokens if tr else 0,
    tokens_per_second=tr.tokens_per_second if tr else 0,
    validation=tr.validation if tr else [],
    command="PYTHONPATH=python python benchmarks/results/study/train_edkm.py " + " ".join(sys.argv[1:]),
)
(out / "train.json").write_text(json.dumps(report, indent=1, default=str))
print(json.dumps({k: v for k, v in report.items() if k not in ("losses", "bits")}, default=str))
