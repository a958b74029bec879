"""DINOv2 losses: DINO on the CLS token, iBOT on masked patches, KoLeo."""

from .dino_cls_loss import DinoClsLoss
from .ibot_patch_loss import IbotPatchLoss
from .koleo_loss import koleo_loss
from .teacher_targets import (
    SinkhornKnopp,
    SoftmaxCentering,
    make_teacher_targets,
    sinkhorn_knopp,
)

__all__ = [
    "DinoClsLoss",
    "IbotPatchLoss",
    "SinkhornKnopp",
    "SoftmaxCentering",
    "koleo_loss",
    "make_teacher_targets",
    "sinkhorn_knopp",
]
