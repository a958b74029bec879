import errno
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings

import pytest
import torch
from _cpu_precision import CPUS, pretend_cpu

from reddino_train.checkpoint import CheckpointError, CheckpointMismatchError
from reddino_train.cli import main
from reddino_train.config import load_config, save_config
from reddino_train.data import EmptyDatasetError
from reddino_train.export import export_teacher
from reddino_train.monitor import CollapseDetector, CollapseWarning, CsvLog, read_log
from reddino_train.losses import koleo_loss
from reddino_train.schedules import ScheduleValues, build_schedules, scaled_lr
from reddino_train.model import build_student
from reddino_train.param_groups import build_param_groups
from reddino_train import run_lock
from reddino_train import train as train_module
from reddino_train.run_lock import LOCK_NAME, RunFolderBusyError, RunFolderError
from reddino_train.train import (
    LOG_COLUMNS,
    MIN_LOSS_SCALE,
    ResumeSettingsWarning,
    Trainer,
    TrainingDivergedError,
    _stop_requests,
    fit,
)

# LayerScale 1 lets the images reach the CLS token of the randomly initialised tiny model
# (with DINOv2's 1e-5 every image gives the same teacher output: a uniform collapse).
# Softmax centering and KoLeo put the centre and KoLeo into the runs as well.
TINY = ["model.layerscale=1.0", "loss.centering=softmax_center", "loss.koleo_weight=0.1"]


