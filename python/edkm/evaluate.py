"""Evaluating a causal LM: held-out perplexity and zero-shot accuracy.

``perplexity``  sliding-window perplexity of texts (the corpus test split for ``ppl``).
``zero_shot``   one jsonl task file: multiple choice, schema (Winogrande) or LAMBADA.
``evaluate``    several of them, as one JSON-serializable dict.
``add_arguments`` / ``main``: the ``edkm eval MODEL --tasks ...`` command.

The model is any callable ``model(input_ids=, attention_mask=)`` returning logits [B, T, V]
(a HuggingFace causal LM's output, a tuple whose first item is the logits, or the logits).
It runs on the device of its first parameter (CPU when it has none), under ``torch.no_grad``
and in eval mode (its training mode is restored afterwards). Everything is deterministic:
the same model, tokenizer and data give the same numbers.

Tokenization conventions (the same for every task):

* A context is ``prefix + tokens(context)``, where prefix is the special tokens the tokenizer
  puts before a text by default (BOS for LLaMA-style tokenizers, nothing for GPT-2-style ones);
  an empty context with no prefix becomes ``[EOS]``.
* The continuation is tokenized on its own and its ids appended to the context's, so the scored
  tokens are exactly the continuation's own. The separator between them (``delimiter``, default
  one space) goes at the start of the continuation, as BPE tokenizers attach a leading space to
  the word after it: ``"... about" + " signs"``. It is left out when the context is empty or
  ends with a newline, or the continuation already starts with whitespace; spaces or tabs at
  the end of the context are moved to the start of the continuation instead (a lone trailing
  space token is not what the model saw in training). A delimiter with more than whitespace
  (``"\\nAnswer: "``) is a prompt: it ends the context (whose trailing whitespace it replaces),
  so it is never scored, and its trailing space goes to the continuation by the same rule.
* Inputs longer than the model's window (``max_length``; default the model's
  ``max_position_embeddings``, else 2048) lose tokens on the left.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from edkm.data import (
    corpus_split,
    default_data_dir,
    document_separator,
    encode,
    encode_documents,
    read_texts,
    special_prefix,
)

DEFAULT_TASKS = ("piqa", "arc_easy", "lambada_openai", "ppl")
FORMATS = ("multiple_choice", "schema", "lambada")


# ----------------------------------------------------------------------------- model plumbing


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        return False


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits [B, keep, V] of the last ``keep`` positions.

    A HuggingFace model is asked for those only (``logits_to_keep``: the LM head, a fifth of a
    small model's compute, runs on the positions that are scored) and builds no KV cache.
    """
    kwargs = {}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if logits.shape[1] != keep:
        logits = logits[:, logits.shape[1] - keep :]
    return logits


@contextlib.contextmanager
def _inference(model):
    """torch.no_grad and model.eval() for the duration; restores the training mode."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary in float32 (float64 logits stay float64)."""
    return torch.log_softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)


def _max_length(model, max_length: int | None) -> int:
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        return max_length
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else 2048


def _progress(iterable, total, desc, enabled):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- perplexity


