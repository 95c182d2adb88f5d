"""`edkm bench lut` runs end to end on a small shape and writes its results."""

import json

from edkm.cli import main


def test_bench_lut_writes_its_table(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "lut",
                "--shapes",
                "smollm2.up_proj",
                "--bits",
                "3",
                "--batch",
                "1,20",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = payload["rows"]
    assert [(r["matrix"], r["bits"], r["batch"]) for r in rows] == [
        ("smollm2.up_proj", 3, 1),
        ("smollm2.up_proj", 3, 20),
    ]
    for r in rows:
        assert r["lut_ms"] > 0 and r["dense_fp32_ms"] > 0 and r["packed_bytes"] < r["dense_bf16_bytes"] / 4
    assert (tmp_path / "lut_linear_cpu.md").read_text().count("smollm2.up_proj") == 2
    assert json.loads((tmp_path / "lut_linear_cpu.json").read_text())["command"]


def test_bench_lut_rejects_unknown_shapes(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="unknown shape"):
        main(["bench", "lut", "--shapes", "gpt5.q_proj", "--out", str(tmp_path)])
