"""edkm bench ndomain: runs the three variants in fresh processes and writes its results."""

import argparse
import json

import pytest

from edkm import _C
from benchmarks import ndomain


@pytest.mark.skipif(not _C.simd_attention_available(), reason="this CPU has no AVX2/FMA")
def test_small_run_writes_results(tmp_path):
    p = argparse.ArgumentParser()
    ndomain.add_arguments(p)
    args = p.parse_args(["--case", "64x96:16", "--dtype", "bfloat16", "--repeats", "1", "--out", str(tmp_path)])
    report = ndomain.run(args)
    [row] = report["cases"]
    assert row["case"] == "64x96:16" and row["dtype"] == "bfloat16" and row["weights_per_lut"] == 1536
    for v in ndomain.VARIANTS:
        assert row[v]["median_seconds"] > 0
    assert row["scalar_ratio"] > 0 and row["udomain_ratio"] > 0 and row["auto"] == "N-domain"
    saved = json.loads((tmp_path / "ndomain_simd_cpu.json").read_text())
    assert saved["cases"][0]["groups"] == 4 and "command" in saved
    assert "| bfloat16 | 64x96:16 | 1,536 |" in (tmp_path / "ndomain_simd_cpu.md").read_text()


def test_bad_dtype_is_one_clear_error():
    with pytest.raises(argparse.ArgumentTypeError, match="--dtype must be one of float32, bfloat16"):
        ndomain._dtype("int8")
