"""edkm.finetune: TrainConfig checks, the lr schedules, the plain loop unchanged, gradient
accumulation, validation, and exact checkpoint/resume (in process and across a SIGKILL).

Tiny random LlamaForCausalLM models (vocab 64) and a fake one-token-per-character tokenizer; no
shared data, no network. The helpers here are shared with test_distill.py and test_datafree.py.
"""

import copy
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import edkm  # noqa: E402
from edkm import finetune as ft  # noqa: E402
from edkm.finetune import TrainConfig, finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


class FakeTokenizer:
    """One token per character (id 3 + ord % (vocab - 3)); EOS 0, BOS 1 put before a text."""

    eos_token_id, bos_token_id = 0, 1

    def __init__(self, vocab: int = VOCAB):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = [3 + ord(c) % (self.vocab - 3) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def __len__(self):
        return self.vocab

    def get_vocab(self):
        return {f"<{i}>": i for i in range(self.vocab)}


TOK = FakeTokenizer()


def made_up_texts(n_docs=4, words=120, seed=0):
    r = random.Random(seed)
    return [
        " ".join("".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6))) for _ in range(words))
        for _ in range(n_docs)
    ]


TEXTS = made_up_texts()


def tiny_llama(seed=0, vocab=VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).float().eval()


def student_and_teacher(seed=0, bits=3, **config):
    """(clustered student, its uncompressed teacher): the teacher is the model before palettize_."""
    m = tiny_llama(seed)
    teacher = copy.deepcopy(m)
    edkm.palettize_(m, edkm.Config(bits=bits, **config))
    return m, teacher


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the machine may be shared); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(lr=1e-3, batch_size=2, block_len=16, validation_tokens=32)


# ---- TrainConfig --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("lr", "1e-3"),
        ("schedule", "step"),
        ("warmup", 1.5),
        ("warmup", -0.1),
        ("min_lr", 2.0),
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("accumulate", 0),
        ("block_len", 1),
        ("max_grad_norm", -1.0),
        ("weight_decay", -0.1),
        ("seed", -1),
        ("alpha", -0.1),
        ("alpha", 1.5),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", True),
        ("data_free_fraction", 1.1),
        ("data_free_first_token", "eos"),
        ("validation_fraction", 1.0),
        ("validation_tokens", -1),
        ("validation_interval", -1),
        ("checkpoint_interval", 0),
    ],
)
def test_train_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig: {field} must be"):
        TrainConfig(**{field: value})


def test_train_config_validation_tokens_below_a_block():
    with pytest.raises(ValueError, match=r"validation_tokens must be 0 or at least block_len \(16\)"):
        TrainConfig(block_len=16, validation_tokens=8)


def test_lr_schedules():
    steps = 10
    const = TrainConfig(warmup=0.2)
    # the old loop's rule: min(1, (s + 1) / warm), warm = max(1, round(warmup * steps))
    assert [const.lr_factor(s, steps) for s in range(steps)] == [min(1.0, (s + 1) / 2) for s in range(steps)]
    lin = TrainConfig(warmup=0.2, schedule="linear", min_lr=0.1)
    cos = TrainConfig(warmup=0.2, schedule="cosine")
    assert [lin.lr_factor(s, steps) for s in range(2)] == [0.5, 1.0]
    assert lin.lr_factor(2, steps) == 1.0 and cos.lr_factor(2, steps) == 1.0  # decay starts at the peak
    for s in range(2, steps):
        frac = (s - 2) / 8
        assert lin.lr_factor(s, steps) == pytest.approx(0.1 + 0.9 * (1 - frac), abs=1e-15)
        assert cos.lr_factor(s, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * frac)), abs=1e-15)
    assert all(cos.lr_factor(s, steps) > cos.lr_factor(s + 1, steps) for s in range(2, steps - 1))
    assert TrainConfig(warmup=0.0).lr_factor(0, steps) == 1.0


# ---- the loop -----------------------------------------------------------------------------------


