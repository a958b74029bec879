"""Export a run's teacher backbone for the plugin: timm's ``save_for_hf`` layout
(config.json + model.safetensors), loadable with ``timm.create_model("local-dir:DIR",
pretrained=True)`` or from the Hub after a push."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .checkpoint import CHECKPOINT_NAME
from .config import config_from_dict
from .model import vit_architecture_args

TEACHER_BACKBONE_PREFIX = "backbone.vit."
EXPORT_TAG = "reddino-train"  # replaces timm's tag of the weights a run may have started from


def export_teacher(run_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the teacher backbone of ``run_dir/checkpoint.pt`` to ``out_dir``.

    The folder is built beside ``out_dir`` and renamed into place, so a failed export never
    leaves a half-written model; an existing ``out_dir`` is replaced only with ``overwrite``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_NAME} in {run_dir}; is it a reddino-train output folder?")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(state["config"], source=str(checkpoint_path))
    vit = timm.create_model(cfg.model.arch, **vit_architecture_args(cfg.model, cfg.crops.global_size))
    vit.load_state_dict({
        name.removeprefix(TEACHER_BACKBONE_PREFIX): tensor
        for name, tensor in state["teacher"].items()
        if name.startswith(TEACHER_BACKBONE_PREFIX)
    })
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_for_hf(
            vit.eval(),
            staging,
            safe_serialization=True,
            model_config={"pretrained_cfg": {"tag": EXPORT_TAG}},
            data_config={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0},
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
