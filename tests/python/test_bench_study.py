"""edkm bench study: row names, size groups, the paired tests against the best other row of the
same size, and the report (tables, Pareto chart) from rows on disk. The rows themselves need
SmolLM2-135M, llama.cpp and HQQ and run as a benchmark, not here."""

import json

import pytest

from benchmarks import study


def test_parse_row_accepts_the_documented_names():
    assert study.parse_row("baseline") == {"name": "baseline", "kind": "baseline"}
    assert study.parse_row("kmeans3") == {"name": "kmeans3", "kind": "kmeans", "bits": 3}
    assert study.parse_row("squeezellm4")["kind"] == "squeezellm"
    assert study.parse_row("gptq3") == {"name": "gptq3", "kind": "gptq", "bits": 3}
    assert study.parse_row("hqq3") == {"name": "hqq3", "kind": "hqq", "bits": 3}
    assert study.parse_row("Q3_K_M") == {"name": "Q3_K_M", "kind": "gguf"}
    assert study.parse_row("Q4_0-pure") == {"name": "Q4_0-pure", "kind": "gguf"}
    assert study.parse_row("edkm3=/x/model.safetensors") == {
        "name": "edkm3",
        "kind": "file",
        "path": "/x/model.safetensors",
    }


@pytest.mark.parametrize("bad", ["kmeans9", "kmeans", "Q5_K", "bad name=/x", "=/x", "x="])
def test_parse_row_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="edkm bench study"):
        study.parse_row(bad)


def test_size_groups_and_methods():
    assert study.size_group(3.0) == "near 3 bits"
    assert study.size_group(3.3) == "near 3 bits"
    assert study.size_group(3.31) == "near 4 bits"
    assert study.size_group(4.3) == "near 4 bits"
    assert study.size_group(4.5) is None
    assert study.method_of("Q4_K_S") == "llama.cpp k-quants"
    assert study.method_of("Q4_0-pure") == "llama.cpp k-quants"
    assert study.method_of("squeezellm3") == "SqueezeLLM-style (post-training)"
    assert study.method_of("edkm-ce") == "eDKM, old recipe (40 steps CE)"
    assert study.method_of("edkm3") == "eDKM, new recipe"
    assert study.method_of("gptq4") == "GPTQ over LUTs (post-training)"
    assert study.method_of("edkm3g16-gptq") == "eDKM, new recipe, GPTQ start"


def _row(name, bits, ppl, piqa, arc, lam, kl=0.5, top1=0.6):
    """A row as run_row writes it, with per-item outcomes given as strings of 0/1."""

    def mc(s):
        return {"acc": s, "acc_norm": s}

    return {
        "name": name,
        "method": study.method_of(name),
        "bits_per_weight": bits,
        "bytes": bits * 100 / 8,
        "size_kind": "test",
        "build_seconds": 1.0,
        "eval_seconds": 2.0,
        "metrics": {
            "ppl": {"ppl": ppl},
            "piqa": {"acc": piqa.count("1") / len(piqa), "acc_norm": piqa.count("1") / len(piqa)},
            "arc_easy": {"acc": arc.count("1") / len(arc), "acc_norm": arc.count("1") / len(arc)},
            "lambada_openai": {"acc": lam.count("1") / len(lam)},
        },
        "agreement": {"kl": kl, "top1": top1},
        "items": {"piqa": mc(piqa), "arc_easy": mc(arc), "lambada_openai": {"acc": lam}},
        "command": f"python -m edkm bench study {name}",
    }


def _write(tmp_path, rows):
    (tmp_path / "rows").mkdir()
    for r in rows:
        (tmp_path / "rows" / f"{r['name']}.json").write_text(json.dumps(r))


def test_paired_tests_compare_each_edkm_row_with_the_best_other_of_its_size():
    rows = {
        r["name"]: r
        for r in [
            _row("baseline", 16, 20.0, "1111111111", "1111100000", "1111111111"),
            _row("kmeans3", 3.01, 900.0, "0000000000", "0000000000", "0000000000"),
            _row("squeezellm3", 3.25, 200.0, "1100000000", "1000000000", "0000000000"),
            _row("Q4_K_S", 4.6, 30.0, "1111111110", "1111000000", "1111111110"),
            _row("edkm3", 3.25, 60.0, "1111111100", "1100000000", "1111100000"),
        ]
    }
    assert study.best_other(rows, "near 3 bits") == "squeezellm3"  # lowest ppl, not eDKM
    tests = study.paired_tests(rows)
    assert {t["a"] for t in tests} == {"edkm3"} and {t["b"] for t in tests} == {"squeezellm3"}
    piqa = next(t for t in tests if t["task"] == "piqa" and t["metric"] == "acc")
    # edkm right on items 2..7 where squeezellm is wrong; never the other way round
    assert (piqa["a_only"], piqa["b_only"], piqa["n"]) == (6, 0, 10)
    assert piqa["mcnemar_p"] == pytest.approx(2 / 2**6)
    lam = next(t for t in tests if t["task"] == "lambada_openai")
    assert (lam["a_only"], lam["b_only"]) == (5, 0)


