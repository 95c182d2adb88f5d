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


@contextlib.contextmanager
def saved_tensors(
    offload: bool = True,
    dedup: bool = True,
    uniquify: bool = False,
    keep_parameters: bool = True,
    store: SavedTensorStore | None = None,
) -> Iterator[SavedTensorStore]:
    """Route every tensor autograd saves inside the block through a SavedTensorStore.

    offload: copy to host memory at pack (pinned, non-blocking from CUDA), back at unpack.
    dedup: one copy per (storage, version); views of it are recorded as geometry.
    uniquify: keep distinct values (or rows of the last dimension) plus the narrowest index
        (uint8 / int16 / int32), when that is smaller; bit-exact.
    keep_parameters: leaves that require grad (parameters) are referenced, not copied.
    store: an existing store to add to (its options win).
    Yields the store; ``store.counters()`` reports bytes on device and host and bytes avoided.
    """
    if store is None:
        store = SavedTensorStore(offload=offload, dedup=dedup, uniquify=uniquify,
                                 keep_parameters=keep_parameters)

    def pack(t: torch.Tensor) -> _Handle:
        return _Handle(store, store.pack(t))

    def unpack(h: _Handle) -> torch.Tensor:
        return store.unpack(h.handle)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield store
