"""The DINOv2 training loop: one process, or one per rank under torchrun (DDP or FSDP2)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from napari_reddino.atomic_files import PartlyWrittenError
from napari_reddino.cell_embeddings import crops_in_words
from napari_reddino.stop_signals import handling_signals
from torch.utils.data import DataLoader
from tqdm import tqdm

from .augment import make_multicrop
from .checkpoint import (
    CHECKPOINT_NAME,
    KEPT_FOLDER,
    CheckpointError,
    architecture,
    keep_earlier,
    kept_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import (
    CONFIG_NAME,
    TrainConfig,
    check_architecture,
    changed_settings,
    config_from_dict,
    config_to_dict,
    run_settings_files,
    save_config,
    settings_until,
)
from .crop_record import NO_RECORD, SEVERAL, training_crops
from .data import EmptyDatasetError, ImageFolder, ResumableSampler, collate_crops
from .distributed import (
    all_gather_objects,
    all_reduce,
    distributed_session,
    raise_rank0_failure,
    rank,
    world_size,
)
from .files import remove_leftovers
from .losses import DinoClsLoss, IbotPatchLoss, koleo_loss
from .masking import BlockMaskGenerator, sample_masks
from .model import DinoModel, build_student, clip_gradients, make_teacher, update_teacher, use_explicit_attention
from .monitor import LOG_NAME, CollapseDetector, CsvLog, entropy
from .parallel import WEIGHTS, distribute, full_state, load_full_state, release_gathered
from .param_groups import apply_schedule, build_param_groups
from .run_lock import RunFolderError, hold_run_folder
from .schedules import ScheduleValues, build_schedules, scaled_lr, schedule_jumps

AUTOCAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_LOSS_SCALE = 2.0**-16  # fp16 steps that overflow even here have diverged, not run out of range
LOSS_TERMS = ("dino", "ibot", "koleo")
STATS = (*LOSS_TERMS, "teacher_entropy", "teacher_batch_entropy")
LOG_COLUMNS = (
    "step", "loss", *LOSS_TERMS, "lr", "last_layer_lr", "weight_decay", "teacher_momentum",
    "teacher_temp", "teacher_entropy", "teacher_batch_entropy", "student_teacher_kl", "images_per_s",
)


# RedDino's recipe halves the DINO term because its code, without local crops, divided the two
# global pairs by four; with local crops DINOv2's objective weighs it 1.
HALF_DINO_WITH_LOCAL_CROPS = (
    "loss.dino_weight={} with {} local crops: the RedDino recipes halve the DINO term only because they have "
    "none (RedDino's code divided its two global pairs by four); with local crops DINOv2's objective weighs it 1, "
    "so set loss.dino_weight=1 unless you mean to weaken it against iBOT")


class ResumeSettingsWarning(UserWarning):
    """A run resumed with a config that differs from the one it was started with."""


class TrainingDivergedError(FloatingPointError):
    """A loss or the gradients stopped being finite; raised before the step changes the weights,
    so the last checkpoint stays sound."""

    def __init__(self, step: int, what: str, value: float, checkpoint_step: int | None) -> None:
        restart = (f"it resumes from the checkpoint of step {checkpoint_step}" if checkpoint_step is not None
                   else "no checkpoint was saved yet, so it starts again from the beginning")
        super().__init__(
            f"training diverged at step {step}: {what} is {value}. Lower optim.base_lr, "
            f"raise optim.warmup_epochs or lower optim.clip_grad, then run again: {restart}."
        )
        self.step, self.what, self.value = step, what, value


@dataclass(frozen=True)
class FitResult:
    iterations_done: int
    stopped_by_signal: bool
    iterations_this_run: int  # 0: the run in the folder had already reached its end
    student: DinoModel
    teacher: DinoModel
    config_current: bool = True  # False: a save stopped short of config.yaml, which holds older settings


@dataclass
class Losses:
    dino: DinoClsLoss
    ibot: IbotPatchLoss

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Losses:
        loss = cfg.loss
        ibot_head = cfg.heads.ibot if cfg.heads.ibot_separate else cfg.heads.dino
        return cls(
            DinoClsLoss(cfg.heads.dino.n_prototypes, loss.centering, loss.student_temp, loss.center_momentum),
            IbotPatchLoss(ibot_head.n_prototypes, loss.centering, loss.student_temp, loss.center_momentum),
        )


def fit(
    cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_steps: int | None = None
) -> FitResult:
    """Train (or resume from ``out_dir/checkpoint.pt``) until the configured number of
    iterations, or ``max_steps`` iterations in all. SIGTERM/SIGINT end the run after the
    current step with a checkpoint. Under torchrun every rank calls ``fit``. A folder another
    run is writing to is refused with :class:`~reddino_train.run_lock.RunFolderBusyError`."""
    out = Path(out_dir)
    check_architecture(cfg)
    with distributed_session() as device:
        if cfg.crops.local_number > 0 and cfg.loss.dino_weight != 1.0 and rank() == 0:
            warnings.warn(HALF_DINO_WITH_LOCAL_CROPS.format(cfg.loss.dino_weight, cfg.crops.local_number), stacklevel=2)
        images = _images_on_every_rank(Path(data_dir), make_multicrop(cfg.crops))  # a typo makes no --out
        with hold_run_folder(out):
            trainer = Trainer(cfg, images, out, device)
            with _stop_requests() as stop:  # not before: a stalled start must stay interruptible
                return trainer.train(max_steps, stop)


class Trainer:
    """One rank's training state (models, optimiser, losses, schedules, data position) and its
    loop; :func:`fit` is the way to use it, benchmarks drive :meth:`step` directly."""

    def __init__(self, cfg: TrainConfig, data: Path | ImageFolder, out: Path, device: torch.device) -> None:
        """``data``: the folder of training images, or those images already listed."""
        self.cfg, self.out, self.device = cfg, out, device
        self.rank, self.world_size = rank(), world_size()
        out.mkdir(parents=True, exist_ok=True)
        self.dataset = data if isinstance(data, ImageFolder) else _images_on_every_rank(
            data, make_multicrop(cfg.crops))
        # how prepare cut the images, which the checkpoints (rank 0's) carry to the exported model
        self.trained_crops = training_crops(self.dataset.paths.folders()) if self.rank == 0 else None
        # rank 0's answer: another node's NFS client may not see a checkpoint just written yet
        resuming = all_gather_objects((out / CHECKPOINT_NAME).exists() if self.rank == 0 else None)[0]
        state = _checkpoint_from_rank0(out / CHECKPOINT_NAME, cfg) if resuming else None
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.student = build_student(cfg, with_weights=state is None).to(device)  # a resume has its own
        self.precision = self._precision(state)
        if self.precision != "fp32" and device.type == "cpu":
            use_explicit_attention(self.student)
        # fp16 needs its loss scaled, else small gradients round to 0; disabled, the scaler passes everything through
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.teacher = make_teacher(self.student)
        self.distributed_student = distribute(self.student, self.teacher, cfg.train.parallel, device)
        self.losses = Losses.from_config(cfg)
        self.losses.dino.to(device)
        self.losses.ibot.to(device)
        groups = build_param_groups(self.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, betas=cfg.optim.adamw_betas)
        self.schedules = build_schedules(cfg, self.world_size)
        grid = cfg.crops.global_size // cfg.model.patch_size
        self.mask_generator = BlockMaskGenerator((grid, grid))
        self.iteration = 0
        self.checkpoint_step: int | None = None  # the step of the checkpoint in the output folder
        self.samples_consumed = 0  # by this rank: where its sampler resumes
        _seed_process(cfg.train.seed + self.rank)  # distinct stochastic depth per rank
        self._settings_pending = False  # changed settings reach config.yaml with their first checkpoint
        self._run_settings: tuple[TrainConfig, Path] | None = None  # the run's own, to keep before they change
        self._said_unkept = False  # that earlier checkpoints cannot be kept (said once a run)
        fresh = state is None
        if state is not None:
            self._resume(state)
            del state  # its tensors are in the models now
        failure, self._log = None, None
        if self.rank == 0:
            try:
                self._tidy_folder(fresh)
                self._log = CsvLog(out / LOG_NAME, LOG_COLUMNS, self.iteration)  # log.csv cut back to the checkpoint
            except OSError as error:  # a full disk or a quota: said on every rank, not rank 0 alone
                failure = RunFolderError(f"cannot write to the output folder {out} ({error}); make room or mend it, "
                                         "then run again")
        raise_rank0_failure(failure)

    def _tidy_folder(self, fresh: bool) -> None:
        """Rank 0, before the first step: remove an interrupted save's leftovers (and, for a fresh
        run, settings files of an earlier run that are no longer true), keep the run's own settings
        where a resume changes them, and write config.yaml."""
        for leftover, size in remove_leftovers(self.out / CHECKPOINT_NAME):
            tqdm.write(f"reddino-train: removed {leftover.name} ({size / 2**20:,.0f} MiB), "
                       "a checkpoint whose save was interrupted")
        for stale in run_settings_files(self.out) if fresh else ():  # of a run whose checkpoint was moved away
            stale.unlink()
            tqdm.write(f"reddino-train: removed {stale.name}, the settings of the run this folder held before")
        if self._run_settings is not None:
            save_config(*self._run_settings)
        if not self._settings_pending:  # else a run that fails before its first checkpoint keeps the old
            save_config(self.cfg, self.out / CONFIG_NAME)

    def _precision(self, state: dict[str, Any] | None) -> str:
        """"fp32", "bf16" or "fp16". "auto" decides on each rank (:func:`precision_for`), and fp32
        where the ranks differ; a resumed run on the same kind of device keeps what its start
        chose, since a second timing on a CPU might choose otherwise."""
        precision = self.cfg.train.precision
        saved = (state or {}).get("precision", {})
        if precision == "auto" and saved.get("device") == self.device.type:
            return saved.get("dtype") or ("bf16" if saved["bf16"] else "fp32")  # the latter: saved before fp16
        chosen = all_gather_objects(precision_for(precision, self.device))
        return chosen[0] if len(set(chosen)) == 1 else "fp32"

    # -- the loop ---------------------------------------------------------------------------

    def train(self, max_steps: int | None, stop: threading.Event) -> FitResult:
        train = self.cfg.train
        end = self.schedules.lr.total_iters if max_steps is None else min(self.schedules.lr.total_iters, max_steps)
        log = self._log
        collapse = CollapseDetector(self.cfg.heads.dino.n_prototypes)
        batches = self._batches()
        stopped, first = False, self.iteration
        saved_at = time.monotonic()
        last_log = (self.iteration, time.perf_counter())
        with tqdm(total=end, initial=self.iteration, disable=self.rank != 0, desc="reddino-train") as bar:
            while self.iteration < end and not stopped:
                values = self.schedules.at(self.iteration)
                save_due = 0 < train.checkpoint_minutes * 60 <= time.monotonic() - saved_at
                stats, stopped, save_due = self.step(next(batches), values, stop, save_due)
                self.iteration += 1
                self.samples_consumed += train.batch_size_per_gpu
                bar.update()
                if self.iteration % train.log_every == 0:
                    images = (self.iteration - last_log[0]) * train.batch_size_per_gpu * self.world_size
                    row = self._log_row(stats, values, images / (time.perf_counter() - last_log[1]))
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    if log is not None:
                        log.write(row)
                    if self.rank == 0:  # global statistics: every rank would warn alike
                        collapse.update(self.iteration, stats["teacher_entropy"], stats["teacher_batch_entropy"])
                    last_log = (self.iteration, time.perf_counter())
                if self.iteration % train.checkpoint_every == 0 or self.iteration == end or stopped or save_due:
                    self._save()
                    saved_at = time.monotonic()
        if stopped and self.rank == 0:
            tqdm.write(f"reddino-train: stopped by signal after step {self.iteration}; checkpoint saved")
        return FitResult(self.iteration, stopped, self.iteration - first, self.student, self.teacher,
                         config_current=not self._settings_pending)

    def step(self, batch: dict[str, torch.Tensor], values: ScheduleValues, stop: threading.Event,
             save_due: bool = False) -> tuple[dict[str, float], bool, bool]:
        """One optimisation step; returns the global-mean statistics, whether any rank asked to
        stop, and whether any found a checkpoint due (``save_due``: ranks' clocks differ)."""
        cfg, device = self.cfg, self.device
        apply_schedule(self.optimizer, values.lr, values.weight_decay, values.last_layer_lr)
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = batch["local_crops"].to(device, non_blocking=True)
        masks = self._masks(len(global_crops)).to(device)
        with torch.autocast(device.type, dtype=AUTOCAST[self.precision], enabled=self.precision != "fp32"):
            teacher_cls, teacher_patches = self.teacher.targets(global_crops, masks)
            student = self.distributed_student(global_crops, local_crops, masks)
        batch_size = len(global_crops) // 2
        teacher_probs = self.losses.dino.teacher_probs(teacher_cls.view(2, batch_size, -1), values.teacher_temp)
        patch_probs = self.losses.ibot.teacher_probs(teacher_patches, values.teacher_temp)
        del teacher_patches  # masked patches x prototypes: 5 GiB in RedDino's ViT-S recipe
        terms = {
            "dino": self.losses.dino(student.cls_logits.view(-1, batch_size, teacher_probs.shape[-1]), teacher_probs),
            "ibot": self.losses.ibot(student.patch_logits, patch_probs, masks),
            "koleo": sum(koleo_loss(tokens) for tokens in student.global_cls_tokens.chunk(2)),
        }
        reduced = torch.stack([
            *(term.detach().float() for term in terms.values()),
            entropy(teacher_probs).mean(),
            entropy(teacher_probs.flatten(0, 1).mean(dim=0)),
            torch.tensor(float(stop.is_set()), device=device),
            torch.tensor(float(save_due), device=device),
        ])
        all_reduce(reduced)
        *means, stop_votes, save_votes = (reduced / self.world_size).tolist()
        stats = dict(zip(STATS, means))
        for term in LOSS_TERMS:
            if not np.isfinite(stats[term]):
                raise TrainingDivergedError(self.iteration + 1, f"the {term} loss", stats[term], self.checkpoint_step)
        weights = {"dino": cfg.loss.dino_weight, "ibot": cfg.loss.ibot_weight, "koleo": cfg.loss.koleo_weight}
        total = sum(weights[name] * term for name, term in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        release_gathered(self.student)  # before clipping: the gathered weights' gradients are in the shards
        self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        gradient_norm = torch.tensor(clip_gradients(self.student, cfg.optim.clip_grad), device=device)
        all_reduce(gradient_norm)  # a rank's NaN or inf reaches every rank: all stop, or none
        if torch.isfinite(gradient_norm):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.scaler.is_enabled() and self.scaler.get_scale() > MIN_LOSS_SCALE:
            # fp16 overflowed at this loss scale: every rank skips the step and halves it alike
            # (each rank's scaler saw only its own shard of the gradients)
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            if (growth := getattr(self.scaler, "_growth_tracker", None)) is not None:
                growth.zero_()  # as torch's own back-off does: the scale grows again only after growth_interval steps
        else:
            raise TrainingDivergedError(self.iteration + 1, "the gradient norm", gradient_norm.item(),
                                        self.checkpoint_step)
        update_teacher(self.teacher, self.student, values.teacher_momentum)
        stats["loss"] = sum(weights[name] * stats[name] for name in LOSS_TERMS)
        return stats, stop_votes > 0, save_votes > 0

    def _log_row(self, stats: dict[str, float], values: ScheduleValues, images_per_s: float) -> dict[str, float]:
        return {
            "step": self.iteration,
            "loss": stats["loss"],
            **{term: stats[term] for term in LOSS_TERMS},
            "lr": values.lr,
            "last_layer_lr": values.last_layer_lr,
            "weight_decay": values.weight_decay,
            "teacher_momentum": values.teacher_momentum,
            "teacher_temp": values.teacher_temp,
            "teacher_entropy": stats["teacher_entropy"],
            "teacher_batch_entropy": stats["teacher_batch_entropy"],
            # mean cross-entropy minus mean teacher entropy over the same crop pairs
            "student_teacher_kl": stats["dino"] - stats["teacher_entropy"],
            "images_per_s": images_per_s,
        }

    # -- data -------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        train = self.cfg.train
        sampler = ResumableSampler(
            len(self.dataset), train.seed, self.rank, self.world_size, start=self.samples_consumed
        )
        loader = DataLoader(
            self.dataset,
            batch_size=train.batch_size_per_gpu,
            sampler=sampler,
            num_workers=train.num_workers,
            collate_fn=collate_crops,
            pin_memory=self.device.type == "cuda",
            persistent_workers=train.num_workers > 0,
            generator=torch.Generator(),  # leaves the global RNG, which the checkpoint restores, alone
            worker_init_fn=_ignore_stop_signals,
        )
        return iter(loader)

    def _masks(self, n_crops: int) -> torch.Tensor:
        rng = np.random.default_rng((self.cfg.train.seed, self.iteration, self.rank))
        masking = self.cfg.masking
        return sample_masks(self.mask_generator, n_crops, masking.ratio_min_max, masking.sample_probability, rng)

    # -- checkpoints ------------------------------------------------------------------------

    def _save(self) -> None:
        rng_states = all_gather_objects(rng_state())
        models = full_state(self.student, self.teacher, self.optimizer)
        failure = None
        if self.rank == 0:
            try:
                self._write_checkpoint(models, rng_states)
            except PartlyWrittenError as error:  # the checkpoint is in place; config.yaml is tried again next time
                warnings.warn(f"the checkpoint of step {self.iteration} is saved, but {error.failed.name} could not be "
                              f"replaced ({error.error.strerror or error.error}); it is written again with the next "
                              "checkpoint", RuntimeWarning, stacklevel=2)
            except OSError as error:  # a full disk, a folder gone: said on every rank, not rank 0 alone
                kept = (f"the checkpoint of step {self.checkpoint_step} is kept" if self.checkpoint_step is not None
                        else "no checkpoint was saved yet")
                room = f" ({KEPT_FOLDER} holds earlier ones that can go)" if kept_checkpoints(self.out) else ""
                failure = RunFolderError(f"cannot write {self.out / CHECKPOINT_NAME} at step {self.iteration} "
                                         f"({error}); {kept}: make room{room} or mend the folder, then run again")
        raise_rank0_failure(failure)
        self.checkpoint_step = self.iteration

    def _write_checkpoint(self, models: dict[str, Any], rng_states: list) -> None:
        settings = (self.out / CONFIG_NAME, self.cfg) if self._settings_pending else None
        if self.checkpoint_step is not None:
            try:
                for gone in keep_earlier(self.out / CHECKPOINT_NAME, self.checkpoint_step, self.cfg.train.keep_checkpoints):
                    tqdm.write(f"reddino-train: removed {KEPT_FOLDER}/{gone.name}, kept from before the run went "
                               f"back to step {self.checkpoint_step}")
            except OSError as error:  # vfat, s3fs or a CIFS share without hard links: the run goes on without them
                if not self._said_unkept:
                    warnings.warn(f"cannot keep earlier checkpoints in {KEPT_FOLDER} ({error.strerror or error}): "
                                  f"from step {self.checkpoint_step} on, {CHECKPOINT_NAME} alone is kept",
                                  RuntimeWarning, stacklevel=2)
                    self._said_unkept = True
        save_checkpoint(self.out / CHECKPOINT_NAME, {
            "architecture": architecture(self.cfg),
            "config": config_to_dict(self.cfg),
            "iteration": self.iteration,
            **models,
            "dino_loss": self.losses.dino.state_dict(),
            "ibot_loss": self.losses.ibot.state_dict(),
            "sampler": {"samples_consumed": self.samples_consumed, "world_size": self.world_size},
            "precision": {"device": self.device.type, "dtype": self.precision, "bf16": self.precision == "bf16"},
            "loss_scale": self.scaler.state_dict(),
            "rng": rng_states,
            "images": self.dataset.listing,
            "crops": self.trained_crops,
        }, config=settings)
        self._settings_pending = False

    def _resume(self, state: dict[str, Any]) -> None:
        load_full_state(self.student, self.teacher, self.optimizer, state)
        own = config_from_dict(state["config"])
        given = self.cfg.model.pretrained
        if given != own.model.pretrained:  # not read: config.yaml and the checkpoints keep what the run began from
            self.cfg = replace(self.cfg, model=replace(self.cfg.model, pretrained=own.model.pretrained))
            if self.rank == 0:
                began = f"model.pretrained={own.model.pretrained!r}" if own.model.pretrained else "random weights"
                warnings.warn(f"resuming {self.out}: model.pretrained={given!r} is not read, the run goes on from its "
                              f"checkpoint's weights (it began from {began}, as its config.yaml keeps saying)",
                              ResumeSettingsWarning, stacklevel=2)
        if own.loss.centering == self.cfg.loss.centering:  # else the other centering starts afresh
            self.losses.dino.load_state_dict(state["dino_loss"])
            self.losses.ibot.load_state_dict(state["ibot_loss"])
        self.iteration = self.checkpoint_step = state["iteration"]
        if self.scaler.is_enabled() and state.get("loss_scale"):  # else a fresh scale finds its level again
            self.scaler.load_state_dict(state["loss_scale"])
        sampler = state["sampler"]  # the same global stream position on another number of ranks
        self.samples_consumed = sampler["samples_consumed"] * sampler["world_size"] // self.world_size
        if len(state["rng"]) == self.world_size:  # else keep the fresh per-rank seeds
            set_rng_state(state["rng"][self.rank])
        if self.rank == 0:
            tqdm.write(f"reddino-train: resumed from {self.out / CHECKPOINT_NAME} at step {self.iteration}")
            was = sampler["world_size"] * own.train.batch_size_per_gpu
            # another number of processes, and so another global batch (another batch per GPU alone
            # is named with the other changed settings)
            if sampler["world_size"] != self.world_size and was != self.world_size * self.cfg.train.batch_size_per_gpu:
                warnings.warn(self._other_world_size(sampler["world_size"], was), ResumeSettingsWarning, stacklevel=2)
            images = self.dataset.listing
            self._keep_crops_record(state, same_images=state.get("images", images) == images)
            if state.get("images", images) != images:  # checkpoints before it was recorded: not checked
                warnings.warn(
                    f"resuming {self.out} on other images than it trained on ({state['images']} then, {images} now): "
                    "the data order from here on is not the run's own, and some images of this epoch may come "
                    "twice or not at all", ResumeSettingsWarning, stacklevel=2)
            changed = changed_settings(own, self.cfg)
            self._settings_pending = bool(changed)
            if changed:  # config.yaml is about to take the new settings: keep the run's own
                kept = self.out / settings_until(self.iteration)
                if not kept.exists():  # else a resume changed them at this step before and trained no step
                    self._run_settings = (own, kept)  # written with the folder's other files
                run_schedules = build_schedules(own, sampler["world_size"])  # as the run had them
                jumps = schedule_jumps(run_schedules, self.schedules, self.iteration)
                warnings.warn(
                    f"resuming {self.out} with settings other than its own, which apply from step "
                    f"{self.iteration} on: {'; '.join(changed)} (the settings until then are in {kept.name})"
                    + (f"; at this step the schedules jump: {', '.join(jumps)}" if jumps else ""),
                    ResumeSettingsWarning, stacklevel=2,
                )

    def _keep_crops_record(self, state: dict[str, Any], same_images: bool) -> None:
        """Rank 0, resuming: the record of how the training cells were cut holds on for the same
        images copied without prepare's files (to a node's scratch disk, say), then or now; images
        cut otherwise than until now record none, as a run on images cut several ways does."""
        was = state.get("crops", self.trained_crops)  # checkpoints before the record: the images' own
        if was == self.trained_crops:
            return
        if SEVERAL in (was, self.trained_crops):  # said when it was found
            self.trained_crops = SEVERAL
            return
        if same_images and None in (was, self.trained_crops):  # prepare's files were out of sight then or now
            self.trained_crops = was or self.trained_crops
            return
        ways = [crops_in_words(crops) if crops else "not by reddino-train prepare --mode cells"
                for crops in (was, self.trained_crops)]
        warnings.warn(f"resuming {self.out} on images cut otherwise than until step {self.iteration} ({ways[0]} "
                      f"then, {ways[1]} now): {NO_RECORD}", ResumeSettingsWarning, stacklevel=2)
        self.trained_crops = SEVERAL

    def _other_world_size(self, saved: int, was: int) -> str:
        """What resuming on another number of processes, and so with another global batch (``was``
        before), changes: DINOv2's rules, which assume one."""
        now = self.cfg.train.batch_size_per_gpu * self.world_size
        processes = "process" if self.world_size == 1 else "processes"
        return (f"resuming {self.out} on {self.world_size} {processes} where it ran on {saved}: the global batch "
                f"goes from {was:,} to {now:,} images, the peak learning rate with its square root "
                f"({scaled_lr(self.cfg.optim.base_lr, was):.3g} -> {scaled_lr(self.cfg.optim.base_lr, now):.3g}), "
                f"and each of the {self.schedules.lr.total_iters - self.iteration:,} steps left sees "
                f"{now / was:.3g} times as many images")


def _checkpoint_from_rank0(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The checkpoint to resume from, read by rank 0 alone: a ViT-L's holds gigabytes, which
    every rank reading it would multiply, in memory and on the shared disk. The other ranks get
    its small entries here, and empty weights, which :func:`load_full_state` fills from rank 0."""
    state, failure = None, None
    if rank() == 0:
        try:
            state = load_checkpoint(path, cfg)
        except CheckpointError as error:  # said on every rank
            failure = error
    raise_rank0_failure(failure)
    if world_size() == 1:
        return state
    small = all_gather_objects({key: value for key, value in state.items() if key not in WEIGHTS}
                               if rank() == 0 else None)[0]
    return state if rank() == 0 else {**small, **{key: {} for key in WEIGHTS}}


class RanksDisagreeError(RuntimeError):
    """The processes of a distributed run see different training images."""


def _images_on_every_rank(data_dir: Path, transform) -> ImageFolder:
    """The training images, or :class:`EmptyDatasetError` on every rank when any rank has none
    (that rank alone failing would leave the others waiting for it until the timeout), and a
    RuntimeError when reading the first image failed otherwise. That image is read here: a
    folder of unreadable files fails now, not in each loader worker."""
    try:
        dataset, problem = ImageFolder(data_dir, transform), None
        dataset[(0, 0)]
    except Exception as error:  # noqa: BLE001  (any of them, said on every rank: see above)
        dataset, problem = None, (isinstance(error, EmptyDatasetError), str(error) or type(error).__name__)
    problems = all_gather_objects(problem)
    failed = [(index, problem) for index, problem in enumerate(problems) if problem is not None]
    if failed:
        said = "; ".join(f"rank {index}: {text}" if len(problems) > 1 else text for index, (_, text) in failed)
        if all(empty for _, (empty, _) in failed):
            raise EmptyDatasetError(said)
        raise RuntimeError(f"reading the first training image failed: {said}")
    _same_on_every_rank("the training images", dataset.listing,
                        "is the data folder still being filled, or different on each node?")
    return dataset


def _same_on_every_rank(what: str, value, hint: str) -> None:
    """:class:`RanksDisagreeError` on every rank when another rank has another ``value``."""
    values = all_gather_objects(value)
    if any(other != values[0] for other in values):
        seen = ", ".join(f"rank {index}: {other}" for index, other in enumerate(values))
        raise RanksDisagreeError(f"the ranks disagree on {what} ({seen}); {hint}")


def precision_for(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where it saves time (CUDA GPUs from Ampere on; CPUs whose bf16 matrix
    products time faster); fp16 on older CUDA GPUs with fast fp16 (Volta, Turing, the P100), as
    DINOv2 itself trained; fp32 elsewhere."""
    if precision != "auto":
        return precision
    from napari_reddino.precision_speed import auto_dtype

    fastest = auto_dtype(device)
    return next(name for name, dtype in AUTOCAST.items() if dtype == fastest)


def _seed_process(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT (sent to the whole process group by Ctrl-C or a
    scheduler) to the main process, which finishes its step and shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while training (main thread only): a checkpoint after
    the current step. A second Ctrl-C raises KeyboardInterrupt there and then, for a step that
    hangs; SIGTERM never does, as a scheduler's preemption and torchrun's agent each send one."""
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        if not stop.is_set() and rank() == 0:  # os.write: the signal may land inside a write to stderr
            again = "; Ctrl-C again stops at once, without one" if signum == signal.SIGINT else ""
            os.write(2, f"reddino-train: {signal.Signals(signum).name}: stopping after this step with a "
                        f"checkpoint{again}\n".encode())
        stop.set()

    with handling_signals(request_stop, keep_ignored=False):
        yield stop