def old_finetune(model, tokenizer, texts, steps, lr, block_len, batch_size, seed, max_grad_norm=1.0, warmup=0.1):
    """The loop as it was before TrainConfig (the reference for the default path)."""
    from edkm.data import token_blocks

    blocks = token_blocks(tokenizer, texts, block_len, max_blocks=steps * batch_size, seed=seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(round(warmup * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    losses = []
    for step in range(steps):
        batch = blocks[step * batch_size : (step + 1) * batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def test_default_loop_is_the_old_loop_bit_for_bit():
    a, _ = student_and_teacher()
    b = copy.deepcopy(a)
    got = finetune(a, TOK, TEXTS, 3, lr=1e-3, block_len=16, batch_size=2, seed=0, progress=False)
    want = old_finetune(b, TOK, TEXTS, 3, lr=1e-3, block_len=16, batch_size=2, seed=0)
    assert isinstance(got, list) and list(got) == want and len(got) == 3
    assert got.ce == want and got.kd == [None] * 3
    assert got.lr == pytest.approx([1e-3 * min(1.0, (s + 1) / 1) for s in range(3)])
    assert got.tokens == 3 * 2 * 16 and got.tokens_per_second > 0
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not a.training


def test_old_keywords_override_the_config():
    m, _ = student_and_teacher()
    res = finetune(
        m,
        TOK,
        TEXTS,
        2,
        config=TrainConfig(lr=1.0, batch_size=8),
        lr=2e-3,
        batch_size=2,
        block_len=16,
        warmup=0.0,
        progress=False,
    )
    assert res.config.lr == 2e-3 and res.config.batch_size == 2 and res.lr == [2e-3, 2e-3]
    with pytest.raises(ValueError, match="TrainConfig: lr must be"):
        finetune(m, TOK, TEXTS, 2, lr=-1.0, block_len=16, progress=False)


def test_lr_follows_the_schedule():
    m, _ = student_and_teacher()
    cfg = TrainConfig(schedule="cosine", warmup=0.25, min_lr=0.1, **SMALL)
    res = finetune(m, TOK, TEXTS, 4, config=cfg, progress=False)
    assert res.lr == pytest.approx([cfg.lr * cfg.lr_factor(s, 4) for s in range(4)], rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_accumulation_is_one_big_batch(alpha):
    """2 micro-batches of 2 give the update of one batch of 4 (clustered model, and distilled).

    Clustered in float32 (cluster_dtype=None): with the default bf16 the weight's gradient
    comes back through the bf16 rounding of the weight, so each micro-batch's gradient is
    rounded to bf16 and the sums agree only to bf16 precision (~0.4%)."""
    a, teacher = student_and_teacher(cluster_dtype=None)
    b = copy.deepcopy(a)
    base = dict(lr=1e-3, block_len=16, alpha=alpha, temperature=2.0, warmup=0.0)
    ra = finetune(a, TOK, TEXTS, 2, config=TrainConfig(batch_size=4, **base), teacher=teacher, progress=False)
    rb = finetune(
        b, TOK, TEXTS, 2, config=TrainConfig(batch_size=2, accumulate=2, **base), teacher=teacher, progress=False
    )
    assert list(rb) == pytest.approx(list(ra), rel=1e-5)
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k
    # the update is not trivially zero: the weights moved
    assert not torch.equal(
        wa["model.layers.0.mlp.up_proj.weight"],
        weights(student_and_teacher(cluster_dtype=None)[0])["model.layers.0.mlp.up_proj.weight"],
    )


def test_validation_is_logged_and_matches_a_separate_evaluation():
    m, teacher = student_and_teacher()
    cfg = TrainConfig(validation_interval=2, **SMALL)
    val_texts = made_up_texts(2, seed=9)
    res = finetune(m, TOK, TEXTS, 3, config=cfg, teacher=teacher, validation_texts=val_texts, progress=False)
    assert [v["step"] for v in res.validation] == [2, 3]
    from edkm.data import token_blocks

    vb = token_blocks(TOK, val_texts, 16, max_blocks=2, seed=0)
    again = ft.validate(m, vb, 2, teacher)
    assert res.validation[-1]["loss"] == pytest.approx(again["loss"], rel=1e-6)
    assert res.validation[-1]["kl"] == pytest.approx(again["kl"], rel=1e-5)
    assert again["kl"] > 0 and math.isfinite(again["loss"])
    # the loss is the clustered (hard) model's: a full-precision model scores differently
    assert ft.validate(teacher, vb, 2)["loss"] != pytest.approx(again["loss"], rel=1e-6)


def test_too_few_texts_for_the_steps():
    m, _ = student_and_teacher()
    with pytest.raises(ValueError, match=r"the texts give \d+ blocks of 16 tokens; 500 steps of 2 x 2 micro-batches"):
        finetune(m, TOK, TEXTS, 500, config=TrainConfig(accumulate=2, **SMALL), progress=False)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        finetune(m, TOK, TEXTS, 0, config=TrainConfig(**SMALL), progress=False)


def test_teacher_needed_and_not_the_student():
    m, teacher = student_and_teacher()
    with pytest.raises(ValueError, match=r"alpha=0.5 needs a teacher"):
        finetune(m, TOK, TEXTS, 1, config=TrainConfig(alpha=0.5, **SMALL), progress=False)
    with pytest.raises(ValueError, match=r"data_free_fraction=1 needs a teacher"):
        finetune(m, TOK, None, 1, config=TrainConfig(data_free_fraction=1.0, **SMALL), progress=False)
    with pytest.raises(ValueError, match="teacher is the model being trained"):
        finetune(m, TOK, TEXTS, 1, config=TrainConfig(alpha=0.5, **SMALL), teacher=m, progress=False)


# ---- checkpoint / resume ------------------------------------------------------------------------


class Stop(Exception):
    pass


def everything_on():
    """Distillation from the top-k cache, half data-free, accumulation, cosine, validation."""
    return TrainConfig(
        alpha=0.7,
        temperature=2.0,
        top_k=8,
        data_free_fraction=0.5,
        accumulate=2,
        schedule="cosine",
        warmup=0.25,
        validation_interval=2,
        checkpoint_interval=1,
        **SMALL,
    )


def test_resume_in_process_reaches_the_same_weights(tmp_path):
    cfg = everything_on()
    val = made_up_texts(1, seed=5)
    full, teacher = student_and_teacher()
    want = finetune(full, TOK, TEXTS, 4, config=cfg, teacher=teacher, validation_texts=val, progress=False)

    def stop_at_2(step, _):
        if step == 2:
            raise Stop

    part, _ = student_and_teacher()
    kw = dict(
        config=cfg,
        teacher=teacher,
        validation_texts=val,
        checkpoint=tmp_path / "run.ckpt",
        teacher_cache=tmp_path / "topk.pt",
        data_free_cache=tmp_path / "datafree",
        progress=False,
    )
    with pytest.raises(Stop):
        finetune(part, TOK, TEXTS, 4, on_step=stop_at_2, **kw)
    fresh, _ = student_and_teacher()
    kw.pop("teacher_cache"), kw.pop("data_free_cache")  # the checkpoint remembers them
    got = finetune(fresh, TOK, TEXTS, 4, **kw)
    assert got.resumed_from == 2 and list(got) == list(want) and got.kd == want.kd
    assert got.validation == want.validation
    wa, wb = weights(full), weights(fresh)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a finished checkpoint: nothing left to do, same result
    again, _ = student_and_teacher()
    done = finetune(again, TOK, TEXTS, 4, **kw)
    assert done.resumed_from == 4 and list(done) == list(want)
    assert all(torch.equal(v, weights(again)[k]) for k, v in wa.items())
    # another run's checkpoint is refused, naming what differs
    other, _ = student_and_teacher()
    with pytest.raises(ValueError, match=r"another run: config fields lr \(0.001 there, 0.002 now\)"):
        finetune(other, TOK, TEXTS, 4, **dict(kw, config=TrainConfig(**{**cfg.to_dict(), "lr": 2e-3})))


def killed_run(out: str, stop_at: int) -> None:
    """The run the test kills: checkpoints every step; after step ``stop_at`` it signals and waits."""

    def cb(step, _):
        if step == stop_at:
            open(out + ".stop", "w").close()
            time.sleep(120)

    model, teacher = student_and_teacher()
    finetune(
        model,
        TOK,
        TEXTS,
        4,
        config=everything_on(),
        teacher=teacher,
        validation_texts=made_up_texts(1, seed=5),
        checkpoint=out + ".ckpt",
        teacher_cache=out + ".topk",
        data_free_cache=out + ".datafree",
        on_step=cb,
        progress=False,
    )


CHILD = r"""
import os, sys, torch
sys.path.insert(0, os.environ["EDKM_TEST_PYTHONPATH"])
sys.path.insert(0, os.environ["EDKM_TEST_DIR"])
from test_finetune import TOK, TEXTS, everything_on, student_and_teacher, made_up_texts
from edkm.finetune import finetune

out = sys.argv[1]
kw = dict(config=everything_on(), validation_texts=made_up_texts(1, seed=5), progress=False)
# resume the killed run in this fresh process (the cache paths come from the checkpoint) ...
model, teacher = student_and_teacher()
res = finetune(model, TOK, TEXTS, 4, teacher=teacher, checkpoint=out + ".ckpt", **kw)
assert res.resumed_from == 2, res.resumed_from
torch.save(model.state_dict(), out + ".resumed")
# ... and run it uninterrupted, from scratch, without a checkpoint
full, teacher = student_and_teacher()
finetune(full, TOK, TEXTS, 4, teacher=teacher, **kw)
torch.save(full.state_dict(), out + ".full")
"""


def test_resume_after_sigkill_reaches_the_same_weights(tmp_path):
    """Killed (SIGKILL) after step 2 of 4 with distillation from the top-k cache, data-free
    blocks, accumulation and validation on; resumed in a fresh process: the same weights, bit
    for bit, as an uninterrupted run. The killed run is a fork of this process (no second
    interpreter start-up); resume and the uninterrupted run are a fresh interpreter, one thread."""
    out = str(tmp_path / "run")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            killed_run(out, 2)
        finally:
            os._exit(code)
    t0 = time.time()
    while not os.path.exists(out + ".stop"):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise AssertionError(f"the forked run exited early (status {status})")
        if time.time() - t0 > 240:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the forked run")
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert os.path.exists(out + ".ckpt") and os.path.exists(out + ".topk")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(
        os.environ,
        EDKM_TEST_PYTHONPATH=str(ROOT / "python"),
        EDKM_TEST_DIR=str(Path(__file__).parent),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run([sys.executable, str(script), out], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    a = torch.load(out + ".full", weights_only=False)
    b = torch.load(out + ".resumed", weights_only=False)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


def test_pick_train_and_validation_texts(tmp_path):
    files = []
    for i in range(6):
        f = tmp_path / "corpus" / "sotu" / f"{1900 + i}_a_b.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"doc{i} " * 50, encoding="utf-8")
        files.append(f)
    cfg = TrainConfig(validation_fraction=0.34, **SMALL)
    texts, vtexts = ft.pick_train_and_validation_texts(files, 2, cfg)
    assert texts and vtexts and not set(texts) & set(vtexts)  # different documents
    from edkm.data import train_validation_split

    _, val = train_validation_split(files, 0.34, 0)
    assert len(val) == 2 and set(vtexts) <= {f.read_text() for f in val}
    # all data-free: no corpus text read at all
    none, _ = ft.pick_train_and_validation_texts(files, 2, TrainConfig(data_free_fraction=1.0, **SMALL))
    assert none == []
