"""reddino-analyse: the real test smears through segmentation, a tiny saved model and a saved
head, against the same steps run one by one through the Python API."""

from __future__ import annotations

import os
import time
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _compiler import needs_a_cxx_compiler
from _model_fixtures import TINY_DIM, hub_cache, publish_to_cache, record_crops, tiny_folder  # noqa: F401  (fixtures)
from PIL import Image
from skimage.io import imread, imsave

from napari_reddino import CellClassifier, embeddings_of, load_embedder, measure_cells, segment_cells
from napari_reddino import analyse_cli
from napari_reddino.analyse_cli import main
from napari_reddino.batch_analysis import SmearAnalysis, list_smears, smear_names
from napari_reddino.cell_embeddings import METADATA_KEY, earlier_run
from napari_reddino.cell_thumbnails import THUMBNAIL_PX, cell_thumbnail
from napari_reddino import class_gallery as class_gallery_module
from napari_reddino.class_gallery import (
    BACKGROUND,
    GAP_PX,
    MIN_CAPTION_PX,
    ROW_CELLS,
    GalleryFiles,
    class_gallery,
    gallery_file_name,
    row_caption,
)
from napari_reddino.crop_windows import square_windows
from napari_reddino.image_input import read_smear

DATA = Path(__file__).parent / "data"
CHULA = DATA / "chula_rbc12"


@pytest.fixture
def smears(tmp_path) -> Path:
    """Two Chula smears in a folder, one of them in a sub-folder."""
    folder = tmp_path / "smears"
    (folder / "day2").mkdir(parents=True)
    shutil.copy(CHULA / "1.jpg", folder / "1.jpg")
    shutil.copy(CHULA / "26.jpg", folder / "day2" / "26.jpg")
    return folder


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"image": str}, keep_default_na=False, na_values={"pct_spherocyte": [""]})


def test_measure_only_writes_every_cell_and_a_summary_per_smear(smears, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(smears), "--out", str(out), "--measure-only", "--pixel-size-um", "0.2"]) == 0
    cells = read(out / "cells.csv")
    for name, path in (("1", smears / "1.jpg"), ("26", smears / "day2" / "26.jpg")):
        image = imread(path)
        expected = measure_cells(segment_cells(image, pixel_size_um=0.2), image, pixel_size_um=0.2)
        mine = cells[cells["image"] == name]
        assert mine["layer"].unique().tolist() == [f"{name} cells"]
        np.testing.assert_array_equal(mine["label"], expected["label"])
        np.testing.assert_allclose(mine["equivalent_diameter_um"], expected["equivalent_diameter_um"])
    summary = read(out / "cells_summary.csv")
    assert summary["image"].tolist() == ["1", "26"]
    # the file as the run was given it: a name alone is no key across runs (another day2/26.jpg renames it)
    assert summary["source_path"].tolist() == [str(smears / "1.jpg"), str(smears / "day2" / "26.jpg")]
    assert list(cells.columns[:4]) == ["layer", "image", "source_path", "label"]
    assert cells.groupby("image")["source_path"].nunique().eq(1).all()
    assert summary["cells"].tolist() == [(cells["image"] == "1").sum(), (cells["image"] == "26").sum()]
    assert summary["diameter_mean_um"].between(6, 9).all()  # red cells at 0.2 µm/px
    captured = capsys.readouterr()
    printed = captured.out
    assert "[1/2] 1: " in printed and "[2/2] 26: " in printed and f"{len(cells):,} cells of 2 smears" in printed
    assert "warning" not in captured.err  # 0.2 µm is their pixel size
    # Another microscope's pixel size cuts the cells into pieces, whose mean size still looks right: said.
    assert main([str(smears / "1.jpg"), "--out", str(tmp_path / "wrong"), "--measure-only",
                 "--pixel-size-um", "0.5"]) == 0
    assert re.search(r"\[1/1\] 1: warning: its cells look 3\d px across, where --pixel-size-um 0.5 makes a 7.5 µm "
                     r"cell 15 px: is it this smear's pixel size", capsys.readouterr().err)


def saved_head(smear: Path, model: str, path: Path, classes=("normal", "spherocyte"), colours=None):
    """A head taught on ``smear`` by roundness alone (round: normal, else spherocyte), saved at
    ``path``; with what it was taught on: ``(head, embedder, image, labels, table, ids, vectors)``."""
    embedder = load_embedder(model, device="cpu")
    image = imread(smear)
    labels = segment_cells(image)
    table = measure_cells(labels, image)
    ids, vectors = embedder.embed(image, labels)
    taught = np.where(table["circularity"] > table["circularity"].median(), "normal", "spherocyte")
    head = CellClassifier(list(classes), colours=colours, model_id=embedder.model_id)
    head.fit(vectors, taught, measurements=table)
    head.save(path)
    return head, embedder, image, labels, table, ids, vectors


