"""Per-iteration schedules of DINOv2 pretraining: learning rate (and the last layer's),
weight decay, teacher EMA momentum and teacher temperature.

Schedules are pure functions of the iteration (the peak learning rate also of the global batch,
and so of the number of processes), so resuming needs nothing but the iteration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import TrainConfig

LR_REFERENCE_BATCH = 1024


@dataclass(frozen=True)
class WarmupCosine:
    """Linear from ``start`` (iteration 0) to ``peak`` (iteration ``warmup_iters``), then a
    half cosine from ``peak`` to ``end``, reached at the last iteration ``total_iters - 1``
    and kept after. Before ``frozen_iters`` the value is 0 (the frozen last layer's lr)."""

    start: float
    peak: float
    end: float
    total_iters: int
    warmup_iters: int = 0
    frozen_iters: int = 0

    def __call__(self, iteration: int) -> float:
        if iteration < self.frozen_iters:
            return 0.0
        if iteration < self.warmup_iters:
            done = iteration / self.warmup_iters
            return self.start * (1 - done) + self.peak * done
        decay_iters = self.total_iters - 1 - self.warmup_iters
        progress = min((iteration - self.warmup_iters) / decay_iters, 1.0) if decay_iters > 0 else 1.0
        weight = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0; exact at both ends
        return self.peak * weight + self.end * (1 - weight)


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    last_layer_lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float


@dataclass(frozen=True)
class Schedules:
    lr: WarmupCosine
    last_layer_lr: WarmupCosine
    weight_decay: WarmupCosine
    teacher_momentum: WarmupCosine
    teacher_temp: WarmupCosine

    def at(self, iteration: int) -> ScheduleValues:
        return ScheduleValues(
            **{field.name: getattr(self, field.name)(iteration) for field in dataclasses.fields(self)}
        )


SCHEDULE_NAMES = {"lr": "learning rate", "last_layer_lr": "last layer's learning rate", "weight_decay": "weight decay",
                  "teacher_momentum": "teacher momentum", "teacher_temp": "teacher temperature"}


def schedule_jumps(before: Schedules, after: Schedules, iteration: int) -> list[str]:
    """Each schedule whose value at ``iteration`` differs between ``before`` and ``after``, as
    "name old -> new": where a run resumes with other settings, the jump it takes there (more
    epochs stretch every cosine anew, so a finished run's learning rate rises again)."""
    old, new = before.at(iteration), after.at(iteration)
    return [f"{SCHEDULE_NAMES[field.name]} {getattr(old, field.name):.4g} -> {getattr(new, field.name):.4g}"
            for field in dataclasses.fields(old)
            if not math.isclose(getattr(old, field.name), getattr(new, field.name), rel_tol=1e-6, abs_tol=1e-12)]


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """DINOv2's rule: ``base_lr`` is for a global batch of 1024 and scales with its square root."""
    return base_lr * math.sqrt(global_batch_size / LR_REFERENCE_BATCH)


def build_schedules(cfg: TrainConfig, world_size: int) -> Schedules:
    """All schedules of a run; epochs count ``train.iterations_per_epoch`` iterations."""

    def iterations(epochs: float) -> int:
        return round(epochs * cfg.train.iterations_per_epoch)

    optim, teacher = cfg.optim, cfg.teacher
    total = iterations(optim.epochs)
    peak_lr = scaled_lr(optim.base_lr, cfg.train.batch_size_per_gpu * world_size)
    lr = WarmupCosine(0.0, peak_lr, optim.min_lr, total, iterations(optim.warmup_epochs))
    return Schedules(
        lr=lr,
        last_layer_lr=dataclasses.replace(lr, frozen_iters=iterations(optim.freeze_last_layer_epochs)),
        weight_decay=WarmupCosine(optim.weight_decay, optim.weight_decay, optim.weight_decay_end, total),
        teacher_momentum=WarmupCosine(teacher.momentum, teacher.momentum, teacher.final_momentum, total),
        teacher_temp=WarmupCosine(
            teacher.warmup_temp, teacher.temp, teacher.temp, total, iterations(teacher.warmup_temp_epochs)
        ),
    )