def test_a_halved_dino_term_with_local_crops_is_warned_of(smear_images, tmp_path):
    # RedDino's 0.5 stands in for its code's division of the global pairs; with local crops it halves DINO.
    with pytest.warns(UserWarning, match=r"^loss.dino_weight=0.5 with 2 local crops: the RedDino recipes halve"):
        fit(load_config("tiny", [*TINY, "loss.dino_weight=0.5"]), smear_images, tmp_path / "halved", max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(load_config("tiny", [*TINY, "loss.dino_weight=0.5", "crops.local_number=0"]), smear_images,
            tmp_path / "reddino", max_steps=1)


def test_a_few_steps_log_every_column_with_finite_losses(smear_images, tmp_path):
    cfg = load_config("tiny", TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        result = fit(cfg, smear_images, tmp_path, max_steps=3)
    assert result.iterations_done == 3 and not result.stopped_by_signal
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert header.split(",") == list(LOG_COLUMNS)
    rows = read_log(tmp_path / "log.csv")
    assert [row["step"] for row in rows] == [1, 2, 3]
    schedules = build_schedules(cfg, world_size=1)
    for row in rows:
        assert all(math.isfinite(value) for value in row.values())
        values = schedules.at(int(row["step"]) - 1)
        assert (row["lr"], row["teacher_temp"], row["teacher_momentum"]) == (
            values.lr, values.teacher_temp, values.teacher_momentum,
        )
        assert row["loss"] == pytest.approx(row["dino"] + row["ibot"] + 0.1 * row["koleo"], rel=1e-12)
        assert 0 < row["teacher_entropy"] < math.log(64)
        assert row["student_teacher_kl"] == pytest.approx(row["dino"] - row["teacher_entropy"], rel=1e-12)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 3
    assert checkpoint["sampler"] == {"samples_consumed": 3 * 4, "world_size": 1}
    assert (tmp_path / "config.yaml").is_file()


def test_a_step_trains_with_the_schedule_values_it_is_given(smear_images, tmp_path, monkeypatch):
    """lr, weight decay, teacher temperature and momentum reach the optimiser, the losses and
    the teacher; the loss minimised is the one logged, each term with its own weight; KoLeo sees
    each view's images apart and adds the two (DINOv2's sum, not their mean); masks differ from
    step to step and from rank to rank."""
    trainer = Trainer(load_config("tiny", [*TINY, "loss.dino_weight=0.7", "loss.ibot_weight=1.3"]), smear_images,
                      tmp_path, torch.device("cpu"))
    values = ScheduleValues(lr=3e-4, last_layer_lr=5e-5, weight_decay=0.07, teacher_momentum=0.75, teacher_temp=0.035)
    temperatures, koleo_rows, minimised = [], [], []
    for loss in (trainer.losses.dino, trainer.losses.ibot):
        probs = loss.teacher_probs
        monkeypatch.setattr(loss, "teacher_probs", lambda *args, probs=probs: temperatures.append(args[-1]) or probs(*args))
    monkeypatch.setattr(train_module, "koleo_loss", lambda tokens: koleo_rows.append(tokens.detach()) or koleo_loss(tokens))
    scale = trainer.scaler.scale
    monkeypatch.setattr(trainer.scaler, "scale", lambda total: minimised.append(total.item()) or scale(total))
    teacher_before = [param.detach().clone() for param in trainer.teacher.parameters()]
    batch = next(trainer._batches())
    stats, stopped, _ = trainer.step(batch, values, threading.Event())

    assert not stopped and temperatures == [values.teacher_temp] * 2
    assert minimised == [pytest.approx(stats["loss"], rel=1e-6)]  # as logged
    assert stats["loss"] == pytest.approx(0.7 * stats["dino"] + 1.3 * stats["ibot"] + 0.1 * stats["koleo"], rel=1e-6)
    assert stats["ibot"] > 0 and stats["dino"] > 0
    groups = trainer.optimizer.param_groups
    assert {group["is_last_layer"] for group in groups} == {True, False}
    for group in groups:
        lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        assert group["lr"] == pytest.approx(lr * group["lr_multiplier"], rel=1e-12)
        assert group["weight_decay"] == pytest.approx(values.weight_decay * group["wd_multiplier"], rel=1e-12)
    for before, teacher, student in zip(teacher_before, trainer.teacher.parameters(), trainer.student.parameters()):
        torch.testing.assert_close(teacher, torch.lerp(before, student.detach(), 1 - values.teacher_momentum))
    batch_size = len(batch["global_crops"]) // 2
    assert [len(rows) for rows in koleo_rows] == [batch_size, batch_size]  # the two views apart
    assert not torch.equal(koleo_rows[0], koleo_rows[1])
    assert stats["koleo"] == pytest.approx(sum(koleo_loss(rows).item() for rows in koleo_rows), rel=1e-5)
    masks = trainer._masks(16)
    assert masks.any() and torch.equal(masks, trainer._masks(16))  # drawn again for a resumed step
    trainer.iteration += 1
    assert not torch.equal(masks, trainer._masks(16))
    trainer.iteration, trainer.rank = trainer.iteration - 1, 1
    assert not torch.equal(masks, trainer._masks(16))


@pytest.mark.parametrize("local_number", [2, 0])  # 0: RedDino's recipe, where only the global views meet
def test_the_dino_term_pairs_each_student_crop_with_the_other_teacher_views_and_koleo_sees_the_backbone(
    smear_images, tmp_path, monkeypatch, local_number
):
    """The step's DINO term recomputed apart from the loss code, from what the teacher and the
    student output: each student crop against the teacher's softmax of every global view that
    is not its own, averaged over the batch, then over those pairs."""
    cfg = load_config("tiny", [*TINY, f"crops.local_number={local_number}"])
    trainer = Trainer(cfg, smear_images, tmp_path, torch.device("cpu"))
    seen, koleo_rows = {}, []
    targets, student = trainer.teacher.targets, trainer.distributed_student
    monkeypatch.setattr(trainer.teacher, "targets", lambda *args: seen.setdefault("teacher", targets(*args)))
    monkeypatch.setattr(trainer, "distributed_student", lambda *args: seen.setdefault("student", student(*args)))
    monkeypatch.setattr(train_module, "koleo_loss", lambda tokens: koleo_rows.append(tokens.detach()) or koleo_loss(tokens))
    values = ScheduleValues(lr=1e-4, last_layer_lr=1e-4, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.05)
    stats, _, _ = trainer.step(next(trainer._batches()), values, threading.Event())

    teacher_cls = seen["teacher"][0].detach().float()
    batch_size = len(teacher_cls) // 2
    teacher = torch.softmax(teacher_cls / values.teacher_temp, dim=-1).view(2, batch_size, -1)  # the centre starts at 0
    student_log = torch.log_softmax(seen["student"].cls_logits.detach().float() / cfg.loss.student_temp, dim=-1)
    student_log = student_log.view(-1, batch_size, teacher.shape[-1])
    assert len(student_log) == 2 + local_number
    pairs = [(s, t) for s in range(len(student_log)) for t in range(2) if s != t]
    expected = sum(-(teacher[t] * student_log[s]).sum(dim=-1).mean() for s, t in pairs) / len(pairs)
    assert stats["dino"] == pytest.approx(expected.item(), rel=1e-5)
    backbone_cls = seen["student"].global_cls_tokens.detach()
    assert backbone_cls.shape[1] == trainer.student.backbone.vit.embed_dim
    assert torch.equal(torch.cat(koleo_rows), backbone_cls)


def test_resumed_run_repeats_the_uninterrupted_one_exactly(smear_images, tmp_path):
    cfg = load_config("tiny", TINY)
    straight = fit(cfg, smear_images, tmp_path / "straight", max_steps=6)
    fit(cfg, smear_images, tmp_path / "resumed", max_steps=3)
    resumed = fit(cfg, smear_images, tmp_path / "resumed", max_steps=6)
    expected, got = read_log(tmp_path / "straight/log.csv"), read_log(tmp_path / "resumed/log.csv")
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    losses = ["loss", "dino", "ibot", "koleo", "teacher_entropy", "student_teacher_kl"]
    for before, after in zip(expected[3:], got[3:]):
        assert [before[key] for key in losses] == [after[key] for key in losses]
    for name, tensor in straight.teacher.state_dict().items():
        assert torch.equal(tensor, resumed.teacher.state_dict()[name]), name


def test_activation_checkpointing_trains_the_same_run(smear_images, tmp_path):
    # Recomputed in the backward pass, the blocks give the same gradients; stochastic depth too,
    # as the recomputation replays the random numbers the forward pass drew.
    runs = {}
    for checkpointing in ("false", "true"):
        cfg = load_config("tiny", [*TINY, "model.drop_path_rate=0.2", f"train.activation_checkpointing={checkpointing}"])
        runs[checkpointing] = fit(cfg, smear_images, tmp_path / checkpointing, max_steps=3)
    assert runs["true"].student.backbone.checkpointing and not runs["false"].student.backbone.checkpointing
    plain, checkpointed = (read_log(tmp_path / name / "log.csv") for name in ("false", "true"))
    for before, after in zip(plain, checkpointed):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    start = build_student(load_config("tiny", [*TINY, "model.drop_path_rate=0.2"])).state_dict()
    for name, tensor in runs["false"].student.state_dict().items():  # the student: the teacher barely moves
        torch.testing.assert_close(runs["true"].student.state_dict()[name], tensor, rtol=0, atol=1e-8)
    assert any(not torch.equal(tensor, start[name]) for name, tensor in runs["true"].student.state_dict().items())


@pytest.mark.parametrize(("minutes", "saved_at"), [(0, [6]), (1, [2, 4, 6])])
def test_checkpoint_minutes_saves_when_that_long_has_passed_since_the_last(smear_images, tmp_path, monkeypatch,
                                                                           minutes, saved_at):
    # A cluster's time limit is in minutes, not steps. The loop's clock here advances 40 s each time
    # it is read: once a step, and once after a save. Counted from the run's start rather than from
    # the last save, every step from the second on would save.
    saves, clock = [], iter(range(40, 10_000, 40))
    save = Trainer._save
    monkeypatch.setattr(Trainer, "_save", lambda trainer: (saves.append(trainer.iteration), save(trainer)))
    monkeypatch.setattr("reddino_train.train.time", types.SimpleNamespace(monotonic=lambda: next(clock),
                                                                          perf_counter=time.perf_counter))
    cfg = load_config("tiny", [*TINY, "train.checkpoint_every=1000", f"train.checkpoint_minutes={minutes}"])
    fit(cfg, smear_images, tmp_path, max_steps=6)
    assert saves == saved_at


def test_resuming_with_other_settings_names_them(smear_images, tmp_path):
    fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)
        fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=2)  # same settings: silent
    changed = load_config("tiny", [*TINY, "optim.base_lr=1e-3", "crops.pixel_augmentations_per_crop=1"])
    with pytest.warns(ResumeSettingsWarning, match=r"from step 2 on: optim.base_lr: 0.0002 -> 0.001; "
                                                   r"crops.pixel_augmentations_per_crop: 2 -> 1 \("):
        fit(changed, smear_images, tmp_path, max_steps=3)


def test_a_resume_given_other_starting_weights_says_they_are_not_read_and_keeps_its_own_record(smear_images,
                                                                                                 tmp_path):
    # The checkpoint holds the weights: recording model.pretrained=timm would misstate how the run began.
    fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fit(load_config("tiny", [*TINY, "model.pretrained=timm"]), smear_images, tmp_path, max_steps=2)
    assert [str(warning.message) for warning in warned if warning.category is ResumeSettingsWarning] == [
        f"resuming {tmp_path}: model.pretrained='timm' is not read, the run goes on from its checkpoint's weights (it "
        "began from random weights, as its config.yaml keeps saying)"]
    assert load_config(tmp_path / "config.yaml") == load_config("tiny", TINY)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["model"]["pretrained"] == ""
    assert not list(tmp_path.glob("config-until-step-*"))


