"""edkm bench coreml: the logic that needs neither coremltools nor its environment (no network).

The option mapping and argument checks, the float64 oracles of both maps (edkm's and a
transcription of coremltools' loop) on tiny tensors, the comparison helpers, the environment's
key, and the report table.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import edkm
from edkm import coreml_env
from benchmarks import coreml
from edkm.cli import build_parser


def _tiny(seed=0, n=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    w[0, :3] = w[1, 2]  # repeated values
    c = torch.tensor([-0.8, -0.3, 0.2, 0.9], dtype=torch.float64)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return w, c, grad


def _args(**kw):
    p = argparse.ArgumentParser()
    coreml.add_arguments(p)
    a = p.parse_args([])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_config_maps_k_iters_temperature():
    cfg = coreml.coreml_config(8, 3, 1e-5)
    assert cfg["n_bits"] == 3 and cfg["cluster_dim"] == 1
    assert cfg["kmeans_max_iter"] == 3 and cfg["palett_tau"] == 1e-5
    assert cfg["quantize_activations"] is False and cfg["palett_mode"] == "dkm"
    # the defaults that would change the map are off, early stop never fires
    assert cfg["prune_threshold"] == 0.0 and cfg["zero_threshold"] == 0.0
    assert cfg["palett_epsilon"] < 0 and cfg["granularity"] == "per_tensor" and cfg["group_size"] is None
    # every value has the type coremltools' attrs validators ask for
    for key in (
        "palett_tau",
        "palett_epsilon",
        "prune_threshold",
        "zero_threshold",
        "palett_cluster_tol",
        "palett_max_mem",
    ):
        assert isinstance(cfg[key], float), key
    assert isinstance(cfg["kmeans_max_iter"], int) and isinstance(cfg["n_bits"], int)
    opt = coreml.coreml_edkm_options_config(8, 3, 1e-5)
    assert opt["palett_max_mem"] < 1.0 and opt["palett_unique"] is True
    assert coreml.coreml_config(256, 1, 0.5)["n_bits"] == 8


@pytest.mark.parametrize(
    "k,iters,tau", [(6, 3, 1e-5), (1, 3, 1e-5), (8, 0, 1e-5), (8, 3, 0.0), (8, 3, float("nan")), (8, 3, -1.0)]
)
def test_config_rejects_bad_values(k, iters, tau):
    with pytest.raises(ValueError):
        coreml.coreml_config(k, iters, tau)


def test_check_args():
    assert coreml.check_args(_args())["n_bits"] == 3
    for bad in (
        dict(repeats=0),
        dict(k=12),
        dict(dtypes="float16"),
        dict(dtypes=""),
        dict(size=(2, 2), k=8),
        dict(coreml_torch="2.7.0; rm"),
        dict(timeout=0),
    ):
        with pytest.raises(ValueError):
            coreml.check_args(_args(**bad))
    assert coreml.parse_dtypes("float32, bfloat16,float32") == ["float32", "bfloat16"]


def test_cli_registers_the_subcommand():
    args = build_parser().parse_args(["bench", "coreml", "--size", "64x32", "--k", "4", "--dtypes", "float32"])
    assert args.run is coreml.main and args.size == (64, 32) and args.k == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "coreml", "--size", "64by32"])


@pytest.mark.parametrize("iters", [1, 3])
def test_oracle_recompute_is_edkm_dkm(iters):
    w, c, grad = _tiny()
    tau = 0.05
    ex = coreml.dkm_oracle(w, c, tau, iters, "recompute", grad)
    wi = w.clone().requires_grad_()
    out = edkm.dkm(wi, c.view(1, -1), tau, iters, 0.0, "squared")
    out.clustered.backward(grad)
    torch.testing.assert_close(out.clustered, ex["soft"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.centroids.flatten(), ex["centroids"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wi.grad, ex["grad"], rtol=1e-9, atol=1e-10)
    assert torch.equal(edkm.assign(w, out.centroids).long(), ex["hard"])


@pytest.mark.parametrize("iters", [1, 3])
def test_oracle_last_is_the_coremltools_loop(iters):
    w, c, grad = _tiny(seed=2)
    tau = 0.05
    ex = coreml.dkm_oracle(w, c, tau, iters, "last", grad)
    wi = w.clone().requires_grad_()
    soft, cent = coreml.coreml_dkm_transcription(wi, c, tau, iters)
    soft.backward(grad)
    torch.testing.assert_close(soft, ex["soft"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cent, ex["centroids"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wi.grad, ex["grad"], rtol=1e-9, atol=1e-10)
    # same centroids as edkm's map; a different output unless the centroids have converged
    rec = coreml.dkm_oracle(w, c, tau, iters, "recompute")
    torch.testing.assert_close(rec["centroids"], ex["centroids"], rtol=0, atol=0)
    assert not torch.allclose(rec["soft"], ex["soft"])


def test_transcription_defaults_change_the_map():
    """The coremltools defaults mapped off (prune_threshold, zero_threshold) do change the result."""
    w, c, _ = _tiny()
    base, _ = coreml.coreml_dkm_transcription(w, c, 0.05, 3)
    pruned, _ = coreml.coreml_dkm_transcription(w, c, 0.05, 3, prune_threshold=1e-2)
    clamped, _ = coreml.coreml_dkm_transcription(w, c, 0.05, 3, zero_threshold=1e-2)
    assert not torch.allclose(base, pruned) and not torch.allclose(base, clamped)


def test_oracle_argument_checks():
    w, c, _ = _tiny()
    with pytest.raises(ValueError):
        coreml.dkm_oracle(w, c, 0.1, 3, "middle")
    with pytest.raises(ValueError):
        coreml.dkm_oracle(w, c, 0.1, 0)


def test_compare_and_index_agreement():
    b = torch.tensor([3.0, -4.0])
    r = coreml.compare(b + torch.tensor([0.0, 0.5]), b)
    assert r["rel_l2"] == pytest.approx(0.1) and r["max_abs"] == 0.5 and r["rel_max"] == pytest.approx(0.125)
    assert coreml.compare(b, b)["rel_l2"] == 0.0
    assert coreml.compare(torch.zeros(2), torch.zeros(2))["rel_l2"] == 0.0
    with pytest.raises(ValueError):
        coreml.compare(b, b[:1])
    a = coreml.index_agreement(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3], dtype=torch.uint8))
    assert a == {"same": 3, "total": 4, "fraction_same": 0.75}
    with pytest.raises(ValueError):
        coreml.index_agreement(torch.zeros(2), torch.zeros(3))


def test_make_inputs_same_matrix_in_both_dtypes(tmp_path):
    coreml.make_inputs((16, 32), 8, "bfloat16", str(tmp_path / "b"))
    coreml.make_inputs((16, 32), 8, "float32", str(tmp_path / "f"))
    load = lambda d, n: torch.load(str(tmp_path / d / (n + ".pt")), weights_only=True)
    wb, wf = load("b", "weight"), load("f", "weight")
    assert wb.dtype == torch.bfloat16 and wf.dtype == torch.float32
    assert torch.equal(wb.float(), wf)
    c = load("b", "centroids")
    assert torch.equal(c, load("f", "centroids")) and c.numel() == 8
    assert torch.equal(c.bfloat16().float(), c) and bool((c[1:] > c[:-1]).all())


def test_agreement_on_written_outputs(tmp_path):
    """agreement() reads both sides' files; an exact side agrees with its own map to rounding."""
    inputs = str(tmp_path / "in")
    coreml.make_inputs((8, 16), 4, "float32", inputs)
    w = torch.load(os.path.join(inputs, "weight.pt"), weights_only=True)
    c = torch.load(os.path.join(inputs, "centroids.pt"), weights_only=True)
    g = torch.load(os.path.join(inputs, "grad.pt"), weights_only=True)
    tau = 1e-3
    for side, final in (("ours", "recompute"), ("theirs", "last")):
        ex = coreml.dkm_oracle(w, c, tau, 2, final, g)
        d = tmp_path / side
        d.mkdir()
        for name, t in (
            ("clustered", ex["soft"]),
            ("centroids", ex["centroids"]),
            ("grad", ex["grad"]),
            ("hard", ex["centroids"][ex["hard"]]),
            ("labels", ex["hard"].flatten()),
        ):
            torch.save(t.float() if t.is_floating_point() else t, str(d / (name + ".pt")))
    ag = coreml.agreement(inputs, str(tmp_path / "ours"), str(tmp_path / "theirs"), tau, 2)
    for side in ("edkm", "coremltools"):
        assert ag[side]["soft_vs_exact"]["rel_l2"] < 1e-6
        assert ag[side]["grad_vs_exact"]["rel_l2"] < 1e-6
        assert ag[side]["labels_vs_exact"]["fraction_same"] == 1.0
    assert ag["coremltools_vs_edkm"]["labels"]["fraction_same"] == 1.0
    assert ag["coremltools_vs_edkm"]["centroids"]["rel_l2"] < 1e-6
    # theirs missing: only ours is compared
    ag = coreml.agreement(inputs, str(tmp_path / "ours"), None, tau, 2)
    assert "coremltools" not in ag and "coremltools_vs_edkm" not in ag


