"""Checkpoints that resume a run exactly, written atomically as tensors and plain containers
(``torch.load(weights_only=True)`` reads them)."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from napari_reddino.models import why_unreadable

from .config import TrainConfig, config_text, config_to_dict
from .files import write_atomic_with

CHECKPOINT_NAME = "checkpoint.pt"
KEPT_FOLDER = "earlier-checkpoints"  # train.keep_checkpoints: step-<N>.pt, hard links; no user file lives here
_KEPT = re.compile(r"step-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the file is left as it is."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint made for another model than the one the config describes."""


# What every reddino-train checkpoint holds; a file without them was written by something else.
_REQUIRED = ("architecture", "config", "iteration", "student", "teacher")


def architecture(cfg: TrainConfig) -> dict[str, Any]:
    """What fixes the shapes of the saved weights; a resume must match it exactly."""
    return _architecture_that_fits({
        "arch": cfg.model.arch,
        "depth": cfg.model.depth,
        "patch_size": cfg.model.patch_size,
        "embed_dim": cfg.model.embed_dim,
        "num_heads": cfg.model.num_heads,
        "global_size": cfg.crops.global_size,
        "layerscale": bool(cfg.model.layerscale),  # timm makes no LayerScale weights for 0
        "heads": config_to_dict(cfg.heads),
    })


def _architecture_that_fits(saved: dict[str, Any]) -> dict[str, Any]:
    """An architecture without the iBOT head's settings where the DINO head serves iBOT too:
    that head has no weights, so its settings cannot make a checkpoint misfit."""
    heads = dict(saved.get("heads") or {})
    if not heads.get("ibot_separate", True):
        heads.pop("ibot", None)
    return {**saved, "heads": heads}


def save_checkpoint(path: Path, state: dict[str, Any], *, config: tuple[Path, TrainConfig] | None = None) -> None:
    """Write ``state`` next to ``path`` and rename it into place, so a crash mid-write leaves
    the previous checkpoint intact; ``config`` (path, settings) is renamed into place with it."""
    texts = {} if config is None else {config[0]: config_text(config[1])}

    def write(handle: IO[bytes]) -> None:
        file = _RemembersWriteErrors(handle)
        try:
            torch.save(state, file)
        except RuntimeError as error:  # torch's writer reports a full disk as "unexpected pos"
            if file.error is None:
                raise
            raise file.error from error

    write_atomic_with(path, write, texts=texts)


class _RemembersWriteErrors:
    """A binary file whose writes keep the OSError they raise (ENOSPC, EFBIG), which
    ``torch.save`` would otherwise turn into a RuntimeError that no longer says why."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def kept_checkpoints(folder: Path) -> list[Path]:
    """The earlier checkpoints kept in the run folder ``folder``, the oldest step first."""
    kept = folder / KEPT_FOLDER
    return sorted((path for path in kept.glob("step-*.pt") if _KEPT.fullmatch(path.name)), key=_step)


def keep_earlier(path: Path, step: int, keep: int) -> list[Path]:
    """Before a newer checkpoint replaces ``path`` (that of ``step``): keep it as
    ``earlier-checkpoints/step-<step>.pt`` while ``keep`` (the newest included) allows, and
    delete the oldest kept beyond. A hard link, so nothing is copied and ``path`` is never
    missing; a teacher that collapsed can be taken back to a step before it (copy that file to
    ``path``). Kept ones of later steps than ``step`` are of the steps gone back from: they go,
    and are returned. Where the file system has no hard links, OSError, after the trimming."""
    abandoned = [old for old in kept_checkpoints(path.parent) if _step(old) > step]
    for old in abandoned:
        old.unlink()
    folder = path.parent / KEPT_FOLDER
    for stale in folder.glob(".step-*.pt.link"):  # a link a killed run did not rename yet
        stale.unlink()
    unlinkable = None
    if keep > 1 and path.exists():
        folder.mkdir(exist_ok=True)
        linked = folder / f".step-{step}.pt.link"
        try:
            os.link(path, linked)
            os.replace(linked, folder / f"step-{step}.pt")  # over one of this step gone back from
        except OSError as error:
            unlinkable = error
    earlier = kept_checkpoints(path.parent)
    for old in earlier[: max(len(earlier) - (keep - 1), 0)]:
        old.unlink()
    if unlinkable is not None:
        raise unlinkable
    return abandoned


def _step(kept: Path) -> int:
    return int(_KEPT.fullmatch(kept.name)[1])


def read_checkpoint(path: Path, advice: str) -> dict[str, Any]:
    """A reddino-train checkpoint's contents, or :class:`CheckpointError` saying why not, then
    that the file was left untouched and ``advice``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        if path.suffix != ".pt" and not _begins_as_torch_file(path):  # a config.yaml given for the checkpoint
            raise CheckpointError(f"{path} is not a checkpoint (no file torch saved); give a run folder or a "
                                  f"{CHECKPOINT_NAME} of one.") from error
        raise CheckpointError(f"{path} cannot be read (damaged or cut short: {why_unreadable(error)}). It was "
                              f"left untouched; {advice}") from error
    missing = [key for key in _REQUIRED if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a reddino-train checkpoint (it has no {', '.join(missing)}). It was left untouched; "
            f"{advice}"
        )
    return state


def _begins_as_torch_file(path: Path) -> bool:
    """Whether ``path`` begins as torch.save's files do (a zip archive; before torch 1.6, a pickle)."""
    try:
        with open(path, "rb") as file:
            return file.read(2) in (b"PK", b"\x80\x02")
    except OSError:
        return True  # unreadable: its own error says so


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint and check it was made for the architecture of ``cfg``."""
    kept = kept_checkpoints(path.parent)
    state = read_checkpoint(path, (
        f"copy the newest checkpoint the run kept, {kept[-1]}, over it to resume from step {_step(kept[-1]):,}, "
        "or restore a backup." if kept else "restore a backup, or move it away to start afresh."))
    saved, wanted = _architecture_that_fits(state["architecture"]), architecture(cfg)
    # recorded since LayerScale could be left out; an earlier checkpoint's weights say whether it had one
    saved.setdefault("layerscale", any(name.endswith(".ls1.gamma") for name in state["student"]))
    if saved != wanted:
        differences = ", ".join(
            f"{key}: checkpoint {saved.get(key)!r} vs config {wanted[key]!r}"
            for key in wanted
            if saved.get(key) != wanted[key]
        )
        raise CheckpointMismatchError(
            f"{path} was made for another architecture ({differences}). It was left untouched; "
            "train into another output folder, or move the checkpoint away to start afresh."
        )
    return state


def rng_state() -> dict[str, Any]:
    """The torch, numpy and python generator states of this process, as tensors and lists."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this process's own GPU only: a resume may see another number of GPUs per node
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
