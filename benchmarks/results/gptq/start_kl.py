"""Validation KL of edkm files on the 4,096 train-split positions train_edkm.py's runs score
(the starting points of the GPTQ runs with the bits budget). Output: start_kl.txt.

usage: PYTHONPATH=python python benchmarks/results/gptq/start_kl.py FILE...
"""

import sys
import torch
from edkm.data import corpus_split, default_data_dir, token_blocks
from edkm.finetune import TrainConfig, pick_train_and_validation_texts, validate
from edkm.models import load_model

torch.set_num_threads(1)
base, tok = load_model("smollm2-135m", torch.float32)
base.eval()
train_files, _ = corpus_split(default_data_dir())
tc = TrainConfig(
    lr=1e-4,
    schedule="cosine",
    warmup=0.1,
    batch_size=4,
    block_len=256,
    alpha=1.0,
    temperature=1.0,
    validation_fraction=0.05,
    validation_tokens=4096,
    validation_interval=12,
    checkpoint_interval=5,
    seed=0,
)
_, vtexts = pick_train_and_validation_texts(train_files, 120, tc)
vb = token_blocks(tok, vtexts, 256, max_blocks=16, seed=0)
for path in sys.argv[1:]:
    m, _ = load_model(path, torch.float32)
    m.eval()
    print(path, validate(m, vb, teacher=base), flush=True)
