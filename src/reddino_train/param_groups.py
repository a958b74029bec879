"""Optimiser parameter groups: layer-wise lr decay, patch-embedding lr multiplier, no weight
decay on biases, norms and LayerScale (DINOv2's rule: names ending in ``.bias`` or holding
``norm`` or ``gamma``), and the head's last layer on its own lr schedule."""

from __future__ import annotations

import re

import torch
from torch import nn

from .heads import PrototypeLayer

GROUP_SETTINGS = ("lr_multiplier", "wd_multiplier", "is_last_layer")  # what a group is built with
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(patch_embed|pos_embed|cls_token|reg_token|mask_token)(?:\.|$)")


def build_param_groups(
    model: nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    """Trainable parameters of ``model`` (a timm ViT, heads, or a module holding both) in
    groups with ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer`` keys.

    With n blocks, the embeddings (patch/pos embedding, cls/register/mask tokens) get
    ``layer_decay ** (n + 1)``, block i gets ``layer_decay ** (n - i)`` and everything after
    the blocks (final norm, heads) gets 1; patch-embedding parameters are further scaled by
    ``patch_embed_lr_mult``. Biases, norms and LayerScale get no weight decay; the tokens and
    the position embedding do, as in DINOv2.
    """
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    block_ids = [int(match[1]) for name, _ in named if (match := _BLOCK.search(name))]
    n_blocks = max(block_ids) + 1 if block_ids else 0
    last_layer = {
        id(param)
        for module in model.modules()
        if isinstance(module, PrototypeLayer)
        for param in module.parameters()
    }
    groups: dict[tuple, dict] = {}
    for name, param in named:
        embedding = _EMBEDDING.search(name)
        if embedding:
            depth = 0
        elif match := _BLOCK.search(name):
            depth = int(match[1]) + 1
        else:
            depth = n_blocks + 1
        lr_multiplier = layer_decay ** (n_blocks + 1 - depth)
        if embedding and embedding[1] == "patch_embed":
            lr_multiplier *= patch_embed_lr_mult
        wd_multiplier = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_multiplier, wd_multiplier, id(param) in last_layer)
        group = groups.setdefault(
            key,
            {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2]},
        )
        group["params"].append(param)
    return list(groups.values())


def apply_schedule(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float
) -> None:
    """Set every group's lr and weight decay from the current schedule values."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
