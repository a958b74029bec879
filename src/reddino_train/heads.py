"""DINO projection head: an MLP to a bottleneck, then cosine similarity to learned prototypes."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeLayer(nn.Module):
    """Weight-normed linear layer without bias: unit-norm prototype directions times a learned
    gain per prototype (``torch.nn.utils.weight_norm`` with g initialised to 1, as in DINOv2).
    The directions start as ``nn.Linear``'s weights do, as DINOv2's (its weight norm wraps a
    linear layer made after the head's truncated-normal initialisation): their norm sets how
    fast AdamW turns them.

    This is the head's "last layer", which the optimiser keeps frozen for the first
    iterations (see ``param_groups``).
    """

    def __init__(self, in_dim: int, n_prototypes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, in_dim))
        self.gain = nn.Parameter(torch.ones(n_prototypes))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gain scales the weights, not the output: under bf16 autocast the output stays bf16
        # rather than becoming float32 (iBOT's masked patches x 131,072 prototypes: 10 GiB, and
        # as much again in the backward pass, in RedDino's ViT-S recipe).
        return F.linear(x, (F.normalize(self.weight, dim=1) * self.gain[:, None]).to(x.dtype))


class DinoHead(nn.Module):
    """(..., in_dim) tokens -> (..., n_prototypes) logits."""

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.GELU()]
        self.mlp = nn.Sequential(*layers[:-1])  # no activation after the bottleneck
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = PrototypeLayer(bottleneck_dim, n_prototypes)

    def forward(self, x: torch.Tensor, logits_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``logits_dtype``: the prototype layer's, outside autocast (see :func:`teacher_logits_dtype`)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, eps=eps)
        if logits_dtype is None:
            return self.last_layer(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x.to(logits_dtype))


def teacher_logits_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the teacher's logits under bf16 autocast: bf16's 8-bit mantissa, divided by
    the teacher's temperature of 0.04, would put noise of about 0.05 on every sharpened logit.
    DINOv2 computes them in fp16 (8x finer, the same memory: iBOT's are gigabytes); on a CPU,
    where fp16 products are slow and the recipes' heads small, float32. None: as autocast has it."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16:
        return torch.float16 if device.type == "cuda" else torch.float32
    return None
