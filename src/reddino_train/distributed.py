"""Collective helpers that fall back to single-process behaviour when torch.distributed is off."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@contextmanager
def distributed_session() -> Iterator[torch.device]:
    """Join the torchrun process group when launched by torchrun (``RANK`` set) and yield this
    rank's device: its GPU with NCCL, else the CPU with gloo.

    The closing barrier keeps a rank from tearing the group down while another still talks
    to it (gloo otherwise aborts at exit now and then).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_gpu(os.environ, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or is_distributed():
        yield device
        return
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield device
        dist.barrier()
    finally:
        dist.destroy_process_group()


class LaunchError(RuntimeError):
    """The launcher's environment does not say which GPU this process is to use."""


def local_gpu(environ: Mapping[str, str], gpu_count: int) -> int:
    """The index of this process's GPU: ``LOCAL_RANK`` among the GPUs it sees, or the only one
    it sees (a scheduler that shows each task its own GPU, ``srun --gpus-per-task=1``)."""
    local = environ.get("LOCAL_RANK")
    sharing = int(environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this node
    # each sees the node's one GPU (NCCL would stop at "Duplicate GPU detected"), unless a wrapper
    # showed each its own (CUDA_VISIBLE_DEVICES=$LOCAL_RANK)
    if gpu_count == 1 and sharing > 1 and "CUDA_VISIBLE_DEVICES" not in environ:
        raise LaunchError(f"torchrun started {sharing} processes on this node, but each sees one GPU, the same one: "
                          "give --nproc-per-node the number of GPUs the node has (nvidia-smi -L lists them)")
    if gpu_count <= 1:
        return 0
    if local is None:
        if int(environ.get("WORLD_SIZE", "1")) > 1:
            raise LaunchError(f"RANK is set but LOCAL_RANK is not, so every process of a node would take its first "
                              f"of {gpu_count} GPUs: launch with torchrun, or set LOCAL_RANK (under SLURM, "
                              "LOCAL_RANK=$SLURM_LOCALID)")
        return 0
    if not 0 <= int(local) < gpu_count:
        raise LaunchError(f"LOCAL_RANK is {local} but this process sees {gpu_count} GPUs (0-{gpu_count - 1}): "
                          "start as many processes per node as it has GPUs (torchrun --nproc-per-node)")
    return int(local)


def all_gather_objects(item: Any) -> list[Any]:
    """Every rank's ``item``, in rank order."""
    if not is_distributed():
        return [item]
    items: list[Any] = [None] * world_size()
    dist.all_gather_object(items, item)
    return items


def raise_rank0_failure(failure: Exception | None) -> None:
    """Raise rank 0's ``failure`` (an error it met; None where it met none, and on the other ranks)
    on every rank, which would otherwise wait for rank 0 at their next collective, for ever. The
    error is made again from its type and message, so it must be one that takes its message alone."""
    failure = all_gather_objects(None if failure is None else (type(failure), str(failure)))[0]
    if failure is not None:
        kind, message = failure
        raise kind(message)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (no-op on one process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor
