"""Finalize a train_edkm.py run from its last checkpoint, for a run stopped before its last step
(the study's time ran out): the same recipe is rebuilt up to palettize_ (same calibration
blocks, Fisher, bit widths and clustering, all deterministic), the checkpoint's model state is
loaded, finalized and saved; train.json records the step it stopped at.

usage: python finish_from_checkpoint.py TARGET_BITS STEPS OUT_DIR [THREADS]
(the arguments the run was started with)
"""

import json
import sys
import time
from pathlib import Path

import torch

import edkm
from edkm.data import corpus_split, default_data_dir
from edkm.finetune import TrainConfig, load_checkpoint, pick_train_and_validation_texts
from edkm.mixed_precision import mixed_precision_config
from edkm.models import load_model
from edkm.recipe import calibration_blocks
from edkm.sensitivity import fisher

target, steps, out = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
t0 = time.perf_counter()
ckpt = load_checkpoint(out / "checkpoint.pt")
model, tok = load_model("smollm2-135m", torch.float32)
train_files, _test = corpus_split(default_data_dir())
train = TrainConfig(**ckpt["config"])
texts, _vtexts = pick_train_and_validation_texts(train_files, steps, train)
cfg = edkm.Config(bits=3, init="sensitivity", outlier_fraction=0.005, outlier_criterion="sensitivity")
batches = calibration_blocks(tok, texts, None, 8, 2, 256, seed=train.seed, progress=True)
sens = fisher(model, batches, progress=True)
mp = mixed_precision_config(model, target, sens, cfg, (2, 3, 4, 6, 16), progress=True)
edkm.palettize_(model, mp.config, sensitivity=sens, progress=True)
model.load_state_dict(ckpt["model"])
edkm.finalize(model)
path = out / "model.safetensors"
size = edkm.save(model, str(path), metadata={"edkm.base_model": "smollm2-135m"})
done = int(ckpt["step"])
lr = list(ckpt["lr"])
tokens = done * train.batch_size * train.accumulate * train.block_len
# the run's own training time: the fine-tuning progress bar's last elapsed time in its log
import re  # noqa: E402  (a script: it reads its log only at this point)

log = out.parent / (out.name + ".log")
elapsed = None
if log.is_file():
    stamps = re.findall(r"fine-tuning:[^\[]*\[((?:\d+:)?\d+:\d+)<", log.read_text(errors="replace"))
    if stamps:
        parts = [int(x) for x in stamps[-1].split(":")]
        elapsed = sum(v * 60**i for i, v in enumerate(reversed(parts)))
report = dict(
    target_bits=target,
    steps=done,
    planned_steps=steps,
    stopped_early=done < steps,
    lr_at_stop=lr[-1] if lr else None,
    file_bytes=size,
    train=train.to_dict(),
    losses=list(ckpt["losses"]),
    tokens=tokens,
    validation=list(ckpt["validation"]),
    bits=dict(mp.bits),
    train_seconds=elapsed,
    tokens_per_second=tokens / elapsed if elapsed else None,
    finish_seconds=time.perf_counter() - t0,
    command="PYTHONPATH=python python benchmarks/results/study/train_edkm.py "
    + " ".join(sys.argv[1:])
    + f"  (stopped after step {done}; finalized by finish_from_checkpoint.py)",
)
(out / "train.json").write_text(json.dumps(report, indent=1, default=str))
print(json.dumps({k: v for k, v in report.items() if k not in ("losses", "bits", "train")}, default=str))
