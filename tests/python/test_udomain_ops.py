"""_udomain_forward / _udomain_backward: the U-domain as ops (used by edkm.distributed)."""

import pytest
import torch

import edkm  # noqa: F401
from edkm.distributed import sharded_dkm


def tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 30, generator=g, dtype=torch.float64).sort(1).values
    counts = torch.randint(0, 5, (2, 30), generator=g).double()
    c = torch.linspace(-1, 1, 4, dtype=torch.float64).repeat(2, 1)
    return values, counts, c


def test_opcheck():
    v, n, c = tables()
    fwd = torch.ops.edkm._udomain_forward
    torch.library.opcheck(fwd, (v, n, c, 0.3, 3, 0.0, "squared"))
    c_out, soft, hist, it = fwd(v, n, c, 0.3, 3, 0.0, "squared")
    grad_soft = torch.randn_like(soft)
    torch.library.opcheck(torch.ops.edkm._udomain_backward, (v, n, hist, it, 0.3, "squared", grad_soft, None))
    torch.library.opcheck(
        torch.ops.edkm._udomain_backward, (v, n, hist, it, 0.3, "absolute", grad_soft, torch.randn_like(c))
    )


@pytest.mark.parametrize("distance", ["squared", "absolute"])
def test_tables_reproduce_dkm_on_the_expanded_weight(distance):
    """DKM over (values, counts) equals dkm_reference over the weight with each value repeated."""
    v, n, c = tables(1)
    c_out, soft, hist, it = torch.ops.edkm._udomain_forward(v, n, c, 0.3, 3, 0.0, distance)
    for g in range(2):
        w = torch.repeat_interleave(v[g], n[g].long())
        ref = edkm.dkm_reference(w.view(1, -1), c[g : g + 1], 0.3, 3, 0.0, distance)
        assert torch.allclose(c_out[g], ref.centroids[0], rtol=1e-12, atol=1e-12)
        expected = torch.repeat_interleave(soft[g], n[g].long())
        assert torch.allclose(ref.clustered[0], expected, rtol=1e-12, atol=1e-12)


def test_bad_tables_are_refused():
    v, n, c = tables()
    with pytest.raises(ValueError, match="counts must have values' shape"):
        torch.ops.edkm._udomain_forward(v, n[:, :3], c, 0.3, 3, 0.0, "squared")
    with pytest.raises(TypeError, match="centroids must have values' dtype"):
        torch.ops.edkm._udomain_forward(v, n, c.float(), 0.3, 3, 0.0, "squared")
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.edkm._udomain_forward(v, n, c, 0.0, 3, 0.0, "squared")


def test_sharded_dkm_single_process_equals_dkm_and_checks_arguments():
    g = torch.Generator().manual_seed(0)
    w = ((torch.randn(8, 64, generator=g) * 8).round() / 64).bfloat16().requires_grad_()
    c = torch.linspace(-0.1, 0.1, 4).repeat(2, 1)
    ref = edkm.dkm(w, c, 0.01)
    out = sharded_dkm(w, c, 0.01, offset=0, group_numel=w.numel() // 2)
    assert torch.equal(out[0], ref.clustered)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        sharded_dkm(w.float(), c, 0.01, offset=0, group_numel=256)
    with pytest.raises(ValueError, match="reaches group"):
        sharded_dkm(w, c, 0.01, offset=0, group_numel=100)
    bad = w.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sharded_dkm(bad, c, 0.01, offset=0, group_numel=256)
