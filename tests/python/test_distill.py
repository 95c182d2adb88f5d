"""edkm.distill: the distillation loss against a hand computation on a tiny model (full logits
and top-k + rest), its gradient, the teacher's top-k cache on disk, and distillation in the loop."""

import math

import pytest
import torch

from edkm import distill
from edkm.distill import TeacherTopK, distillation_loss, teacher_topk
from edkm.finetune import TrainConfig, finetune
from test_finetune import SMALL, TEXTS, TOK, FakeTokenizer, one_thread, student_and_teacher, tiny_llama  # noqa: F401


@pytest.fixture(scope="module")
def logits():
    """(student, teacher) logits [2, 5, 64] of two different tiny random LLaMAs on made-up tokens."""
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        s = tiny_llama(seed=1)(input_ids=x).logits
        t = tiny_llama(seed=2)(input_ids=x).logits
    return s * 20, t * 20  # random tiny models are nearly uniform: sharpen so top-k matters


def softmax_py(row, T):
    z = [v / T for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    total = sum(e)
    return [v / total for v in e]


def hand_kl(s, t, T, k=None):
    """T^2 * mean over positions of KL(p || q), in plain Python floats (float64), by hand:
    the full vocabulary, or the k largest teacher logits plus one bucket for the rest."""
    s, t = s.double().reshape(-1, s.shape[-1]).tolist(), t.double().reshape(-1, t.shape[-1]).tolist()
    total = 0.0
    for srow, trow in zip(s, t):
        p, q = softmax_py(trow, T), softmax_py(srow, T)
        if k is None:
            total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        else:
            top = sorted(range(len(trow)), key=lambda i: -trow[i])[:k]
            kl = sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in top)
            rest = [i for i in range(len(trow)) if i not in set(top)]
            if rest:
                pr, qr = sum(p[i] for i in rest), sum(q[i] for i in rest)
                kl += pr * (math.log(pr) - math.log(qr))
            total += kl
    return T * T * total / len(s)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_full_kl_is_the_hand_computation(logits, T):
    s, t = logits
    got = distillation_loss(s, t, T)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(hand_kl(s, t, T), rel=1e-5)
    assert distillation_loss(s.double(), t.double(), T).item() == pytest.approx(hand_kl(s, t, T), rel=1e-12)
    assert distillation_loss(t, t, T).abs().item() < 1e-6  # a student equal to its teacher: no loss


@pytest.mark.parametrize("k,T", [(1, 1.0), (5, 1.0), (5, 2.0), (63, 1.0), (64, 1.0)])
def test_topk_kl_is_the_hand_computation(logits, k, T):
    s, t = logits
    top = teacher_topk(t, k, T)
    assert top.k == k and top.vocab_size == 64 and top.temperature == T
    got = distillation_loss(s.double(), teacher_topk(t.double(), k, T), T).item()
    assert got == pytest.approx(hand_kl(s, t, T, k), rel=1e-10)
    assert distillation_loss(s, top, T).item() == pytest.approx(hand_kl(s, t, T, k), rel=1e-5)
    # coarsening never increases the KL; all k = V buckets give the full KL
    assert got <= hand_kl(s, t, T) * (1 + 1e-12)
    if k == 64:
        assert got == pytest.approx(hand_kl(s, t, T), rel=1e-10)


def test_topk_rest_is_exact_when_tiny():
    """log p_R from the logits, not log(1 - sum p_i): a rest of 1e-30 survives in float32."""
    t = torch.tensor([[0.0, -69.0776, -80.0, -90.0]])  # p_R ~ e^-69 ~ 1e-30 for k = 1
    top = teacher_topk(t, 1, 1.0)
    want = torch.tensor([-69.0776, -80.0, -90.0], dtype=torch.float64).logsumexp(0) - torch.tensor(
        [0.0, -69.0776, -80.0, -90.0], dtype=torch.float64
    ).logsumexp(0)
    assert top.rest.item() == pytest.approx(want.item(), rel=1e-6)


def test_gradient(logits):
    s, t = logits
    s = s[:1, :3].double().requires_grad_()
    t = t[:1, :3].double()
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, t, 2.0), (s,))
    top = teacher_topk(t, 4, 2.0)
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, top, 2.0), (s,))


def test_bad_inputs(logits):
    s, t = logits
    with pytest.raises(ValueError, match="teacher's vocabulary has 80 tokens, the student's 64"):
        distillation_loss(s, torch.zeros(2, 5, 80), 1.0)
    with pytest.raises(ValueError, match="teacher's vocabulary has 80 tokens, the student's 64"):
        distillation_loss(s, teacher_topk(torch.zeros(2, 5, 80), 4, 1.0), 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            distillation_loss(s, t, bad)
    with pytest.raises(ValueError, match="computed at temperature 2, the loss asks for 1"):
        distillation_loss(s, teacher_topk(t, 4, 2.0), 1.0)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 64\]"):
        teacher_topk(t, 0, 1.0)
    with pytest.raises(ValueError, match="positions"):
        distillation_loss(s[:1], teacher_topk(t, 4, 1.0), 1.0)


