"""DKM of a weight sharded across ranks, without gathering it (docs/DESIGN.md section 4).

The U-domain statistics are additive. Each rank builds the slot histogram of its own shard of a
16-bit weight ([G, 65536] counts), the histograms are all-reduced, and every rank then runs the
same U-domain iterations on the same tables and gathers the soft values for its own shard only.
Backward mirrors it: each rank scatter-adds its upstream gradient into [G, 65536] slots, the
tables are all-reduced, the U-domain backward runs on every rank, and each rank writes the
gradient of its own elements. Traffic per call: two all-reduces of G x 65536 values (float64
counts, float32 gradients), whatever the weight's size; nothing N-sized is saved.

The result equals :func:`edkm.dkm` on the gathered weight (up to float32 summation order).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

_PATTERNS = 1 << 16
_16BIT = (torch.bfloat16, torch.float16)


def _keys(shard: torch.Tensor, offset: int, group_numel: int) -> torch.Tensor:
    """group * 65536 + bit pattern, for every element of the shard (int64)."""
    flat = shard.detach().reshape(-1)
    bits = flat.view(torch.int16).to(torch.int64) & 0xFFFF
    group = (torch.arange(flat.numel(), device=flat.device) + offset) // group_numel
    return group * _PATTERNS + bits


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _ShardedDkm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, centroids, temperature, max_iter, epsilon, distance, offset, group_numel, pg):
        groups, k = centroids.shape
        keys = _keys(shard, offset, group_numel)
        counts = torch.bincount(keys, minlength=groups * _PATTERNS).to(torch.float64)
        counts = _all_reduce(counts, pg).view(groups, _PATTERNS)
        patterns = torch.arange(_PATTERNS, dtype=torch.int32, device=shard.device).to(torch.int16)
        all_values = patterns.view(shard.dtype).to(torch.float32)
        finite = torch.isfinite(all_values)
        if bool((counts[:, ~finite] > 0).any()):
            raise ValueError("sharded_dkm: weight contains NaN or Inf")
        present = (counts.sum(0) > 0).nonzero().view(-1)  # the same on every rank
        values = all_values[present].expand(groups, -1).contiguous()
        cnt = counts[:, present].to(torch.float32).contiguous()
        c_out, soft, history, iterations = torch.ops.edkm._udomain_forward(
            values, cnt, centroids.to(torch.float32), temperature, max_iter, epsilon, distance
        )
        table = torch.zeros(groups, _PATTERNS, dtype=torch.float32, device=shard.device)
        table[:, present] = soft
        out = table.view(-1)[keys].to(shard.dtype).view(shard.shape)
        ctx.save_for_backward(shard, values, cnt, history, iterations, present)
        ctx.args = (temperature, distance, offset, group_numel, pg, centroids.dtype)
        ctx.mark_non_differentiable(iterations)
        return out, c_out.to(centroids.dtype), iterations

    @staticmethod
    def backward(ctx, grad_out, grad_c, _grad_iterations):
        shard, values, cnt, history, iterations, present = ctx.saved_tensors
        temperature, distance, offset, group_numel, pg, c_dtype = ctx.args
        groups = values.shape[0]
        keys = _keys(shard, offset, group_numel)
        if grad_out is None:
            grad_out = torch.zeros_like(shard)
        g = grad_out.reshape(-1).to(torch.float32)
        dense = torch.zeros(groups * _PATTERNS, dtype=torch.float32, device=shard.device)
        dense.index_add_(0, keys, g)
        dense = _all_reduce(dense, pg).view(groups, _PATTERNS)
        if grad_c is not None:
            grad_c = _all_reduce(grad_c.to(torch.float32).contiguous(), pg)
        direct, indirect, grad_c0 = torch.ops.edkm._udomain_backward(
            values, cnt, history, iterations, temperature, distance, dense[:, present].contiguous(), grad_c
        )
        # Each weight of value v_u owns 1/n_u of what reaches v_u through the centroids.
        shift = torch.where(cnt > 0, indirect / cnt.clamp_min(1), torch.zeros_like(cnt))
        direct_t = torch.zeros(groups, _PATTERNS, dtype=torch.float32, device=shard.device)
        shift_t = torch.zeros_like(direct_t)
        direct_t[:, present] = direct
        shift_t[:, present] = shift
        grad_shard = g * direct_t.view(-1)[keys] + shift_t.view(-1)[keys]
        return (
            grad_shard.to(shard.dtype).view(shard.shape),
            grad_c0.to(c_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def sharded_dkm(
    shard: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float,
    max_iter: int = 3,
    epsilon: float = 0.0,
    distance: str = "squared",
    *,
    offset: int,
    group_numel: int,
    group=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`edkm.dkm` of a weight of which this rank holds ``shard``.

    shard: this rank's contiguous slice of the flattened weight (bf16 or fp16); ``offset`` its
    first element's position in the flattened weight; ``group_numel`` the elements per LUT group
    (``weight.numel() // G``; G = ``centroids.shape[0]``). For a [rows, cols] weight sharded by
    rows (FSDP2's ``Shard(0)``), offset = first_row * cols. Every rank of ``group`` (default: the
    world) must call it with the same centroids and arguments. Without torch.distributed
    initialized it runs on the shard alone (a world of one). Returns (clustered shard, final
    centroids, iterations), as edkm.dkm does; gradients reach the shard and the centroids.
    """
    if shard.dtype not in _16BIT:
        raise TypeError(
            f"sharded_dkm: shard must be bfloat16 or float16 (cluster the 16-bit rounding "
            f"of wider weights), got {shard.dtype}"
        )
    if centroids.dim() != 2 or centroids.shape[1] < 2:
        raise ValueError(f"sharded_dkm: centroids must be [G, K] with K >= 2, got {tuple(centroids.shape)}")
    if group_numel < 1 or offset < 0:
        raise ValueError(f"sharded_dkm: offset must be >= 0 and group_numel >= 1, got {offset}, {group_numel}")
    last_group = (offset + shard.numel() - 1) // group_numel if shard.numel() else 0
    if last_group >= centroids.shape[0]:
        raise ValueError(
            f"sharded_dkm: the shard reaches group {last_group} but centroids has "
            f"{centroids.shape[0]} groups (offset {offset}, group_numel {group_numel})"
        )
    if centroids.dtype not in (torch.float32, shard.dtype):
        raise TypeError(f"sharded_dkm: centroids must be float32 or the shard's dtype, got {centroids.dtype}")
    return _ShardedDkm.apply(
        shard,
        centroids,
        float(temperature),
        int(max_iter),
        float(epsilon),
        distance,
        int(offset),
        int(group_numel),
        group,
    )