def test_a_finished_run_given_more_epochs_says_how_far_its_schedules_jump(smear_images, tmp_path):
    short = ["optim.epochs=1", "train.iterations_per_epoch=2", "optim.warmup_epochs=0", "teacher.warmup_temp_epochs=0"]
    fit(load_config("tiny", [*TINY, *short]), smear_images, tmp_path, max_steps=2)  # at its schedules' end
    longer = load_config("tiny", [*TINY, *short, "optim.epochs=2"])
    optim, teacher = longer.optim, longer.teacher

    def at_step_2_of_4(start, end):  # a half cosine over steps 0-3: weight (1 + cos(2 pi / 3)) / 2 = 1/4 on start
        return start / 4 + end * 3 / 4

    lr = at_step_2_of_4(scaled_lr(optim.base_lr, longer.train.batch_size_per_gpu), optim.min_lr)
    wd = at_step_2_of_4(optim.weight_decay, optim.weight_decay_end)
    momentum = at_step_2_of_4(teacher.momentum, teacher.final_momentum)
    with pytest.warns(ResumeSettingsWarning, match=re.escape(
            f"at this step the schedules jump: learning rate {optim.min_lr:.4g} -> {lr:.4g}, last layer's learning "
            f"rate {optim.min_lr:.4g} -> {lr:.4g}, weight decay {optim.weight_decay_end:.4g} -> {wd:.4g}, teacher "
            f"momentum {teacher.final_momentum:.4g} -> {momentum:.4g}") + "$"):
        fit(longer, smear_images, tmp_path, max_steps=3)


def test_changed_settings_keep_the_run_s_own_and_its_config_yaml_resumes_with_them(smear_images, tmp_path):
    started = load_config("tiny", [*TINY, "optim.base_lr=1e-3"])
    fit(started, smear_images, tmp_path, max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)  # the run's own settings: silent
        fit(load_config(tmp_path / "config.yaml"), smear_images, tmp_path, max_steps=2)
    assert not list(tmp_path.glob("config-until-step-*"))
    changed = load_config("tiny", TINY)  # the recipe without the override the run started with
    with pytest.warns(ResumeSettingsWarning, match=r"optim.base_lr: 0.001 -> 0.0002 \(the settings until then "
                                                   r"are in config-until-step-2.yaml\)"):
        fit(changed, smear_images, tmp_path, max_steps=3)
    assert load_config(tmp_path / "config-until-step-2.yaml") == started
    assert load_config(tmp_path / "config.yaml") == changed
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["optim"]["base_lr"] == 2e-4
    # Changed at step 3 twice, with no step between: the file keeps the settings steps 1-3 had.
    for base_lr in ("5e-4", "7e-4"):
        with pytest.warns(ResumeSettingsWarning, match="config-until-step-3.yaml"):
            fit(load_config("tiny", [*TINY, f"optim.base_lr={base_lr}"]), smear_images, tmp_path, max_steps=3)
    assert load_config(tmp_path / "config-until-step-3.yaml") == changed
    # Neither trained a step nor saved a checkpoint: config.yaml still holds the checkpoint's settings.
    assert load_config(tmp_path / "config.yaml") == changed
    # The checkpoint moved away to start afresh: a new run takes the folder, and the old settings go,
    # but not a file that only has their name.
    (tmp_path / "checkpoint.pt").unlink()
    fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)
    assert not list(tmp_path.glob("config-until-step-*")) and load_config(tmp_path / "config.yaml") == changed
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / "config-until-step-9.yaml").write_text("my notes\n")
    with pytest.raises(RunFolderError, match=r"holds files that no training run wrote \(config-until-step-9.yaml\)"):
        fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)


def test_a_resumed_run_takes_the_layerwise_decay_of_its_config_not_of_the_checkpoint(smear_images, tmp_path):
    fit(load_config("tiny", [*TINY, "optim.layerwise_decay=0.9"]), smear_images, tmp_path, max_steps=1)
    changed = load_config("tiny", [*TINY, "optim.layerwise_decay=0.5"])
    with pytest.warns(ResumeSettingsWarning, match="optim.layerwise_decay: 0.9 -> 0.5"):
        resumed = Trainer(changed, smear_images, tmp_path, torch.device("cpu"))
    fresh = build_param_groups(build_student(changed), 0.5, changed.optim.patch_embed_lr_mult)
    assert resumed.iteration == 1
    assert sorted(g["lr_multiplier"] for g in resumed.optimizer.param_groups) == sorted(
        g["lr_multiplier"] for g in fresh
    )


@pytest.mark.parametrize(("before", "after"), [("softmax_center", "sinkhorn_knopp"),
                                                ("sinkhorn_knopp", "softmax_center")])
def test_a_resumed_run_may_change_its_centering_which_starts_afresh(smear_images, tmp_path, before, after):
    fit(load_config("tiny", [*TINY, f"loss.centering={before}"]), smear_images, tmp_path, max_steps=1)
    with pytest.warns(ResumeSettingsWarning, match=f"loss.centering: '{before}' -> '{after}'"):
        result = fit(load_config("tiny", [*TINY, f"loss.centering={after}"]), smear_images, tmp_path, max_steps=2)
    assert result.iterations_done == 2
    centre = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["dino_loss"]
    assert bool(centre) == (after == "softmax_center")  # Sinkhorn-Knopp keeps no centre


def test_resuming_on_another_number_of_processes_says_what_that_changes(smear_images, tmp_path):
    cfg = load_config("tiny", TINY)
    fit(cfg, smear_images, tmp_path, max_steps=1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["sampler"] = {"samples_consumed": 2, "world_size": 2}  # as a run on two processes saves it
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    total = build_schedules(cfg, world_size=1).lr.total_iters
    was, now = (scaled_lr(cfg.optim.base_lr, 4 * n) for n in (2, 1))
    with pytest.warns(ResumeSettingsWarning) as warned:
        resumed = Trainer(cfg, smear_images, tmp_path, torch.device("cpu"))
    assert str(warned[0].message) == (
        f"resuming {tmp_path} on 1 process where it ran on 2: the global batch goes from 8 to 4 images, the peak "
        f"learning rate with its square root ({was:.3g} -> {now:.3g}), and each of the {total - 1:,} steps left "
        "sees 0.5 times as many images")
    assert resumed.samples_consumed == 4  # the same place in the global stream of images
    halved = load_config("tiny", [*TINY, "train.batch_size_per_gpu=8"])  # 2 x 4 images become 1 x 8
    with pytest.warns(ResumeSettingsWarning) as warned:
        Trainer(halved, smear_images, tmp_path, torch.device("cpu"))
    said = "\n".join(str(warning.message) for warning in warned)
    assert "train.batch_size_per_gpu: 4 -> 8" in said and "global batch" not in said  # the same 8 images a step


def test_a_resumed_run_takes_the_adamw_betas_of_its_config_in_every_group(smear_images, tmp_path):
    fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)
    changed = load_config("tiny", [*TINY, "optim.adamw_betas=[0.5, 0.9]", "optim.layerwise_decay=0.5"])
    with pytest.warns(ResumeSettingsWarning, match="optim.adamw_betas"):
        resumed = Trainer(changed, smear_images, tmp_path, torch.device("cpu"))
    assert {tuple(group["betas"]) for group in resumed.optimizer.param_groups} == {(0.5, 0.9)}
    assert resumed.optimizer.state  # the moments came back with the checkpoint


def test_divergence_stops_with_the_step_and_the_term(smear_images, tmp_path):
    cfg = load_config("tiny", [*TINY, "optim.base_lr=1e35", "optim.warmup_epochs=0"])
    with pytest.raises(TrainingDivergedError, match=r"diverged at step (\d+): the (dino|ibot|koleo) loss") as error:
        fit(cfg, smear_images, tmp_path, max_steps=6)
    assert error.value.step == 2 and not math.isfinite(error.value.value)
    assert str(error.value).endswith("then run again: no checkpoint was saved yet, so it starts again from the "
                                     "beginning.")
    assert [row["step"] for row in read_log(tmp_path / "log.csv")] == [1]
    assert not (tmp_path / "checkpoint.pt").exists()
    fit(load_config("tiny", TINY), smear_images, tmp_path / "saved", max_steps=1)
    with pytest.raises(TrainingDivergedError) as error, pytest.warns(ResumeSettingsWarning):
        fit(cfg, smear_images, tmp_path / "saved", max_steps=6)
    assert str(error.value).endswith("then run again: it resumes from the checkpoint of step 1.")


@pytest.mark.parametrize("clip_grad", ["3.0", "0"])
def test_gradients_that_are_not_finite_stop_the_run_before_they_reach_the_weights(smear_images, tmp_path, clip_grad):
    """A finite loss can still give NaN gradients; clipping does not catch them."""
    cfg = load_config("tiny", [*TINY, f"optim.clip_grad={clip_grad}"])
    fit(cfg, smear_images, tmp_path, max_steps=1)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    trainer = Trainer(cfg, smear_images, tmp_path, torch.device("cpu"))
    models = {"student": trainer.student, "teacher": trainer.teacher}
    before = {part: [param.detach().clone() for param in model.parameters()] for part, model in models.items()}
    trainer.student.backbone.vit.cls_token.register_hook(lambda grad: torch.full_like(grad, math.nan))
    with pytest.raises(TrainingDivergedError,
                       match=r"diverged at step 2: the gradient norm is nan\..*checkpoint of step 1\.$"):
        trainer.train(max_steps=3, stop=threading.Event())
    for part, model in models.items():
        assert all(torch.equal(param, old) for param, old in zip(model.parameters(), before[part])), part
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_fp16_skips_a_step_that_overflows_but_stops_where_no_loss_scale_helps(smear_images, tmp_path):
    cfg = load_config("tiny", [*TINY, "train.precision=fp16"])
    fit(cfg, smear_images, tmp_path, max_steps=1)
    trainer = Trainer(cfg, smear_images, tmp_path, torch.device("cpu"))
    before = [param.detach().clone() for param in trainer.student.parameters()]
    trainer.student.backbone.vit.cls_token.register_hook(lambda grad: torch.full_like(grad, math.inf))
    # backed off already, and 1,999 steps into the 2,000 after which the scale would double
    trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": MIN_LOSS_SCALE * 2, "_growth_tracker": 1999})
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 3: the gradient norm is inf\..*checkpoint of "
                                                    r"step 1\.$"):
        trainer.train(max_steps=5, stop=threading.Event())  # step 2 is skipped at half the scale; step 3 stops
    assert trainer.scaler.get_scale() == MIN_LOSS_SCALE
    assert trainer.scaler.state_dict()["_growth_tracker"] == 0  # the skipped step started the count again
    assert all(torch.equal(param, old) for param, old in zip(trainer.student.parameters(), before))


def test_checkpoint_of_another_architecture_is_refused_and_kept(smear_images, tmp_path):
    fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointMismatchError, match=r"another architecture \(depth: checkpoint 2 vs config 1\)"):
        fit(load_config("tiny", [*TINY, "model.depth=1"]), smear_images, tmp_path, max_steps=2)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    with pytest.raises(CheckpointMismatchError, match=r"\(layerscale: checkpoint True vs config False\)"):
        fit(load_config("tiny", [*TINY, "model.layerscale=0"]), smear_images, tmp_path, max_steps=2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["architecture"]["layerscale"]  # saved before LayerScale's presence was recorded: its weights say
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointMismatchError, match=r"\(layerscale: checkpoint True vs config False\)"):
        fit(load_config("tiny", [*TINY, "model.layerscale=0"]), smear_images, tmp_path, max_steps=2)
    assert fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=2).iterations_done == 2
    # The iBOT head's settings count only where it is separate: else it has no weights.
    unused = "heads.ibot.n_prototypes=32"
    with pytest.warns(ResumeSettingsWarning, match="heads.ibot.n_prototypes: 64 -> 32"):
        assert fit(load_config("tiny", [*TINY, unused]), smear_images, tmp_path, max_steps=2).iterations_done == 2
    fit(load_config("tiny", [*TINY, "heads.ibot_separate=true"]), smear_images, tmp_path / "separate", max_steps=1)
    with pytest.raises(CheckpointMismatchError, match=r"heads: checkpoint .*'ibot': \{'n_prototypes': 64"):
        fit(load_config("tiny", [*TINY, "heads.ibot_separate=true", unused]), smear_images, tmp_path / "separate",
            max_steps=2)