def test_a_saved_head_classifies_every_cell_as_the_api_does(smears, tmp_path, tiny_folder, capsys):  # noqa: F811
    model = str(tiny_folder[1])
    head, embedder, image, labels, table, ids, vectors = saved_head(smears / "1.jpg", model, tmp_path / "head")

    out = tmp_path / "out"
    imsave(tmp_path / "empty.png", np.full((200, 300, 3), 235, dtype=np.uint8), check_contrast=False)  # no cells
    argv = [str(smears / "1.jpg"), str(tmp_path / "empty.png"), "--out", str(out), "--model", model,
            "--head", str(tmp_path / "head"), "--device", "cpu", "--with-embeddings"]
    assert main(argv) == 0
    cells = read(out / "cells.csv")
    assert set(cells["image"]) == {"1"}
    proba = head.predict_proba(vectors, measurements=table)
    np.testing.assert_array_equal(cells["label"], ids)  # each row's probabilities below are its own cell's
    np.testing.assert_allclose(cells[["area_px", "circularity"]], table[["area_px", "circularity"]], rtol=1e-6)
    np.testing.assert_allclose(cells[["p_normal", "p_spherocyte"]], proba, rtol=1e-5, atol=1e-6)
    assert cells["predicted_class"].tolist() == np.asarray(head.classes)[proba.argmax(axis=1)].tolist()
    with np.load(out / "cells.npz") as saved:
        np.testing.assert_array_equal(saved["label"], ids)
        np.testing.assert_allclose(saved["embedding"], vectors, rtol=1e-5, atol=1e-6)
    summaries = pd.read_csv(out / "cells_summary.csv", dtype={"image": str})
    assert summaries["image"].tolist() == ["1", "empty"] and summaries["cells"].iloc[1] == 0
    summary = summaries.iloc[0]
    assert summary["unclassified"] == 0
    assert summary["pct_normal"] + summary["pct_spherocyte"] == pytest.approx(100)
    assert summary["model_id"] == embedder.model_id
    assert "unlike" not in capsys.readouterr().err  # the head's own smear
    aslan = [str(DATA / "aslan_bcd" / "image-1.png"), "--out", str(tmp_path / "aslan"), "--model", model,
             "--head", str(tmp_path / "head"), "--device", "cpu"]
    assert main(aslan) == 0
    err = capsys.readouterr().err
    assert "[1/1] image-1: warning: 100% of its cells are unlike the cells the head was trained among" in err
    assert read(tmp_path / "aslan" / "cells.csv")["model_id"].eq(embedder.model_id).all()


