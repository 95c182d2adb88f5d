"""Text data for fine-tuning and perplexity: the corpus split and fixed-length token blocks.

The corpora are plain-text files laid out as in ``shared/data`` (see its README)::

    DATA/corpus/sotu/YYYY_president_party.txt   State of the Union addresses, one per file
    DATA/corpus/austen/*.txt                    Jane Austen's six novels

Nothing in the library needs that folder: the functions take paths, and ``default_data_dir()``
finds it for benchmarks and the command line ($EDKM_DATA_DIR, else ``<checkout>/../shared/data``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

# The suggested held-out split: SOTU addresses from this year on, and one novel.
TEST_SOTU_FROM_YEAR = 2000
TEST_AUSTEN = ("persuasion.txt",)

_SOTU_NAME = re.compile(r"^(\d{4})_.*\.txt$")
# Show a progress bar when tokenizing more characters than this.
_PROGRESS_CHARS = 2_000_000


def default_data_dir() -> Path | None:
    """The data folder for benchmarks and the CLI, or None when there is none.

    $EDKM_DATA_DIR when set (returned even if it does not exist, so that the caller's error
    names it), else ``<checkout>/../shared/data`` when that exists, else None.
    """
    env = os.environ.get("EDKM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    candidate = checkout.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    return None


def _corpus_root(data_dir) -> Path:
    if data_dir is None:
        raise FileNotFoundError(
            "no data directory: pass one (--data-dir) or set EDKM_DATA_DIR "
            "(expected DATA/corpus/sotu/*.txt and DATA/corpus/austen/*.txt)"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    # Accept the data root (DATA/corpus/...) or the corpus folder itself.
    return root / "corpus" if (root / "corpus").is_dir() else root


def corpus_split(data_dir) -> tuple[list[Path], list[Path]]:
    """(train_files, test_files): the suggested split of the corpora under ``data_dir``.

    test = SOTU addresses from 2000 on and austen/persuasion.txt; every other ``.txt`` of
    ``sotu/`` and ``austen/`` is train. ``data_dir`` is the data root (holding ``corpus/``) or
    the corpus folder. Both lists are sorted by path. Raises FileNotFoundError when the folder
    is missing or holds no corpus text.
    """
    root = _corpus_root(data_dir)
    train: list[Path] = []
    test: list[Path] = []
    sotu = sorted((root / "sotu").glob("*.txt")) if (root / "sotu").is_dir() else []
    austen = sorted((root / "austen").glob("*.txt")) if (root / "austen").is_dir() else []
    for f in sotu:
        m = _SOTU_NAME.match(f.name)
        (test if m and int(m.group(1)) >= TEST_SOTU_FROM_YEAR else train).append(f)
    for f in austen:
        (test if f.name in TEST_AUSTEN else train).append(f)
    if not train and not test:
        raise FileNotFoundError(f"no corpus text under {root}: expected sotu/YYYY_*.txt and austen/*.txt")
    return train, test


def read_texts(files: Iterable) -> list[str]:
    """The UTF-8 text of each file, in order."""
    texts = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (a BOS for LLaMA, often none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    return []  # nothing added, or only appended (an EOS): nothing goes before the text


def document_separator(tokenizer) -> int:
    """The token put between concatenated documents: EOS, else BOS."""
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither an EOS nor a BOS token to separate documents")


def encode(tokenizer, text: str) -> list[int]:
    """The text's own tokens, without special tokens (long texts welcome: no length warning)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def encode_documents(
    tokenizer, texts: Sequence[str], max_tokens: int | None = None, desc: str = "tokenizing"
) -> tuple[list[int], list[bool]]:
    """Concatenate documents into one token stream: ``[SEP] prefix doc1 [SEP] prefix doc2 ...``.

    SEP is EOS (else BOS), prefix the special tokens the tokenizer puts before a text (a BOS for
    LLaMA-style tokenizers, nothing for GPT-2-style ones). Returns (ids, is_text): is_text is
    True exactly at the documents' own tokens, False at the inserted special tokens. With
    ``max_tokens``, stops tokenizing once the stream holds at least max_tokens document tokens
    (the rest would be cut off anyway; the caller cuts).
    """
    sep = document_separator(tokenizer)
    prefix = special_prefix(tokenizer)
    ids: list[int] = []
    is_text: list[bool] = []
    n_text = 0
    total = sum(len(t) for t in texts)
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="char", unit_scale=True, disable=total < _PROGRESS_CHARS, leave=False
    ) as bar:
        for text in texts:
            if max_tokens is not None and n_text >= max_tokens:
                break
            tokens = encode(tokenizer, text)
            head = [sep] + prefix
            ids += head + tokens
            is_text += [False] * len(head) + [True] * len(tokens)
            n_text += len(tokens)
            bar.update(len(text))
    return ids, is_text


