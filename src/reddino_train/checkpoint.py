"""Checkpoints that resume a run exactly, written atomically as tensors and plain containers
(``torch.load(weights_only=True)`` reads them)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig, config_to_dict
from .files import write_atomic_with

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint made for another model than the one the config describes."""


def architecture(cfg: TrainConfig) -> dict[str, Any]:
    """What fixes the shapes of the saved weights; a resume must match it exactly."""
    return {
        "arch": cfg.model.arch,
        "depth": cfg.model.depth,
        "patch_size": cfg.model.patch_size,
        "embed_dim": cfg.model.embed_dim,
        "num_heads": cfg.model.num_heads,
        "global_size": cfg.crops.global_size,
        "heads": config_to_dict(cfg.heads),
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` next to ``path`` and rename it into place, so a crash mid-write
    leaves the previous checkpoint intact."""
    write_atomic_with(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint and check it was made for the architecture of ``cfg``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, wanted = state["architecture"], architecture(cfg)
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
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
