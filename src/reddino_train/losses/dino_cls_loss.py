"""DINO loss on the CLS token: every student crop predicts the teacher's targets for every
global crop showing a different view of the same image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .teacher_targets import StudentTeacherLoss


class DinoClsLoss(StudentTeacherLoss):

    def teacher_probs(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets for teacher head outputs of shape (global crops, batch, prototypes)."""
        probs = self.teacher_targets(teacher_logits.flatten(0, 1), temp)
        return probs.view(teacher_logits.shape)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all (student crop, teacher crop) pairs of different views.

        student_logits: (student crops, batch, prototypes), the global crops first and in the
        teacher's order, then the local crops. teacher_probs: (global crops, batch, prototypes).
        """
        n_teacher, batch = teacher_probs.shape[:2]
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        pair_loss = -torch.einsum("tbk,sbk->ts", teacher_probs, log_probs) / batch
        different_view = torch.ones_like(pair_loss, dtype=torch.bool)
        different_view[:, :n_teacher].fill_diagonal_(False)
        return pair_loss[different_view].mean()
