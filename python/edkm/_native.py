"""Loads libedkm (the op library shared with C++ users) and the pybind11 module."""

from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _library_path() -> str:
    override = os.environ.get("EDKM_LIBRARY")
    if override:
        return override
    found = sorted(glob.glob(os.path.join(_HERE, "lib", "libedkm.so*")))
    if not found:
        raise ImportError(
            "edkm: the native library was not built (no python/edkm/lib/libedkm.so). "
            "Run `make build` or `pip install --no-build-isolation -e .` first."
        )
    return found[0]


torch.ops.load_library(_library_path())

from edkm import _C  # noqa: E402  (needs libedkm loaded first)

cuda_compiled = _C.cuda_compiled
