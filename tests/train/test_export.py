import errno
import json
import os
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch

from napari_reddino import load_embedder
from reddino_train.checkpoint import CheckpointError
from reddino_train.cli import main
from reddino_train.config import load_config
from napari_reddino.atomic_files import UMASK
import reddino_train.export as export_module
from reddino_train.export import export_teacher
from reddino_train.train import fit

TINY = ["model.layerscale=1.0"]
DATA = Path(__file__).parents[1] / "data"


def test_export_loads_in_timm_with_the_teachers_features(smear_images, tmp_path):
    result = fit(load_config("tiny", TINY), smear_images, tmp_path / "run", max_steps=2)
    folder = export_teacher(tmp_path / "run", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2" and config["num_features"] == 384
    assert config["pretrained_cfg"]["input_size"] == [3, 56, 56]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert config["pretrained_cfg"]["std"] == [0.229, 0.224, 0.225]
    assert "license" not in config["pretrained_cfg"]  # not timm's Apache-2.0: the weights' terms are the user's
    assert "reddino_crops" not in config  # crops of the test's own, not cut by prepare
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert {path.stat().st_mode & 0o777 for path in folder.iterdir()} == {0o666 & ~UMASK}  # the lab can read it
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = result.teacher.backbone(images)[:, 0]
        assert torch.equal(model.forward_features(images)[:, 0], expected)
        assert not torch.equal(result.student.backbone(images)[:, 0], expected)


def test_cli_fits_exports_and_refuses_to_overwrite(smear_images, tmp_path, capsys):
    run, model = str(tmp_path / "run"), str(tmp_path / "model")
    assert main(["fit", "tiny", str(smear_images), "--out", run, *TINY, "--max-steps", "1"]) == 0
    assert "1 iteration done" in capsys.readouterr().out
    # Started again (a scheduler's requeue), the finished run trains nothing and says why.
    assert main(["fit", "tiny", str(smear_images), "--out", run, *TINY, "--max-steps", "1"]) == 0
    assert f"{run} holds a run already at iteration 1, --max-steps 1: nothing to do. To train it further, raise " \
           "--max-steps; to start afresh, give another --out" in capsys.readouterr().out
    assert main(["fit", "tiny", str(smear_images), "--out", run, *TINY, "optim.epochs=1", "train.iterations_per_epoch=1"]) == 0
    assert f"{run} holds a run already at iteration 1, the end of its schedule: nothing to do. To train it further, " \
           "raise optim.epochs (every schedule then stretches to the new length: the learning rate jumps back up its " \
           "cosine, with no warm-up);" in capsys.readouterr().out
    assert main(["export", run, "--out", model]) == 0
    said = capsys.readouterr().out
    assert f"use it in napari (Embed cells > Browse…), with reddino-analyse --model {model}" in said
    assert ("it records no crop settings (its training images were not all cut alike by reddino-train prepare --mode "
            "cells, or the run is older than the record), so cells are cut for it as for RedDino: masked crops at "
            "smear scale, margin 0.25") in said
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    assert main(["export", run, "--out", model]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", run, "--out", model, "--overwrite"]) == 0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == weights
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert main(["export", run, "--out", str(tmp_path), "--overwrite"]) == 2  # the folder holding the run
    assert "would delete the run" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    smears = tmp_path / "smears"  # a mistyped --out: a folder that is no export is never replaced
    smears.mkdir()
    (smears / "1.jpg").write_bytes(b"a smear")
    for overwrite in ([], ["--overwrite"]):  # without --overwrite, no advice to pass it: it would not help
        assert main(["export", run, "--out", str(smears), *overwrite]) == 2
        said = capsys.readouterr().err
        assert "exists and is not an earlier export (a folder of config.json and model.safetensors, with at most a model card)" in said
        assert "replace it with --overwrite" not in said
    assert (smears / "1.jpg").read_bytes() == b"a smear"
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", run, "--out", str(tmp_path / "notes.txt"), "--overwrite"]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    newer = tmp_path / "newer"  # a run of a later version, with a setting this one does not know
    newer.mkdir()
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["model"]["future_option"] = 1
    torch.save(checkpoint, newer / "checkpoint.pt")
    assert main(["export", str(newer), "--out", str(tmp_path / "newer-model")]) == 2
    assert "unknown key model.future_option" in capsys.readouterr().err


def test_sigterm_during_an_export_leaves_no_half_written_folder(smear_images, tmp_path, capsys, terminate_after):
    fit(load_config("tiny", TINY), smear_images, tmp_path / "run", max_steps=1)
    terminate_after(export_module, "save_for_hf")  # a scheduler's time limit, the model written but not in place
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 130
    assert capsys.readouterr().err.endswith("\nreddino-train export: interrupted; nothing was exported\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no staging folder left beside it


def test_a_run_on_prepared_cells_exports_how_they_were_cut_and_the_plugin_cuts_cells_so(tmp_path, capsys):
    smears, cells, run, model = (tmp_path / name for name in ("smears", "cells", "run", "model"))
    smears.mkdir()
    shutil.copy(DATA / "chula_rbc12" / "1.jpg", smears)
    cut = ["--crop-mode", "masked", "--crop-scale", "smear", "--margin", "0.5"]
    assert main(["prepare", str(smears), "--out", str(cells), "--size", "56", *cut]) == 0
    assert main(["fit", "tiny", str(cells), "--out", str(run), *TINY, "--max-steps", "1"]) == 0
    masked = {"mode": "masked", "scale": "smear", "margin": 0.5}
    assert torch.load(run / "checkpoint.pt", weights_only=True)["crops"] == masked
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(model)]) == 0
    assert ("it trained on masked crops at smear scale, margin 0.5 (reddino-train prepare), and cells are cut so for "
            "it unless told otherwise") in capsys.readouterr().out
    assert json.loads((model / "config.json").read_text())["reddino_crops"] == masked
    assert load_embedder(model, device="cpu", dtype="float32").crops == masked
    timm.create_model(f"local-dir:{model}", pretrained=True)  # timm passes the record over
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["crops"]["margin"] = "wide"  # edited: no export that no tool would load
    torch.save(state, run / "checkpoint.pt")
    assert main(["export", str(run), "--out", str(tmp_path / "edited")]) == 2
    said = capsys.readouterr().err
    assert "records the crops of its training cells as {" in said and "'margin': 'wide'" in said
    assert "which is not a crop mode, scale and margin (edited?); nothing was exported" in said
    assert not (tmp_path / "edited").exists()


def test_a_failed_push_to_the_hub_says_why_and_keeps_the_export(smear_images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run, model = str(tmp_path / "run"), tmp_path / "model"
    fit(load_config("tiny", TINY), smear_images, run, max_steps=1)
    assert main(["export", run, "--out", str(model), "--push-to-hub", "lab/rbc-model"]) == 2
    captured = capsys.readouterr()
    assert f"wrote {model}" in captured.out
    assert "lab/rbc-model" in captured.err and "offline mode" in captured.err
    assert f"hf upload lab/rbc-model {model}" in captured.err
    timm.create_model(f"local-dir:{model}", pretrained=True)  # the export is whole


@pytest.mark.parametrize("args, message", [
    (["fit", "tiny", "{empty}", "--out", "{out}"], "no images under"),
    (["fit", "tiny", "{empty}", "--out", "{out}", "crops.size=3"], "unknown key crops.size"),
    (["fit", "tiny", "{empty}", "--out", "{out}", "model.arch=vit_smal_patch14_dinov2"],
     "model.arch='vit_smal_patch14_dinov2' is not a timm architecture"),
    (["export", "{empty}", "--out", "{out}"], "no checkpoint.pt"),
    (["export", "{empty}", "--out", "{out}", "--private"], "--private is for --push-to-hub"),
])
def test_cli_errors_exit_2_with_the_reason(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": str(tmp_path / "empty"), "out": str(tmp_path / "out")}
    assert main([arg.format(**paths) for arg in args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", ["0", "-3", "2.5"])
def test_a_max_steps_below_one_is_refused_before_anything_runs(tmp_path, capsys, steps):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "tiny", str(tmp_path), "--out", str(tmp_path / "out"), "--max-steps", steps])
    assert exited.value.code == 2
    assert f"{steps!r} is not a whole number of iterations of 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_export_folder_that_cannot_be_written_is_said_in_a_sentence(smear_images, tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    assert main(["fit", "tiny", str(smear_images), "--out", run, *TINY, "--max-steps", "1"]) == 0

    def read_only(**_):  # a folder of someone else's, mounted read-only (root writes anyway, so it is made so)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("reddino_train.export.tempfile.mkdtemp", read_only)
    capsys.readouterr()
    assert main(["export", run, "--out", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err == (f"reddino-train export: cannot write {tmp_path / 'model'} (Permission "
                                       "denied); nothing was exported\n")


def test_an_overwrite_that_fails_at_the_last_step_keeps_the_earlier_export(smear_images, tmp_path, monkeypatch):
    run, model = tmp_path / "run", tmp_path / "model"
    fit(load_config("tiny", TINY), smear_images, run, max_steps=1)
    export_teacher(run, model)
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    replace = os.replace

    def new_one_refused(source, target):  # the new export cannot take the old one's place
        if Path(target) == model and ".old." not in str(source):
            raise PermissionError(errno.EACCES, "Permission denied")
        replace(source, target)

    monkeypatch.setattr(os, "replace", new_one_refused)
    with pytest.raises(PermissionError):
        export_teacher(run, model, overwrite=True)
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "run"]  # nothing left aside


def test_a_kept_checkpoint_exports_and_a_model_card_stays_across_overwrite(smear_images, tmp_path):
    cfg = load_config("tiny", [*TINY, "train.keep_checkpoints=2", "train.checkpoint_every=1"])
    fit(cfg, smear_images, tmp_path / "run", max_steps=2)
    kept = tmp_path / "run" / "earlier-checkpoints" / "step-1.pt"
    assert kept.is_file()
    earlier = export_teacher(kept, tmp_path / "step1")  # the best of the evaluated checkpoints, not the last
    latest = export_teacher(tmp_path / "run", tmp_path / "latest")
    assert (earlier / "model.safetensors").read_bytes() != (latest / "model.safetensors").read_bytes()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["iteration"] == 2  # left as it was
    (latest / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\nOur lab's RBC model.\n")
    export_teacher(kept, latest, overwrite=True)  # the card written for the Hub stays
    assert (latest / "README.md").read_text().endswith("Our lab's RBC model.\n")
    assert (latest / "model.safetensors").read_bytes() == (earlier / "model.safetensors").read_bytes()

    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short: a full disk as it was saved
    with pytest.raises(CheckpointError, match=rf"cannot be read \(damaged or cut short: .*\)\. It was left untouched; "
                       rf"export another checkpoint the run kept, such as the newest, {re.escape(str(kept))}, or "):
        export_teacher(tmp_path / "run", tmp_path / "cut")
    kept.write_bytes(kept.read_bytes()[:1000])  # the kept one damaged too: none other to name
    with pytest.raises(CheckpointError, match=r"It was left untouched; restore a backup\.$"):
        export_teacher(kept, tmp_path / "cut")
