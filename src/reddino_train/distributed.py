"""Collective helpers that fall back to single-process behaviour when torch.distributed is off."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (no-op on one process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor
