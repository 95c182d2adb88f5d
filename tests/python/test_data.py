"""edkm.data: the corpus split, reading texts, token blocks (fixture files, a character tokenizer)."""

import string
from pathlib import Path

import pytest
import torch

from edkm import data


def char_tokenizer(bos: bool = False):
    """One token per character (printable ASCII and newline), <eos>/<pad>/<unk>, optional <bos>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>", "<pad>", "<unk>", "<bos>"]
    chars = list(string.printable)
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    kwargs = dict(eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if bos:
        kwargs["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def make_corpus(root: Path) -> Path:
    sotu, austen = root / "corpus" / "sotu", root / "corpus" / "austen"
    sotu.mkdir(parents=True)
    austen.mkdir(parents=True)
    for name in [
        "1790_george_washington_n.txt",
        "1999_william_j_clinton_d.txt",
        "2000_william_j_clinton_d.txt",
        "2021_joseph_r_biden_d.txt",
    ]:
        (sotu / name).write_text(f"Address {name[:4]}.\nMore text.\n", encoding="utf-8")
    for name in ["emma.txt", "persuasion.txt"]:
        (austen / name).write_text(f"Novel {name}. Caf\u00e9.\n", encoding="utf-8")
    return root


def test_char_tokenizer_roundtrip():
    tok = char_tokenizer()
    assert len(ids_of(tok, "ab c\n")) == 5
    assert tok("ab", add_special_tokens=True)["input_ids"] == ids_of(tok, "ab")
    btok = char_tokenizer(bos=True)
    assert btok("ab")["input_ids"] == [btok.bos_token_id] + ids_of(btok, "ab")


def test_corpus_split(tmp_path):
    root = make_corpus(tmp_path / "data")
    train, test = data.corpus_split(root)
    names = lambda fs: [f.name for f in fs]  # noqa: E731
    assert names(test) == ["2000_william_j_clinton_d.txt", "2021_joseph_r_biden_d.txt", "persuasion.txt"]
    assert names(train) == ["1790_george_washington_n.txt", "1999_william_j_clinton_d.txt", "emma.txt"]
    # the corpus folder itself works too
    assert data.corpus_split(root / "corpus") == (train, test)


def test_corpus_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.corpus_split(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no corpus text"):
        data.corpus_split(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no data directory"):
        data.corpus_split(None)


def test_read_texts(tmp_path):
    root = make_corpus(tmp_path)
    train, test = data.corpus_split(root)
    texts = data.read_texts(test)
    assert texts[-1] == "Novel persuasion.txt. Caf\u00e9.\n"
    with pytest.raises(FileNotFoundError):
        data.read_texts([tmp_path / "missing.txt"])


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDKM_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("EDKM_DATA_DIR")
    found = data.default_data_dir()
    expected = Path(data.__file__).resolve().parents[2].parent / "shared" / "data"
    assert found == (expected if expected.is_dir() else None)


def test_encode_documents_marks_text_tokens():
    tok = char_tokenizer()
    ids, is_text = data.encode_documents(tok, ["ab", "c"])
    eos = tok.eos_token_id
    assert ids == [eos] + ids_of(tok, "ab") + [eos] + ids_of(tok, "c")
    assert is_text == [False, True, True, False, True]
    btok = char_tokenizer(bos=True)
    ids, is_text = data.encode_documents(btok, ["ab"])
    assert ids == [btok.eos_token_id, btok.bos_token_id] + ids_of(btok, "ab")
    assert is_text == [False, False, True, True]


def test_token_blocks():
    tok = char_tokenizer()
    texts = ["abcdefghij" * 3, "klmnopqrst" * 2]
    stream, _ = data.encode_documents(tok, texts)
    blocks = data.token_blocks(tok, texts, block_len=8)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 8, 8)
    # every block is one of the consecutive blocks of the stream, each exactly once
    expected = sorted(tuple(stream[i * 8 : (i + 1) * 8]) for i in range(len(stream) // 8))
    assert sorted(tuple(b.tolist()) for b in blocks) == expected
    # deterministic by seed
    assert torch.equal(blocks, data.token_blocks(tok, texts, block_len=8, seed=0))
    other = data.token_blocks(tok, texts, block_len=8, seed=1)
    assert not torch.equal(blocks, other)
    assert sorted(tuple(b.tolist()) for b in other) == expected
    few = data.token_blocks(tok, texts, block_len=8, max_blocks=3)
    assert torch.equal(few, blocks[:3])


def test_token_blocks_errors():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="fewer than one block"):
        data.token_blocks(tok, ["abc"], block_len=64)
    with pytest.raises(ValueError, match="block_len"):
        data.token_blocks(tok, ["abc"], block_len=1)


def test_train_validation_split(tmp_path):
    train = [tmp_path / "corpus" / "sotu" / f"{1900 + i}_x_y.txt" for i in range(10)] + [
        tmp_path / "corpus" / "austen" / "emma.txt"
    ]
    tr, val = data.train_validation_split(train, 0.2, seed=0)
    assert len(val) == 2 and len(tr) == 9  # whole documents: round(0.2 * 11) files
    assert set(tr) | set(val) == set(train) and not set(tr) & set(val)
    assert tr == sorted(tr) and val == sorted(val)
    assert data.train_validation_split(list(reversed(train)), 0.2, seed=0) == (tr, val)  # order-free
    assert data.train_validation_split(train, 0.2, seed=1) != (tr, val)
    assert data.train_validation_split(train, 0.01, seed=0)[1].__len__() == 1  # at least one
    assert data.train_validation_split(train, 0.0) == (sorted(train), [])


def test_train_validation_split_refuses_the_test_split(tmp_path):
    root = make_corpus(tmp_path / "data")
    train, test = data.corpus_split(root)
    assert not any(data.is_test_file(f) for f in train) and all(data.is_test_file(f) for f in test)
    with pytest.raises(ValueError, match="file\\(s\\) of the test split"):
        data.train_validation_split(train + test[:1], 0.3)
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\)"):
        data.train_validation_split(train, 1.0)
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\)"):
        data.train_validation_split(train, -0.1)
    with pytest.raises(ValueError, match="leaves none to train on"):
        data.train_validation_split(train[:1], 0.5)
