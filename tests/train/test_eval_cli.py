"""``reddino-train eval`` end to end: a tiny model from ``fit`` + ``export``, on a crops folder
made by ``prepare`` and on the Chula point labels of the test smears."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from _model_fixtures import hub_cache, record_crops, serving_hub  # noqa: F401  (fixtures)
from PIL import Image
from skimage.draw import ellipse
from skimage.io import imread

from napari_reddino import cells_at_points, load_embedder, measure_cells, segment_cells
from napari_reddino.crops import cell_windows
from reddino_train.cli import main
from reddino_train.config import load_config
from reddino_train.eval_data import EmbeddingFeatures, MeasurementFeatures, read_point_labels
from reddino_train.export import export_teacher
from reddino_train.prepare import PrepareSettings, prepare
from reddino_train.train import fit

DATA = Path(__file__).parents[1] / "data"
CHULA = DATA / "chula_rbc12"


@pytest.fixture(scope="module")
def model(smear_images, tmp_path_factory) -> Path:
    """The teacher of a 1-step tiny run, exported for the plugin (56 px input, 384-d)."""
    root = tmp_path_factory.mktemp("model")
    fit(load_config("tiny", ["model.layerscale=1.0"]), smear_images, root / "run", max_steps=1)
    return export_teacher(root / "run", root / "model")


@pytest.fixture(scope="module")
def crops_by_smear(tmp_path_factory) -> Path:
    """Cell crops of a Chula and an Aslan smear: one class per smear, as prepare writes them."""
    sources = tmp_path_factory.mktemp("sources")
    shutil.copy(CHULA / "1.jpg", sources)
    shutil.copy(DATA / "aslan_bcd" / "image-1.png", sources)
    out = tmp_path_factory.mktemp("crops") / "cells"
    prepare([sources], out, PrepareSettings(size=32), progress=False)
    return out


def test_eval_on_crops_by_class(model, crops_by_smear, tmp_path, capsys):
    out = tmp_path / "crops.json"
    assert main(["eval", str(model), "--data", str(crops_by_smear), "--random-init", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for method in ("kNN k=1", "kNN k=20", "logistic regression"):
        assert f"| cls | {method} |" in printed and f"| random-init | {method} |" in printed
    report = json.loads(out.read_text())
    n_crops = len(list(crops_by_smear.rglob("*.png")))
    assert report["format"] == "crops" and report["split"] == "5-fold" and report["folds"] == 5
    assert report["samples"] == n_crops and set(report["classes"]) == {"1", "image-1"}
    for features in ("cls", "random-init"):
        for scores in report["results"][features].values():
            assert 0 <= scores["balanced_accuracy"] <= 1 and len(scores["fold_balanced_accuracy"]) == 5
            assert sum(c["support"] for c in scores["per_class"].values()) == n_crops
    # a Chula cell and an Aslan cell differ in stain and size: any features tell them apart
    assert report["results"]["cls"]["logreg"]["balanced_accuracy"] > 0.8
    cached = np.load(tmp_path / "crops.cls.npz")
    assert cached["features"].shape == (n_crops, 384)
    random = np.load(tmp_path / "crops.random-init.npz")["features"]
    assert not np.allclose(random, cached["features"])


def test_a_crop_that_is_not_square_is_seen_whole_on_its_slide_not_squashed(model):
    features = EmbeddingFeatures(load_embedder(str(model), device="cpu"), mode="masked", scale="cell", margin=0.25)
    wide = np.full((24, 60, 3), (225, 230, 228), np.uint8)  # a bounding-box crop of an elliptocyte
    wide[ellipse(12, 30, 11, 28, shape=wide.shape[:2])] = (200, 110, 130)  # most of its pixels: no slide colour
    square = np.full((60, 60, 3), (225, 230, 228), np.uint8)
    square[18:42] = wide  # the same cell, on more of its slide
    embeddings = features.crops([wide, square, wide.transpose(1, 0, 2), square.transpose(1, 0, 2)])
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-4)
    np.testing.assert_allclose(embeddings[2], embeddings[3], atol=1e-4)
    assert not np.allclose(embeddings[0], embeddings[2], atol=1e-3)  # the model sees which way it lies


def test_crops_in_a_folder_per_smear_can_be_split_by_smear(model, crops_by_smear, tmp_path, capsys):
    # Split by cell, a classifier can tell a test crop's smear from its train crops of that smear.
    grouped = tmp_path / "grouped"
    for smear in ("1", "image-1"):
        crops = sorted((crops_by_smear / smear).glob("*.png"))
        for label, part in (("x", crops[::2]), ("y", crops[1::2])):  # <class>/<smear>/<crop>.png
            (grouped / label / smear).mkdir(parents=True)
            for crop in part:
                shutil.copy(crop, grouped / label / smear / crop.name)
    out = tmp_path / "grouped.json"
    assert main(["eval", str(model), "--data", str(grouped), "--json", str(out), "--max-per-class", "20",
                 "--split", "5-fold"]) == 0
    assert json.loads(out.read_text())["split"] == "5-fold"  # when asked for
    assert main(["eval", str(model), "--data", str(grouped), "--json", str(out), "--max-per-class", "20",
                 "--overwrite"]) == 0
    report = json.loads(out.read_text())
    assert (report["split"], report["folds"]) == ("by-image", 2)  # by default: two smears
    groups = np.load(tmp_path / "grouped.cls.npz")["groups"]
    assert sorted(set(groups)) == ["1", "image-1"] and len(groups) == report["samples"]
    refused = "a split by image needs to know each sample's image"
    (grouped / "x" / "loose.png").write_bytes(next((grouped / "x" / "1").glob("*.png")).read_bytes())
    assert main(["eval", str(model), "--data", str(grouped), "--split", "by-image"]) == 2  # a crop of no smear
    assert refused in capsys.readouterr().err
    assert main(["eval", str(model), "--data", str(crops_by_smear.parent), "--format", "crops", "--split",
                 "by-image"]) == 2  # one folder per class, each "smear" of one class: no smears
    assert refused in capsys.readouterr().err

    # A folder per patient, each of one class: split by patient, so no patient's stain gives its class away.
    patients = tmp_path / "patients"
    for label, smear in (("x", "1"), ("y", "image-1")):
        crops = sorted((crops_by_smear / smear).glob("*.png"))[:24]
        for patient, part in ((f"{label}-a", crops[::2]), (f"{label}-b", crops[1::2])):
            (patients / label / patient).mkdir(parents=True)
            for crop in part:
                shutil.copy(crop, patients / label / patient / crop.name)
    assert main(["eval", str(model), "--data", str(patients), "--json", str(out), "--overwrite"]) == 0
    report = json.loads(out.read_text())
    assert (report["split"], report["folds"]) == ("by-image", 4)
    shutil.rmtree(patients / "y" / "y-b")  # one class from one patient only: a fold would never train on it
    assert main(["eval", str(model), "--data", str(patients), "--split", "by-image"]) == 2
    assert refused in capsys.readouterr().err


def test_cached_features_are_used_only_for_the_same_model_and_the_same_files(model, crops_by_smear, tmp_path,
                                                                             capsys):
    other = shutil.copytree(model, tmp_path / "other")  # the same architecture, other weights
    weights = safetensors.torch.load_file(other / "model.safetensors")
    safetensors.torch.save_file({name: tensor + 0.01 for name, tensor in weights.items()}, other / "model.safetensors")
    data = shutil.copytree(crops_by_smear, tmp_path / "crops")

    def cached(model_folder: Path) -> bool:
        assert main(["eval", str(model_folder), "--data", str(data), "--json", str(tmp_path / "e.json"),
                     "--overwrite", "--max-per-class", "10"]) == 0
        return "features from the cache: cls" in capsys.readouterr().out

    assert not cached(model) and cached(model)
    assert not cached(other) and cached(other)
    first = sorted(data.rglob("*.png"))[0]
    first.write_bytes(sorted(data.rglob("*.png"))[-1].read_bytes())  # a crop replaced by another
    assert not cached(other)


def test_a_hub_model_downloaded_by_eval_cuts_cells_as_its_record_says_and_caches_them_so(
        model, tmp_path, capsys, serving_hub):  # noqa: F811
    crops = {"mode": "context", "scale": "cell", "margin": 0.5}
    serving_hub("lab/trained", record_crops(shutil.copytree(model, tmp_path / "trained"), crops))
    args = ["eval", "hf_hub:lab/trained", "--data", str(CHULA), "--limit-images", "1", "--split", "5-fold", "--json",
            str(tmp_path / "e.json")]
    assert main(args) == 0  # its config is read only once downloaded
    assert json.loads((tmp_path / "e.json").read_text())["crops"] == crops
    image = imread(CHULA / "1.jpg")
    labels = segment_cells(image)
    ids = cells_at_points(labels, read_point_labels(CHULA / "1.txt")[0])
    ids = ids[ids > 0]
    all_ids, expected = load_embedder(str(tmp_path / "trained"), device="cpu", dtype="float32").embed(image, labels)
    inside = windows_inside_image(labels, ids, scale="cell", margin=0.5)
    features = np.load(tmp_path / "e.cls.npz")["features"][: len(ids)]
    np.testing.assert_allclose(features[inside], expected[np.searchsorted(all_ids, ids)][inside], rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0  # cached under the model's commit and its crops
    assert "features from the cache: cls" in capsys.readouterr().out


def windows_inside_image(labels, ids, **crops):
    """Whether each cell's window (the plugin's, with these crop settings) lies inside the smear."""
    windows = cell_windows(labels, **crops)
    boxes = windows.boxes[np.searchsorted(windows.ids, ids)]
    return (boxes[:, :2] >= 0).all(axis=1) & (boxes[:, 2] <= labels.shape[1]) & (boxes[:, 3] <= labels.shape[0])


def test_eval_on_chula_points_split_by_image(model, tmp_path, capsys):
    out = tmp_path / "points.json"
    args = ["eval", str(model), "--data", str(CHULA), "--random-init", "--with-measurements", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| measurements | logistic regression |" in printed and "split by-image (2 folds)" in printed
    report = json.loads(out.read_text())
    n_points = sum(len(read_point_labels(CHULA / f"{n}.txt")[1]) for n in (1, 26))
    summary = report["data_summary"]
    assert report["format"] == "points" and report["split"] == "by-image" and report["folds"] == 2
    assert summary["images"] == 2 and summary["points"] == n_points and 0.8 * n_points < summary["matched"] <= n_points
    assert report["samples"] == summary["matched"] and "normal" in report["classes"]
    assert report["crops"] == {"mode": "masked", "scale": "smear", "margin": 0.25}  # the plugin's defaults
    assert set(report["results"]) == {"cls", "random-init", "measurements"}
    assert set(report["results"]["measurements"]) == {"logreg"}
    cached = np.load(tmp_path / "points.cls.npz")
    assert sorted(set(cached["groups"].tolist())) == ["1.jpg", "26.jpg"]
    measurements = np.load(tmp_path / "points.measurements.npz")["features"]
    assert measurements.shape[0] == summary["matched"] and 8 <= measurements.shape[1] <= 20

    # the cells' features are the plugin's embeddings of those cells
    image = imread(CHULA / "1.jpg")
    labels = segment_cells(image)
    points, _ = read_point_labels(CHULA / "1.txt")
    ids = cells_at_points(labels, points)
    ids = ids[ids > 0]
    all_ids, embeddings = load_embedder(str(model), device="cpu", dtype="float32").embed(image, labels)
    inside = windows_inside_image(labels, ids)
    expected = embeddings[np.searchsorted(all_ids, ids)]
    np.testing.assert_allclose(cached["features"][: len(ids)][inside], expected[inside], rtol=1e-4, atol=1e-5)
    # and their measurements the plugin's, taken among all the smear's cells: a cell's neighbours
    # share its outline whether or not they were annotated
    table = measure_cells(labels, image).set_index("label", drop=False).loc[ids]
    columns = [column for column in table.columns if MeasurementFeatures.is_feature(column)]
    np.testing.assert_allclose(measurements[: len(ids)], table[columns].to_numpy(np.float32), rtol=1e-5)
    annotated_only = measure_cells(np.where(np.isin(labels, ids), labels, 0), image).set_index("label").loc[ids]
    assert (table["outline_shared"] > annotated_only["outline_shared"] + 0.05).sum() >= 3

    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # again: from the cache, with the same numbers
    assert "features from the cache: cls, random-init, measurements" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"] == report["results"]

    # context crops (neighbours kept) on request: the plugin's context embeddings, not from the
    # cache; smear-scale windows (the default) are sized from all the smear's cells, so every
    # feature is the plugin's, border cells included
    embedder = load_embedder(str(model), device="cpu", dtype="float32")
    context_out = tmp_path / "context.json"
    assert main(["eval", str(model), "--data", str(CHULA), "--crop-mode", "context", "--json", str(context_out)]) == 0
    context_ids, context = embedder.embed(image, labels, mode="context")
    features = np.load(tmp_path / "context.cls.npz")["features"][: len(ids)]
    np.testing.assert_allclose(features, context[np.searchsorted(context_ids, ids)], rtol=1e-4, atol=1e-5)
    assert not np.allclose(features[inside], expected[inside], atol=1e-3)

    # at cell scale in context mode only the annotated cells are embedded: the plugin's features
    # wherever a window stays inside the image (outside, the padding's colour may differ a little);
    # into the same --json, the cache of the smear-scale crops is not taken for them
    args = ["eval", str(model), "--data", str(CHULA), "--crop-mode", "context", "--crop-scale", "cell"]
    capsys.readouterr()
    assert main([*args, "--json", str(context_out), "--overwrite"]) == 0
    assert "features from the cache: cls" not in capsys.readouterr().out
    cell_ids, by_cell = embedder.embed(image, labels, mode="context", scale="cell")
    inside = windows_inside_image(labels, ids, scale="cell")
    features = np.load(tmp_path / "context.cls.npz")["features"][: len(ids)]
    np.testing.assert_allclose(features[inside], by_cell[np.searchsorted(cell_ids, ids)][inside], rtol=1e-4, atol=1e-5)

    # a model that records how its training cells were cut is evaluated on cells cut so: the
    # features of the context crops at cell scale just computed
    trained = record_crops(shutil.copytree(model, tmp_path / "trained"), {"mode": "context", "scale": "cell",
                                                                         "margin": 0.25})
    assert main(["eval", str(trained), "--data", str(CHULA), "--json", str(tmp_path / "trained.json")]) == 0
    assert "matched to a segmented cell; context crops at cell scale, margin 0.25" in capsys.readouterr().out
    assert json.loads((tmp_path / "trained.json").read_text())["crops"] == {"mode": "context", "scale": "cell",
                                                                            "margin": 0.25}
    np.testing.assert_array_equal(np.load(tmp_path / "trained.cls.npz")["features"][: len(ids)], features)


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--data", "{crops}"], "No such model"),
    (["{model}", "--data", "{crops}", "--split", "by-image"], "needs to know each sample's image"),
    (["{model}", "--data", "{crops}", "--with-measurements"], "need smears with point labels"),
    (["{model}", "--data", "{crops}", "--limit-images", "3", "--crop-mode", "masked"],
     "--limit-images and --crop-mode are for smears with point labels (--format points); crops are taken as they "
     "are (--max-per-class limits them)"),
    (["{missing}", "--data", "{crops}", "--limit-images", "0"], "--limit-images 0: give a whole number of 1 or more"),
    (["{missing}", "--data", "{crops}", "--batch-size", "-4"], "--batch-size -4: give a whole number"),
    (["{missing}", "--data", "{crops}", "--margin", "-0.5"], "--margin -0.5: give a fraction"),
    (["{missing}", "--data", "{crops}", "--seed", "-1"], "--seed -1: give a whole number from 0 to 4294967295"),
    (["{model}", "--data", "{chula}", "--format", "crops"], "no crops under {chula}; expected one folder of images "
     "per class, DATA/<class>/*.png (this folder holds smears with point labels: use --format points)"),
    (["{model}", "--data", "{one_class}"], "every crop under {one_class} is of one class, 'smear0'; expected one "
     "folder of images per class, DATA/<class>/*.png, two classes at least"),
    # found before the evaluation, not after it (the table was lost, a cache file left behind)
    (["{missing}", "--data", "{crops}", "--json", "{one_class}", "--overwrite"],
     "{one_class} is a folder; give --json a file name, such as {one_class}/eval.json"),
    (["{missing}", "--data", "{crops}", "--json", "{notes}/eval.json"], "cannot write in {notes}; give --json a "
     "file in a folder you can write to"),
    (["{missing}", "--data", "{crops}", "--no-cls"], "--no-cls leaves nothing to evaluate: add --random-init or "
     "--with-measurements"),
])
def test_eval_errors_exit_2_with_the_reason(model, crops_by_smear, tmp_path, capsys, args, message):
    one_class = tmp_path / "one_class"
    shutil.copytree(next(p for p in sorted(crops_by_smear.iterdir()) if p.is_dir()), one_class / "smear0")
    (tmp_path / "notes.txt").write_text("a file, where --json wants a folder")
    paths = {"missing": str(tmp_path / "nope"), "model": str(model), "crops": str(crops_by_smear),
             "chula": str(CHULA), "one_class": str(one_class), "notes": str(tmp_path / "notes.txt")}
    assert main(["eval", *(arg.format(**paths) for arg in args)]) == 2
    assert message.format(**paths) in capsys.readouterr().err


def test_eval_subsamples_images_and_cells_and_caches_by_those_settings(model, tmp_path, capsys):
    """--limit-images, --max-per-class, --seed and --pixel-size-um each choose other cells (or
    other outlines), so each is part of the cache's key."""
    out = tmp_path / "few.json"
    args = ["eval", str(model), "--data", str(CHULA), "--no-cls", "--with-measurements", "--limit-images", "1",
            "--max-per-class", "5", "--split", "5-fold", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["data_summary"]["images"] == 1 and set(report["results"]) == {"measurements"}
    matched = read_point_labels(CHULA / "1.txt")[1]
    supports = {name: c["support"] for name, c in report["results"]["measurements"]["logreg"]["per_class"].items()}
    assert all(0 < support <= 5 for support in supports.values()) and report["samples"] == sum(supports.values())
    assert max(np.unique(matched, return_counts=True)[1]) > 5  # so some class was cut down to 5
    first = np.load(tmp_path / "few.measurements.npz")["features"]
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0
    assert "features from the cache: measurements" in capsys.readouterr().out

    for changed in (["--seed", "1"], ["--pixel-size-um", "0.25"]):
        assert main([*args, *changed, "--overwrite"]) == 0
        assert "features from the cache" not in capsys.readouterr().out, changed
        assert not np.array_equal(np.load(tmp_path / "few.measurements.npz")["features"], first), changed


def test_a_split_short_of_images_names_the_files_it_could_not_read(model, tmp_path, capsys):
    data = shutil.copytree(CHULA, tmp_path / "chula")
    (data / "26.jpg").write_bytes((CHULA / "26.jpg").read_bytes()[:2000])  # cut short in a copy
    assert main(["eval", str(model), "--data", str(data)]) == 2
    said = capsys.readouterr().err
    assert "(1 file could not be read or segmented: " in said and f"{data / '26.jpg'} (unreadable" in said
    # Scores from the smears that were read: given, but not as a success (a script must see it),
    # also when a re-run takes the features from the cache.
    run = ["eval", str(model), "--data", str(data), "--no-cls", "--with-measurements", "--split", "5-fold",
           "--json", str(tmp_path / "eval.json"), "--overwrite"]
    for cached in (False, True):
        assert main(run) == 1
        said = capsys.readouterr()
        assert ("features from the cache: measurements" in said.out) == cached
        assert "reddino-train eval: 1 file could not be read or segmented (see above); the scores leave them out" in said.err
        assert f"skipped 1 file: {data / '26.jpg'} (unreadable" in said.out
    # A field too small for the pixel size given is left out the same way, not the end of the run.
    (data / "26.jpg").write_bytes((CHULA / "26.jpg").read_bytes())
    Image.open(CHULA / "1.jpg").crop((0, 0, 30, 30)).save(data / "1.jpg")
    assert main(["eval", str(model), "--data", str(data), "--no-cls", "--with-measurements", "--pixel-size-um", "0.2",
                 "--split", "5-fold"]) == 1  # scored on the other smear, and said
    said = capsys.readouterr()
    assert f"skipped 1 file: {data / '1.jpg'} (With a pixel size of 0.2 µm, a red cell would be 38 px across" in said.out


def test_chula_dataset_folder_is_read_as_points_and_a_json_inside_it_keeps_its_cache(model, tmp_path, capsys):
    """--data Chula/Dataset (labels in ../Label) is the points layout, and results and caches
    written into the data folder do not make the next run's cache stale, while a label changed in
    ../Label does; a cache cut short, or empty, is computed again."""
    dataset, labels = tmp_path / "chula" / "Dataset", tmp_path / "chula" / "Label"
    dataset.mkdir(parents=True), labels.mkdir()
    shutil.copy(CHULA / "1.jpg", dataset), shutil.copy(CHULA / "1.txt", labels)
    args = ["eval", str(model), "--data", str(dataset), "--no-cls", "--with-measurements", "--split", "5-fold",
            "--json", str(dataset / "eval.json"), "--overwrite"]
    assert main(args) == 0
    assert json.loads((dataset / "eval.json").read_text())["format"] == "points"
    assert "features from the cache" not in capsys.readouterr().out
    assert main(args) == 0
    assert "features from the cache: measurements" in capsys.readouterr().out
    cache = dataset / "eval.measurements.npz"
    for cut_short in (cache.read_bytes()[: cache.stat().st_size // 2], b""):
        cache.write_bytes(cut_short)
        assert main(args) == 0
        assert "features from the cache" not in capsys.readouterr().out
    (labels / "1.txt").write_text((labels / "1.txt").read_text().replace(" 0\n", " 1\n", 1))  # a label mended
    assert main(args) == 0
    assert "features from the cache" not in capsys.readouterr().out