def test_env_key_and_path(tmp_path):
    reqs = coreml_env.requirements("9.0", "2.7.0", "2.2.6")
    assert reqs == ["coremltools==9.0", "torch==2.7.0", "numpy==2.2.6"]
    p = coreml_env.env_path(reqs, "py311", str(tmp_path))
    assert p.startswith(str(tmp_path)) and os.path.basename(p).startswith("coreml-env-py311-")
    assert p == coreml_env.env_path(list(reqs), "py311", str(tmp_path))
    assert p != coreml_env.env_path(coreml_env.requirements("9.0", "2.6.0", "2.2.6"), "py311", str(tmp_path))
    assert p != coreml_env.env_path(reqs, "py312", str(tmp_path))
    assert not coreml_env.is_ready(p)
    for bad in ("", "2.7.0 ", ">=2.7", "2.7;x"):
        with pytest.raises(ValueError):
            coreml_env.requirements(torch_version=bad)


def test_env_failure_is_reported_not_raised(tmp_path):
    """A base Python that cannot create a venv: the first step's command and output come back."""
    reqs = coreml_env.requirements()
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -c ]; then echo py311; exit 0; fi\necho 'no venv here' >&2\nexit 3\n")
    fake.chmod(0o755)
    info = coreml_env.ensure(reqs, base_python=str(fake), cache=str(tmp_path / "cache"))
    assert "error" in info and "exited with 3" in info["error"] and "no venv here" in info["error"]
    assert info["steps"][0]["returncode"] == 3 and not coreml_env.is_ready(info["path"])


