"""edkm.settings / get_settings / set_settings: values take effect in the block and come back
afterwards whatever happens; bad names and values get one clear error and change nothing."""

import pytest
import torch

import edkm
from edkm import _C

DEFAULTS = {
    "deterministic_scatter": True,
    "fused_udomain": True,
    "fused_udomain_cuda": False,
    "privatized_slot_atomics": False,
    "ndomain": "auto",
    "simd_attention": True,
}


def test_defaults_and_getters_agree():
    s = edkm.get_settings()
    assert s == DEFAULTS
    assert (s["ndomain"], s["fused_udomain"], s["deterministic_scatter"]) == (
        _C.ndomain(),
        _C.fused_udomain(),
        _C.deterministic_scatter(),
    )


def test_block_sets_and_restores_even_on_error():
    with pytest.raises(RuntimeError, match="inside"):
        with edkm.settings(ndomain="never", fused_udomain=False) as now:
            assert now["ndomain"] == "never" and not now["fused_udomain"]
            assert _C.ndomain() == "never" and not _C.fused_udomain()
            raise RuntimeError("inside")
    assert edkm.get_settings() == DEFAULTS


def test_nested_blocks_restore_in_order():
    with edkm.settings(ndomain="always"):
        with edkm.settings(ndomain="never", simd_attention=False):
            assert _C.ndomain() == "never" and not _C.simd_attention()
        assert _C.ndomain() == "always" and _C.simd_attention()
    assert edkm.get_settings() == DEFAULTS


def test_decorator_and_set_settings():
    @edkm.settings(ndomain="never")
    def inside():
        return _C.ndomain()

    assert inside() == "never" and _C.ndomain() == "auto"
    previous = edkm.set_settings(deterministic_scatter=False)
    try:
        assert previous == {"deterministic_scatter": True} and not _C.deterministic_scatter()
    finally:
        edkm.set_settings(**previous)
    assert edkm.get_settings() == DEFAULTS


def test_a_setting_changes_what_runs():
    """ndomain='never' makes dkm keep the U-domain tables for backward, 'always' only the history
    (the switch is real, not only a stored value)."""
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    c = torch.linspace(-1, 1, 4, dtype=torch.float64).view(1, 4)
    counts = {}
    for mode in ("never", "always"):
        saved = []
        with (
            edkm.settings(ndomain=mode),
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t),
        ):
            edkm.dkm(w, c, 0.1, 2)
        counts[mode] = sum(saved)
    assert counts["never"] != counts["always"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"fused": True}, TypeError, "unknown setting 'fused'; the settings are"),
        ({"fused_udomain": 1}, TypeError, "fused_udomain must be True or False, got 1"),
        ({"ndomain": "sometimes"}, ValueError, "ndomain must be one of"),
    ],
)
def test_bad_settings_change_nothing(kwargs, error, message):
    with pytest.raises(error, match=message):
        with edkm.settings(simd_attention=False, **kwargs):
            pass
    with pytest.raises(error, match=message):
        edkm.set_settings(simd_attention=False, **kwargs)
    assert edkm.get_settings() == DEFAULTS
