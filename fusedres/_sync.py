"""Synchronized batch statistics across processes, as nn.SyncBatchNorm computes them.

Each rank's fused conv epilogue and finalize give its own per-channel (count, mean, biased variance);
these are all-gathered and merged (the parallel form of Chan's formula), so every rank normalizes
with the statistics of the whole global batch. In backward the two BN reductions (sum g, sum g*xhat)
are all-reduced. Only per-channel vectors cross processes. The custom ops cannot carry a process
group in their schema, so groups are registered here and passed by number.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

_GROUPS: Dict[int, Optional["dist.ProcessGroup"]] = {}
NO_GROUP = -1


def group_id(group) -> int:
    """A number for ``group`` (None: the default group) that the custom ops can carry."""
    for gid, known in _GROUPS.items():
        if known is group:
            return gid
    gid = len(_GROUPS)
    _GROUPS[gid] = group
    return gid


def group_of(gid: int):
    return _GROUPS[gid]


def world_is_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def merge_stats(mean: Tensor, var: Tensor, count: int, gid: int) -> Tuple[Tensor, Tensor, float]:
    """Global (mean, biased variance, count) of the per-rank statistics of every rank in the group."""
    group = group_of(gid)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered: List[Tensor] = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)                       # [world, 2K + 1]
    k = mean.numel()
    means, variances, counts = table[:, :k], table[:, k:2 * k], table[:, 2 * k:]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_var = ((counts * variances).sum(0) + (counts * (means - g_mean) ** 2).sum(0)) / total
    return g_mean, g_var, float(total.item())


def sum_across(tensors: List[Tensor], gid: int) -> List[Tensor]:
    """Element-wise sums over the group's ranks (one all-reduce for all of them)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group_of(gid))
    return list(flat.split([t.numel() for t in tensors]))
