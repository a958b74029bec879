"""How a run learns the crop settings of its training images, from prepare's folders."""

import json
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from reddino_train.config import load_config
from reddino_train.crop_record import SEVERAL, training_crops
from reddino_train.export import export_teacher
from reddino_train.data import PackedPaths, find_images
from reddino_train.prepare import INDEX_NAME, SETTINGS_NAME, PrepareSettings
from reddino_train.train import ResumeSettingsWarning, fit

CONTEXT = {"mode": "context", "scale": "cell", "margin": 0.25}  # prepared_folder's (prepare's until 2026-12-07)
MASKED = {"mode": "masked", "scale": "smear", "margin": 0.5}


def prepared_folder(out: Path, smears: int = 2, **settings) -> Path:
    """``out`` laid out as prepare leaves it (``<smear>/<n>.png`` and ``<smear>/index.csv``, and
    prepare.json), with tiny crops; cells cut as :data:`CONTEXT` unless ``settings`` say otherwise."""
    if settings.get("mode", "cells") == "cells":
        settings = {"crop_mode": "context", "crop_scale": "cell", **settings}
    for smear in range(smears):
        (out / f"smear{smear}").mkdir(parents=True)
        for cell in (1, 2):
            Image.new("RGB", (64, 64), (200, 100 + 50 * cell, 120)).save(out / f"smear{smear}" / f"{cell}.png")
        (out / f"smear{smear}" / INDEX_NAME).write_text("file,source\n")
    (out / SETTINGS_NAME).write_text(json.dumps(asdict(PrepareSettings(**settings)), indent=2))
    return out


def crops_of(root: Path) -> dict | None:
    return training_crops(PackedPaths(find_images(root)).folders())


def test_images_of_one_prepare_folder_carry_its_crop_settings(tmp_path):
    assert crops_of(prepared_folder(tmp_path / "cells")) == CONTEXT
    masked = prepared_folder(tmp_path / "masked", crop_mode="masked", crop_scale="smear", margin=0.5)
    assert crops_of(masked) == MASKED
    # several prepare folders cut alike, under the folder the run is given
    prepared_folder(tmp_path / "runs" / "day1", crop_mode="masked", crop_scale="smear", margin=0.5)
    prepared_folder(tmp_path / "runs" / "day2", crop_mode="masked", crop_scale="smear", margin=0.5)
    assert crops_of(tmp_path / "runs") == MASKED
    assert crops_of(tmp_path / "runs" / "day1" / "smear0") == MASKED  # one smear's folder of them


def test_a_prepare_folder_of_an_older_version_has_the_defaults_of_then(tmp_path):
    out = prepared_folder(tmp_path / "cells", crop_mode="masked")
    settings = json.loads((out / SETTINGS_NAME).read_text())
    del settings["crop_scale"]  # written before prepare had it: every window was sized to its cell
    (out / SETTINGS_NAME).write_text(json.dumps(settings))
    assert crops_of(out) == {"mode": "masked", "scale": "cell", "margin": 0.25}


def test_images_cut_in_several_ways_record_so_and_say_which_ways(tmp_path):
    root = tmp_path / "mixed"
    prepared_folder(root / "a")
    prepared_folder(root / "b", crop_mode="masked", crop_scale="smear", margin=0.5)
    with pytest.warns(RuntimeWarning, match=r"cut in 2 ways \(context crops at cell scale, margin 0.25; masked crops "
                                            r"at smear scale, margin 0.5\): the model records no crop settings"):
        assert crops_of(root) == SEVERAL
    shutil.rmtree(root / "b")
    Image.new("RGB", (4, 4)).save(root / "mine.png")  # a crop of the user's own beside them
    with pytest.warns(RuntimeWarning, match="images not cut by reddino-train prepare"):
        assert crops_of(root) == SEVERAL
    (root / "mine.png").unlink()
    (root / "a" / "extra").mkdir()  # a folder of the user's own inside prepare's output
    Image.new("RGB", (4, 4)).save(root / "a" / "extra" / "mine.png")
    with pytest.warns(RuntimeWarning, match="images not cut by reddino-train prepare"):
        assert crops_of(root) == SEVERAL


