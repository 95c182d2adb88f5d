"""edkm.datafree: blocks sampled from the teacher (seeded, KV cache, BOS or random first token),
the disk cache (resume after an interruption gives the same tokens), mixing with corpus blocks,
and data-free fine-tuning."""

import pytest
import torch

from edkm import datafree
from edkm.datafree import generate_blocks, mix_blocks
from edkm.finetune import TrainConfig, finetune
from test_finetune import SMALL, TEXTS, TOK, one_thread, student_and_teacher, tiny_llama  # noqa: F401


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=4)


def test_seeded_and_starting_from_bos(teacher):
    a = generate_blocks(teacher, 5, 12, batch_size=2, seed=0, bos_token_id=1, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert (a[:, 0] == 1).all() and ((a >= 0) & (a < 64)).all()
    assert torch.equal(a, generate_blocks(teacher, 5, 12, batch_size=2, seed=0, bos_token_id=1, progress=False))
    other = generate_blocks(teacher, 5, 12, batch_size=2, seed=1, bos_token_id=1, progress=False)
    assert not torch.equal(a, other)
    assert len({tuple(r) for r in a.tolist()}) == 5  # the blocks of one batch differ from each other
    # more blocks later: the first ones are the same (whole batches, each seeded on its own)
    more = generate_blocks(teacher, 7, 12, batch_size=2, seed=0, bos_token_id=1, progress=False)
    assert torch.equal(more[:5], a)
    # the BOS comes from the model config when not given (tiny_llama's is 1)
    assert torch.equal(generate_blocks(teacher, 5, 12, batch_size=2, seed=0, progress=False), a)


def test_random_first_token(teacher):
    r = generate_blocks(teacher, 16, 4, batch_size=8, seed=0, first_token="random", progress=False)
    assert len(set(r[:, 0].tolist())) > 4 and ((r >= 0) & (r < 64)).all()


def test_kv_cache_sampling_equals_sampling_from_full_forwards(teacher):
    """The cached loop draws from the same distributions as recomputing the whole prefix."""
    b = 0
    got = generate_blocks(teacher, 3, 10, batch_size=3, seed=7, bos_token_id=1, progress=False)
    g = torch.Generator().manual_seed(datafree.batch_seed(7, b))
    seq = torch.full((3, 1), 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(9):
            probs = torch.softmax(teacher(input_ids=seq, use_cache=False).logits[:, -1].float(), dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert torch.equal(got, seq)


def test_interrupted_generation_resumes_to_the_same_tokens(teacher, tmp_path):
    kw = dict(batch_size=2, seed=3, bos_token_id=1, progress=False)
    want = generate_blocks(teacher, 7, 8, **kw)

    class Killed(Exception):
        pass

    def kill_after_two(b):
        if b == 1:
            raise Killed

    with pytest.raises(Killed):
        generate_blocks(teacher, 7, 8, cache_dir=tmp_path, on_batch=kill_after_two, **kw)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.glob("batch_*.pt")) == ["batch_000000.pt", "batch_000001.pt"]
    (folder / ".batch_000002.pt.999.tmp").write_bytes(b"half a file")  # what a kill mid-write leaves
    made = []
    got = generate_blocks(teacher, 7, 8, cache_dir=tmp_path, on_batch=made.append, **kw)
    assert made == [2, 3] and torch.equal(got, want)
    # all cached now: nothing made, same tokens; a damaged batch file is made again
    made.clear()
    assert torch.equal(generate_blocks(teacher, 7, 8, cache_dir=tmp_path, on_batch=made.append, **kw), want)
    assert made == []
    (folder / "batch_000001.pt").write_bytes(b"garbage")
    assert torch.equal(generate_blocks(teacher, 7, 8, cache_dir=tmp_path, on_batch=made.append, **kw), want)
    assert made == [1]
    # other settings, other folder: never served these tokens
    other = generate_blocks(teacher, 7, 8, cache_dir=tmp_path, **dict(kw, seed=4))
    assert not torch.equal(other, want) and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_mix_blocks():
    corpus = torch.arange(0, 24).view(6, 4)
    gen = torch.arange(100, 116).view(4, 4)
    mixed = mix_blocks(corpus, gen, seed=0)
    assert mixed.shape == (10, 4)
    assert sorted(map(tuple, mixed.tolist())) == sorted(map(tuple, torch.cat([corpus, gen]).tolist()))
    assert not torch.equal(mixed, torch.cat([corpus, gen]))  # shuffled
    assert torch.equal(mixed, mix_blocks(corpus, gen, seed=0))
    assert torch.equal(mix_blocks(None, gen, seed=0).sort(0).values, gen)
    with pytest.raises(ValueError, match="differ in length"):
        mix_blocks(corpus, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no blocks"):
        mix_blocks(None, None)


def test_bad_inputs(teacher):
    with pytest.raises(ValueError, match="first_token must be one of"):
        generate_blocks(teacher, 2, 4, first_token="eos", progress=False)
    with pytest.raises(ValueError, match="n_blocks must be an integer >= 1"):
        generate_blocks(teacher, 0, 4, progress=False)
    with pytest.raises(ValueError, match="block_len must be an integer >= 2"):
        generate_blocks(teacher, 2, 1, progress=False)
    with pytest.raises(ValueError, match=r"bos_token_id must be a token id in \[0, 64\)"):
        generate_blocks(teacher, 2, 4, bos_token_id=64, progress=False)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        generate_blocks(teacher, 2, 4, bos_token_id=1, temperature=0.0, progress=False)
    no_bos = tiny_llama(seed=4)
    no_bos.config.bos_token_id = None
    with pytest.raises(ValueError, match="first_token='bos' needs bos_token_id"):
        generate_blocks(no_bos, 2, 4, progress=False)


def test_data_free_and_mixed_finetuning(tmp_path):
    """No texts at all with data_free_fraction=1; half and half mixes the two sources."""
    m, teacher = student_and_teacher()
    cfg = TrainConfig(alpha=1.0, data_free_fraction=1.0, **SMALL)
    res = finetune(m, TOK, None, 2, config=cfg, teacher=teacher, data_free_cache=tmp_path, progress=False)
    assert len(res) == 2 and all(v > 0 for v in res)
    from edkm.finetune import _training_blocks

    half = TrainConfig(data_free_fraction=0.5, **SMALL)
    blocks = _training_blocks(TOK, TEXTS, 4, half, teacher, None, tmp_path, False)
    assert blocks.shape == (8, 16)
    gen = generate_blocks(teacher, 4, 16, batch_size=16, seed=0, bos_token_id=1, progress=False)
    from_teacher = {tuple(r) for r in gen.tolist()}
    assert sum(tuple(r) in from_teacher for r in blocks.tolist()) == 4
