"""iBOT loss on masked patch tokens: the student, seeing a crop with some patches masked,
predicts the teacher's targets for those patches of the unmasked crop."""

from __future__ import annotations

import torch

from .soft_cross_entropy import soft_cross_entropy
from .teacher_targets import StudentTeacherLoss


class IbotPatchLoss(StudentTeacherLoss):

    def teacher_probs(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets for the teacher head outputs of the masked patches, (masked patches, prototypes)."""
        return self.teacher_targets(teacher_logits, temp)

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy per masked patch, averaged within each crop, then over all crops.

        Each crop weighs the same however many of its patches are masked; crops without a mask
        count as zero in the mean, as in DINOv2. masks: (crops, patches) bool; the logits and
        targets hold one row per True entry in row-major order (``tokens[masks]``).
        """
        patch_loss = soft_cross_entropy(student_logits, teacher_probs, self.student_temp)
        crop_of_patch = masks.nonzero()[:, 0]
        n_masked = masks.sum(dim=1).clamp_min(1)
        return (patch_loss / n_masked[crop_of_patch]).sum() / len(masks)