def test_a_save_killed_midway_keeps_the_checkpoint_and_the_next_start_removes_its_leftover(
        smear_images, tmp_path, capsys):
    cfg = load_config("tiny", TINY)
    path = tmp_path / "checkpoint.pt"
    fit(cfg, smear_images, tmp_path, max_steps=1)
    saved = path.read_bytes()
    stalled_save = textwrap.dedent("""
        import sys, time
        from reddino_train.files import write_atomic_with
        def write(handle):
            handle.write(bytes(1_000_000))
            handle.flush()
            print("writing", flush=True)
            time.sleep(120)
        write_atomic_with(sys.argv[1], write)
    """)
    with subprocess.Popen([sys.executable, "-c", stalled_save, str(path)], stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout.readline() == "writing\n"
        child.kill()
    [leftover] = tmp_path.glob(".checkpoint.pt.*.tmp")
    assert leftover.stat().st_size == 1_000_000 and path.read_bytes() == saved
    unrelated = [tmp_path / ".checkpoint.pt.notes", tmp_path / ".checkpoint.pt.old.abcdefgh.tmp"]
    for path_not_ours in unrelated:
        path_not_ours.write_text("not a temporary file of this checkpoint")
    (tmp_path / ".checkpoint.pt.abcdefgh.tmp").mkdir()  # a folder of that name is left alone too
    capsys.readouterr()
    assert fit(cfg, smear_images, tmp_path, max_steps=2).iterations_done == 2
    assert f"removed {leftover.name} (1 MiB), a checkpoint whose save was interrupted" in capsys.readouterr().out
    assert not leftover.exists() and all(path.exists() for path in unrelated)
    assert (tmp_path / ".checkpoint.pt.abcdefgh.tmp").is_dir()
    assert torch.load(path, weights_only=True)["iteration"] == 2


def test_earlier_checkpoints_are_kept_as_asked_and_one_can_be_gone_back_to(smear_images, tmp_path, monkeypatch,
                                                                             capsys):
    every_step = [*TINY, "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    backup = tmp_path / "checkpoint-50000.pt"  # the user's own copy, by a name like the ones kept
    fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=1)
    shutil.copyfile(tmp_path / "checkpoint.pt", backup)
    fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=5)
    kept = tmp_path / "earlier-checkpoints"

    def steps(*paths):
        return [torch.load(path, weights_only=True)["iteration"] for path in paths]

    assert sorted(path.name for path in kept.iterdir()) == ["step-3.pt", "step-4.pt"] and backup.is_file()
    assert steps(kept / "step-3.pt", kept / "step-4.pt", tmp_path / "checkpoint.pt") == [3, 4, 5]
    # Gone back to step 3 (the teacher collapsed after it): the run goes on from there, and the
    # steps it went back from are no longer kept.
    shutil.copyfile(kept / "step-3.pt", tmp_path / "checkpoint.pt")
    capsys.readouterr()
    result = fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=5)
    assert result.iterations_this_run == 2 and steps(kept / "step-3.pt", kept / "step-4.pt") == [3, 4]
    assert capsys.readouterr().out.count("reddino-train: removed earlier-checkpoints/") == 1  # step-4.pt, once
    # Fewer kept from here on: the oldest go at the next save; the user's copy stays. What a folder
    # keeps is no setting of the training: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)
        fit(load_config("tiny", [*every_step, "train.keep_checkpoints=1"]), smear_images, tmp_path, max_steps=6)
    assert not list(kept.iterdir()) and backup.is_file()
    # Where the file system has no hard links, the run says so once and goes on with its newest checkpoint.
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(errno.EPERM, "Operation not permitted")))
    with pytest.warns(RuntimeWarning, match=r"cannot keep earlier checkpoints in earlier-checkpoints \(Operation not "
                                             r"permitted\): from step 6 on, checkpoint.pt alone is kept") as warned:
        fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=8)
    assert len([warning for warning in warned if "cannot keep" in str(warning.message)]) == 1
    assert steps(tmp_path / "checkpoint.pt") == [8] and not list(kept.iterdir())
    # Its checkpoint.pt moved away, a folder of earlier ones is not taken for a fresh run's.
    monkeypatch.undo()
    os.link(tmp_path / "checkpoint.pt", kept / "step-8.pt")
    (tmp_path / "checkpoint.pt").unlink()
    backup.unlink()
    with pytest.raises(RunFolderError, match=r"holds earlier checkpoints of a run \(earlier-checkpoints/step-8.pt\) "
                                             r"but no checkpoint.pt: copy the one to go on from to checkpoint.pt"):
        fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=9)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_saying_which_is_kept(
        smear_images, tmp_path, capsys, monkeypatch):
    main(["fit", "tiny", str(smear_images), "--out", str(tmp_path), *TINY, "--max-steps", "1"])
    saved = (tmp_path / "checkpoint.pt").read_bytes()

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(path, write, texts=None):  # torch.save's own writer meets the error, as on a real disk
        write(io.BufferedWriter(FullDisk()))

    monkeypatch.setattr("reddino_train.checkpoint.write_atomic_with", full_disk)
    capsys.readouterr()
    assert main(["fit", "tiny", str(smear_images), "--out", str(tmp_path), *TINY, "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.endswith(
        f"reddino-train fit: cannot write {tmp_path}/checkpoint.pt at step 2 ([Errno 28] No space left on device); "
        "the checkpoint of step 1 is kept: make room or mend the folder, then run again\n")
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_a_folder_that_cannot_be_written_at_the_start_stops_the_run_saying_so(smear_images, tmp_path, capsys,
                                                                              monkeypatch):
    main(["fit", "tiny", str(smear_images), "--out", str(tmp_path), *TINY, "--max-steps", "1"])
    saved = (tmp_path / "checkpoint.pt").read_bytes()

    def full_disk(*args, **kwargs):  # log.csv, cut back to the checkpoint's step, cannot be written again
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module, "CsvLog", full_disk)
    capsys.readouterr()
    assert main(["fit", "tiny", str(smear_images), "--out", str(tmp_path), *TINY, "--max-steps", "2"]) == 2
    assert capsys.readouterr().err == (f"reddino-train fit: cannot write to the output folder {tmp_path} ([Errno 28] "
                                       "No space left on device); make room or mend it, then run again\n")
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_a_config_yaml_that_cannot_be_replaced_is_written_with_the_next_checkpoint(smear_images, tmp_path, monkeypatch):
    every_step = [*TINY, "train.checkpoint_every=1"]
    fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=1)
    changed = load_config("tiny", [*every_step, "optim.base_lr=1e-3"])
    replace, refused = os.replace, []

    def held_open_once(source, target):  # config.yaml open in an editor on Windows, then closed
        if str(target).endswith("config.yaml") and not refused:
            refused.append(target)
            assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 2  # renamed first
            raise PermissionError(errno.EACCES, "Permission denied")
        replace(source, target)

    monkeypatch.setattr("napari_reddino.atomic_files.os.replace", held_open_once)
    with pytest.warns(RuntimeWarning, match=r"the checkpoint of step 2 is saved, but config.yaml could not be replaced "
                                            r"\(Permission denied\); it is written again with the next checkpoint"):
        with pytest.warns(ResumeSettingsWarning):
            fit(changed, smear_images, tmp_path, max_steps=3)  # the same run saves again at step 3
    assert refused and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 3
    assert load_config(tmp_path / "config.yaml") == changed

    def config_held_open(source, target):
        if str(target).endswith("config.yaml"):
            raise PermissionError(errno.EACCES, "Permission denied")
        replace(source, target)

    monkeypatch.setattr("napari_reddino.atomic_files.os.replace", config_held_open)
    with pytest.warns(RuntimeWarning, match="config.yaml could not be replaced"), pytest.warns(ResumeSettingsWarning):
        result = fit(load_config("tiny", [*every_step, "optim.base_lr=2e-3"]), smear_images, tmp_path, max_steps=4)
    assert not result.config_current  # the CLI then names no command that would resume with config.yaml's settings
    assert load_config(tmp_path / "config.yaml") == changed


def test_a_folder_another_run_holds_is_refused_untouched_until_that_run_ends(smear_images, tmp_path, capsys):
    cfg = load_config("tiny", TINY)
    fit(cfg, smear_images, tmp_path, max_steps=1)
    files_before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name != LOCK_NAME}
    other_run = textwrap.dedent("""
        import sys, time
        from reddino_train.run_lock import hold_run_folder
        with hold_run_folder(sys.argv[1]):
            print("holding", flush=True)
            time.sleep(120)
    """)
    with subprocess.Popen([sys.executable, "-c", other_run, str(tmp_path)], stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout.readline() == "holding\n"
        refusal = (rf"{re.escape(str(tmp_path))} is in use by another reddino-train fit \(pid {child.pid} on \S+, "
                   r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to end, or give this run another --out; "
                   r"if that process is gone with its node, copy checkpoint.pt, config.yaml and log.csv into a new "
                   r"--out to resume there$")
        with pytest.raises(RunFolderBusyError, match=refusal):
            fit(cfg, smear_images, tmp_path, max_steps=2)
        assert main(["fit", "tiny", str(smear_images), "--out", str(tmp_path), *TINY, "--max-steps", "2"]) == 2
        assert re.search(refusal, capsys.readouterr().err)
        files_after = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name != LOCK_NAME}
        assert files_after == files_before
        child.kill()  # a run that dies, however, frees the folder
    assert fit(cfg, smear_images, tmp_path, max_steps=2).iterations_done == 2


def test_a_killed_run_frees_its_folder_while_its_forked_workers_live_on(smear_images, tmp_path):
    """Data loader workers are forked from rank 0 and outlive a SIGKILL of it by seconds."""
    killed_run = textwrap.dedent("""
        import os, sys, time
        from reddino_train.run_lock import hold_run_folder
        with hold_run_folder(sys.argv[1]):
            worker = os.fork()
            if worker == 0:
                time.sleep(60)
                os._exit(0)
            print(worker, flush=True)
            time.sleep(120)
    """)
    with subprocess.Popen([sys.executable, "-c", killed_run, str(tmp_path)], stdout=subprocess.PIPE, text=True) as child:
        worker = int(child.stdout.readline())
        child.kill()
    try:
        os.kill(worker, 0)  # the worker still lives...
        assert fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1).iterations_done == 1  # ...yet
    finally:
        os.kill(worker, signal.SIGKILL)


def test_an_output_folder_that_cannot_be_made_is_refused(smear_images, tmp_path):
    (tmp_path / "a file").write_text("")
    with pytest.raises(RunFolderError, match=r"cannot use .*a file as the output folder"):
        fit(load_config("tiny", TINY), smear_images, tmp_path / "a file", max_steps=1)


def test_a_fresh_run_refuses_a_folder_of_other_files_and_takes_one_of_its_own(smear_images, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"years of work")
    (out / "config.yaml").write_text("someone else's settings\n")
    (out / "log.csv").write_text("date,glucose\n2026-12-01,5.1\n")
    with pytest.raises(RunFolderError, match=r"home holds files that no training run wrote \(thesis.docx; config.yaml, "
                                             r"which is no training config; log.csv, which is no training log\): give"):
        fit(load_config("tiny", TINY), smear_images, out, max_steps=1)
    assert (out / "config.yaml").read_text() == "someone else's settings\n"
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "log.csv", "thesis.docx"]  # no lock file
    (out / "log.csv").write_text("\nstep,loss\n")  # a blank first line: no log either, and no crash
    with pytest.raises(RunFolderError, match=r"log.csv, which is no training log"):
        fit(load_config("tiny", TINY), smear_images, out, max_steps=1)
    (out / "thesis.docx").unlink()
    (out / "slurm-4711.out").write_text("job 4711 on node07\n")  # a job script's own log is welcome
    save_config(load_config("tiny"), out / "config.yaml")  # a run that stopped before its first checkpoint
    (out / "log.csv").write_text("step,loss\n1,9.5\n")
    assert fit(load_config("tiny", TINY), smear_images, out, max_steps=1).iterations_done == 1
    assert [row["step"] for row in read_log(out / "log.csv")] == [1]