def test_side_script_reports_errors_as_json(tmp_path):
    """_coreml_side.py runs by path without edkm; without coremltools it writes the error."""
    req = {
        "mode": "baseline",
        "variant": "coremltools",
        "inputs": str(tmp_path),
        "config": {},
        "repeats": 1,
        "result": str(tmp_path / "r.json"),
    }
    (tmp_path / "req.json").write_text(json.dumps(req))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, coreml._SIDE_SCRIPT, str(tmp_path / "req.json")], check=True, env=env, timeout=300)
    r = json.loads((tmp_path / "r.json").read_text())
    assert "error" in r  # no coremltools (or no inputs) here: reported, not raised


def test_table_renders_a_failed_side():
    report = {
        "size": "4x4",
        "k": 4,
        "n_bits": 2,
        "iterations": 1,
        "temperature": 1e-3,
        "device": "cpu",
        "date": "d",
        "command": "c",
        "machine": {},
        "environments": {
            "edkm": {"edkm": "0", "torch": "t", "torch_threads": 2},
            "coremltools": {"error": "pip failed"},
        },
        "mapping": [{"coremltools": "n_bits", "value": "2", "edkm": "K=4"}],
        "cases": {
            "float32": {
                "variants": {
                    "edkm": {
                        "median_seconds": 0.001,
                        "seconds": [0.001],
                        "median_cpu_seconds": 0.002,
                        "peak_rss_above_inputs_bytes": 2**20,
                    },
                    "coremltools": {"error": "environment: pip failed"},
                },
                "agreement": {
                    "exact_maps_coremltools_vs_edkm": {"soft": {"rel_l2": 0.1}, "grad": {"rel_l2": 0.2}},
                    "edkm": {
                        k: {"rel_l2": 0.0}
                        for k in ("soft_vs_exact", "centroids_vs_exact", "grad_vs_exact", "hard_vs_exact")
                    }
                    | {"labels_vs_exact": {"fraction_same": 1.0}},
                },
            }
        },
    }
    text = coreml.table(report)
    assert "could not be set up" in text and "| float32 | coremltools | failed |" in text
    assert "environment: pip failed" in text and "| `n_bits` |" in text


def test_raised_in_names_the_innermost_coremltools_frame():
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/x/site-packages/coremltools/optimize/torch/palettization/fake_palettize.py", line 613, in forward\n'
        '  File "/x/site-packages/coremltools/optimize/torch/palettization/_fake_palettizer_tensor_hook.py", '
        "line 62, in __init__\n"
        '  File "/x/site-packages/torch/cuda/__init__.py", line 372, in _lazy_init\n'
        "RuntimeError: Found no NVIDIA driver\n"
    )
    where = coreml._raised_in(tb)
    assert "_fake_palettizer_tensor_hook.py:62" in where and "__init__" in where
    assert coreml._raised_in("no frames") == ""
