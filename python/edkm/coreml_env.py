"""The isolated Python environments that run coremltools: `edkm bench coreml` (coremltools with
the torch it supports, for its DKMPalettizer) and `edkm export --coreml` (coremltools and numpy
only: the program is built with its MIL builder, no torch needed).

coremltools pins (or was only tested with) an older torch than ours, and edkm's native library
is built against our torch, so their side runs in its own virtual environment, in the same cache
as the project's (`~/.cache/edkm`, override with `EDKM_CACHE`), outside the checkout, keyed by
its requirement lines and the Python version. Like scripts/setup_env.sh: the `.ready` marker is
written last, so an interrupted setup is thrown away and redone, never half-used; a ready one
is reused as is. Every attempt (command, return code, the tail of its output) is recorded, so a
failed install says exactly why.

This module does not import edkm's native library (only the standard library).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

COREMLTOOLS_VERSION = "9.0"
# coremltools 9.0: coremltools/_deps/__init__.py has _TORCH_MAX_VERSION = "2.7.0" (the newest torch
# it was tested with; newer ones only get a warning) and _CT_OPTIMIZE_TORCH_MIN_VERSION = "2.1.0".
COREML_TORCH_VERSION = "2.7.0"
# numpy is pinned so the environment is reproducible (coremltools asks numpy>=1.14.5, torch 2.7
# works with numpy 2).
COREML_NUMPY_VERSION = "2.2.6"


def requirements(
    coremltools_version: str = COREMLTOOLS_VERSION,
    torch_version: str = COREML_TORCH_VERSION,
    numpy_version: str = COREML_NUMPY_VERSION,
) -> list[str]:
    """The pip requirement lines of the environment (the environment's key is built from them)."""
    for name, v in (("coremltools", coremltools_version), ("torch", torch_version), ("numpy", numpy_version)):
        if not v or any(ch.isspace() for ch in v) or any(ch in v for ch in "<>=!;,"):
            raise ValueError(f"{name} version must be a plain version like 2.7.0, got {v!r}")
    return [f"coremltools=={coremltools_version}", f"torch=={torch_version}", f"numpy=={numpy_version}"]


# `edkm export --coreml`: no torch. Every package is pinned (coremltools 9.0 asks protobuf,
# sympy, attrs, cattrs, pyaml, tqdm, packaging without upper bounds).
EXPORT_REQUIREMENTS = [
    "coremltools==9.0",
    "numpy==2.2.6",
    "protobuf==7.36.2",
    "sympy==1.14.0",
    "mpmath==1.3.0",
    "attrs==26.1.0",
    "cattrs==26.2.1",
    "pyaml==26.7.0",
    "PyYAML==6.0.4",
    "tqdm==4.70.1",
    "packaging==26.4",
    "typing_extensions==4.16.0",
]
EXPORT_CHECK = (
    "import json, numpy, coremltools; from coremltools.converters.mil import Builder; "
    "print(json.dumps({'numpy': numpy.__version__, 'coremltools': coremltools.__version__}))"
)


def python_tag(python: str | None = None) -> str:
    if python is None:
        return f"py{sys.version_info[0]}{sys.version_info[1]}"
    out = subprocess.run(
        [python, "-c", "import sys; print(f'py{sys.version_info[0]}{sys.version_info[1]}')"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def cache_dir() -> str:
    return os.environ.get("EDKM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edkm")


def env_key(reqs: list[str], tag: str) -> str:
    return hashlib.sha256(("\n".join(reqs) + "\n" + tag).encode()).hexdigest()[:12]


def env_path(reqs: list[str], tag: str | None = None, cache: str | None = None) -> str:
    tag = tag or python_tag()
    return os.path.join(cache or cache_dir(), f"coreml-env-{tag}-{env_key(reqs, tag)}")


def env_python(path: str) -> str:
    return os.path.join(path, "bin", "python")


def is_ready(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".ready"))


# Run inside the new environment: it must import what the benchmark uses.
_CHECK = (
    "import json, torch, numpy, coremltools; "
    "from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig; "
    "print(json.dumps({'torch': torch.__version__, 'numpy': numpy.__version__, "
    "'coremltools': coremltools.__version__}))"
)


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def ensure(
    reqs: list[str],
    base_python: str | None = None,
    cache: str | None = None,
    log=None,
    check: str = _CHECK,
    who: str = "edkm bench coreml",
) -> dict:
    """Create (once) the environment for `reqs`; return {"path", "python", "created", "steps",
    "versions"} or, when a step fails, the same with "error" (the failing step's message).
    ``check``: Python code run in the environment that prints its versions as JSON."""
    base_python = base_python or sys.executable
    tag = python_tag(base_python)
    path = env_path(reqs, tag, cache)
    info: dict = {
        "path": path,
        "python": env_python(path),
        "requirements": reqs,
        "python_tag": tag,
        "created": False,
        "steps": [],
    }

    def step(argv: list[str]) -> subprocess.CompletedProcess:
        if log:
            log(f"{who}: {' '.join(argv)}")
        r = subprocess.run(argv, capture_output=True, text=True)
        info["steps"].append({"argv": argv, "returncode": r.returncode, "output_tail": _tail(r.stdout + r.stderr)})
        return r

    if not is_ready(path):
        if log:
            log(f"{who}: creating the coremltools environment in {path} (once)")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for argv in (
            [base_python, "-m", "venv", path],
            [env_python(path), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [env_python(path), "-m", "pip", "install", "-q", *reqs],
        ):
            r = step(argv)
            if r.returncode != 0:
                info["error"] = (
                    f"`{' '.join(argv)}` exited with {r.returncode}: {_tail((r.stdout + r.stderr).strip(), 1500)}"
                )
                return info
        info["created"] = True
    r = step([env_python(path), "-c", check])
    if r.returncode != 0:
        info["error"] = f"importing coremltools failed: {_tail((r.stdout + r.stderr).strip(), 1500)}"
        return info
    import json

    info["versions"] = json.loads(r.stdout.strip().splitlines()[-1])
    if not is_ready(path):
        with open(os.path.join(path, ".ready"), "w") as f:
            f.write("\n".join(reqs) + "\n")
    freeze = subprocess.run([env_python(path), "-m", "pip", "freeze"], capture_output=True, text=True)
    info["pip_freeze"] = freeze.stdout.split()
    return info


if __name__ == "__main__":
    res = ensure(requirements(), log=lambda m: print(m, file=sys.stderr))
    print(res.get("error") or res["path"])