def test_a_file_system_without_locks_trains_with_a_warning(smear_images, tmp_path, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(run_lock.fcntl, "lockf", no_locks)
    with pytest.warns(RuntimeWarning, match=rf"cannot lock {re.escape(str(tmp_path))} \(Function not implemented\)"):
        assert fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1).iterations_done == 1


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda data: data[: len(data) // 2], r"cannot be read \(damaged or cut short: "),
        (lambda data: b"", r"cannot be read \(damaged or cut short: "),
        (lambda data: None, r"is not a reddino-train checkpoint \(it has no architecture, config, iteration"),
    ],
    ids=["cut-short", "empty", "another-tool"],
)
def test_a_damaged_or_foreign_checkpoint_is_refused_by_name_and_kept(smear_images, tmp_path, damage, says):
    path = tmp_path / "checkpoint.pt"
    fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=1)
    damaged = damage(path.read_bytes())
    if damaged is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # a checkpoint of some other trainer
        damaged = path.read_bytes()
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} {says}.*left untouched"):
        fit(load_config("tiny", TINY), smear_images, tmp_path, max_steps=2)
    assert path.read_bytes() == damaged
    with pytest.raises(CheckpointError, match=says):
        export_teacher(tmp_path, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_a_damaged_checkpoint_beside_kept_ones_names_the_newest_to_go_on_from(smear_images, tmp_path):
    every_step = [*TINY, "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=3)
    path, newest = tmp_path / "checkpoint.pt", tmp_path / "earlier-checkpoints" / "step-2.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=re.escape(
            f"left untouched; copy the newest checkpoint the run kept, {newest}, over it to resume from step 2, or "
            "restore a backup.") + "$"):
        fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=4)
    shutil.copyfile(newest, path)  # as it says
    assert fit(load_config("tiny", every_step), smear_images, tmp_path, max_steps=4).iterations_this_run == 2
    # what is plainly no checkpoint is not called damaged
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'config.yaml'} is not a checkpoint (no file torch saved); give a run folder or a "
            "checkpoint.pt of one.") + "$"):
        export_teacher(tmp_path / "config.yaml", tmp_path / "exported")
    backup = tmp_path / "checkpoint.pt.bak"  # by any name, a checkpoint cut short is one
    backup.write_bytes(newest.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(backup))} cannot be read \(damaged or cut short: "):
        export_teacher(backup, tmp_path / "exported")


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(EmptyDatasetError, match="no images under"):
        fit(load_config("tiny"), tmp_path / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a mistyped data folder leaves no output folder behind
    for name in ("a.png", "b.jpg"):
        (tmp_path / "data" / name).write_bytes(b"not an image")  # a download that failed, say
    with pytest.raises(EmptyDatasetError, match="none of the 2 images under .* is readable"):  # not in a worker
        fit(load_config("tiny", ["train.num_workers=2"]), tmp_path / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resuming_on_other_images_says_so(smear_images, tmp_path):
    fit(load_config("tiny", TINY), smear_images, tmp_path / "run", max_steps=1)
    fewer = shutil.copytree(smear_images, tmp_path / "fewer")
    sorted(fewer.rglob("*.png"))[0].unlink()  # prepare run again into the folder, say
    moved = shutil.copytree(smear_images, tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)  # the same images elsewhere: silent
        fit(load_config("tiny", TINY), moved, tmp_path / "run", max_steps=2)
    with pytest.warns(ResumeSettingsWarning, match=r"on other images than it trained on \(16 images \(\w{8}\) then, "
                                                   r"15 images \(\w{8}\) now\): the data order from here on"):
        fit(load_config("tiny", TINY), fewer, tmp_path / "run", max_steps=3)


@pytest.mark.parametrize(("weights", "says"), [
    (lambda path: None, "there is no such file"),
    (lambda path: path.write_bytes(b"not weights"), r"Cannot read weights from .* \(damaged or not a weights file\): "
                                                    r"not tensors alone \(Unsupported operand"),
    (lambda path: torch.save(build_student(load_config("tiny", ["model.depth=3"])).backbone.vit.state_dict(), path),
     r"do not fit a ViT of 2 blocks, width 384, patch 14: unexpected keys \(14\): blocks.2."),
])
def test_pretrained_weights_that_cannot_be_used_are_a_clear_error(smear_images, tmp_path, weights, says):
    weights(tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=rf"^model.pretrained.*{says}"):
        fit(load_config("tiny", [f"model.pretrained={tmp_path / 'weights.pth'}"]), smear_images, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_resume_needs_no_pretrained_weights_file_any_more(smear_images, tmp_path):
    # The file may be gone by then (a scratch disk purged): the checkpoint holds the weights.
    torch.save(build_student(load_config("tiny")).backbone.vit.state_dict(), tmp_path / "start.pth")
    cfg = load_config("tiny", [*TINY, f"model.pretrained={tmp_path / 'start.pth'}"])
    fit(cfg, smear_images, tmp_path / "run", max_steps=1)
    (tmp_path / "start.pth").unlink()
    assert fit(cfg, smear_images, tmp_path / "run", max_steps=2).iterations_done == 2


def test_a_second_ctrl_c_stops_a_step_that_hangs_and_a_second_sigterm_does_not(capfd, terminal_ctrl_c):
    with _stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)  # a checkpoint after the step
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's agent passes the scheduler's on: the same request
        time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert capfd.readouterr().err == "reddino-train: SIGTERM: stopping after this step with a checkpoint\n"
    with _stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the step that hangs: the second Ctrl-C ends it at once
    assert capfd.readouterr().err == ("reddino-train: SIGINT: stopping after this step with a checkpoint; Ctrl-C "
                                      "again stops at once, without one\n")


def test_collapse_warns_once_the_streak_lasts(smear_images, tmp_path):
    # DINOv2's LayerScale 1e-5 on a random model: identical CLS tokens, uniform targets
    with pytest.warns(CollapseWarning, match=r"step 5: the teacher has collapsed \(uniform\)"):
        fit(load_config("tiny"), smear_images, tmp_path, max_steps=5)
    rows = read_log(tmp_path / "log.csv")
    assert all(row["teacher_entropy"] == pytest.approx(math.log(64), abs=1e-4) for row in rows)


def test_the_cli_says_a_collapse_in_one_line_of_its_own(smear_images, tmp_path, capsys):
    assert main(["fit", "tiny", str(smear_images), "--out", str(tmp_path), "--max-steps", "5"]) == 0
    errors = capsys.readouterr().err
    said = [line for line in errors.splitlines() if "collapsed" in line]
    assert len(said) == 1 and said[0].startswith("reddino-train: warning: step 5: the teacher has collapsed (uniform)")
    assert "CollapseWarning" not in errors and "warnings.warn" not in errors


def test_collapse_detector_kinds_and_streaks():
    detector = CollapseDetector(n_prototypes=100, patience=3)
    uniform, healthy = math.log(100) - 0.01, 2.0
    assert [detector.update(step, uniform, 4.6) for step in (1, 2)] == [None, None]
    assert detector.update(3, healthy, 4.6) is None  # the streak breaks
    with pytest.warns(CollapseWarning):
        messages = [detector.update(step, uniform, 4.6) for step in (4, 5, 6, 7)]
    assert messages[:2] == [None, None] and messages[3] is None
    assert messages[2].startswith("step 6: the teacher has collapsed (uniform)")
    with pytest.warns(CollapseWarning):
        one_prototype = [detector.update(step, 0.001, 0.05) for step in (8, 9, 10)]
    assert one_prototype[2].startswith("step 10: the teacher has collapsed (one-prototype)")
    assert "centering" in one_prototype[2]


def test_bf16_autocast_trains_with_finite_losses_close_to_fp32(smear_images, tmp_path):
    fp32 = fit(load_config("tiny", TINY), smear_images, tmp_path / "fp32", max_steps=1)
    bf16 = fit(load_config("tiny", [*TINY, "train.precision=bf16"]), smear_images, tmp_path / "bf16", max_steps=1)
    assert fp32.iterations_done == bf16.iterations_done == 1
    (exact,), (low,) = read_log(tmp_path / "fp32/log.csv"), read_log(tmp_path / "bf16/log.csv")
    assert math.isfinite(low["loss"]) and low["loss"] != exact["loss"]
    assert low["dino"] == pytest.approx(exact["dino"], rel=0.05)
    # on a CPU, bf16 training computes attention explicitly (the fused backward is slow there)
    assert fused_attention_flags(bf16.student) == fused_attention_flags(bf16.teacher) == {False}
    assert fused_attention_flags(fp32.student) == {True}


def fused_attention_flags(model: torch.nn.Module) -> set[bool]:
    return {module.fused_attn for module in model.modules() if hasattr(module, "fused_attn")}


@pytest.mark.parametrize(("cpu_features", "bf16_speedup", "picks"), CPUS)
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_faster(smear_images, tmp_path, monkeypatch,
                                                                    cpu_features, bf16_speedup, picks):
    pretend_cpu(monkeypatch, cpu_features, bf16_speedup)
    same_as = "bf16" if picks == torch.bfloat16 else "fp32"
    for precision in ("auto", same_as):
        fit(load_config("tiny", [*TINY, f"train.precision={precision}"]), smear_images, tmp_path / precision,
            max_steps=1)
    (auto,), (explicit,) = read_log(tmp_path / "auto/log.csv"), read_log(tmp_path / f"{same_as}/log.csv")
    assert auto["loss"] == explicit["loss"]


def test_a_resumed_run_keeps_the_precision_auto_chose_at_its_start_on_the_same_kind_of_device(
        smear_images, tmp_path, monkeypatch):
    pretend_cpu(monkeypatch, {"amx_bf16": True}, 3.0)
    cfg = load_config("tiny", [*TINY, "train.precision=auto"])
    fit(cfg, smear_images, tmp_path, max_steps=1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["precision"] == {"device": "cpu", "dtype": "bf16", "bf16": True}
    pretend_cpu(monkeypatch, {"amx_bf16": True}, 0.9)  # timed again now, bf16 would lose
    assert Trainer(cfg, smear_images, tmp_path, torch.device("cpu")).precision == "bf16"
    del checkpoint["precision"]["dtype"]  # saved before fp16 existed
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert Trainer(cfg, smear_images, tmp_path, torch.device("cpu")).precision == "bf16"
    checkpoint["precision"]["device"] = "cuda"  # started on a GPU: this CPU decides for itself
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert Trainer(cfg, smear_images, tmp_path, torch.device("cpu")).precision == "fp32"


def test_fp16_trains_with_a_loss_scale_that_backs_off_on_overflow_and_resumes(smear_images, tmp_path):
    # fp16 as DINOv2 trained (and GPUs before Ampere can): the loss is scaled so small gradients
    # survive, and a step that overflows at the scale is skipped on every rank, the scale halved.
    for precision in ("fp16", "fp32"):  # the whole tiny schedule: the first steps find the scale
        fit(load_config("tiny", [*TINY, f"train.precision={precision}"]), smear_images, tmp_path / precision)
    saved = torch.load(tmp_path / "fp16/checkpoint.pt", weights_only=True)
    assert saved["precision"]["dtype"] == "fp16" and saved["iteration"] == 10
    # Started at 2**16, where the first steps overflow: it backed off, then the last steps were taken.
    assert saved["loss_scale"]["scale"] < 2.0**16 and saved["loss_scale"]["_growth_tracker"] >= 1
    skipped = round(math.log2(2.0**16 / saved["loss_scale"]["scale"]))  # one halving per skipped step
    assert {int(state["step"]) for state in saved["optimizer"]["state"].values()} == {10 - skipped}
    assert 10 - skipped >= 1
    rows, reference = read_log(tmp_path / "fp16/log.csv"), read_log(tmp_path / "fp32/log.csv")
    # The same weights give the same loss at the first step; the runs part after it (fp16 skips steps).
    assert rows[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-2)
    assert all(math.isfinite(row["loss"]) for row in rows) and len(rows) == len(reference) == 10
    mean = [sum(row["loss"] for row in log) / len(log) for log in (rows, reference)]
    assert mean[0] == pytest.approx(mean[1], rel=0.1)  # and then it trains as fp32 does (3 % apart here)
    resumed = Trainer(load_config("tiny", [*TINY, "train.precision=fp16"]), smear_images, tmp_path / "fp16",
                      torch.device("cpu"))
    assert resumed.scaler.get_scale() == saved["loss_scale"]["scale"]
    assert torch.load(tmp_path / "fp32/checkpoint.pt", weights_only=True)["loss_scale"] == {}


def test_loader_workers_give_the_same_run_as_the_main_process(smear_images, tmp_path):
    for workers in (0, 2):
        fit(load_config("tiny", [*TINY, f"train.num_workers={workers}"]), smear_images, tmp_path / f"w{workers}",
            max_steps=2)
    in_main, in_workers = read_log(tmp_path / "w0/log.csv"), read_log(tmp_path / "w2/log.csv")
    assert [row["loss"] for row in in_main] == [row["loss"] for row in in_workers]


def test_a_log_row_that_cannot_be_written_is_warned_of_and_training_goes_on(smear_images, tmp_path, monkeypatch):
    fsync, rows = os.fsync, []

    def disk_full_at_the_second_row(descriptor):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith("log.csv"):
            rows.append(descriptor)
            if len(rows) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", disk_full_at_the_second_row)
    with pytest.warns(RuntimeWarning, match=r"step 2 is not in .*log.csv \(No space left on device\); training goes on"):
        result = fit(load_config("tiny", [*TINY, "train.log_every=1"]), smear_images, tmp_path, max_steps=3)
    assert result.iterations_done == 3 and (tmp_path / "checkpoint.pt").is_file()


def test_a_log_with_damaged_rows_is_cut_back_to_its_whole_ones_on_resume(tmp_path):
    """A row cut short by a kill, one with a NUL byte, one with too many fields, and a column an
    older version logged: the run resumes with the whole rows up to its checkpoint."""
    path = tmp_path / "log.csv"
    path.write_bytes(b"step,loss,old_column\n1,0.5,9\n2,0.4,9\n3,0.\x003,9\n4,0.2,9,9\n5,0.1,9\n6,0.05,9\n5")
    with pytest.warns(RuntimeWarning, match=r"left out 3 damaged rows of .*log.csv \(cut short"):
        log = CsvLog(path, ["step", "loss", "entropy"], resume_step=5)
    log.write({"step": 6, "loss": 0.25, "entropy": 1.5})
    assert path.read_text().splitlines() == ["step,loss,entropy", "1,0.5,", "2,0.4,", "5,0.1,", "6,0.25,1.5"]
