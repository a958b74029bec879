"""Export a run's teacher backbone for the plugin: timm's ``save_for_hf`` layout
(config.json + model.safetensors), loadable with ``timm.create_model("local-dir:DIR",
pretrained=True)`` or from the Hub after a push. Where the run trained on the cell crops of
``reddino-train prepare``, config.json also records how they were cut
(:data:`napari_reddino.models.CROPS_KEY`), and the plugin cuts cells alike for the model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from timm.models import save_for_hf

from napari_reddino.atomic_files import UMASK
from napari_reddino.crop_windows import valid_crops
from napari_reddino.models import CROPS_KEY

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .checkpoint import CHECKPOINT_NAME, KEPT_FOLDER, CheckpointError, kept_checkpoints, read_checkpoint
from .config import config_from_dict
from .crop_record import SEVERAL
from .model import vit_architecture_args

TEACHER_BACKBONE_PREFIX = "backbone.vit."
EXPORT_FILES = ("config.json", "model.safetensors")  # what save_for_hf writes
MODEL_CARD_FILES = ("README.md", ".gitattributes")  # the user's, for the Hub: kept when an export is replaced
EXPORT_TAG = "reddino-train"  # replaces timm's tag of the weights a run may have started from


def export_teacher(run_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the teacher backbone of ``run_dir/checkpoint.pt`` (or of the checkpoint file
    ``run_dir``: one the run kept, ``earlier-checkpoints/step-<N>.pt``) to ``out_dir``.

    The folder is built beside ``out_dir`` and renamed into place, so a failed export never
    leaves a half-written model; an existing ``out_dir`` is replaced only with ``overwrite``,
    keeping the model card written into it (``README.md``).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint_path = run_dir if run_dir.is_file() or run_dir.suffix == ".pt" else run_dir / CHECKPOINT_NAME
    if checkpoint_path == run_dir and not run_dir.is_file():
        raise FileNotFoundError(f"no checkpoint file {run_dir}")
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT_NAME} in {run_dir}; is it a reddino-train output folder?")
    if checkpoint_path.resolve().is_relative_to(out_dir.resolve()):
        raise FileExistsError(f"{out_dir} holds the run {run_dir}; export to another folder, replacing it "
                              "would delete the run")
    if out_dir.exists() and not _is_export(out_dir):  # before the advice to overwrite, which would not help
        raise FileExistsError(f"{out_dir} exists and is not an earlier export (a folder of "
                              f"{' and '.join(EXPORT_FILES)}, with at most a model card), so it is not replaced; export to "
                              "a new folder")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; replace it with --overwrite (Python: overwrite=True)")
    folder = checkpoint_path.parent  # the run's, or its earlier-checkpoints/ where a kept one was given
    run = folder.parent if folder.name == KEPT_FOLDER else folder
    kept = [path for path in kept_checkpoints(run) if path.resolve() != checkpoint_path.resolve()]
    state = read_checkpoint(checkpoint_path, (
        f"export another checkpoint the run kept, such as the newest, {kept[-1]}, or restore a backup." if kept else
        "restore a backup."))
    cfg = config_from_dict(state["config"], source=str(checkpoint_path))
    crops = state.get("crops")  # checkpoints before it was recorded: none
    if crops == SEVERAL:  # a run on images cut several ways
        crops = None
    elif crops is not None and (crops := valid_crops(crops)) is None:  # else a model that no tool would load
        raise CheckpointError(f"{checkpoint_path} records the crops of its training cells as {state['crops']!r}, which "
                              "is not a crop mode, scale and margin (edited?); nothing was exported")
    vit = timm.create_model(cfg.model.arch, **vit_architecture_args(cfg.model, cfg.crops.global_size))
    vit.load_state_dict({
        name.removeprefix(TEACHER_BACKBONE_PREFIX): tensor
        for name, tensor in state["teacher"].items()
        if name.startswith(TEACHER_BACKBONE_PREFIX)
    })
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp's 0700 would hide the model from the rest of the lab
    try:
        save_for_hf(
            vit.eval(),
            staging,
            safe_serialization=True,
            # how prepare cut the training cells, for the plugin to cut cells alike (runs on other images: none)
            model_config={"pretrained_cfg": {"tag": EXPORT_TAG}, **({CROPS_KEY: crops} if crops else {})},
            data_config={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0},
        )
        _without_licence(staging / "config.json")
        for file in staging.iterdir():  # safetensors writes 0600: the lab could not load the weights
            os.chmod(file, 0o666 & ~UMASK)
        for name in MODEL_CARD_FILES:
            if (out_dir / name).is_file():
                shutil.copy2(out_dir / name, staging / name)
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _without_licence(config_path: Path) -> None:
    """Drop the licence that save_for_hf copies from timm's DINOv2 config (Apache-2.0): the trained
    weights' terms follow from the weights the run started from (RedDino's are cc-by-nc-4.0) and
    its images, which only the user knows."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("pretrained_cfg", {}).pop("license", None) is not None:
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # as timm writes it


def _is_export(folder: Path) -> bool:
    names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    return set(EXPORT_FILES) <= names <= {*EXPORT_FILES, *MODEL_CARD_FILES}


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; an old ``target`` is moved aside first and deleted only
    once ``new`` is in place, so a failure leaves the old one."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


class PushError(RuntimeError):
    """The exported folder could not be uploaded to the Hub; the folder itself is intact."""


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported model folder to the Hub model repo ``repo_id`` (created when missing).

    Returns the commit's URL. Users then load it with ``load_embedder("hf_hub:REPO")``.
    """
    folder = Path(folder)
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                   commit_message=f"{EXPORT_TAG} export")
    except (HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as error:
        raise PushError(
            f"could not push {folder} to the Hub repo {repo_id}: {str(error).rstrip('.')}. "
            f"The exported model is intact; log in (`hf auth login`) or go online, then run `hf upload {repo_id} {folder}`."
        ) from error
    return commit.commit_url