def sliding_windows(n_tokens: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding-window perplexity over a stream of ``n_tokens`` tokens.

    Each window is (begin, end, first): the model reads tokens [begin, end) and scores the
    targets [first, end), each predicted from the tokens before it inside the window. Window k
    starts at k * stride; the first scores every token from 1, later ones only the tokens the
    previous window did not reach (the last ``stride``), so every token from 1 to n-1 is scored
    exactly once, with at least ``context_len - stride`` tokens of context after the first
    window. The last window ends at the end of the stream and may be shorter.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    if not 1 <= stride < context_len:
        # stride == context_len would leave each window's first token without context, unscored
        raise ValueError(f"stride must be in 1..context_len-1 ({context_len - 1}), got {stride}")
    windows = []
    begin, prev_end = 0, 0
    while n_tokens >= 2:
        end = min(begin + context_len, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        if end == n_tokens:
            break
        prev_end = end
        begin += stride
    return windows


def scored_stream(tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> tuple[list, list]:
    """(ids, is_text): the token stream :func:`perplexity` scores (see there), cut after its
    first ``max_tokens`` document tokens when given."""
    ids, is_text = encode_documents(tokenizer, list(texts), max_tokens=max_tokens)
    if max_tokens is not None:
        seen = 0
        for i, t in enumerate(is_text):
            seen += t
            if seen == max_tokens:
                return ids[: i + 1], is_text[: i + 1]
    return ids, is_text


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str] | str,
    context_len: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Sliding-window perplexity of ``texts``: {"ppl", "nll", "tokens", ...}.

    The documents are concatenated into one stream ``[EOS] prefix doc1 [EOS] prefix doc2 ...``
    (EOS, else BOS, as separator; prefix as for contexts, see the module doc), so a document's
    first tokens are predicted with the end of the previous one as context, like in
    pre-training. Only the documents' own tokens are scored (not the separators or prefixes),
    each exactly once (``sliding_windows``): the first ``context_len - 1`` with the tokens
    before them, every later one with at least ``context_len - stride`` tokens of left
    context. ``max_tokens`` keeps the stream up to its first max_tokens document tokens (the
    start of the first documents), for quick runs. ``nll`` is the mean negative
    log-likelihood per scored token (nats), ``ppl = exp(nll)``; windows are batched
    ``batch_size`` at a time (right-padded).
    """
    if isinstance(texts, str):
        texts = [texts]
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and context_len > limit:
        raise ValueError(f"context_len {context_len} exceeds the model's {limit} positions")
    sliding_windows(0, context_len, stride)  # argument checks
    start = time.perf_counter()
    ids, is_text = scored_stream(tokenizer, texts, max_tokens)
    if not any(is_text[1:]):
        raise ValueError("perplexity: the texts hold no tokens to score")
    windows = sliding_windows(len(ids), context_len, stride)
    ids_t = torch.tensor(ids, dtype=torch.long)
    score_t = torch.tensor(is_text, dtype=torch.bool)
    pad = document_separator(tokenizer)
    device = _model_device(model)
    nll_sum, count = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with _inference(model):
        for batch in _progress(batches, len(batches), "perplexity", progress):
            width = max(e - b for b, e, _ in batch)
            inp = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (b, e, _) in enumerate(batch):
                inp[row, : e - b] = ids_t[b:e]
                mask[row, : e - b] = 1
            # the scored positions of every row lie in the last `keep` columns
            skip = min(first - 1 - b for b, _, first in batch)
            logits = _logits(model, inp.to(device), mask.to(device), width - skip)
            for row, (b, e, first) in enumerate(batch):
                lp = _log_softmax(logits[row, first - 1 - b - skip : e - 1 - b - skip])
                lp = lp.gather(-1, ids_t[first:e].to(lp.device)[:, None])[:, 0]
                keep = score_t[first:e].to(lp.device)
                nll_sum -= float(lp[keep].double().sum())
                count += int(keep.sum())
    nll = nll_sum / count
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": count,
        "windows": len(windows),
        "context_len": context_len,
        "stride": stride,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- zero-shot


def teacher_agreement(model, teacher, blocks: torch.Tensor, batch_size: int = 4, *, progress: bool = False) -> dict:
    """How close ``model`` stays to ``teacher`` on token blocks [N, L] (e.g. held-out text, or
    text the teacher wrote): ``kl`` = mean over positions of KL(teacher || model) in nats
    (float32 log-softmax over the full vocabulary), ``top1`` = fraction of positions where both
    predict the same next token (argmax; ties to the lower id), ``positions`` = how many. The
    two models must share a vocabulary."""
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.numel() == 0:
        raise ValueError(
            f"teacher_agreement: blocks must be a non-empty [N, L] tensor of token ids, "
            f"got {getattr(blocks, 'shape', type(blocks).__name__)}"
        )
    kl_sum, agree, n = 0.0, 0, 0
    t0 = time.perf_counter()
    starts = range(0, blocks.shape[0], batch_size)
    with _inference(model), _inference(teacher):
        for i in _progress(starts, len(starts), "edkm: agreement with the teacher", progress):
            b = blocks[i : i + batch_size]
            mask = torch.ones_like(b)
            lp = _log_softmax(_logits(model, b.to(_model_device(model)), mask.to(_model_device(model)), b.shape[1]))
            lt = _log_softmax(
                _logits(teacher, b.to(_model_device(teacher)), mask.to(_model_device(teacher)), b.shape[1])
            ).to(lp.device)
            if lp.shape[-1] != lt.shape[-1]:
                raise ValueError(
                    f"teacher_agreement: the model has a vocabulary of {lp.shape[-1]} tokens, "
                    f"the teacher {lt.shape[-1]}"
                )
            kl_sum += float((lt.exp() * (lt - lp)).sum(-1).sum())
            agree += int((lp.argmax(-1) == lt.argmax(-1)).sum())
            n += b.numel()
    return {"kl": kl_sum / n, "top1": agree / n, "positions": n, "seconds": time.perf_counter() - t0}


def split_continuation(context: str, continuation: str, delimiter: str = " ") -> tuple[str, str]:
    """(context, continuation) as tokenized: the delimiter rule of the module doc."""
    if delimiter.strip():  # a prompt word ("\nAnswer: "): part of the context, never scored
        context, delimiter = context.rstrip() + delimiter, ""
    stripped = context.rstrip(" \t")
    if stripped != context:
        return stripped, context[len(stripped) :] + continuation
    if not context or context.endswith("\n") or continuation[:1].isspace():
        return context, continuation
    return context, delimiter + continuation


def _bad(path, lineno, msg):
    return ValueError(f"{path}:{lineno}: {msg}")


def _check_gold(path, lineno, gold, n):
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise _bad(path, lineno, f"'gold' must be an integer index in 0..{n - 1}, got {gold!r}")


def _check_strings(path, lineno, key, value):
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _bad(path, lineno, f"'{key}' must be a non-empty list of strings")


def _parse_item(path, lineno, item) -> tuple[str, dict]:
    if not isinstance(item, dict):
        raise _bad(path, lineno, f"expected a JSON object, got {type(item).__name__}")
    if "context_options" in item:
        _check_strings(path, lineno, "context_options", item["context_options"])
        if not isinstance(item.get("continuation"), str):
            raise _bad(path, lineno, "schema item needs a string 'continuation'")
        _check_gold(path, lineno, item.get("gold"), len(item["context_options"]))
        return "schema", item
    if "query" in item and "choices" in item:
        if not isinstance(item["query"], str):
            raise _bad(path, lineno, "'query' must be a string")
        _check_strings(path, lineno, "choices", item["choices"])
        _check_gold(path, lineno, item.get("gold"), len(item["choices"]))
        return "multiple_choice", item
    if "context" in item and "continuation" in item:
        if not isinstance(item["context"], str) or not isinstance(item["continuation"], str):
            raise _bad(path, lineno, "'context' and 'continuation' must be strings")
        if not item["continuation"]:
            raise _bad(path, lineno, "empty 'continuation'")
        return "lambada", item
    raise _bad(
        path,
        lineno,
        f"unrecognized item with keys {sorted(item)}; expected {{query, choices, gold}} "
        "(multiple choice), {context_options, continuation, gold} (schema) or "
        "{context, continuation} (LAMBADA)",
    )


def load_task(task_file, limit: int | None = None) -> tuple[str, list[dict]]:
    """(format, items) of a jsonl task file: its first ``limit`` items (blank lines skipped).

    The format is detected per line; every line must have the first line's. Raises
    FileNotFoundError for a missing file, ValueError naming the file and line for a bad line.
    """
    path = Path(task_file)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    fmt, items = None, []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, lineno, f"invalid JSON ({e.msg})") from None
            kind, item = _parse_item(path, lineno, item)
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise _bad(path, lineno, f"{kind} item in a {fmt} file")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return fmt, items


def score_continuations(
    model,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "scoring",
) -> list[tuple[float, bool, int]]:
    """For each (context_ids, continuation_ids): (sum of the continuation's log-probs, whether
    greedy decoding gives exactly the continuation, its number of tokens).

    The model reads ``(context + continuation)[:-1]`` (left-truncated to ``max_length``);
    requests are sorted by length (longest first) and batched with right padding and an
    attention mask, then returned in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = _max_length(model, max_length)
    prepared = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation tokenizes to no tokens")
        if not ctx:
            raise ValueError("a context tokenizes to no tokens (give it at least a BOS/EOS)")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {max_length}")
        prepared.append(((list(ctx) + list(cont))[:-1][-max_length:], list(cont)))
    order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)
    results: list = [None] * len(prepared)
    with _inference(model):
        for batch in _progress(batches, len(batches), desc, progress):
            width = len(prepared[batch[0]][0])
            inp = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prepared[i][0]
                inp[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            skip = min(len(prepared[i][0]) - len(prepared[i][1]) for i in batch)
            logits = _logits(model, inp.to(device), mask.to(device), width - skip)
            for row, i in enumerate(batch):
                ids, cont = prepared[i]
                lp = _log_softmax(logits[row, len(ids) - len(cont) - skip : len(ids) - skip])
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                total = float(lp.gather(-1, target[:, None]).double().sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (total, greedy, len(cont))
    return results


def _stderr(hits: list[bool]) -> float:
    n = len(hits)
    if n < 2:
        return 0.0
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties


def zero_shot(
    model,
    tokenizer,
    task_file,
    limit: int | None = None,
    batch_size: int = 8,
    delimiter: str = " ",
    max_length: int | None = None,
    progress: bool = True,
    per_item: bool = False,
) -> dict:
    """Zero-shot evaluation on a jsonl task file; the format is detected (``load_task``).

    * multiple choice ``{"query", "choices", "gold"}``: each choice scored by the sum of the
      log-probabilities of its tokens given the query; ``acc`` picks the highest sum,
      ``acc_norm`` the highest sum divided by the choice's length in UTF-8 bytes.
    * schema ``{"context_options", "continuation", "gold"}``: the shared continuation scored
      under each context option; ``acc`` picks the highest.
    * LAMBADA ``{"context", "continuation"}``: ``acc`` is the fraction whose continuation is
      exactly what greedy decoding gives; ``ppl = exp(-mean over items of the continuation's
      log-likelihood)`` (the usual LAMBADA perplexity), ``token_ppl`` the same per token,
      ``mean_logprob`` the mean continuation log-likelihood.

    Returns {"task": file stem, "format", "n", "acc", "acc_stderr", "seconds", ...}; with
    ``per_item``, also "items": per item {"logprobs": [per option], "acc": bool} (and
    "acc_norm" for multiple choice, "greedy" for LAMBADA).
    """
    start = time.perf_counter()
    path = Path(task_file)
    fmt, items = load_task(path, limit)
    prefix = special_prefix(tokenizer)
    fallback = [document_separator(tokenizer)]
    cache: dict[str, list[int]] = {}

    def request(context: str, continuation: str):
        ctx, cont = split_continuation(context, continuation, delimiter)
        if ctx not in cache:
            cache[ctx] = (prefix + encode(tokenizer, ctx)) or fallback
        return cache[ctx], encode(tokenizer, cont)

    requests, owner = [], []  # owner[i]: (item index, option index) of request i
    for k, item in enumerate(items):
        if fmt == "multiple_choice":
            for j, choice in enumerate(item["choices"]):
                requests.append(request(item["query"], choice))
                owner.append((k, j))
        elif fmt == "schema":
            for j, option in enumerate(item["context_options"]):
                requests.append(request(option, item["continuation"]))
                owner.append((k, j))
        else:
            requests.append(request(item["context"], item["continuation"]))
            owner.append((k, 0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback[0]
    scores = score_continuations(model, requests, batch_size, max_length, pad, progress, desc=path.stem)
    by_item: list[list] = [[] for _ in items]
    for (k, _), s in zip(owner, scores):
        by_item[k].append(s)
    result = {"task": path.stem, "format": fmt, "n": len(items)}
    if fmt == "lambada":
        hits = [s[0][1] for s in by_item]
        logps = [s[0][0] for s in by_item]
        n_tokens = sum(s[0][2] for s in by_item)
        result.update(
            acc=sum(hits) / len(hits),
            acc_stderr=_stderr(hits),
            ppl=math.exp(-sum(logps) / len(logps)),
            token_ppl=math.exp(-sum(logps) / n_tokens),
            mean_logprob=sum(logps) / len(logps),
        )
    else:
        hits = [_argmax([s[0] for s in ss]) == item["gold"] for ss, item in zip(by_item, items)]
        result.update(acc=sum(hits) / len(hits), acc_stderr=_stderr(hits))
        if fmt == "multiple_choice":
            norm = [
                _argmax([s[0] / max(1, len(c.encode("utf-8"))) for s, c in zip(ss, item["choices"])]) == item["gold"]
                for ss, item in zip(by_item, items)
            ]
            result.update(acc_norm=sum(norm) / len(norm), acc_norm_stderr=_stderr(norm))
    if per_item:
        result["items"] = [{"logprobs": [s[0] for s in ss], "acc": bool(h)} for ss, h in zip(by_item, hits)]
        if fmt == "multiple_choice":
            for d, h in zip(result["items"], norm):
                d["acc_norm"] = bool(h)
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- several tasks


def resolve_task(task, data_dir) -> tuple[str, Path | None]:
    """(name, path): "ppl" -> ("ppl", None); a path to a file -> (its stem, it); a name ->
    (name, DATA/eval/NAME.jsonl)."""
    if isinstance(task, str) and task == "ppl":
        return "ppl", None
    path = Path(task)
    if isinstance(task, Path) or path.suffix == ".jsonl" or len(path.parts) > 1 or path.is_file():
        return path.stem, path
    if data_dir is None:
        raise FileNotFoundError(
            f"task {task!r} needs a data directory (--data-dir or EDKM_DATA_DIR) holding eval/{task}.jsonl"
        )
    root = Path(data_dir)
    for candidate in (root / "eval" / f"{task}.jsonl", root / f"{task}.jsonl"):
        if candidate.is_file():
            return str(task), candidate
    raise FileNotFoundError(f"task {task!r}: no {root / 'eval' / (str(task) + '.jsonl')}")


def evaluate(
    model,
    tokenizer,
    tasks: Iterable,
    data_dir=None,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    ppl_batch_size: int = 4,
    context_len: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    delimiter: str = " ",
    progress: bool = True,
) -> dict:
    """Run several tasks; a JSON-serializable {"tasks": {name: result}, "settings", "seconds"}.

    Each task is "ppl" (``perplexity`` on the test split of ``corpus_split(data_dir)`` with
    context_len / stride / max_tokens / ppl_batch_size), a task name (DATA/eval/NAME.jsonl) or
    the path of a jsonl file (``zero_shot`` with limit / batch_size / delimiter).
    """
    start = time.perf_counter()
    resolved = [resolve_task(t, data_dir) for t in tasks]  # fail early on a missing file
    out: dict = {}
    for name, path in resolved:
        if path is None:
            _, test_files = corpus_split(data_dir)
            r = perplexity(
                model,
                tokenizer,
                read_texts(test_files),
                context_len=context_len,
                stride=stride,
                max_tokens=max_tokens,
                batch_size=ppl_batch_size,
                progress=progress,
            )
            r = {"task": "ppl", "split": "test", "files": len(test_files), **r}
        else:
            r = zero_shot(
                model, tokenizer, path, limit=limit, batch_size=batch_size, delimiter=delimiter, progress=progress
            )
            r["task"] = name
        out[name] = r
    settings = {
        "limit": limit,
        "batch_size": batch_size,
        "ppl_batch_size": ppl_batch_size,
        "context_len": context_len,
        "stride": stride,
        "max_tokens": max_tokens,
        "delimiter": delimiter,
        "data_dir": None if data_dir is None else str(data_dir),
    }
    return {"tasks": out, "settings": settings, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model to evaluate (as understood by edkm.models.load_model)")
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated: ppl (test-split perplexity), names of DATA/eval/*.jsonl, "
        "or paths of jsonl files (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data folder (corpus/, eval/); default $EDKM_DATA_DIR, else ../shared/data next to the checkout",
    )
    p.add_argument("--limit", type=int, default=None, help="first N items of each zero-shot task")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="perplexity on the first N tokens of the test split only"
    )
    p.add_argument("--context-len", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--stride", type=int, default=256, help="perplexity stride (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--ppl-batch-size", type=int, default=4, help="perplexity windows per batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--delimiter",
        default=" ",
        help="between context and continuation (default ' '; backslash escapes such as "
        "\\n are decoded, e.g. '\\nAnswer: ')",
    )
    p.add_argument(
        "--harness",
        default="edkm",
        choices=("edkm", "lm-eval"),
        help="'lm-eval': run lm-evaluation-harness (its hf model) on the same local task "
        "files instead; MODEL is then a Hugging Face directory, a hub name, or an "
        "edkm file (exported to a temporary directory first); zero-shot tasks only",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON, no progress bars")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON results to this file")


def format_results(results: dict) -> str:
    lines = [f"{'task':<18}{'n':>8}  metrics"]
    for name, r in results["tasks"].items():
        if name == "ppl" or "tokens" in r:
            metrics = f"ppl {r['ppl']:.3f}  nll {r['nll']:.4f}"
            n = r["tokens"]
        else:
            metrics = f"acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}"
            if "acc_norm" in r:
                metrics += f"  acc_norm {r['acc_norm']:.4f}"
            if "ppl" in r:
                metrics += f"  ppl {r['ppl']:.3f}"
            n = r["n"]
        lines.append(f"{name:<18}{n:>8}  {metrics}  ({r['seconds']:.1f} s)")
    return "\n".join(lines)


def main(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    delimiter = args.delimiter
    if "\\" in delimiter:
        delimiter = codecs.decode(delimiter, "unicode_escape")
    if not tasks:
        raise SystemExit("edkm eval: --tasks is empty")
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    if args.harness == "lm-eval":
        return _main_lm_eval(args, tasks, data_dir)
    try:
        for t in tasks:  # check the data before spending time on loading the model
            resolve_task(t, data_dir)
        if "ppl" in tasks:
            corpus_split(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"edkm eval: {e}") from None
    from edkm.models import load_model

    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    if tokenizer is None:
        raise SystemExit(f"edkm eval: model {args.model!r} comes without a tokenizer; cannot evaluate text")
    results = evaluate(
        model,
        tokenizer,
        tasks,
        data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        ppl_batch_size=args.ppl_batch_size,
        context_len=args.context_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
        delimiter=delimiter,
        progress=not args.json,
    )
    results["model"] = args.model
    results["dtype"] = args.dtype
    text = json.dumps(results, indent=2)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text if args.json else format_results(results))
    return 0


def _main_lm_eval(args, tasks, data_dir) -> int:
    from edkm import lm_eval_harness

    if "ppl" in tasks:
        raise SystemExit("edkm eval: --harness lm-eval: 'ppl' is edkm's own perplexity task; run it without --harness")
    if args.delimiter != " ":
        raise SystemExit("edkm eval: --harness lm-eval uses the delimiters of its task configs; drop --delimiter")
    try:
        for t in tasks:  # check the local data before spending time on loading the model
            if t in lm_eval_harness.available_tasks():
                resolve_task(t, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"edkm eval: {e}") from None
    start = time.perf_counter()
    results = lm_eval_harness.run(
        args.model, tasks, data_dir, limit=args.limit, batch_size=args.batch_size, dtype=args.dtype
    )
    results.update(model=args.model, dtype=args.dtype, seconds=time.perf_counter() - start)
    text = json.dumps(results, indent=2)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"{'task':<18}{'n':>8}  metrics (lm-evaluation-harness)")
        for name, r in results["tasks"].items():
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "n" and not k.endswith("_stderr"))
            print(f"{name:<18}{r['n']:>8}  {metrics}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m edkm.evaluate")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
