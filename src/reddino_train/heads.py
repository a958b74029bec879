"""DINO projection head: an MLP to a bottleneck, then cosine similarity to learned prototypes."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeLayer(nn.Module):
    """Weight-normed linear layer without bias: unit-norm prototype directions times a learned
    gain per prototype (``torch.nn.utils.weight_norm`` with g initialised to 1, as in DINOv2).

    This is the head's "last layer", which the optimiser keeps frozen for the first
    iterations (see ``param_groups``).
    """

    def __init__(self, in_dim: int, n_prototypes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, in_dim))
        self.gain = nn.Parameter(torch.ones(n_prototypes))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gain scales the weights, not the output: under bf16 autocast the output stays bf16
        # rather than becoming float32 (iBOT's masked patches x 131,072 prototypes: 10 GiB, and
        # as much again in the backward pass, in RedDino's ViT-S recipe).
        return F.linear(x, F.normalize(self.weight, dim=1) * self.gain[:, None])


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))
