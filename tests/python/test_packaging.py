"""`pip install --no-build-isolation -e .` works (into a scratch prefix, not the environment),
and the command line answers."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.slow
def test_pip_editable_install(tmp_path):
    prefix = tmp_path / "prefix"
    env = dict(os.environ, EDKM_BUILD_DIR=os.path.join(ROOT, "build"), EDKM_BUILD_TESTS="ON")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--prefix",
            str(prefix),
            "-e",
            ROOT,
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (site_dir,) = glob.glob(str(prefix / "lib" / "python3*" / "site-packages"))
    assert os.path.exists(prefix / "bin" / "edkm")
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); import edkm; print(edkm.__file__); "
        "from edkm.cli import main; main(['demo', '--help'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code, site_dir], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == os.path.join(ROOT, "python", "edkm", "__init__.py")
    assert "LLaMA-7B" in run.stdout or "--bits" in run.stdout


def test_cli_bench_dkm_json(tmp_path):
    import json

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edkm",
            "bench",
            "dkm",
            "--size",
            "64x128",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["time_ratio"] > 0 and report["saved_bytes_ratio"] > 1
    assert set(report["variants"]) == {"dkm", "reference"}
    assert os.path.exists(tmp_path / "dkm_cpu_64x128_bfloat16.json")
    assert os.path.exists(tmp_path / "dkm_cpu_64x128_bfloat16.md")


def test_cli_rejects_bad_size():
    run = subprocess.run(
        [sys.executable, "-m", "edkm", "bench", "dkm", "--size", "12"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 2
    assert "--size must look like ROWSxCOLS" in run.stderr


def test_libedkm_uses_the_shared_libstdcxx():
    """A second, static libstdc++ inside libedkm garbles number formatting (seen on a GPU
    machine whose g++ links it statically): libedkm must need the shared one."""
    import shutil

    from edkm import _native

    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run(
        ["readelf", "-d", _native._library_path()], capture_output=True, text=True, check=True
    ).stdout
    assert any("NEEDED" in line and "libstdc++" in line for line in dynamic.splitlines())


@pytest.mark.slow
def test_cli_bench_memory_quick_json(tmp_path):
    import json

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "edkm",
            "bench",
            "memory",
            "--quick",
            "--device",
            "cpu",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["variant"] for r in rows] == ["reference", "M", "M+U", "M+U+S", "dkm"]
    for r in rows:
        assert set(r) == {"variant", "saved_device_bytes", "saved_host_bytes", "peak_bytes", "seconds"}
    kept = {r["variant"]: r["saved_device_bytes"] + r["saved_host_bytes"] for r in rows}
    assert rows[1]["saved_device_bytes"] == 0  # M moved everything to the host
    assert kept["M+U"] < kept["M"] / 4 and kept["M+U+S"] < kept["M+U"] and kept["dkm"] < kept["M+U+S"]
    assert (tmp_path / "memory_cpu_quick.png").stat().st_size > 0


def test_benchmarks_are_not_in_the_package_and_run_from_the_checkout():
    assert not os.path.exists(os.path.join(ROOT, "python", "edkm", "bench"))
    assert not glob.glob(os.path.join(ROOT, "python", "edkm", "*bench*"))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.dkm", "--help"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 0 and "python -m benchmarks.dkm" in run.stdout, run.stderr
