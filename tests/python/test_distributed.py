"""2 ranks with gloo on CPU (spawned processes, bounded time): the sharded store gives the
single-process gradients, disagreeing ranks get a clear error, and DDP and FSDP2 over dkm
match a single-process run."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers
import edkm
from conftest import rel_error

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, tmp_path):
    port = free_port()
    paths = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(r, WORLD, port, paths[r])) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"{fn.__name__}: a rank did not finish within 120 s")
        assert p.exitcode == 0, f"{fn.__name__}: a rank exited with {p.exitcode}"
    return [torch.load(p) if os.path.exists(p) else None for p in paths]


@pytest.fixture(autouse=True)
def importable_workers(monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    python_dir = os.path.join(here, "..", "..", "python")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, python_dir, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(here)


@pytest.mark.slow
def test_sharded_store_gives_single_process_gradients(tmp_path):
    results = run_ranks(dist_workers.sharded_gradients, tmp_path)
    w, c = dist_workers.weight_and_centroids()
    w = w.requires_grad_()
    clustered = edkm.dkm_reference(w, c, 1e-4, 3).clustered
    clustered.float().square().sum().backward()
    for r in results:
        assert torch.equal(r["grad"], w.grad)
        assert torch.equal(r["clustered"], clustered.detach())
        assert r["counters"]["shard_bytes_avoided"] > 0
    # Each rank kept about half of what an unsharded store keeps.
    with edkm.saved_tensors(offload=True, uniquify=True) as alone:
        out = edkm.dkm_reference(w, c, 1e-4, 3)
    whole = alone.counters()["host_bytes"]
    assert results[0]["counters"]["host_bytes"] < 0.75 * whole
    del out


@pytest.mark.slow
def test_disagreeing_ranks_get_a_clear_error(tmp_path):
    for r in run_ranks(dist_workers.disagreeing_ranks, tmp_path):
        assert "ranks saved different tensors" in r["message"]


@pytest.mark.slow
@pytest.mark.parametrize("worker", ["ddp_dkm", "fsdp2_dkm"], ids=["DDP", "FSDP2"])
def test_data_parallel_dkm_matches_single_process(worker, tmp_path):
    results = run_ranks(getattr(dist_workers, worker), tmp_path)
    model = dist_workers.ClusteredLinear()
    x = dist_workers.batch()
    y, clustered = model(x)
    (y.square().sum() / x.shape[0]).backward()
    for r in results:
        # Float64: only the order of the all-reduce's sums differs.
        assert rel_error(r["grad"], model.weight.grad) <= 1e-12
        assert torch.equal(r["clustered"], clustered.detach())


def test_shard_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="shard_group needs torch.distributed"):
        with edkm.saved_tensors(shard_group=object()):
            pass


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (same sign assumed; 0 when equal)."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    return (ia - ib).abs()


def test_sharded_dkm_all_reduces_statistics_and_matches_the_gathered_weight(tmp_path):
    """DESIGN.md section 4: each rank holds part of the weight (not on group boundaries); the
    U-domain tables are all-reduced; results equal edkm.dkm on the whole weight."""
    results = run_ranks(dist_workers.sharded_dkm_worker, tmp_path)
    w, c, up = dist_workers.sharded_weight()
    w = w.requires_grad_()
    cent = c.clone().requires_grad_()
    ref = edkm.dkm(w, cent, 5e-5, 3)
    ((ref.clustered.float() * up.float()).sum() + ref.centroids.square().sum()).backward()
    flat_out, flat_grad = ref.clustered.detach().reshape(-1), w.grad.reshape(-1)
    for rank, r in enumerate(results):
        lo, hi = dist_workers.SHARD_BOUNDS[rank]
        assert torch.equal(r["clustered"], flat_out[lo:hi])
        assert rel_error(r["centroids"], ref.centroids) < 1e-6
        assert r["iterations"] == int(ref.iterations)
        # float32 sums in another order: equal, or one bf16 ulp apart on a few elements
        ulps = _ulps_apart(r["grad"], flat_grad[lo:hi])
        assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.01
        assert rel_error(r["grad_c"], cent.grad) < 1e-5


def test_a_rank_that_dies_before_unpack_gives_the_others_a_clear_error(tmp_path):
    results = run_ranks(dist_workers.dying_rank, tmp_path)
    r = results[0]
    assert "all-gather across the shard group failed" in r["message"], r["message"]
    assert r["seconds"] < 60
