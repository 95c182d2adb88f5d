"""2 ranks with gloo on CPU (spawned processes, bounded time): the sharded store gives the
single-process gradients, disagreeing ranks get a clear error, and DDP and FSDP2 over dkm
match a single-process run."""
import os
import socket
import sys

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
    return [torch.load(p) for p in paths]


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
