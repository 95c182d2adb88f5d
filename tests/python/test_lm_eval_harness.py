"""lm-evaluation-harness through our local task configs agrees with `edkm eval`, item by item, on
a tiny model and tiny task files (no hub, no ../shared)."""

import json
import random

import pytest
import torch

from edkm.cli import main

pytest.importorskip("lm_eval")
pytest.importorskip("tokenizers")

from test_export_hf import tiny_hf_dir  # noqa: E402


def fake_tasks(tmp_path, n=12, seed=0):
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(3, 64)}" for _ in range(k))  # noqa: E731
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    with open(data / "eval" / "piqa.jsonl", "w") as f:  # PIQA-style: the query ends with a newline
        for _ in range(n):
            f.write(
                json.dumps(
                    {
                        "query": f"w3 {words(5)}\n",
                        "choices": [words(rng.randrange(1, 5)) for _ in range(2)],
                        "gold": rng.randrange(2),
                    }
                )
                + "\n"
            )
    with open(data / "eval" / "arc_easy.jsonl", "w") as f:
        for _ in range(n):
            f.write(
                json.dumps(
                    {
                        "query": f"w4 {words(4)}",
                        "choices": [words(rng.randrange(1, 4)) for _ in range(4)],
                        "gold": rng.randrange(4),
                    }
                )
                + "\n"
            )
    return data


def test_lm_eval_agrees_with_edkm_eval_item_by_item(tmp_path):
    from edkm import evaluate, lm_eval_harness
    from edkm.models import load_model

    model_dir = tiny_hf_dir(tmp_path, tie=True)
    data = fake_tasks(tmp_path)
    theirs = lm_eval_harness.run(str(model_dir), ["piqa", "arc_easy"], data, batch_size=4, log_samples=True)
    model, tok = load_model(str(model_dir), torch.float32)
    for task in ("piqa", "arc_easy"):
        ours = evaluate.zero_shot(
            model, tok, data / "eval" / f"{task}.jsonl", batch_size=4, progress=False, per_item=True
        )
        t = theirs["tasks"][task]
        assert t["n"] == ours["n"] == 12
        assert t["acc"] == pytest.approx(ours["acc"]) and t["acc_norm"] == pytest.approx(ours["acc_norm"])
        for item, sample in zip(ours["items"], theirs["samples"][task]):
            lp = [r[0] for r in sample["filtered_resps"]]
            assert lp == pytest.approx(item["logprobs"], abs=1e-4)


def test_edkm_eval_harness_lm_eval_on_a_compressed_file(tmp_path, capsys):
    model_dir = tiny_hf_dir(tmp_path, tie=False)
    data = fake_tasks(tmp_path)
    out = tmp_path / "t.safetensors"
    assert main(["compress", str(model_dir), "--bits", "4", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    assert (
        main(["eval", str(out), "--harness", "lm-eval", "--tasks", "piqa,arc_easy", "--data-dir", str(data), "--json"])
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert set(r["tasks"]) == {"piqa", "arc_easy"} and r["settings"]["harness"].startswith("lm-eval")
    assert 0 <= r["tasks"]["piqa"]["acc"] <= 1 and r["tasks"]["arc_easy"]["n"] == 12


def test_harness_lm_eval_rejects_unknown_tasks(tmp_path):
    with pytest.raises(SystemExit, match="'ppl' is edkm's own perplexity task"):
        main(["eval", str(tmp_path), "--harness", "lm-eval", "--tasks", "ppl", "--data-dir", str(tmp_path)])
