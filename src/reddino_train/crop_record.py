"""How the training images were cut, for the model trained on them to carry to the plugin.

``reddino-train prepare --mode cells`` writes ``OUT/prepare.json`` with its crop mode, scale and
margin, and its crops to ``OUT/<smear>/<n>.png`` beside an ``index.csv``. A run records them in
its checkpoints when every training image lies in such a folder and all were cut alike (images
cut several ways: :data:`SEVERAL`, for good); ``export`` writes them into the model's
``config.json`` (:data:`napari_reddino.models.CROPS_KEY`), and the plugin, ``reddino-analyse``
and ``eval`` then cut cells as the model learnt them unless told otherwise.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from napari_reddino.cell_embeddings import crops_in_words
from napari_reddino.crop_windows import valid_crops

from .prepare import INDEX_NAME, saved_settings

SEVERAL = "cut several ways"  # a run's record where its images were: no record, whatever it trains on later
NO_RECORD = "the model records no crop settings, so the plugin cuts cells for it with its defaults"
PATCHES = "smear patches"  # what a folder of --mode patches holds
UNPREPARED = "images not cut by reddino-train prepare"


def training_crops(folders: Iterable[str | os.PathLike]) -> dict | str | None:
    """The crop settings (``mode``, ``scale``, ``margin``) of the ``prepare --mode cells`` output
    whose smear folders (``OUT/<smear>/``, each with its ``index.csv``, beside ``OUT/prepare.json``)
    are the ``folders`` holding the training images (:meth:`~reddino_train.data.PackedPaths.folders`),
    where every folder is one and all were cut alike; :data:`SEVERAL` where they were cut in
    several ways (a warning names them: the model records none); else None."""
    ways = sorted({json.dumps(_cut_in(Path(folder).absolute()), sort_keys=True) for folder in folders})
    cut = [json.loads(way) for way in ways]
    if len(cut) == 1:
        return cut[0] if isinstance(cut[0], dict) else None
    if any(isinstance(way, dict) for way in cut):
        said = "; ".join(crops_in_words(way) if isinstance(way, dict) else way for way in cut)
        warnings.warn(f"the training images were cut in {len(cut)} ways ({said}): {NO_RECORD}", RuntimeWarning,
                      stacklevel=2)
        return SEVERAL
    return None


def _cut_in(smear: Path) -> dict | str:
    """How prepare cut the images of the folder ``smear``, as its output's prepare.json says."""
    if not (smear / INDEX_NAME).is_file():
        return UNPREPARED  # a folder of the user's own, even inside prepare's output
    try:
        settings = saved_settings(smear.parent)
    except (OSError, ValueError, TypeError):
        return UNPREPARED  # none, or not prepare's: nothing it says can be trusted
    if settings["mode"] == "patches":
        return PATCHES
    crops = {"mode": settings["crop_mode"], "scale": settings["crop_scale"], "margin": settings["margin"]}
    return (valid_crops(crops) if settings["mode"] == "cells" else None) or UNPREPARED
