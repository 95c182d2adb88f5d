"""Counting what autograd saves for backward, for benchmarks and the demo."""

from __future__ import annotations

import torch


class SavedBytes:
    """Distinct storages autograd saves inside ``with counter.hooks():``.

    Tensors passed as ``exclude`` (the weights: autograd references them, it does not copy)
    are not counted; a storage saved several times (views) counts once.
    """

    def __init__(self, *exclude: torch.Tensor):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self._exclude:
            self._storages[s.data_ptr()] = s.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())