def token_blocks(
    tokenizer, texts: Sequence[str], block_len: int, max_blocks: int | None = None, seed: int = 0
) -> torch.LongTensor:
    """Training blocks: a LongTensor [n, block_len] cut from the concatenated texts.

    The texts are tokenized and concatenated as ``[SEP] prefix text1 [SEP] prefix text2 ...``
    (see ``encode_documents``; so a block may span a document boundary, as in LM pre-training),
    cut into consecutive non-overlapping blocks of ``block_len`` tokens (the incomplete tail is
    dropped), shuffled by a permutation drawn from ``torch.Generator().manual_seed(seed)``,
    and the first ``max_blocks`` kept. Deterministic: same tokenizer, texts and seed, same
    blocks. Use each block as both input and labels of a causal LM.
    """
    if block_len < 2:
        raise ValueError(f"block_len must be at least 2, got {block_len}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
    ids, _ = encode_documents(tokenizer, texts)
    n = len(ids) // block_len
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one block of {block_len}")
    blocks = torch.tensor(ids[: n * block_len], dtype=torch.long).view(n, block_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if max_blocks is not None:
        order = order[:max_blocks]
    return blocks[order].contiguous()


def is_test_file(path) -> bool:
    """True for a file of the suggested held-out split (``corpus_split``'s test list): a SOTU
    address from TEST_SOTU_FROM_YEAR on, or one of TEST_AUSTEN, judged by folder and name."""
    p = Path(path)
    if p.parent.name == "sotu":
        m = _SOTU_NAME.match(p.name)
        return bool(m) and int(m.group(1)) >= TEST_SOTU_FROM_YEAR
    return p.parent.name == "austen" and p.name in TEST_AUSTEN


def train_validation_split(train_files: Sequence, fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(train, validation): whole documents of ``train_files`` set aside for validation.

    ``round(fraction * n)`` files (at least one when fraction > 0), drawn with
    ``random.Random(seed)`` from the files sorted by path, go to validation; the rest stay
    train, so no document is in both. Both lists are sorted by path. Made for choosing
    hyperparameters on data the model is not trained on without touching the test split: a
    file of the test split (``is_test_file``) is refused. ``fraction`` = 0 gives (train, []).
    """
    import random

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"train_validation_split: fraction must be a number in [0, 1), got {fraction!r}")
    files = sorted(Path(f) for f in train_files)
    test = [f for f in files if is_test_file(f)]
    if test:
        raise ValueError(
            f"train_validation_split: train_files holds {len(test)} file(s) of the test split "
            f"(e.g. {test[0]}); validation must be cut from the train split only"
        )
    if fraction == 0:
        return files, []
    n_val = max(1, int(round(fraction * len(files))))
    if n_val >= len(files):
        raise ValueError(
            f"train_validation_split: a fraction of {fraction:g} of {len(files)} train file(s) "
            f"leaves none to train on; pass more files or a smaller fraction"
        )
    order = list(files)
    random.Random(seed).shuffle(order)
    validation = set(order[:n_val])
    return [f for f in files if f not in validation], sorted(validation)