def test_teacher_cache_on_disk(tmp_path):
    teacher = tiny_llama(seed=2)
    blocks = torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "cache" / "topk.pt"
    a = distill.compute_teacher_topk(teacher, blocks, 6, 2.0, batch_size=2, cache_path=path, progress=False)
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with torch.no_grad():
        direct = teacher_topk(teacher(input_ids=blocks).logits, 6, 2.0)
    assert torch.equal(a.indices, direct.indices)
    assert torch.allclose(a.logprobs, direct.logprobs, atol=1e-6) and torch.allclose(a.rest, direct.rest, atol=1e-6)

    calls = []
    real = teacher.forward
    teacher.forward = lambda *args, **kw: calls.append(1) or real(*args, **kw)
    b = distill.compute_teacher_topk(teacher, blocks, 6, 2.0, batch_size=2, cache_path=path, progress=False)
    assert not calls  # read from the cache
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.indices, b.indices) and torch.equal(a.rest, b.rest)
    distill.compute_teacher_topk(teacher, blocks, 7, 2.0, batch_size=2, cache_path=path, progress=False)
    assert calls  # another k: recomputed (and the cache rewritten)
    calls.clear()
    path.write_bytes(b"not a cache")
    c = distill.compute_teacher_topk(teacher, blocks, 6, 2.0, batch_size=2, cache_path=path, progress=False)
    assert calls and torch.equal(c.indices, a.indices)  # an unreadable cache is recomputed
    with torch.no_grad():  # another teacher (different weights): not served the old cache
        next(teacher.parameters()).add_(1.0)
    calls.clear()
    distill.compute_teacher_topk(teacher, blocks, 6, 2.0, batch_size=2, cache_path=path, progress=False)
    assert calls


def test_the_loop_mixes_alpha_kd_and_ce():
    """Step 1's loss is alpha * KD + (1 - alpha) * CE of the starting student on the first batch."""
    from edkm.data import token_blocks

    m, teacher = student_and_teacher()
    cfg = TrainConfig(alpha=0.25, temperature=2.0, **SMALL)
    batch = token_blocks(TOK, TEXTS, 16, max_blocks=2, seed=0)
    m.train()
    out = m(input_ids=batch, labels=batch)  # the same forward the loop's first step makes
    with torch.no_grad():
        want_kd = distillation_loss(out.logits, teacher(input_ids=batch).logits, 2.0).item()
    want_ce = out.loss.item()
    m2, _ = student_and_teacher()
    res = finetune(m2, TOK, TEXTS, 2, config=cfg, teacher=teacher, progress=False)
    assert res.ce[0] == pytest.approx(want_ce, rel=1e-5) and res.kd[0] == pytest.approx(want_kd, rel=1e-4)
    assert res[0] == pytest.approx(0.25 * res.kd[0] + 0.75 * res.ce[0], rel=1e-6)
    assert want_kd > 0


def test_topk_with_all_tokens_trains_like_the_interleaved_teacher():
    a, teacher = student_and_teacher()
    b, _ = student_and_teacher()
    base = dict(alpha=1.0, temperature=2.0, **SMALL)
    ra = finetune(a, TOK, TEXTS, 2, config=TrainConfig(top_k=0, **base), teacher=teacher, progress=False)
    rb = finetune(b, TOK, TEXTS, 2, config=TrainConfig(top_k=64, **base), teacher=teacher, progress=False)
    assert list(rb) == pytest.approx(list(ra), rel=1e-5)
    assert ra.kd == list(ra)  # alpha = 1: the loss is the distillation term alone


def test_teacher_vocabulary_or_tokenizer_mismatch():
    m, _ = student_and_teacher()
    with pytest.raises(ValueError, match="teacher's vocabulary has 80 tokens, the student's 64"):
        finetune(m, TOK, TEXTS, 1, config=TrainConfig(alpha=1.0, **SMALL), teacher=tiny_llama(vocab=80), progress=False)
    with pytest.raises(ValueError, match="teacher's tokenizer has 70 tokens, the student's 64"):
        finetune(
            m,
            TOK,
            TEXTS,
            1,
            config=TrainConfig(alpha=1.0, **SMALL),
            teacher=tiny_llama(),
            teacher_tokenizer=FakeTokenizer(70),
            progress=False,
        )


def test_topk_slicing():
    t = torch.randn(3, 4, 10)
    top = teacher_topk(t, 3, 1.0)
    part = top[1:3]
    assert isinstance(part, TeacherTopK) and part.indices.shape == (2, 4, 3)
    assert torch.equal(part.logprobs, top.logprobs[1:3]) and part.vocab_size == 10
