"""Writing benchmark results: atomically (temp file + rename), with the command and machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import tempfile

import torch


def default_results_dir() -> str:
    """benchmarks/results of this checkout."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# How the running benchmark was invoked: `edkm bench NAME ...` by default; run_module sets
# `python -m benchmarks.NAME` when it runs one directly.
COMMAND_PREFIX = ["python", "-m", "edkm"]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in COMMAND_PREFIX + sys.argv[1:])


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stamp() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(),
    }


def write_json(path: str, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
