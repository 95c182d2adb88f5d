"""edkm bench step: a small decoder-layer training step, plain vs clustered, on CPU."""

import argparse
import json

import pytest

from benchmarks import step
from benchmarks.peak_memory import peak_bytes


def parse(*argv):
    p = argparse.ArgumentParser()
    step.add_arguments(p)
    return p.parse_args(list(argv))


def test_small_run_writes_results_and_orders_the_variants_by_memory(tmp_path):
    args = parse(
        "--device",
        "cpu",
        "--hidden",
        "256",
        "--intermediate",
        "688",
        "--heads",
        "4",
        "--tokens",
        "64",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    )
    report = step.run(args)
    ts = report["training_step"]
    assert set(ts) == {"plain", "dkm_linear", "dkm+linear", "palettize_"}
    for r in ts.values():
        assert r["seconds"] > 0 and r["peak_bytes"] > 0
    # F.linear after dkm saves the clustered weight; dkm_linear rebuilds it: less memory.
    assert ts["dkm_linear"]["peak_bytes"] < ts["dkm+linear"]["peak_bytes"]
    saved = json.loads((tmp_path / "step_cpu_256x688_t64.json").read_text())
    assert saved["hidden"] == 256 and "command" in saved
    assert "| dkm_linear |" in (tmp_path / "step_cpu_256x688_t64.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--hidden", "100", "--heads", "8"], "multiple of --heads"),
        (["--tokens", "-1"], "--tokens must be >= 1"),
        (["--hidden", "0"], "--hidden must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        step.run(parse("--device", "cpu", "--out", str(tmp_path), *argv))


def test_peak_bytes_counts_tensors_alive_together():
    import torch

    def work():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
        c = torch.empty(1 << 19, dtype=torch.uint8)
        return b, c

    assert peak_bytes(work, "cpu") == 3 << 20
