"""edkm bench udomain: runs both variants in fresh processes and writes its results."""

import argparse
import json

import pytest

from benchmarks import udomain


def test_small_run_writes_results(tmp_path):
    p = argparse.ArgumentParser()
    udomain.add_arguments(p)
    args = p.parse_args(["--case", "64x96:16", "--case", "32x32:32", "--repeats", "1", "--out", str(tmp_path)])
    report = udomain.run(args)
    assert [r["case"] for r in report["cases"]] == ["64x96:16", "32x32:32"]
    for r in report["cases"]:
        for v in udomain.VARIANTS:
            assert r[v]["median_seconds"] > 0 and r[v]["peak_rss_above_inputs_bytes"] > -(2**30)
        assert r["time_ratio"] > 0
    saved = json.loads((tmp_path / "udomain_cpu.json").read_text())
    assert saved["cases"][0]["groups"] == 4 and "command" in saved
    assert "| 64x96:16 | 4 |" in (tmp_path / "udomain_cpu.md").read_text()


@pytest.mark.parametrize("bad", ["64x96", "64x96:7", "0x5:1", "axb:1"])
def test_bad_cases_are_one_clear_error(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="--case"):
        udomain.parse_case(bad)