def test_report_writes_tables_chart_and_json(tmp_path):
    rows = [
        _row("baseline", 16, 20.0, "11", "10", "11", kl=0.0, top1=1.0),
        _row("kmeans3", 3.01, 9.0e5, "00", "00", "00", kl=9.0, top1=0.1),
        _row("Q3_K_M", 4.2, 35.0, "11", "10", "10"),
        _row("edkm3", 3.25, 45.0, "10", "10", "10"),
    ]
    rows[2]["gguf_types"] = {"Q3_K": 10, "IQ4_NL": 5}
    rows[2]["llama_cpp_check"] = {"tokens": 64, "edkm_ppl": 35.0, "llama_cpp_ppl": 35.07}
    _write(tmp_path, rows)
    rep = study.report(tmp_path, {"limit": 2, "eval_tokens": 64, "kl_tokens": 32})
    md = (tmp_path / "study.md").read_text()
    assert "## near 3 bits" in md and "## near 4 bits" in md and "## other sizes" in md
    # the 3-bit table is sorted by perplexity: edkm3 (45) before kmeans3 (9e5)
    sec = md.split("## near 3 bits")[1].split("##")[0]
    assert sec.index("| edkm3 ") < sec.index("| kmeans3 ")
    assert "| 2.25 |" in sec  # 45 / 20 times the baseline
    assert "9.00e+05" in sec
    assert "| Q3_K_M | 35.000 | 35.070 | 1.0020 |" in md  # the harness check
    assert "IQ4_NL x5" in md
    assert (tmp_path / "study.png").stat().st_size > 10_000
    on_disk = json.loads((tmp_path / "study.json").read_text())
    assert set(on_disk["rows"]) == {"baseline", "kmeans3", "Q3_K_M", "edkm3"}
    assert on_disk["paired"] == rep["paired"] and all(t["b"] == "kmeans3" for t in rep["paired"])
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_without_rows_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rows"):
        study.report(tmp_path, {})


def test_llama_cpp_style_windows_cover_each_scored_token_once():
    """The llama.cpp check scores exactly edkm.evaluate.perplexity's positions: every window's
    scored tokens, over the sliding windows, cover each stream position >= 1 exactly once."""
    from edkm.evaluate import sliding_windows

    n = 1000
    seen = []
    for b, e, first in sliding_windows(n, 512, 256):
        seen += list(range(first, e))
    assert seen == list(range(1, n))


def test_cli_registers_bench_study():
    from edkm.cli import build_parser

    args = build_parser().parse_args(["bench", "study", "baseline", "--report", "--limit", "3"])
    assert args.run is study.main and args.rows == ["baseline"] and args.report and args.limit == 3


def _accuracy_report(tmp_path, **settings):
    s = dict(
        bits=3,
        group_size=None,
        limit=2,
        eval_tokens=64,
        context_len=512,
        stride=256,
        steps=40,
        batch_size=4,
        block_len=256,
    )
    s.update(settings)
    variants = {}
    for v, ppl in (("baseline", 20.0), ("rtn", 1e24), ("kmeans", 9e5), ("edkm", 200.0), ("finetune", 25.0)):
        r = _row("x", 3.01 if v in ("rtn", "kmeans", "edkm") else 16.0, ppl, "10", "01", "00")
        variants[v] = {
            "variant": v,
            "bytes": r["bytes"],
            "bits_per_weight": r["bits_per_weight"],
            "size_kind": "edkm file",
            "build_seconds": 1.0,
            "eval_seconds": 2.0,
            "metrics": r["metrics"],
            "items": r["items"],
        }
    variants["edkm"]["train_losses"] = [3.0, 2.0]
    path = tmp_path / "acc.json"
    path.write_text(
        json.dumps(
            {
                "settings": s,
                "variants": variants,
                "date": "2026-11-26T11:02:46+00:00",
                "command": "python -m edkm bench accuracy --threads 1",
            }
        )
    )
    return path


def test_import_accuracy_takes_the_matching_rows(tmp_path):
    path = _accuracy_report(tmp_path)
    rows = {r["name"]: r for r in study.import_accuracy(str(path), {"limit": 2, "eval_tokens": 64})}
    assert set(rows) == {"rtn3", "kmeans3", "edkm-ce", "finetune"}
    assert rows["edkm-ce"]["agreement"] is None and rows["edkm-ce"]["train_tokens"] == 40 * 4 * 256
    assert rows["rtn3"]["metrics"]["ppl"]["ppl"] == 1e24
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    for r in list(rows.values()) + [_row("baseline", 16, 20.0, "11", "11", "11", kl=0.0, top1=1.0)]:
        (out / "rows" / f"{r['name']}.json").write_text(json.dumps(r))
    md = study.markdown(study.report(out, {"limit": 2, "eval_tokens": 64, "kl_tokens": 32}))
    assert "not measured&dagger;" in md and "taken from `python -m edkm bench accuracy --threads 1`" in md


def test_import_accuracy_refuses_other_settings(tmp_path):
    path = _accuracy_report(tmp_path, limit=10)
    with pytest.raises(ValueError, match=r"settings differ .*'limit': \(10, 2\)"):
        study.import_accuracy(str(path), {"limit": 2, "eval_tokens": 64})
