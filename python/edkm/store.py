"""The saved-tensor store as a context manager: everything autograd saves while it is active
goes through edkm's C++ SavedTensorStore (offload to host, dedup, uniquify).

    with edkm.saved_tensors(offload=True, uniquify=True) as store:
        loss = model(x)
    loss.backward()
    print(store.counters())
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from edkm import _native

SavedTensorStore = _native._C.SavedTensorStore


class _Handle:
    """What autograd keeps in place of a saved tensor; frees its copy when the graph drops it."""

    __slots__ = ("store", "handle", "__weakref__")

    def __init__(self, store: SavedTensorStore, handle: int):
        self.store = store
        self.handle = handle

    def __del__(self):
        try:
            self.store.release(self.handle)
        except Exception:  # interpreter shutdown: nothing left to free
            pass


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """all_gather on the device the group's backend wants (NCCL: the current GPU), results
    back where `t` was."""
    import torch.distributed as dist

    home = t.device
    if dist.get_backend(group) == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, t, group=group)
    except RuntimeError as e:  # torch.distributed.DistBackendError included
        raise RuntimeError(
            "saved_tensors: all-gather across the shard group failed (a rank died, left or timed "
            f"out; the process group's timeout bounds the wait): {e}"
        ) from e
    return [p.to(home) for p in parts]


def _shard_after_pack(store: SavedTensorStore, handle: int, group) -> None:
    """Check every rank saved the same thing, then keep this rank's 1/L of it."""
    import torch.distributed as dist

    mine = store.fingerprint(handle)
    everyone = _all_gather(mine, group)
    if any(not torch.equal(other, mine) for other in everyone):
        store.release(handle)
        described = ", ".join(
            f"rank {r}: {'n/a' if not int(f[0]) else f'{int(f[1])} elements x {int(f[2])} bytes, hash {int(f[3])}'}"
            for r, f in enumerate(everyone)
        )
        raise RuntimeError(
            "saved_tensors(shard_group=...): ranks saved different tensors, so none can be sharded "
            f"({described}). Shard only computations that are identical on every rank (e.g. "
            "clustering replicated weights), not activations."
        )
    if int(mine[0]):
        store.shard(handle, dist.get_rank(group), dist.get_world_size(group))


@contextlib.contextmanager
def saved_tensors(
    offload: bool = True,
    dedup: bool = True,
    uniquify: bool = False,
    keep_parameters: bool = True,
    shard_group=None,
    store: SavedTensorStore | None = None,
) -> Iterator[SavedTensorStore]:
    """Route every tensor autograd saves inside the block through a SavedTensorStore.

    offload: copy to host memory at pack (pinned, non-blocking from CUDA), back at unpack.
    dedup: one copy per (storage, version); views of it are recorded as geometry.
    uniquify: keep distinct values (or rows of the last dimension) plus the narrowest index
        (uint8 / int16 / int32), when that is smaller; bit-exact.
    keep_parameters: leaves that require grad (parameters) are referenced, not copied.
    shard_group: a torch.distributed process group whose ranks all save the same tensors in
        this block (e.g. clustering replicated weights): each rank keeps 1/L of every copy
        (the index of a uniquified one, else its bytes) and unpack all-gathers it. Ranks that
        saved different tensors fail with a clear error. Pack and unpack become collectives:
        every rank must run the same forward and backward.
    store: an existing store to add to (its options win).
    Yields the store; ``store.counters()`` reports bytes on device and host and bytes avoided.
    """
    if shard_group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "saved_tensors: shard_group needs torch.distributed to be initialized "
                "(torch.distributed.init_process_group)"
            )
    if store is None:
        store = SavedTensorStore(offload=offload, dedup=dedup, uniquify=uniquify, keep_parameters=keep_parameters)

    def pack(t: torch.Tensor) -> _Handle:
        handle = _Handle(store, store.pack(t))
        if shard_group is not None:
            _shard_after_pack(store, handle.handle, shard_group)
        return handle

    def unpack(h: _Handle) -> torch.Tensor:
        if store.is_sharded(h.handle):
            part = store.shard_part(h.handle)
            # As bytes: backends (gloo) do not all-gather every dtype (int16, bfloat16).
            parts = _all_gather(part.view(torch.uint8), shard_group)
            store.unshard(h.handle, torch.cat(parts).view(part.dtype))
        return store.unpack(h.handle)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield store
