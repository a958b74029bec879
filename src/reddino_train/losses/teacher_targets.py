"""Teacher targets: turn teacher logits into the probabilities the student learns to match.

Two ways to keep the teacher from collapsing onto a few prototypes: subtract a running centre
before the softmax (DINO), or balance the batch's assignments over all prototypes with a few
Sinkhorn-Knopp iterations (SwAV, used by DINOv2's large models and RedDino). Both see the
global batch when torch.distributed is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Centering
from ..distributed import all_reduce


class SoftmaxCentering(nn.Module):
    """Softmax of ``(logits - centre) / temp``; the centre is an EMA of the teacher's mean logits."""

    def __init__(self, n_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(n_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets for ``teacher_logits`` (rows x prototypes) with the current centre, then
        fold this batch's mean into the centre for the next step."""
        logits = teacher_logits.float()
        probs = F.softmax((logits - self.center).div_(temp), dim=-1)
        totals = all_reduce(torch.cat([logits.sum(dim=0), logits.new_tensor([len(logits)])]))
        count = totals[-1]
        if count > 0:
            batch_mean = totals[:-1] / count
            self.center.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
        return probs


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Rows x prototypes assignment whose rows each sum to 1 and whose prototypes share the
    global batch about equally (exactly in the limit of many iterations)."""
    # One float32 copy, worked on in place: iBOT's rows x prototypes are gigabytes.
    q = teacher_logits.to(torch.float32, copy=True)
    n_rows = all_reduce(q.new_tensor(float(len(q))))
    if n_rows == 0:
        return q
    # A global shift leaves the result unchanged (each step rescales) and keeps exp finite.
    local_max = q.max() if len(q) else q.new_tensor(float("-inf"))
    shift = all_reduce(local_max.clone(), op=dist.ReduceOp.MAX)
    q.sub_(shift).div_(temp).exp_()
    n_prototypes = q.shape[1]
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        prototype_mass = all_reduce(q.sum(dim=0, keepdim=True))
        q /= prototype_mass.clamp_min(tiny) * n_prototypes
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny) * n_rows
    return q.mul_(n_rows)


class SinkhornKnopp(nn.Module):
    def __init__(self, n_iterations: int = 3) -> None:
        super().__init__()
        self.n_iterations = n_iterations

    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, temp, self.n_iterations)


def make_teacher_targets(centering: Centering, n_prototypes: int, center_momentum: float) -> nn.Module:
    """The module that maps teacher logits (rows x prototypes) and a temperature to targets."""
    if centering == "softmax_center":
        return SoftmaxCentering(n_prototypes, center_momentum)
    if centering == "sinkhorn_knopp":
        return SinkhornKnopp()
    raise ValueError(f"unknown centering {centering!r}; use softmax_center or sinkhorn_knopp")


class StudentTeacherLoss(nn.Module):
    """Shared by the DINO and iBOT losses: a student temperature and the teacher's targets."""

    def __init__(
        self,
        n_prototypes: int,
        centering: Centering = "softmax_center",
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.teacher_targets = make_teacher_targets(centering, n_prototypes, center_momentum)
