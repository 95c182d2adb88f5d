"""edkm.evaluate: perplexity windows, zero-shot scoring, padding invariance, file errors, the CLI.

A tiny random LLaMA and a character tokenizer; models with controlled logits where the answer
must be forced. No network, no shared data.
"""

import argparse
import json
import math
import string
import sys
import types

import pytest
import torch

from edkm import evaluate as ev


def char_tokenizer(bos: bool = False):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>", "<pad>", "<unk>", "<bos>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    kwargs = dict(eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
        kwargs["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


TOK = char_tokenizer()
V = len(TOK)


def ids_of(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def tiny_llama(seed=0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


class Bigram(torch.nn.Module):
    """Logits depend on the current token only: a strong preference for table[token]."""

    def __init__(self, table: dict, strength=8.0):
        super().__init__()
        logits = torch.zeros(V, V, dtype=torch.float64)
        for a, b in table.items():
            logits[TOK.convert_tokens_to_ids(a), TOK.convert_tokens_to_ids(b)] = strength
        self.register_buffer("table", logits)

    def forward(self, input_ids, attention_mask=None):
        return (self.table[input_ids],)  # a tuple, as some models return


def log_prob_naive(model, ids, p, begin=0):
    """log p(ids[p] | ids[begin:p]), one unbatched, unpadded forward."""
    x = torch.tensor([ids[begin:p]])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, -1]
    return float(torch.log_softmax(logits.double(), -1)[ids[p]])


TEXTS = ["The quick brown fox jumps over the lazy dog. " * 2, "Pack my box with five dozen liquor jugs!"]


# ----------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize(
    "n,L,s",
    [
        (2, 4, 1),
        (10, 4, 2),
        (37, 8, 3),
        (37, 8, 7),
        (40, 8, 4),
        (5, 16, 8),
        (100, 16, 5),
        (17, 2, 1),
        (1, 4, 2),
        (0, 4, 2),
    ],
)
def test_sliding_windows_score_each_token_once(n, L, s):
    windows = ev.sliding_windows(n, L, s)
    targets = [p for b, e, f in windows for p in range(f, e)]
    assert targets == list(range(1, n))
    if n < 2:
        assert windows == []
        return
    for k, (b, e, f) in enumerate(windows):
        assert b == k * s and e - b <= L and b < f <= e
        if b > 0:  # after the first window: at least L - s tokens of context
            assert f - b >= L - s
    assert windows[-1][1] == n


def test_sliding_windows_errors():
    with pytest.raises(ValueError, match="stride"):
        ev.sliding_windows(10, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        ev.sliding_windows(10, 8, 0)
    with pytest.raises(ValueError, match="context_len"):
        ev.sliding_windows(10, 1, 1)


def test_perplexity_single_window_is_exp_mean_nll():
    model = tiny_llama()
    text = TEXTS[0]
    stream = [TOK.eos_token_id] + ids_of(text)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([stream])).logits[0]
    lp = torch.log_softmax(logits[:-1].double(), -1).gather(-1, torch.tensor(stream[1:])[:, None])
    nll = -float(lp.mean())
    r = ev.perplexity(model, TOK, text, context_len=128, stride=64, progress=False)
    assert r["tokens"] == len(stream) - 1 and r["windows"] == 1
    assert r["nll"] == pytest.approx(nll, rel=1e-9)
    assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-9)


@pytest.mark.parametrize("L,s,batch", [(16, 8, 3), (12, 5, 1), (10, 9, 4)])
def test_perplexity_sliding_matches_naive(L, s, batch):
    model = tiny_llama(seed=1)
    stream = [TOK.eos_token_id] + ids_of(TEXTS[0]) + [TOK.eos_token_id] + ids_of(TEXTS[1])
    is_text = [i != 0 and t != TOK.eos_token_id for i, t in enumerate(stream)]
    total, count = 0.0, 0
    for p in range(1, len(stream)):
        if not is_text[p]:
            continue
        # token p is scored in the first window that reaches it
        k = 0 if p < L else -(-(p - L + 1) // s)
        total -= log_prob_naive(model, stream, p, begin=k * s)
        count += 1
    r = ev.perplexity(model, TOK, TEXTS, context_len=L, stride=s, batch_size=batch, progress=False)
    assert r["tokens"] == count == len(ids_of(TEXTS[0])) + len(ids_of(TEXTS[1]))
    assert r["nll"] == pytest.approx(total / count, rel=1e-9)


def test_perplexity_batch_size_invariant_float32():
    model = tiny_llama(seed=2, dtype=torch.float32)
    rs = [ev.perplexity(model, TOK, TEXTS, context_len=16, stride=6, batch_size=b, progress=False) for b in (1, 4, 64)]
    for r in rs[1:]:
        assert r["tokens"] == rs[0]["tokens"]
        assert r["nll"] == pytest.approx(rs[0]["nll"], rel=1e-5)


def test_perplexity_max_tokens():
    model = tiny_llama()
    r = ev.perplexity(model, TOK, TEXTS, context_len=16, stride=8, max_tokens=30, progress=False)
    ref = ev.perplexity(model, TOK, TEXTS[0][:30], context_len=16, stride=8, progress=False)
    assert r["tokens"] == ref["tokens"] == 30
    assert r["nll"] == pytest.approx(ref["nll"], rel=1e-12)
    # a cap beyond the text scores all of it
    full = ev.perplexity(model, TOK, TEXTS, context_len=16, stride=8, progress=False)
    big = ev.perplexity(model, TOK, TEXTS, context_len=16, stride=8, max_tokens=10**6, progress=False)
    assert big["tokens"] == full["tokens"] and big["nll"] == full["nll"]


def test_perplexity_restores_training_mode_and_checks_args():
    model = tiny_llama().train()
    ev.perplexity(model, TOK, TEXTS[1], context_len=16, stride=8, progress=False)
    assert model.training
    with pytest.raises(ValueError, match="exceeds the model"):
        ev.perplexity(model, TOK, TEXTS, context_len=512, stride=256)
    with pytest.raises(ValueError, match="no tokens"):
        ev.perplexity(model, TOK, [""], context_len=16, stride=8)


def test_perplexity_bos_tokenizer_scores_text_only():
    btok = char_tokenizer(bos=True)
    model = tiny_llama()
    r = ev.perplexity(model, btok, TEXTS, context_len=16, stride=8, progress=False)
    assert r["tokens"] == len(ids_of(TEXTS[0])) + len(ids_of(TEXTS[1]))


# ----------------------------------------------------------------------------- zero-shot


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


def test_split_continuation():
    assert ev.split_continuation("I care about", "signs") == ("I care about", " signs")
    assert ev.split_continuation("Question: x\n", "Yes") == ("Question: x\n", "Yes")
    assert ev.split_continuation("about ", "signs") == ("about", " signs")
    assert ev.split_continuation("about", " signs") == ("about", " signs")
    assert ev.split_continuation("", "signs") == ("", "signs")
    assert ev.split_continuation("a", "b", delimiter="\nAnswer: ") == ("a\nAnswer:", " b")
    assert ev.split_continuation("Question: x\n", "b", delimiter="\nAnswer: ") == ("Question: x\nAnswer:", " b")
    assert ev.split_continuation("a", "b", delimiter="\n") == ("a", "\nb")


def test_multiple_choice_acc_forced(tmp_path):
    # the model wants ' ' after anything, then 'a' after ' ': choice "a" always wins on acc
    model = Bigram({c: " " for c in "Qq?"} | {" ": "a"})
    items = [
        {"query": "Q?", "choices": ["b", "a"], "gold": 1},  # right
        {"query": "Q?", "choices": ["a", "b"], "gold": 1},  # wrong
        {"query": "q?", "choices": ["b", "c", "a"], "gold": 2},  # right
        {"query": "Q?", "choices": ["a", "c"], "gold": 0},  # right
    ]
    r = ev.zero_shot(model, TOK, write_jsonl(tmp_path / "mc.jsonl", items), progress=False)
    assert r["task"] == "mc" and r["format"] == "multiple_choice" and r["n"] == 4
    assert r["acc"] == 0.75
    assert r["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    r2 = ev.zero_shot(model, TOK, tmp_path / "mc.jsonl", limit=2, batch_size=1, progress=False)
    assert r2["n"] == 2 and r2["acc"] == 0.5


def test_multiple_choice_acc_norm_divides_by_bytes(tmp_path):
    # uniform model: every token costs log V; "b" = 2 tokens / 1 byte, "bbbbbbbb" = 9 tokens / 8 bytes
    model = Bigram({})
    items = [{"query": "Q", "choices": ["b", "bbbbbbbb"], "gold": 1}]
    r = ev.zero_shot(model, TOK, write_jsonl(tmp_path / "t.jsonl", items), progress=False)
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0
    # bytes, not characters: a 2-byte character counts twice
    assert len("\u00e9".encode()) == 2


def test_schema_and_lambada_forced(tmp_path):
    model = Bigram({"x": " ", " ": "a", "a": "b", "b": "c"})
    schema = [
        {"context_options": ["b", "x"], "continuation": "abc", "gold": 1},
        {"context_options": ["x", "b"], "continuation": "abc", "gold": 1},
    ]
    r = ev.zero_shot(model, TOK, write_jsonl(tmp_path / "wino.jsonl", schema), progress=False)
    assert r["format"] == "schema" and r["acc"] == 0.5 and "acc_norm" not in r
    lamb = [{"context": "x", "continuation": "abc"}, {"context": "x", "continuation": "abd"}]
    r = ev.zero_shot(model, TOK, write_jsonl(tmp_path / "lambada.jsonl", lamb), progress=False)
    assert r["format"] == "lambada" and r["acc"] == 0.5
    # log-likelihoods by hand: favored token log p = 8 - log(e^8 + V - 1), others -log(e^8 + V - 1)
    z = math.log(math.exp(8) + V - 1)
    hit, miss = 8 - z, -z
    ll = [4 * hit, 3 * hit + miss]
    assert r["mean_logprob"] == pytest.approx(sum(ll) / 2)
    assert r["ppl"] == pytest.approx(math.exp(-sum(ll) / 2))
    assert r["token_ppl"] == pytest.approx(math.exp(-sum(ll) / 8))


def test_zero_shot_matches_naive_scoring(tmp_path):
    model = tiny_llama(seed=3)
    items = [
        {"query": "Question: which?\n", "choices": ["one", "two words", "three"], "gold": 1},
        {"query": "Pick", "choices": ["x", "yy"], "gold": 0},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", items)
    r = ev.zero_shot(model, TOK, path, progress=False)
    hits, norm_hits = [], []
    for item in items:
        sums = []
        for c in item["choices"]:
            ctx, cont = ev.split_continuation(item["query"], c)
            ids = ids_of(ctx) + ids_of(cont)
            n = len(ids_of(ctx))
            sums.append(sum(log_prob_naive(model, ids, p) for p in range(n, len(ids))))
        hits.append(max(range(len(sums)), key=lambda i: sums[i]) == item["gold"])
        normed = [s / len(c.encode()) for s, c in zip(sums, item["choices"])]
        norm_hits.append(max(range(len(sums)), key=lambda i: normed[i]) == item["gold"])
    assert r["acc"] == sum(hits) / 2 and r["acc_norm"] == sum(norm_hits) / 2


def test_score_continuations_padding_invariant():
    model = tiny_llama(seed=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for n_ctx, n_cont in [(3, 2), (17, 5), (9, 1), (30, 4), (1, 3), (12, 12)]:
        ids = torch.randint(4, V, (n_ctx + n_cont,), generator=g).tolist()
        reqs.append((ids[:n_ctx], ids[n_ctx:]))
    alone = ev.score_continuations(model, reqs, batch_size=1, progress=False)
    padded = ev.score_continuations(model, reqs, batch_size=4, progress=False)
    together = ev.score_continuations(model, reqs, batch_size=100, pad_id=7, progress=False)
    for a, b, c in zip(alone, padded, together):
        assert b[0] == pytest.approx(a[0], rel=1e-5, abs=1e-5)
        assert c[0] == pytest.approx(a[0], rel=1e-5, abs=1e-5)
        assert a[1:] == b[1:] == c[1:]
    # left truncation to max_length keeps the continuation and the tokens just before it
    short = ev.score_continuations(model, [reqs[3]], max_length=8, progress=False)[0]
    ctx, cont = reqs[3]
    trunc = ev.score_continuations(model, [((ctx + cont)[-9 : -len(cont)], cont)], progress=False)[0]
    assert short[0] == pytest.approx(trunc[0], rel=1e-6)


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"query": "q", "choices": ["a"], "gold": 0}', "{not json"], r"bad\.jsonl:2: invalid JSON"),
        (['{"question": "q", "answer": "a"}'], r"bad\.jsonl:1: unrecognized item"),
        (['{"query": "q", "choices": ["a", "b"], "gold": 2}'], r"bad\.jsonl:1: 'gold'"),
        (['{"query": "q", "choices": ["a", "b"]}'], r"bad\.jsonl:1: 'gold'"),
        (['{"query": "q", "choices": [], "gold": 0}'], r"bad\.jsonl:1: 'choices'"),
        (['{"context_options": ["a"], "gold": 0}'], r"bad\.jsonl:1: schema item"),
        (['{"context": "c", "continuation": ""}'], r"bad\.jsonl:1: empty"),
        (
            ['{"context": "c", "continuation": "d"}', "", '{"query": "q", "choices": ["a"], "gold": 0}'],
            r"bad\.jsonl:3: multiple_choice item in a lambada file",
        ),
        (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
        ([""], r"bad\.jsonl: no items"),
    ],
)
def test_bad_task_files(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        ev.zero_shot(Bigram({}), TOK, path, progress=False)


def test_missing_task_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.zero_shot(Bigram({}), TOK, tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------- evaluate and CLI


def make_data(root):
    sotu, austen, evald = root / "corpus" / "sotu", root / "corpus" / "austen", root / "eval"
    for d in (sotu, austen, evald):
        d.mkdir(parents=True)
    (sotu / "1999_a_b.txt").write_text("Old address, train only.")
    (sotu / "2001_c_d.txt").write_text(TEXTS[0])
    (austen / "persuasion.txt").write_text(TEXTS[1])
    (austen / "emma.txt").write_text("Train text.")
    write_jsonl(evald / "tinyqa.jsonl", [{"query": "Q?", "choices": ["b", "a"], "gold": 1}] * 3)
    write_jsonl(evald / "tinylamb.jsonl", [{"context": "x", "continuation": "ab"}])
    return root


def test_evaluate_combines_tasks(tmp_path):
    root = make_data(tmp_path / "data")
    model = tiny_llama()
    out = ev.evaluate(
        model,
        TOK,
        ["tinyqa", root / "eval" / "tinylamb.jsonl", "ppl"],
        root,
        limit=2,
        context_len=16,
        stride=8,
        progress=False,
    )
    json.dumps(out)  # serializable
    assert list(out["tasks"]) == ["tinyqa", "tinylamb", "ppl"]
    assert out["tasks"]["tinyqa"]["n"] == 2
    ppl = out["tasks"]["ppl"]
    ref = ev.perplexity(model, TOK, TEXTS, context_len=16, stride=8, progress=False)
    assert ppl["files"] == 2 and ppl["tokens"] == ref["tokens"] and ppl["nll"] == ref["nll"]
    with pytest.raises(FileNotFoundError, match="nosuch"):
        ev.evaluate(model, TOK, ["nosuch"], root)
    with pytest.raises(FileNotFoundError, match="data directory"):
        ev.evaluate(model, TOK, ["tinyqa"], None)


def test_cli_main_with_fake_loader(tmp_path, monkeypatch, capsys):
    root = make_data(tmp_path / "data")
    model = tiny_llama()
    calls = []

    def load_model(spec, dtype):
        calls.append((spec, dtype))
        return model, TOK

    monkeypatch.setitem(sys.modules, "edkm.models", types.SimpleNamespace(load_model=load_model))
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    out_file = tmp_path / "res" / "eval.json"
    args = parser.parse_args(
        [
            "tiny",
            "--tasks",
            "tinyqa,ppl",
            "--data-dir",
            str(root),
            "--limit",
            "1",
            "--context-len",
            "16",
            "--stride",
            "8",
            "--json",
            "--output",
            str(out_file),
        ]
    )
    assert ev.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert calls == [("tiny", torch.float32)]
    assert printed["tasks"]["tinyqa"]["n"] == 1 and printed["model"] == "tiny"
    assert json.loads(out_file.read_text()) == printed
    args = parser.parse_args(
        [
            "tiny",
            "--tasks",
            "tinyqa,ppl",
            "--data-dir",
            str(root),
            "--context-len",
            "32",
            "--stride",
            "16",
            "--output",
            str(out_file),
            "--delimiter",
            "\\nAnswer: ",
        ]
    )
    assert ev.main(args) == 0
    table = capsys.readouterr().out
    assert "tinyqa" in table and "ppl" in table
    assert json.loads(out_file.read_text())["settings"]["delimiter"] == "\nAnswer: "
    # missing data: a clear exit before the model is loaded
    args = parser.parse_args(["tiny", "--tasks", "ppl", "--data-dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(args)
    assert len(calls) == 2