@needs_a_cxx_compiler
def test_compile_runs_the_model_compiled_and_says_the_first_smear_waits(smears, tmp_path, tiny_folder,
                                                                        capsys):  # noqa: F811
    model = str(tiny_folder[1])
    embedder = saved_head(smears / "1.jpg", model, tmp_path / "head")[1]
    argv = [str(smears / "1.jpg"), "--out", str(tmp_path / "out"), "--model", model, "--head", str(tmp_path / "head"),
            "--device", "cpu", "--compile"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile could not compile")  # no running uncompiled
        assert main(argv) == 0
    assert "torch.compile compiles the model during the first smear" in capsys.readouterr().err
    assert read(tmp_path / "out" / "cells.csv")["model_id"].eq(embedder.model_id).all()


def test_without_model_a_head_s_hub_model_embeds_the_cells_and_a_local_one_must_be_given(
    smears, tmp_path, tiny_folder, hub_cache, capsys  # noqa: F811
):
    publish_to_cache(tiny_folder[1], hub_cache, "lab/rbc-tiny")
    embedder = saved_head(smears / "1.jpg", "hf_hub:lab/rbc-tiny", tmp_path / "hub-head")[1]
    run = [str(smears / "1.jpg"), "--device", "cpu", "--head"]
    assert main([*run, str(tmp_path / "hub-head"), "--out", str(tmp_path / "out")]) == 0
    assert "the head learnt from hf_hub:lab/rbc-tiny; its cells are embedded with it" in capsys.readouterr().out
    assert read(tmp_path / "out" / "cells.csv")["model_id"].eq(embedder.model_id).all()
    saved_head(smears / "1.jpg", str(tiny_folder[1]), tmp_path / "local-head")
    assert main([*run, str(tmp_path / "local-head"), "--out", str(tmp_path / "local")]) == 2
    assert (f"the head {tmp_path / 'local-head'} learnt from the local model 'tiny_model'; give its folder with "
            "--model") in capsys.readouterr().err
    # Given another Hub model, a Hub head is refused before that model loads (here it could not: not cached).
    assert main([*run, str(tmp_path / "hub-head"), "--model", "reddino-small", "--out", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err == (f"reddino-analyse: the head {tmp_path / 'hub-head'} learnt from "
                                       "hf_hub:lab/rbc-tiny, not from --model reddino-small: leave --model out to "
                                       "embed the cells with the head's model, or train a head on this one\n")
    # The same weights in a folder (a copy on a machine offline) are the head's model: compared once loaded.
    assert main([*run, str(tmp_path / "hub-head"), "--model", str(tiny_folder[1]), "--out", str(tmp_path / "copy")]) == 0


def row_thumbnails(picture: np.ndarray, row: int) -> list[np.ndarray]:
    """The thumbnail slots of row ``row`` of a class gallery, left to right."""
    caption_px = picture.shape[1] - ROW_CELLS * (THUMBNAIL_PX + GAP_PX) - GAP_PX
    assert caption_px >= MIN_CAPTION_PX
    top = row * (THUMBNAIL_PX + 2 * GAP_PX) + GAP_PX
    return [picture[top:top + THUMBNAIL_PX, left:left + THUMBNAIL_PX]
            for left in range(caption_px, caption_px + ROW_CELLS * (THUMBNAIL_PX + GAP_PX), THUMBNAIL_PX + GAP_PX)]


def test_a_class_gallery_shows_each_class_s_whole_cells_at_random_the_labelled_and_most_certain_first(monkeypatch):
    image = imread(CHULA / "1.jpg")
    labels = segment_cells(image)
    table = measure_cells(labels, image)
    whole = np.flatnonzero(~table["touches_border"].to_numpy())
    cut = np.flatnonzero(table["touches_border"].to_numpy())
    assert len(whole) > 40 and len(cut) > 0
    table["predicted_class"], table["prediction_probability"] = "", np.linspace(0.3, 0.99, len(table))
    table.loc[whole[:30], "predicted_class"] = "target cell"  # more than a row holds
    table.loc[whole[30:33], "predicted_class"] = "spherocyte"
    table.loc[cut, "predicted_class"] = "schistocyte"  # only cells cut by the border: no row
    captions = []
    monkeypatch.setattr(class_gallery_module, "row_caption", lambda *args, **kwargs: captions.append(
        (args, kwargs)) or row_caption(*args, **kwargs))
    picture = class_gallery(image, labels, table, ["schistocyte", "spherocyte", "target cell", "teardrop"],
                            {"target cell": "#ff00ff"})
    assert picture.shape[0] == 2 * (THUMBNAIL_PX + 2 * GAP_PX)  # spherocyte, then target cell
    # counted among the whole cells only; no share while some whole cells have no class
    assert captions == [(("spherocyte", 3, len(whole)), {"with_share": False}),
                        (("target cell", 30, len(whole)), {"with_share": False})]
    windows = square_windows(table[["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]].to_numpy(float))

    def cell_of(thumbnail, candidates, outline) -> int:
        return next(i for i in candidates if np.array_equal(
            thumbnail, cell_thumbnail(image, labels, int(table.at[i, "label"]), windows[i], outline=outline)))

    spherocytes = row_thumbnails(picture, 0)
    assert sorted(cell_of(t, whole[30:33], (255, 255, 255)) for t in spherocytes[:3]) == list(whole[30:33])
    assert all((t == BACKGROUND).all() for t in spherocytes[3:])  # the rest of the row stays empty
    targets = [cell_of(t, whole[:30], (255, 0, 255)) for t in row_thumbnails(picture, 1)]
    certainty = table.loc[targets, "prediction_probability"].to_numpy()
    assert len(set(targets)) == ROW_CELLS and np.all(np.diff(certainty) < 0)  # the most certain first ...
    assert set(targets) != set(whole[20:30])  # ... of a random ten, not the ten most certain
    # A 16-bit smear with its own levels gives the same picture.
    deep = class_gallery(image.astype(np.uint16) * 257, labels, table, ["spherocyte", "target cell"],
                         {"target cell": "#ff00ff"}, contrast_limits=(0, 65535))
    assert np.abs(deep.astype(int) - picture).max() <= 1
    # Cells embedded at cell scale with a wider margin are shown in those windows, as the model saw them.
    at_cell_scale = class_gallery(image, labels, table, ["spherocyte"], crops={"mode": "context", "scale": "cell",
                                                                               "margin": 0.5})
    windows = square_windows(table[["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]].to_numpy(float), 0.5, "cell")
    assert sorted(cell_of(t, whole[30:33], (255, 255, 255)) for t in row_thumbnails(at_cell_scale, 0)[:3]) == \
        list(whole[30:33])
    windows = square_windows(table[["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]].to_numpy(float))
    # A manual label outranks the prediction, as the smear summary counts, and comes first in its
    # row; cells labelled by hand alone get a row too.
    table["manual_label"] = ""
    table.loc[whole[0], "manual_label"] = "spherocyte"  # predicted a target cell
    table.loc[whole[40:42], "manual_label"] = "teardrop"  # no prediction
    labelled = class_gallery(image, labels, table, ["schistocyte", "spherocyte", "target cell", "teardrop"],
                             {"target cell": "#ff00ff"})
    assert labelled.shape[0] == 3 * (THUMBNAIL_PX + 2 * GAP_PX)
    spherocytes = row_thumbnails(labelled, 0)
    assert cell_of(spherocytes[0], whole[:1], (255, 255, 255)) == whole[0]
    assert sorted(cell_of(t, whole[30:33], (255, 255, 255)) for t in spherocytes[1:4]) == list(whole[30:33])
    assert len({cell_of(t, whole[1:30], (255, 0, 255)) for t in row_thumbnails(labelled, 1)}) == ROW_CELLS
    assert sorted(cell_of(t, whole[40:42], (255, 255, 255)) for t in row_thumbnails(labelled, 2)[:2]) == list(whole[40:42])
    # Once every whole cell has a class, each row gives its share; the rows count every whole cell once.
    captions.clear()
    table.loc[whole, "predicted_class"] = table.loc[whole, "predicted_class"].replace("", "target cell")
    class_gallery(image, labels, table, ["schistocyte", "spherocyte", "target cell", "teardrop"])
    assert [kwargs for _, kwargs in captions] == [{"with_share": True}] * 3
    assert sum(args[1] for args, _ in captions) == len(whole) == captions[0][0][2]


def test_a_row_s_caption_gives_the_share_with_its_interval_once_every_whole_cell_has_a_class():
    assert row_caption("target cell", 5, 1_000, with_share=False) == "target cell\n5 of 1,000 whole cells"
    assert row_caption("target cell", 5, 100, with_share=True) == (
        "target cell\n5 of 100 whole cells\n5.0% (95% CI 1.6%-11.3%)")  # Rümke's 1.6-11.3 % for 5 of 100


def test_galleries_are_written_per_smear_and_replace_an_earlier_run_s(smears, tmp_path, tiny_folder, capsys):  # noqa: F811
    model = str(tiny_folder[1])
    head, _, image, labels, *_ = saved_head(smears / "1.jpg", model, tmp_path / "head", colours={"normal": "#00ff00"})
    out = tmp_path / "out"
    (out / "galleries").mkdir(parents=True)
    imsave(out / "galleries" / "yesterday.png", np.zeros((4, 4, 3), np.uint8), check_contrast=False)
    argv = [str(smears), "--out", str(out), "--model", model, "--head", str(tmp_path / "head"), "--device", "cpu",
            "--galleries"]
    assert main(argv) == 2 and "galleries (with 1 picture) exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "galleries of 2 smears in" in printed and "removed the earlier run's 1 picture" in printed
    assert sorted(path.name for path in (out / "galleries").iterdir()) == ["1.png", "26.png"]  # yesterday's gone
    cells = read(out / "cells.csv").query("image == '1'").reset_index(drop=True)
    assert cells["touches_border"].dtype == bool
    np.testing.assert_array_equal(imread(out / "galleries" / "1.png")[..., :3],
                                  class_gallery(image, labels, cells, head.classes, head.colours))

    # A gallery that cannot be written loses the smear nothing but its picture.
    (out / "galleries" / "1.png").unlink()
    (out / "galleries" / "1.png").mkdir()  # a folder where the picture goes
    assert main([*argv, "--overwrite"]) == 0
    assert "[1/2] 1: warning: no gallery written (" in capsys.readouterr().err
    assert set(read(out / "cells.csv")["image"]) == {"1", "26"}
    (out / "galleries" / "1.png").rmdir()

    # A run without galleries takes the earlier ones away: they show cells its table no longer holds.
    assert main([str(smears), "--out", str(out), "--measure-only", "--overwrite"]) == 0
    assert "removed the earlier run's 1 picture" in capsys.readouterr().out
    assert not (out / "galleries").exists()  # emptied, so gone

    (out / "galleries").write_text("not a folder")
    assert main([*argv, "--overwrite"]) == 2
    assert "galleries is a file, where the pictures would go; move it, or choose another --out" in capsys.readouterr().err

    assert main([str(smears), "--out", str(tmp_path / "x"), "--measure-only", "--galleries"]) == 2
    assert "--galleries shows the cells of each class a head predicts: give --head PATH too" in capsys.readouterr().err


def test_a_gallery_is_named_by_its_smear_inside_the_galleries_folder():
    assert [gallery_file_name(name) for name in ("26", "day2/26", "../a", "//data/s1.jpg", "Smear 12.03.2024")] == [
        "26.png", "day2_26.png", "_a.png", "__data_s1.jpg.png", "Smear 12.03.2024.png"]
    files = GalleryFiles("out/galleries")  # two smears never share a picture, whatever the disk
    assert [files.path(name).name for name in ("day2/26", "day2_26", "Day2_26", "day2/26", "26")] == [
        "day2_26.png", "day2_26 (2).png", "Day2_26 (3).png", "day2_26.png", "26.png"]
    assert files.path("26").parent == Path("out/galleries")


def test_without_an_embeddings_file_a_batch_keeps_only_ids_and_model(smears, tiny_folder):  # noqa: F811
    embedder = load_embedder(str(tiny_folder[1]), device="cpu")
    image = imread(smears / "1.jpg")
    kept, light = (SmearAnalysis(embedder=embedder, keep_embeddings=keep)(image, "1") for keep in (True, False))
    (ids, vectors, model_id), (light_ids, light_vectors, light_model_id) = embeddings_of(kept), embeddings_of(light)
    np.testing.assert_array_equal(light_ids, ids)
    assert vectors.shape == (len(ids), TINY_DIM) and light_vectors.shape == (len(ids), 0)
    assert light_model_id == model_id == embedder.model_id
    assert light.metadata[METADATA_KEY]["crop_checks"] is None and earlier_run(light) is None  # kilobytes a smear


def test_a_batch_crops_the_cells_as_its_head_s_were_cropped(smears, tiny_folder):  # noqa: F811
    embedder = load_embedder(str(tiny_folder[1]), device="cpu")
    head = CellClassifier(["a", "b"], model_id=embedder.model_id, crops={"mode": "context", "scale": "cell", "margin": 0.5})
    head.fit(np.random.default_rng(0).normal(size=(20, TINY_DIM)), ["a", "b"] * 10)
    image = imread(smears / "1.jpg")
    cells = SmearAnalysis(embedder=embedder, head=head)(image, "1")
    record = cells.metadata[METADATA_KEY]
    assert (record["crop_mode"], record["crop_scale"], record["margin"]) == ("context", "cell", 0.5)
    ids, expected = embedder.embed(image, segment_cells(image), mode="context", scale="cell", margin=0.5)
    np.testing.assert_array_equal(record["label_ids"], ids)
    np.testing.assert_allclose(record["embeddings"], expected, rtol=1e-5, atol=1e-6)
    head.crops = None  # a head saved before heads recorded their crops: the defaults, as before
    record = SmearAnalysis(embedder=embedder, head=head)(image, "1").metadata[METADATA_KEY]
    assert (record["crop_mode"], record["crop_scale"], record["margin"]) == ("masked", "smear", 0.25)


def test_a_batch_crops_the_cells_as_its_model_s_training_cells_were_cut_unless_its_head_says(smears, tiny_folder,
                                                                                              tmp_path):  # noqa: F811
    cut = {"mode": "context", "scale": "smear", "margin": 0.75}
    trained = record_crops(shutil.copytree(tiny_folder[1], tmp_path / "trained"), cut)
    embedder = load_embedder(str(trained), device="cpu")
    image = imread(smears / "1.jpg")
    record = SmearAnalysis(embedder=embedder)(image, "1").metadata[METADATA_KEY]
    assert {"mode": record["crop_mode"], "scale": record["crop_scale"], "margin": record["margin"]} == cut
    _, expected = embedder.embed(image, segment_cells(image), **cut)
    np.testing.assert_allclose(record["embeddings"], expected, rtol=1e-5, atol=1e-6)
    head = CellClassifier(["a", "b"], model_id=embedder.model_id, crops={"mode": "masked", "scale": "cell", "margin": 0.5})
    head.fit(np.random.default_rng(0).normal(size=(20, TINY_DIM)), ["a", "b"] * 10)
    record = SmearAnalysis(embedder=embedder, head=head)(image, "1").metadata[METADATA_KEY]
    assert (record["crop_mode"], record["crop_scale"], record["margin"]) == ("masked", "cell", 0.5)


def test_an_earlier_table_that_cannot_be_removed_is_named_not_a_traceback(smears, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cells.npz").write_bytes(b"yesterday's embeddings")
    unlink = Path.unlink

    def held_open(path, missing_ok=False):  # as Windows refuses a file another program has open
        if path.name == "cells.npz":
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", held_open)
    assert main([str(smears), "--out", str(out), "--measure-only", "--overwrite"]) == 1
    assert len(read(out / "cells_summary.csv")) == 2  # the new tables are written all the same
    err = capsys.readouterr().err
    assert f"could not remove the earlier run's {out / 'cells.npz'} (Permission denied)" in err and "Traceback" not in err


def test_existing_results_are_kept_unless_overwrite_and_bad_options_are_refused_up_front(smears, tmp_path, capsys,
                                                                                        monkeypatch,
                                                                                        tiny_folder):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "cells_summary.csv").write_text("yesterday's")
    assert main([str(smears), "--out", str(out), "--measure-only"]) == 2
    assert "cells_summary.csv exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "cells_summary.csv").read_text() == "yesterday's" and not (out / "cells.csv").exists()
    (out / "cells.npz").write_bytes(b"yesterday's embeddings")  # of other cells: would not match the new table
    assert main([str(smears), "--out", str(out), "--measure-only", "--overwrite"]) == 0
    assert len(read(out / "cells_summary.csv")) == 2
    assert not (out / "cells.npz").exists()
    assert "removed the earlier run's cells.npz, which no longer matched" in capsys.readouterr().out
    (out / "cells_summary.csv").unlink()
    (out / "cells_summary.csv").mkdir()  # cannot be replaced by a file: said before any smear is read
    assert main([str(smears), "--out", str(out), "--measure-only", "--overwrite"]) == 2
    captured = capsys.readouterr()
    assert f"{out / 'cells_summary.csv'} is a folder, where a table would go" in captured.err and not captured.out
    (out / "cells_summary.csv").rmdir()
    replace = os.replace

    def held_open(name: str):  # open in a spreadsheet, on Windows: it cannot be replaced
        def replace_unless_held(source, target):
            if Path(target).name == name:
                raise PermissionError(13, "Permission denied")
            replace(source, target)
        return replace_unless_held

    monkeypatch.setattr(os, "replace", held_open("cells_summary.csv"))
    (out / "cells.npz").write_bytes(b"the embeddings of the cells.csv there")
    table = (out / "cells.csv").read_bytes()
    assert main([str(smears), "--out", str(out), "--measure-only", "--overwrite"]) == 1
    # the table replaced first is put back: it never stands beside another run's summary
    assert (out / "cells.csv").read_bytes() == table
    assert (out / "cells.npz").read_bytes() == b"the embeddings of the cells.csv there"  # it still matches
    captured = capsys.readouterr()  # the run's work is kept: the whole set, beside the held file
    assert captured.err == ("reddino-analyse: cells_summary.csv could not be replaced (Permission denied); it and "
                            "cells.csv, put back, are as before (open in another program?); this run's files get a "
                            "timestamped name instead\n")
    aside = sorted(path.name for path in out.glob("cells-*"))
    assert len(aside) == 2 and aside[1] == aside[0].replace(".csv", "_summary.csv") and aside[0] in captured.out
    assert len(read(out / aside[1])) == 2 and len(read(out / aside[0])) == len(read(out / "cells.csv"))
    for path in out.glob("cells-*"):
        path.unlink()
    (out / "cells.npz").write_bytes(b"the embeddings of the cells.csv there")
    monkeypatch.setattr(os, "replace", held_open("cells.csv"))
    assert main([str(smears), "--out", str(out), "--measure-only", "--overwrite"]) == 1
    assert capsys.readouterr().err == ("reddino-analyse: cells.csv could not be replaced (Permission denied); it is as "
                                       "before (open in another program?); this run's files get a timestamped name "
                                       "instead\n")
    assert len(list(out.glob("cells-*"))) == 2
    assert (out / "cells.npz").read_bytes() == b"the embeddings of the cells.csv there"  # it still matches
    (out / "cells.npz").unlink()
    monkeypatch.setattr(os, "replace", replace)
    fresh = tmp_path / "fresh"
    export = analyse_cli.export_cells_csv

    def another_run_wrote_meanwhile(table, *args, **kwargs):  # two runs given the same --out
        if Path(table).name == "cells.csv":
            Path(table).write_text("the other run's")
        return export(table, *args, **kwargs)

    monkeypatch.setattr(analyse_cli, "export_cells_csv", another_run_wrote_meanwhile)
    assert main([str(smears), "--out", str(fresh), "--measure-only"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"reddino-analyse: {fresh / 'cells.csv'} appeared while this run went on (another run "
                            "writing to the same folder?); this run's files get a timestamped name instead\n")
    assert (fresh / "cells.csv").read_text() == "the other run's" and not (fresh / "cells_summary.csv").exists()
    aside = [path.name for path in sorted(fresh.iterdir()) if path.name != "cells.csv"]
    assert len(aside) == 2 and re.fullmatch(rf"cells-\d{{8}}-\d{{6}}-{os.getpid()}\.csv", aside[0]), aside
    assert aside[1] == aside[0].replace(".csv", "_summary.csv") and aside[0] in captured.out
    assert len(read(fresh / aside[0])) == len(read(out / "cells.csv")) and len(read(fresh / aside[1])) == 2
    monkeypatch.setattr(analyse_cli, "export_cells_csv", export)

    other = tmp_path / "other"
    (tmp_path / "empty").mkdir()
    refusals = [
        ([str(smears), "--out", str(other), "--measure-only", "--head", "h"], "cannot take --head"),
        ([str(smears), "--out", str(other), "--measure-only", "--model", "reddino-base", "--device", "cpu",
          "--compile"], "cannot take --model or --device or --compile"),
        ([str(smears), "--out", str(other), "--model", str(tiny_folder[1])], "nothing it computes would be written"),
        ([str(smears), "--out", str(other), "--measure-only", "--pixel-size-um", "0"],
         "--pixel-size-um 0: The pixel size must be a positive number of micrometres"),
        ([str(smears), "--out", str(other), "--measure-only", "--pixel-size-um", "2e-7"],
         "is it in micrometres, not metres or millimetres?"),
        # A camera's sensor pixel, not divided by the objective: 3,124 "cells" in Chula 1, which has 123.
        ([str(smears), "--out", str(other), "--measure-only", "--pixel-size-um", "3.45"],
         "--pixel-size-um 3.45: At 3.45 µm per pixel a red cell would be 2.2 px across, too few to segment or embed "
         "(at most 1.5 µm per pixel). Is it the camera sensor's pixel size? Divide it by the objective's "
         "magnification: at 100x, 3.45 µm is 0.0345 µm per pixel."),
        ([str(tmp_path / "nothing.jpg"), "--out", str(other), "--measure-only"], "no such file"),
        ([str(smears), str(tmp_path / "empty"), "--out", str(other), "--measure-only"],
         f"no images (png, jpg, jpeg, tif, tiff) in {tmp_path / 'empty'}"),
        ([str(smears), "--out", str(other), "--model", "reddino-tiny", "--with-embeddings"],
         "cannot load the model 'reddino-tiny'"),
        ([str(smears), "--out", str(other), "--model", str(tiny_folder[1] / "model.safetensors"), "--with-embeddings"],
         "model.safetensors is a weights file; give the model folder (config.json and model.safetensors"),
        ([str(smears), "--out", str(out / "cells.csv"), "--measure-only"], "cannot make the output folder"),
        # said before a model is loaded (or downloaded): this one would be refused as unknown
        ([str(smears), "--out", str(out / "cells.csv" / "deeper"), "--model", "reddino-tiny", "--with-embeddings"],
         f"cannot make the output folder {out / 'cells.csv' / 'deeper'}: {out / 'cells.csv'} is a file"),
        ([str(smears), "--out", str(other), "--measure-only", "--with-embeddings"], "cannot take --with-embeddings"),
        # without --model: refused before the default model is loaded (or looked for offline)
        ([str(smears), "--out", str(other), "--head", str(tmp_path / "none")], "cannot use the head"),
        ([str(smears), "--out", str(other), "--model", str(tiny_folder[1]), "--head", str(tmp_path / "none")],
         "cannot use the head"),
    ]
    for argv, says in refusals:
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err
    assert not other.exists()


def test_an_unreadable_smear_is_skipped_and_the_others_are_written(smears, tmp_path, capsys):
    (smears / "broken.png").write_bytes(b"not a png")
    blank = np.full((200, 300, 3), 235, dtype=np.uint8)  # a bright empty field: no cells
    imsave(smears / "empty.png", blank, check_contrast=False)
    out = tmp_path / "out"
    assert main([str(smears), "--out", str(out), "--measure-only"]) == 1
    captured = capsys.readouterr()
    assert "broken.png: skipped" in captured.err and "1 of 4 smears skipped" in captured.err
    assert "empty: no cells found (is it a blood smear?)" in captured.out
    summary = read(out / "cells_summary.csv")
    assert summary["image"].tolist() == ["1", "26", "empty"]  # in path order: day2/26.jpg before empty.png
    assert summary.set_index("image").loc["empty", "cells"] == 0
    assert main([str(smears / "broken.png"), "--out", str(tmp_path / "none"), "--measure-only"]) == 3  # nothing written
    assert "no smear was analysed; nothing written" in capsys.readouterr().err


def test_a_thumbnail_s_cells_are_said_to_be_too_few_pixels_across(tmp_path, capsys):
    with Image.open(CHULA / "26.jpg") as photo:  # a 160 x 120 copy of a 640 x 480 smear: cells of 10 px
        photo.resize((160, 120)).save(tmp_path / "thumb.png")
    shutil.copy(CHULA / "26.jpg", tmp_path / "full.jpg")
    assert main([str(tmp_path / "thumb.png"), str(tmp_path / "full.jpg"), "--out", str(tmp_path / "out"),
                 "--measure-only"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "px across (a thumbnail" in line]
    assert len(warned) == 1 and re.fullmatch(r"\[1/2\] thumb: warning: its cells are only \d\d? px across \(a "
                                             r"thumbnail, or a low magnification\?\): shapes, sizes and classes read "
                                             r"from so few pixels are coarse; analyse the full-size image", warned[0])


def test_a_cmyk_jpeg_is_read_as_the_rgb_smear_it_shows(tmp_path):
    # From a print workflow: read as stored, its C, M, Y, K planes passed for R, G, B and alpha (1 cell found).
    from PIL import Image

    smear = imread(CHULA / "1.jpg")
    Image.fromarray(smear).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    pixels = read_smear(tmp_path / "cmyk.jpg")
    assert pixels.shape == smear.shape and np.abs(pixels.astype(int) - smear).mean() < 3
    assert abs(int(segment_cells(pixels).max()) - int(segment_cells(smear).max())) <= 5


def test_a_gray_smear_stored_with_alpha_or_one_channel_is_read_as_its_gray_plane(tmp_path):
    import tifffile
    from PIL import Image

    gray = imread(CHULA / "1.jpg")[..., 1]
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "one.tif", gray[..., None])
    for name in ("la.png", "one.tif"):
        pixels = read_smear(tmp_path / name)
        np.testing.assert_array_equal(pixels, gray)
        assert segment_cells(pixels).max() > 100


@pytest.mark.parametrize(("name", "content"), [("tiny.jpg", b"\xff\xd8\xff"), ("tiny.png", b"\x89P"),
                                               ("text.png", b"not a png at all, but a note")])
def test_a_file_that_is_no_image_is_said_to_be_one_however_short(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)  # Pillow fails on a few bytes with SyntaxError or struct.error
    with pytest.raises(OSError, match=r"^not an image that can be read \(PNG, JPEG or TIFF\), or a damaged one$"):
        read_smear(tmp_path / name)


def test_smears_are_listed_and_named_as_napari_names_their_layers(tmp_path):
    for relative in ("a/1.jpg", "b/1.JPG", "b/2.tif", "b/notes.txt", "b/._2.tif", "c/x/3.png", "d/x/3.png", "d/x/3.jpg"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = list_smears([tmp_path / "a", tmp_path / "b", tmp_path / "a" / ".." / "a" / "1.jpg", tmp_path / "c",
                         tmp_path / "d"])
    assert [path.relative_to(tmp_path).as_posix() for path in found] == [
        "a/1.jpg", "b/1.JPG", "b/2.tif", "c/x/3.png", "d/x/3.jpg", "d/x/3.png"]  # hidden ._ files left out
    assert smear_names(found) == ["a/1.jpg", "b/1.JPG", "2", "c/x/3.png", "x/3.jpg", "d/x/3.png"]
    assert smear_names([Path("1.jpg"), Path("1.png"), Path("2.png")]) == ["1.jpg", "1.png", "2"]  # run in the folder
    # one's file name is another's stem: numbered as napari numbers a taken layer name
    assert smear_names([Path("1.jpg"), Path("1.png"), Path("1.jpg.png")]) == ["1.jpg", "1.png", "1.jpg [1]"]


def test_linked_folders_are_searched_once_and_hidden_and_nas_folders_not(tmp_path):
    day, scope = tmp_path / "day", tmp_path / "scope2"
    for relative in ("day/1.jpg", "day/.Trash-1000/files/old.jpg", "day/@eaDir/1.jpg/SYNOPHOTO_THUMB_XL.jpg",
                     "day/.snapshot/hourly/1.jpg", "day/#snapshot/1.jpg", "day/#recycle/1.jpg", "day/lost+found/x.jpg",
                     "day/$Recycle.Bin/x.jpg", "day/d/3.jpg", "day/#12 patient/4.jpg", "scope2/2.jpg"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    (day / "scope2").symlink_to(scope, target_is_directory=True)  # a second microscope's share, linked in
    (scope / "back").symlink_to(day, target_is_directory=True)  # and a link back up: no loop
    (day / "a").mkdir()
    (day / "a" / "shortcut").symlink_to(day / "d", target_is_directory=True)  # found first, yet d keeps its own path
    unreadable = []
    found = list_smears([day], unreadable=unreadable)
    assert [path.relative_to(day).as_posix() for path in found] == ["#12 patient/4.jpg", "1.jpg", "d/3.jpg",
                                                                    "scope2/2.jpg"]  # a lab's own # folder is read
    assert unreadable == []
    assert [path.name for path in list_smears([day / ".snapshot"])] == ["1.jpg"]  # asked for by name


def test_a_folder_whose_smears_all_lie_in_a_linked_folder_is_analysed(tmp_path):
    day, scope = tmp_path / "day", tmp_path / "scope"
    day.mkdir()
    scope.mkdir()
    shutil.copy(CHULA / "1.jpg", scope / "1.jpg")
    (day / "scope").symlink_to(scope, target_is_directory=True)
    assert main([str(day), "--out", str(tmp_path / "out"), "--measure-only"]) == 0
    assert read(tmp_path / "out" / "cells_summary.csv")["source_path"].tolist() == [str(day / "scope" / "1.jpg")]


def test_the_pictures_of_earlier_runs_and_exports_are_not_taken_for_smears(tmp_path):
    day = tmp_path / "day1"
    for relative in ("1.jpg", "run1/cells.csv", "run1/galleries/1.png", "mine.csv", "mine_galleries/1.png",
                     "run3/.reddino-analyse-parts/a.npz", "run3/galleries/4.png",  # a run killed before its table
                     "run2/old.png", "galleries/2.jpg", "x_galleries/3.jpg"):  # the last two: no table beside
        (day / relative).parent.mkdir(parents=True, exist_ok=True)
        (day / relative).write_bytes(b"")
    found = list_smears([day], leave_out=day / "run2")  # this run's output folder
    assert [path.relative_to(day).as_posix() for path in found] == ["1.jpg", "galleries/2.jpg", "x_galleries/3.jpg"]
    assert [path.name for path in list_smears([day], leave_out=day)] == ["1.jpg", "2.jpg", "old.png", "3.jpg"]
    assert list_smears([day / "run1" / "galleries"]) == sorted((day / "run1" / "galleries").iterdir())  # asked for


def test_the_console_command_is_installed():
    finished = subprocess.run([Path(sys.executable).with_name("reddino-analyse"), "--help"], capture_output=True,
                              text=True, check=True)
    assert "--head PATH" in finished.stdout


class _CtrlCInFinaliser:
    """Presses Ctrl-C while Python finalises it, as when a progress bar is collected: the
    KeyboardInterrupt is raised inside ``__del__``, where Python prints it and goes on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between two of these
            pass


def ctrl_c_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one
def test_a_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run(tmp_path, monkeypatch, capsys, terminal_ctrl_c):
    folder = tmp_path / "smears"
    folder.mkdir()
    for number in range(3):
        shutil.copy(CHULA / "1.jpg", folder / f"{number}.jpg")

    def read_and_press_ctrl_c(path):
        _CtrlCInFinaliser()  # gone at once
        return read_smear(path)

    monkeypatch.setattr(analyse_cli, "read_smear", read_and_press_ctrl_c)
    assert main([str(folder), "--out", str(tmp_path / "out"), "--measure-only"]) == 130
    assert "interrupted; 2 smears not reached" in capsys.readouterr().err
    assert read(tmp_path / "out" / "cells_summary.csv")["image"].tolist() == ["0"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again


def analyse_copies(tmp_path: Path, count: int, name: str) -> tuple[Path, list]:
    """The output folder and the reddino-analyse command of ``count`` copies of a smear (file
    names ``name.format(number)``), measured only."""
    folder = tmp_path / "smears"
    folder.mkdir()
    for number in range(count):
        shutil.copy(CHULA / "1.jpg", folder / name.format(number))
    out = tmp_path / "out"
    return out, [Path(sys.executable).with_name("reddino-analyse"), str(folder), "--out", str(out), "--measure-only"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a scheduler's time limit, timeout
def test_ctrl_c_or_sigterm_writes_the_smears_finished_so_far(tmp_path, stop):
    out, command = analyse_copies(tmp_path, 20, "{:02d}.jpg")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as in CI: the CLI flushes
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          preexec_fn=ctrl_c_as_in_a_terminal) as run:
        first = run.stdout.readline()
        assert first.startswith("[1/20] 00: ")
        run.send_signal(stop)
        printed, errors = run.communicate(timeout=60)
    assert run.returncode == 128 + stop, errors
    finished = 1 + sum(line.startswith("[") for line in printed.splitlines())
    assert 1 <= finished < 20
    assert f"interrupted; {20 - finished} smear" in errors
    assert read(out / "cells_summary.csv")["image"].tolist() == [f"{n:02d}" for n in range(finished)]


def test_a_run_a_script_sent_to_the_background_goes_on_through_ctrl_c(tmp_path):
    out, command = analyse_copies(tmp_path, 3, "{}.jpg")

    def sent_to_the_background():  # as a shell starts "reddino-analyse ... &" in a script
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=sent_to_the_background) as run:
        assert run.stdout.readline().startswith("[1/3] 0: ")
        run.send_signal(signal.SIGINT)  # Ctrl-C pressed in the script's terminal
        printed, errors = run.communicate(timeout=60)
    assert run.returncode == 0, errors
    assert read(out / "cells_summary.csv")["image"].tolist() == ["0", "1", "2"]


def test_a_file_name_that_is_not_utf8_is_analysed_under_an_escaped_name(tmp_path, capsys):
    # A Windows microscope's share mounted without UTF-8: "café" in Latin-1 took the whole night's results.
    folder = tmp_path / "smears"
    folder.mkdir()
    shutil.copy(CHULA / "1.jpg", folder / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(CHULA / "26.jpg", folder / "26.jpg")
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--measure-only"]) == 0
    assert read(out / "cells_summary.csv")["image"].tolist() == ["26", "caf\\xe9"]
    assert "caf\\xe9: " in capsys.readouterr().out


def test_the_columns_keep_their_order_whether_a_gray_or_a_colour_smear_comes_first(tmp_path):
    orders = []
    for first in ("gray", "colour"):
        folder = tmp_path / first / "smears"
        folder.mkdir(parents=True)
        smear = imread(CHULA / "1.jpg")
        imsave(folder / f"a_{first}.png", smear[..., 1] if first == "gray" else smear, check_contrast=False)
        imsave(folder / f"b_{first}.png", smear if first == "gray" else smear[..., 1], check_contrast=False)
        assert main([str(folder), "--out", str(tmp_path / first / "out"), "--measure-only"]) == 0
        orders.append(list(read(tmp_path / first / "out" / "cells.csv").columns))
    assert orders[0] == orders[1]
    colours = [orders[0].index(name) for name in ("mean_red", "mean_green", "mean_blue", "mean_gray", "central_pallor")]
    assert colours == sorted(colours) and colours[-1] - colours[0] == 4



def test_a_sigterm_while_the_files_are_written_waits_for_them(smears, tmp_path, monkeypatch, capsys):
    export = analyse_cli.export_cells_csv

    def terminated_meanwhile(*args, **kwargs):  # a scheduler's time limit, just after the last smear
        os.kill(os.getpid(), signal.SIGTERM)
        return export(*args, **kwargs)

    monkeypatch.setattr(analyse_cli, "export_cells_csv", terminated_meanwhile)
    out = tmp_path / "out"
    assert main([str(smears), "--out", str(out), "--measure-only"]) == 128 + signal.SIGTERM
    assert "interrupted after the last smear; the files are whole" in capsys.readouterr().err
    assert read(out / "cells_summary.csv")["image"].tolist() == ["1", "26"] and len(read(out / "cells.csv")) > 200
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the signal is the system's again


def test_a_killed_runs_temporary_results_are_removed_once_a_day_old(smears, tmp_path, capsys):
    """A run killed while it wrote its results (kill -9, a node lost) left hidden temporary files,
    an embeddings file's as large as the results, that no run removed. Another run writing beside
    it now is left alone: only a file unchanged for a day is a dead run's."""
    out = tmp_path / "out"
    out.mkdir()
    old, fresh = out / ".cells.csv.k1ll3d00.tmp", out / ".cells_summary.csv.wr1t1ng0.tmp"
    old.write_bytes(b"x" * 2**20)
    fresh.write_text("being written")
    day_ago = time.time() - 24 * 3600 - 1
    os.utime(old, (day_ago, day_ago))
    assert main([str(smears), "--out", str(out), "--measure-only"]) == 0
    assert not old.exists() and fresh.exists()
    assert f"removed {old} (1.0 MB), left by a run killed while it wrote cells.csv" in capsys.readouterr().err
