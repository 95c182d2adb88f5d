"""KD tuning study: SmolLM2-135M, 3-bit one LUT per matrix, compare CE / KD / data-free KD by
validation loss and KL (validation = 10% of the *train* files; the test split is never read)."""

import copy
import json
import sys
import time
import torch
import edkm
from edkm.data import corpus_split, default_data_dir
from edkm.finetune import TrainConfig, finetune, pick_train_and_validation_texts, validate
from edkm.data import token_blocks
from edkm.models import load_model

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 24
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ce", "kd_t1", "datafree_kd_t1", "kd_t2"]
out = open("/tmp/ft/study.jsonl", "a")
torch.manual_seed(0)
if len(sys.argv) > 3:
    torch.set_num_threads(int(sys.argv[3]))
teacher, tok = load_model("smollm2-135m", torch.float32)
teacher.eval()
student0 = copy.deepcopy(teacher)
edkm.palettize_(student0, edkm.Config(bits=3), progress=False)
train, _test = corpus_split(default_data_dir())  # _test is never read
base = dict(
    lr=5e-4,
    schedule="cosine",
    warmup=0.1,
    batch_size=2,
    block_len=128,
    validation_fraction=0.1,
    validation_tokens=1024,
    seed=0,
    checkpoint_interval=1000,
)
cfg0 = TrainConfig(**base)
texts, vtexts = pick_train_and_validation_texts(train, steps, cfg0)
vb = token_blocks(tok, vtexts, cfg0.block_len, max_blocks=cfg0.validation_tokens // cfg0.block_len, seed=0)
t = time.perf_counter()
v0 = validate(student0, vb, 4, teacher)
print(json.dumps(dict(variant="k-means (step 0)", **v0, seconds=time.perf_counter() - t)), file=out, flush=True)
settings = {
    "ce": dict(alpha=0.0),
    "kd_t1": dict(alpha=1.0, temperature=1.0),
    "kd_t2": dict(alpha=1.0, temperature=2.0),
    "datafree_kd_t1": dict(alpha=1.0, temperature=1.0, data_free_fraction=1.0),
}
for name in variants:
    cfg = TrainConfig(**base, **settings[name])
    m = copy.deepcopy(student0)
    t = time.perf_counter()
    res = finetune(
        m,
        tok,
        texts,
        steps,
        config=cfg,
        teacher=teacher,
        validation_texts=vtexts,
        data_free_cache="/tmp/ft/datafree_cache",
        progress=True,
        desc=f"edkm: {name}",
    )
    print(
        json.dumps(
            dict(
                variant=name,
                steps=steps,
                first_loss=res[0],
                last_loss=res[-1],
                **res.validation[-1],
                tok_s=res.tokens_per_second,
                seconds=time.perf_counter() - t,
                config={k: v for k, v in cfg.to_dict().items() if k in settings[name] or k == "lr"},
            )
        ),
        file=out,
        flush=True,
    )
    del m
