"""KoLeo regulariser (Sablayrolles et al., 2019, "Spreading vectors for similarity search")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(distance from x_i to its nearest neighbour)`` on L2-normalised rows.

    Lower when the batch spreads out. DINOv2 applies it to the student's CLS tokens of each
    global crop separately, so two views of one image are never each other's neighbour.
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)  # below any cosine similarity: never one's own neighbour
        nearest = similarity.argmax(dim=1)
        distances = (x - x[nearest]).norm(dim=-1)
        return -torch.log(distances + eps).mean()