def test_patches_and_images_not_cut_by_prepare_record_none_without_a_warning(tmp_path):
    patches = prepared_folder(tmp_path / "patches", mode="patches")
    plain = tmp_path / "plain" / "smear"
    plain.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(plain / "1.png")
    damaged = prepared_folder(tmp_path / "damaged")
    (damaged / SETTINGS_NAME).write_text('{"mode": "cells", "crop_mode": "blur')
    wrong = prepared_folder(tmp_path / "wrong")
    (wrong / SETTINGS_NAME).write_text(json.dumps({"mode": "cells", "crop_mode": "blurred"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for root in (patches, tmp_path / "plain", damaged, wrong):
            assert crops_of(root) is None
    assert crops_of(patches / "smear0") is None  # one smear's patches


def test_a_resume_keeps_the_record_on_a_copy_of_the_images_and_drops_it_for_images_cut_otherwise(tmp_path):
    cells, run = prepared_folder(tmp_path / "cells"), tmp_path / "run"
    tiny = load_config("tiny", ["model.layerscale=1.0"])

    def recorded() -> dict | None:
        return torch.load(run / "checkpoint.pt", weights_only=True)["crops"]

    fit(tiny, cells, run, max_steps=1)
    assert recorded() == CONTEXT
    staged = shutil.copytree(cells, tmp_path / "scratch", ignore=shutil.ignore_patterns("*.json", "*.csv"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)
        fit(tiny, staged, run, max_steps=2)  # the same images, copied to a node's disk without prepare's files
    assert recorded() == CONTEXT
    masked = prepared_folder(tmp_path / "masked", crop_mode="masked")  # the same names, cut otherwise
    with pytest.warns(ResumeSettingsWarning, match=r"on images cut otherwise than until step 2 \(context crops at "
                                                   r"cell scale, margin 0.25 then, masked crops at cell scale, margin "
                                                   r"0.25 now\): the model records no crop settings"):
        fit(tiny, masked, run, max_steps=3)
    assert recorded() == SEVERAL
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)  # said once
        fit(tiny, masked, run, max_steps=4)  # on those images from now on: trained on both still
    assert recorded() == SEVERAL
    export_teacher(run, tmp_path / "model")
    assert "reddino_crops" not in json.loads((tmp_path / "model" / "config.json").read_text())
    other = tmp_path / "other" / "smear0"  # other images, of the user's own: not cut as the record says
    other.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(other / "1.png")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "crops": CONTEXT}, run / "checkpoint.pt")
    with pytest.warns(ResumeSettingsWarning) as said:
        fit(tiny, other.parent, run, max_steps=5)
    assert {"on other images than it trained on", "(context crops at cell scale, margin 0.25 then, not by reddino-train "
            "prepare --mode cells now): the model records no crop settings"} <= {
        part for warning in said for part in re.findall(r"on other images than it trained on|\(context.*settings",
                                                         str(warning.message))}
    assert recorded() == SEVERAL


def test_a_resume_of_a_run_older_than_the_record_or_begun_on_a_staged_copy_takes_the_images_record(tmp_path):
    cells, run = prepared_folder(tmp_path / "cells"), tmp_path / "run"
    staged = shutil.copytree(cells, tmp_path / "scratch", ignore=shutil.ignore_patterns("*.json", "*.csv"))
    tiny = load_config("tiny", ["model.layerscale=1.0"])
    fit(tiny, staged, run, max_steps=1)  # begun on the copy: prepare's files out of sight
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeSettingsWarning)
        fit(tiny, cells, run, max_steps=2)
        assert torch.load(run / "checkpoint.pt", weights_only=True)["crops"] == CONTEXT
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        del state["crops"]  # saved before runs recorded it
        torch.save(state, run / "checkpoint.pt")
        fit(tiny, cells, run, max_steps=3)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["crops"] == CONTEXT
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["crops"]
    torch.save(state, run / "checkpoint.pt")
    more = prepared_folder(tmp_path / "more", smears=3, crop_mode="masked")  # and on more images: theirs
    with pytest.warns(ResumeSettingsWarning, match="on other images than it trained on") as said:
        fit(tiny, more, run, max_steps=4)
    assert len(said) == 1 and torch.load(run / "checkpoint.pt", weights_only=True)["crops"] == {**CONTEXT,
                                                                                                "mode": "masked"}


def test_images_right_under_a_relative_data_folder_are_found_in_their_smear_folder(tmp_path, monkeypatch):
    out = prepared_folder(tmp_path / "cells", crop_mode="masked", crop_scale="smear", margin=0.5)
    monkeypatch.chdir(out / "smear0")
    assert crops_of(Path(".")) == MASKED
