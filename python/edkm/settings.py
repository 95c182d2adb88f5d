"""The kernels' process-wide settings: ``with edkm.settings(...)``, ``edkm.get_settings()``,
``edkm.set_settings(...)``.

| setting | values (default) | what it selects |
|---|---|---|
| ``deterministic_scatter`` | bool (True) | CUDA backward scatter-add: fixed-point integer atomics, the same bits every run; False: float64 atomics (order-dependent rounding) |
| ``fused_udomain`` | bool (True) | CPU U-domain iterations: fused loops; False: the ATen composition every device runs |
| ``fused_udomain_cuda`` | bool (False) | CUDA U-domain iterations: the fused kernels; False: the ATen composition |
| ``privatized_slot_atomics`` | bool (False) | CUDA slot histogram / scatter-add: shared-memory histograms and warp-aggregated atomics |
| ``ndomain`` | "auto", "always", "never" ("auto") | CPU dkm: iterate over each group's weights (N-domain) for small groups, or always / never |
| ``simd_attention`` | bool (True) | CPU attention passes in float32 AVX2 (where the CPU has it); False: scalar float64 loops |

The settings are process-wide (every thread sees them), not thread-local: change them between
training steps, not while another thread runs edkm ops.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Tuple

NDOMAIN_MODES = ("auto", "always", "never")


def _table() -> Dict[str, Tuple[Callable[[], Any], Callable[[Any], None], Any]]:
    from edkm._native import _C as C

    return {
        "deterministic_scatter": (C.deterministic_scatter, C.set_deterministic_scatter, bool),
        "fused_udomain": (C.fused_udomain, C.set_fused_udomain, bool),
        "fused_udomain_cuda": (C.fused_udomain_cuda, C.set_fused_udomain_cuda, bool),
        "privatized_slot_atomics": (C.privatized_slot_atomics, C.set_privatized_slot_atomics, bool),
        "ndomain": (C.ndomain, C.set_ndomain, NDOMAIN_MODES),
        "simd_attention": (C.simd_attention, C.set_simd_attention, bool),
    }


def get_settings() -> Dict[str, Any]:
    """Every setting's current value."""
    return {name: get() for name, (get, _, _) in _table().items()}


def _check(table, changes: Dict[str, Any], who: str) -> None:
    for name, value in changes.items():
        if name not in table:
            raise TypeError(f"{who}: unknown setting {name!r}; the settings are {sorted(table)}")
        kind = table[name][2]
        if kind is bool and not isinstance(value, bool):
            raise TypeError(f"{who}: {name} must be True or False, got {value!r}")
        if isinstance(kind, tuple) and value not in kind:
            raise ValueError(f"{who}: {name} must be one of {kind}, got {value!r}")


def set_settings(**changes) -> Dict[str, Any]:
    """Change settings for good; returns their previous values (``set_settings(**previous)``
    puts them back). Prefer ``with edkm.settings(...)``, which always restores them."""
    table = _table()
    _check(table, changes, "edkm.set_settings")
    previous = {name: table[name][0]() for name in changes}
    for name, value in changes.items():
        table[name][1](value)
    return previous


@contextlib.contextmanager
def settings(**changes) -> Iterator[Dict[str, Any]]:
    """Within the block, the given settings (module doc) take these values; afterwards, whatever
    happens in the block, each is back to the value it had before. Yields the settings in force.
    Also a decorator: ``@edkm.settings(ndomain="never")``."""
    table = _table()
    _check(table, changes, "edkm.settings")
    previous = {name: table[name][0]() for name in changes}
    try:
        for name, value in changes.items():
            table[name][1](value)
        yield get_settings()
    finally:
        for name, value in previous.items():
            table[name][1](value)
