"""Bodies of the 2-rank gloo tests (run in spawned processes by test_distributed.py)."""

import os

import torch
import torch.distributed as dist

import edkm


def init(rank: int, world: int, port: int, timeout_s: int = 60) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def weight_and_centroids():
    # About 160 distinct values: uint8 indices dominate what the store keeps, as at scale.
    g = torch.Generator().manual_seed(0)
    w = ((torch.randn(512, 256, generator=g) * 0.02 / 1e-3).round() * 1e-3).bfloat16()
    c = torch.linspace(-0.05, 0.05, 8).view(1, 8)
    return w, c


def sharded_gradients(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    try:
        w, c = weight_and_centroids()
        w = w.requires_grad_()
        with edkm.saved_tensors(offload=True, uniquify=True, shard_group=dist.group.WORLD) as store:
            clustered = edkm.dkm_reference(w, c, 1e-4, 3).clustered
        counters = store.counters()
        clustered.float().square().sum().backward()
        torch.save({"grad": w.grad, "clustered": clustered.detach(), "counters": counters}, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def disagreeing_ranks(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    try:
        w, c = weight_and_centroids()
        w = (w + rank * 0.01).requires_grad_()  # every rank a different weight
        try:
            with edkm.saved_tensors(offload=True, shard_group=dist.group.WORLD):
                edkm.dkm_reference(w, c, 1e-4, 3)
            message = "no error"
        except RuntimeError as e:
            message = str(e)
        torch.save({"message": message}, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


class ClusteredLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(16, 32, dtype=torch.float64) * 0.2)
        self.register_buffer("centroids", torch.linspace(-0.3, 0.3, 8, dtype=torch.float64).view(1, 8))

    def forward(self, x):
        clustered = edkm.dkm(self.weight, self.centroids, 1e-3, 3).clustered
        return x @ clustered.t(), clustered


def batch():
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def ddp_dkm(rank: int, world: int, port: int, path: str) -> None:
    """DDP over a layer whose weight dkm clusters; each rank sees half the batch."""
    init(rank, world, port)
    try:
        model = torch.nn.parallel.DistributedDataParallel(ClusteredLinear())
        x = batch()
        y, clustered = model(x.chunk(world)[rank])
        # Mean over the full batch: DDP averages the ranks' gradients.
        (y.square().sum() * world / x.shape[0]).backward()
        torch.save({"grad": model.module.weight.grad, "clustered": clustered.detach()}, path)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def fsdp2_dkm(rank: int, world: int, port: int, path: str) -> None:
    """FSDP2 (fully_shard) over the same layer: the weight is sharded between steps and
    all-gathered for the forward, where dkm clusters it."""
    init(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = ClusteredLinear()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        x = batch()
        y, clustered = model(x.chunk(world)[rank])
        (y.square().sum() * world / x.shape[0]).backward()
        torch.save({"grad": model.weight.grad.full_tensor(), "clustered": clustered.detach()}, path)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def sharded_weight():
    """A [12, 300] bf16 weight with repeats, 3 LUT groups of 4 rows, and an upstream gradient."""
    g = torch.Generator().manual_seed(3)
    w = ((torch.randn(12, 300, generator=g) * 8).round() / 256).bfloat16()
    c = torch.stack([torch.linspace(-0.03, 0.03, 8) + 0.001 * i for i in range(3)])
    up = torch.randn(12, 300, generator=g).bfloat16()
    return w, c, up


# Element ranges per rank: deliberately not on group boundaries (group = 1200 elements).
SHARD_BOUNDS = [(0, 1700), (1700, 3600)]


def sharded_dkm_worker(rank: int, world: int, port: int, out: str) -> None:
    from edkm.distributed import sharded_dkm

    init(rank, world, port)
    try:
        w, c, up = sharded_weight()
        lo, hi = SHARD_BOUNDS[rank]
        shard = w.reshape(-1)[lo:hi].clone().requires_grad_()
        cent = c.clone().requires_grad_()
        out_shard, c_out, iters = sharded_dkm(shard, cent, 5e-5, 3, offset=lo, group_numel=w.numel() // 3)
        # the loss of the whole weight is the sum of the ranks' parts
        loss = (out_shard.float() * up.reshape(-1)[lo:hi].float()).sum() + c_out.square().sum() / world
        loss.backward()
        torch.save(
            {
                "clustered": out_shard.detach(),
                "centroids": c_out.detach(),
                "grad": shard.grad,
                "grad_c": cent.grad,
                "iterations": int(iters),
            },
            out,
        )
    finally:
        dist.barrier()
        dist.destroy_process_group()


def dying_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 dies between forward (pack) and backward (unpack all-gathers): rank 0 must get a
    clear error within the group's timeout, not hang."""
    import time

    init(rank, world, port, timeout_s=10)
    w, c = weight_and_centroids()
    w = w.requires_grad_()
    with edkm.saved_tensors(offload=True, uniquify=True, shard_group=dist.group.WORLD):
        clustered = edkm.dkm_reference(w, c, 1e-4, 3).clustered
    if rank == 1:
        os._exit(0)
    t0 = time.monotonic()
    try:
        clustered.float().square().sum().backward()
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    torch.save({"message": message, "seconds": time.monotonic() - t0}, out)
    os._exit(0)  # the group is broken: skip its teardown
