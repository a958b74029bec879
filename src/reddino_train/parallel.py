"""How student and teacher spread over ranks: DDP keeps a full copy on each rank; FSDP2
(``fully_shard``) shards parameters, gradients and optimizer state, block by block, for
models whose copies do not fit one GPU each.

Checkpoints always hold full (unsharded) state dicts keyed by parameter name, whichever
strategy wrote them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from .config import Parallel
from .distributed import world_size
from .model import DinoModel
from .param_groups import GROUP_SETTINGS

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL = StateDictOptions(full_state_dict=True)
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
WEIGHTS = ("student", "teacher", "optimizer")  # the entries of a checkpoint only rank 0 reads


def distribute(student: DinoModel, teacher: DinoModel, parallel: Parallel, device: torch.device) -> torch.nn.Module:
    """Spread the models over the ranks (in place for FSDP) and return the module whose call
    is the student's forward pass. Build the optimizer afterwards: FSDP swaps in new parameters.

    FSDP gathers the student's weights once per step and keeps them through its two forward
    passes (global, then local crops) and its backward pass, as DINOv2's SHARD_GRAD_OP does;
    :func:`release_gathered` frees them after the backward pass. Resharding after each use
    gathered every block four times per step (two gloo ranks, tiny recipe: 12 all-gathers per
    step before, 6 after, with the teacher's 3)."""
    if world_size() == 1:
        return student
    if parallel == "ddp":
        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    for model in (student, teacher):
        for block in model.backbone.vit.blocks:
            fully_shard(block, reshard_after_forward=model is teacher)
        # the teacher never runs backward, so its root must free the gathered weights itself
        fully_shard(model, reshard_after_forward=model is teacher)
    student.set_reshard_after_backward(False)
    register_fsdp_forward_method(teacher, "targets")
    return student


def release_gathered(student: torch.nn.Module) -> None:
    """After the student's backward pass, free the weights FSDP gathered for the step: the
    optimizer updates the shards, and the next step must gather them anew."""
    for module in student.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(student: DinoModel, teacher: DinoModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full state dicts on rank 0 (empty on the others); every rank must call it."""
    return {
        "student": get_model_state_dict(student, options=FULL_ON_RANK0),
        "teacher": get_model_state_dict(teacher, options=FULL_ON_RANK0),
        "optimizer": get_optimizer_state_dict(student, optimizer, options=FULL_ON_RANK0),
    }


def load_full_state(
    student: DinoModel, teacher: DinoModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load full state dicts (as ``full_state`` saved them) into replicated or sharded models.
    Under torchrun only rank 0 has them (the other ranks' are empty): it sends each tensor to
    the others, who keep their shard."""
    options = FULL if world_size() == 1 else FROM_RANK0
    set_model_state_dict(student, state["student"], options=options)
    set_model_state_dict(teacher, state["teacher"], options=options)
    # The saved param groups carry the multipliers and betas of the run that saved them; the
    # config's (layer-wise lr decay, patch-embedding lr, AdamW betas) apply from the resumed step on.
    settings = [{key: group[key] for key in (*GROUP_SETTINGS, "betas")} for group in optimizer.param_groups]
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=options)
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        group.update(wanted)
