"""CellClassifier: known answers on constructed embeddings and a real smear's measurements."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from skimage.io import imread
from sklearn.linear_model import LogisticRegression

from napari_reddino import measure_cells, segment_cells
from napari_reddino.cell_classifier import (
    DEFAULT_MEASUREMENTS,
    CellClassifier,
    HeadMismatchError,
    available_measurements,
    head_paths,
    measurement_features,
    uncertainty_order,
)
from napari_reddino.model_ids import readable_ids

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def smear_table() -> pd.DataFrame:
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    return measure_cells(segment_cells(image), image)


def separable(per_class: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = np.repeat(np.array(["normal", "spherocyte", "target cell"], dtype=object), per_class)
    centres = {name: rng.normal(scale=5, size=dim) for name in set(names)}
    return np.stack([centres[n] for n in names]) + rng.normal(size=(len(names), dim)), names


def test_separable_classes_are_learned_from_a_few_labels_each():
    embeddings, truth = separable()
    labels = truth.copy()
    labels[1::3], labels[2::3] = "", None  # a third of the cells labelled
    head = CellClassifier().fit(embeddings, labels)
    assert head.classes == ["normal", "spherocyte", "target cell"]
    assert (head.predict(embeddings) == truth).all()
    proba = head.predict_proba(embeddings)
    assert proba.dtype == np.float32 and proba.shape == (90, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-6)


def test_empty_none_and_missing_labels_all_mean_unlabelled():
    embeddings, labels = separable(seed=1)
    missing = labels.copy()
    missing[1::6], missing[2::6], missing[3::6] = "", np.nan, None  # np.nan: a pandas column's missing label
    blank = np.array([name if isinstance(name, str) else "" for name in missing], dtype=object)
    np.testing.assert_array_equal(CellClassifier().fit(embeddings, missing).predict_proba(embeddings),
                                  CellClassifier().fit(embeddings, blank).predict_proba(embeddings))


def test_two_labels_per_class_among_many_cells_are_not_led_by_chance_agreements():
    """The features are scaled by every cell: labelled cells that happen to agree on a noise
    feature must not make it decide (scaled by them alone, 0.74 of these cells were right)."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, size=2000)
    direction = rng.normal(size=384)
    embeddings = rng.normal(size=(2000, 384)) * rng.uniform(0.2, 2.0, 384)  # unequal spreads, as real ones
    embeddings = (embeddings + np.outer(truth, 6 * direction / np.linalg.norm(direction))).astype(np.float32)
    labels = np.full(2000, "", dtype=object)
    for name, value in (("normal", 0), ("spherocyte", 1)):
        labels[np.flatnonzero(truth == value)[:2]] = name
    head = CellClassifier().fit(embeddings, labels)
    right = head.predict(embeddings) == np.where(truth == 1, "spherocyte", "normal")
    assert right[labels == ""].mean() > 0.9


def test_balancing_moves_the_boundary_towards_the_minority_class():
    # 180 "normal" cells around 0 and 20 "spherocyte" around 2 on one axis, with unit spread.
    normal = norm.ppf((np.arange(180) + 0.5) / 180)
    spherocyte = 2 + norm.ppf((np.arange(20) + 0.5) / 20)
    x = np.concatenate([normal, spherocyte])[:, None]
    labels = np.array(["normal"] * 180 + ["spherocyte"] * 20, dtype=object)
    head = CellClassifier().fit(x, labels)
    # Balanced, the classes weigh the same: the boundary is near the midpoint, 1.
    p_midpoint = head.predict_proba([[1.0]])[0, 1]
    assert 0.4 < p_midpoint < 0.6
    # Unweighted, the 9:1 prior pushes it to about 1 + ln(9) / 2 = 2.1: a cell at 1.3 would be normal.
    unweighted = LogisticRegression(C=1e4).fit(x, labels)
    assert unweighted.predict([[1.3]])[0] == "normal"
    assert head.predict([[1.3]])[0] == "spherocyte"


def test_classes_follow_the_given_class_list():
    embeddings, labels = separable()
    labels[labels == "spherocyte"] = ""
    head = CellClassifier(["target cell", "spherocyte", "normal", "other"], {"normal": "#00ff00"}).fit(embeddings, labels)
    assert head.classes == ["target cell", "normal"]
    assert set(head.predict(embeddings)) == {"target cell", "normal"}
    assert head.predict(embeddings[:1])[0] == "normal"


@pytest.mark.parametrize("labels", [["normal"] * 90, [""] * 90, []])
def test_fewer_than_two_classes_are_refused(labels):
    embeddings, _ = separable()
    with pytest.raises(ValueError, match="at least two classes"):
        CellClassifier().fit(embeddings, labels)


def test_labels_outside_the_class_list_are_refused():
    embeddings, labels = separable()
    with pytest.raises(ValueError, match="'target cell'"):
        CellClassifier(["normal", "spherocyte"]).fit(embeddings, labels)


def test_a_head_learns_from_measurements_of_a_real_smear(smear_table):
    circularity = smear_table["circularity"].to_numpy()
    labels = np.where(circularity > np.median(circularity), "round", "irregular").astype(object)
    noise = np.random.default_rng(0).normal(size=(len(labels), 8))  # embeddings that know nothing
    head = CellClassifier().fit(noise, labels, measurements=smear_table, measurement_columns=["circularity"])
    assert head.measurement_columns == ["circularity"]
    assert (head.predict(noise, measurements=smear_table) == labels).mean() > 0.9


def test_default_measurements_are_the_scale_free_ones_the_table_allows(smear_table):
    noise = np.random.default_rng(0).normal(size=(len(smear_table), 8))
    labels = np.where(np.arange(len(smear_table)) % 2, "a", "b").astype(object)
    assert CellClassifier().fit(noise, labels, measurements=smear_table).measurement_columns == list(DEFAULT_MEASUREMENTS)
    gray = smear_table.drop(columns=["mean_red", "mean_green", "mean_blue"]).assign(mean_gray=100.0)
    columns = CellClassifier().fit(noise, labels, measurements=gray).measurement_columns
    assert columns == [c for c in DEFAULT_MEASUREMENTS if not c.endswith("_fraction")]
    assert CellClassifier().fit(noise, labels).measurement_columns == []
    # A map pooling a colour and a gray smear: no colour for half the cells, so no colour features.
    pooled = pd.concat([smear_table, gray], ignore_index=True)
    assert available_measurements(pooled) == [c for c in DEFAULT_MEASUREMENTS if not c.endswith("_fraction")]
    colour_head = CellClassifier().fit(noise, labels, measurements=smear_table)
    with pytest.raises(ValueError, match="red_fraction, blue_fraction, which some of these cells lack"):
        colour_head.predict_proba(noise, measurements=gray)
    # Cells measured before outline_shared existed: a new head goes without it, a head with it says why not.
    older = smear_table.drop(columns="outline_shared")
    pooled = pd.concat([smear_table, older], ignore_index=True)
    assert available_measurements(pooled) == [c for c in DEFAULT_MEASUREMENTS if c != "outline_shared"]
    with pytest.raises(ValueError, match=r"outline_shared, which some of these cells lack.*segment them again"):
        colour_head.predict_proba(noise, measurements=older)
    # An infinite value would make every logit NaN, and argmax would quietly name the first class.
    infinite = smear_table.assign(circularity=smear_table["circularity"].where(smear_table.index != 2, np.inf))
    with pytest.raises(ValueError, match="The measurements circularity have missing or infinite values"):
        colour_head.predict_proba(noise, measurements=infinite)
    with pytest.raises(ValueError, match=f"Measurements of {len(smear_table) - 1} cells for {len(smear_table)} embedded"):
        colour_head.predict_proba(noise, measurements=smear_table.iloc[1:])


def test_a_renamed_class_keeps_its_weights_and_colour(smear_table):
    head, noise = trained_head(smear_table)
    before = head.predict_proba(noise, measurements=smear_table)
    head.rename_classes({"schistocyte": "fragment"})
    assert head.classes == ["fragment", "normal"] and head.colours == {"normal": "#00ff00", "fragment": "#ff0000"}
    np.testing.assert_array_equal(head.predict_proba(noise, measurements=smear_table), before)
    assert set(head.predict(noise, measurements=smear_table)) == {"normal", "fragment"}
    head.class_ids = {"normal": "id-n", "fragment": "id-f"}
    head.rename_classes({"normal": "fragment", "fragment": "normal"})  # a swap, at once
    assert head.classes == ["normal", "fragment"] and head.colours == {"fragment": "#00ff00", "normal": "#ff0000"}
    assert head.class_ids == {"fragment": "id-n", "normal": "id-f"}
    np.testing.assert_array_equal(head.predict_proba(noise, measurements=smear_table), before)


def test_measurements_ignore_magnification_and_exposure(smear_table):
    other_scope = smear_table.copy()
    other_scope["equivalent_diameter_px"] *= 2.5
    other_scope[["mean_red", "mean_green", "mean_blue"]] *= 0.7
    np.testing.assert_allclose(
        measurement_features(other_scope, DEFAULT_MEASUREMENTS, len(smear_table)),
        measurement_features(smear_table, DEFAULT_MEASUREMENTS, len(smear_table)),
    )


def test_colour_fractions_are_each_channel_s_share_of_the_cell_s_mean_colour():
    table = pd.DataFrame({"mean_red": [100.0, 30.0, 0.0], "mean_green": [50.0, 30.0, 0.0], "mean_blue": [50.0, 60.0, 0.0]})
    values = measurement_features(table, ["red_fraction", "blue_fraction"], 3)
    np.testing.assert_allclose(values, [[0.5, 0.25], [0.25, 0.5], [1 / 3, 1 / 3]])  # black: no colour, a third each


def test_relative_diameter_is_against_the_whole_cells_of_each_smear():
    table = pd.DataFrame({
        "image": ["a", "a", "a", "a", "b", "b"],
        "equivalent_diameter_px": [10.0, 20, 30, 40, 5, 15],
        "touches_border": [False, False, False, True, True, True],
    })
    relative = measurement_features(table, ["relative_diameter"], 6)[:, 0]
    np.testing.assert_allclose(relative, [0.5, 1, 1.5, 2, 0.5, 1.5])  # a: median of 10, 20, 30; b: all touch
    # two segmentations of one smear (an exported table): each layer's own cells
    table = table.assign(image="a", layer=["a cells"] * 4 + ["a cells [1]"] * 2)
    relative = measurement_features(table, ["relative_diameter"], 6)[:, 0]
    np.testing.assert_allclose(relative, [0.5, 1, 1.5, 2, 0.5, 1.5])
    np.testing.assert_allclose(measurement_features(table.drop(columns=["image", "layer"]), ["relative_diameter"], 6)[:, 0],
                               np.array([10, 20, 30, 40, 5, 15]) / 20)  # one smear: median of 10, 20, 30
    # a table without the border column (cells from another tool's export): every cell counts
    np.testing.assert_allclose(measurement_features(table[["equivalent_diameter_px"]], ["relative_diameter"], 6)[:, 0],
                               np.array([10, 20, 30, 40, 5, 15]) / 17.5)


def test_prediction_refuses_missing_measurements_and_other_embedding_sizes(smear_table):
    noise = np.random.default_rng(0).normal(size=(len(smear_table), 8))
    labels = np.where(np.arange(len(smear_table)) % 2, "a", "b").astype(object)
    head = CellClassifier().fit(noise, labels, measurements=smear_table)
    with pytest.raises(ValueError, match="central_pallor"):
        head.predict_proba(noise, measurements=smear_table.drop(columns="central_pallor"))
    with pytest.raises(ValueError, match=r"trained on measurements too \(.*relative_diameter.*\): pass the cells' "
                                         r"table from measure_cells as measurements=\.$"):
        head.predict_proba(noise)  # forgotten: not taken for a gray smear
    with pytest.raises(ValueError, match="8-d"):
        head.predict_proba(noise[:, :5], measurements=smear_table)


def test_held_out_recall_is_each_class_s_share_named_right_when_left_out_of_training():
    embeddings, truth = separable(per_class=20)
    head = CellClassifier(["normal", "spherocyte", "target cell"]).fit(embeddings, truth)
    assert head.held_out_recall(embeddings, truth) == {"normal": 1.0, "spherocyte": 1.0, "target cell": 1.0}
    # Spherocytes and target cells made alike: left out, half of them or so are taken for the other.
    alike = embeddings.copy()
    alike[truth == "target cell"] = alike[truth == "spherocyte"] + np.random.default_rng(1).normal(
        scale=0.1, size=(20, alike.shape[1]))
    head.fit(alike, truth)
    recall = head.held_out_recall(alike, truth)
    assert recall["normal"] == 1.0 and recall["spherocyte"] + recall["target cell"] < 1.5
    assert recall == head.held_out_recall(alike, truth)  # the same folds every time
    # Labels at random in many dimensions: a head fits them all, and names only about half of
    # those it did not see right (trained on every cell, left-out ones included, it would say 1.0).
    rng = np.random.default_rng(2)
    noise, coin = rng.normal(size=(60, 64)), rng.choice(np.array(["heads", "tails"], dtype=object), 60)
    head = CellClassifier().fit(noise, coin)
    assert (head.predict(noise) == coin).mean() == 1.0
    assert np.mean(list(head.held_out_recall(noise, coin).values())) < 0.75
    few = truth.copy()
    few[np.flatnonzero(truth == "target cell")[1:]] = ""  # one labelled target cell: nothing to leave out
    head.fit(embeddings, few)
    assert head.held_out_recall(embeddings, few) is None


def trained_head(smear_table) -> tuple[CellClassifier, np.ndarray]:
    noise = np.random.default_rng(0).normal(size=(len(smear_table), 8))
    labels = np.where(smear_table["circularity"] > 0.8, "normal", "schistocyte").astype(object)
    # not in alphabetical order: a save or load that sorted them would swap the names against the weights
    head = CellClassifier(["schistocyte", "normal"], {"normal": "#00ff00", "schistocyte": "#ff0000"}, "reddino-small")
    return head.fit(noise, labels, measurements=smear_table), noise


@pytest.mark.parametrize("name", ["head", "head.safetensors", "head.json"])
def test_a_saved_head_predicts_the_same(tmp_path, smear_table, name):
    head, noise = trained_head(smear_table)
    head.save(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["head.json", "head.safetensors"]  # no temporary file left
    loaded = CellClassifier.load(tmp_path / "head", model_id="reddino-small")
    assert (loaded.classes, loaded.colours, loaded.model_id) == (head.classes, head.colours, "reddino-small")
    assert (loaded.embedding_dim, loaded.measurement_columns) == (8, head.measurement_columns)
    np.testing.assert_array_equal(
        loaded.predict_proba(noise, measurements=smear_table), head.predict_proba(noise, measurements=smear_table)
    )
    assert loaded.classes == ["schistocyte", "normal"]
    np.testing.assert_array_equal(loaded.predict(noise, measurements=smear_table),
                                  head.predict(noise, measurements=smear_table))


def test_cells_unlike_those_the_head_was_trained_among_are_beyond_its_reach(tmp_path, smear_table):
    head, noise = trained_head(smear_table)
    # its reach is the 99th percentile of its own cells' distances: one or two of 124 lie beyond
    assert 1 <= head.beyond_reach(noise, measurements=smear_table).sum() <= 2
    fresh = np.random.default_rng(1).normal(size=noise.shape)  # other cells like them
    assert head.beyond_reach(fresh, measurements=smear_table).mean() < 0.1
    shifted = noise + 4  # another stain moves every embedding
    assert head.beyond_reach(shifted, measurements=smear_table).all()
    assert head.predict_proba(shifted, measurements=smear_table).max(axis=1).mean() > 0.9  # yet it answers, sure

    head.save(tmp_path / "head")
    assert CellClassifier.load(tmp_path / "head").reach == head.reach
    about = json.loads((tmp_path / "head.json").read_text())
    (tmp_path / "head.json").write_text(json.dumps({key: value for key, value in about.items() if key != "reach"}))
    assert not CellClassifier.load(tmp_path / "head").beyond_reach(shifted, measurements=smear_table).any()
    for wrong in ("far", -1.0):
        (tmp_path / "head.json").write_text(json.dumps({**about, "reach": wrong}))
        with pytest.raises(ValueError, match="reach"):
            CellClassifier.load(tmp_path / "head")


def test_a_head_fitted_among_cells_all_alike_saves_and_loads(tmp_path):
    """A model that gives every cell one vector (a broken or dummy one) leaves a reach of 0."""
    head = CellClassifier(["normal", "spherocyte"]).fit(np.ones((20, 8), np.float32), ["normal", "spherocyte"] * 10)
    assert head.reach == 0
    head.save(tmp_path / "head")
    assert CellClassifier.load(tmp_path / "head").reach == 0


def test_a_head_saved_into_a_missing_folder_names_that_folder(tmp_path, smear_table):
    head, _ = trained_head(smear_table)
    with pytest.raises(FileNotFoundError, match=f"No folder {tmp_path / 'heads'} to write head.safetensors in"):
        head.save(tmp_path / "heads" / "head")
    assert os.listdir(tmp_path) == []


def test_a_head_of_another_model_is_refused(tmp_path, smear_table):
    head, _ = trained_head(smear_table)
    head.save(tmp_path / "head")
    with pytest.raises(HeadMismatchError, match="reddino-small.*reddino-base"):
        CellClassifier.load(tmp_path / "head", model_id="reddino-base")
    assert CellClassifier.load(tmp_path / "head").model_id == "reddino-small"  # no model given: no check
    # saved without a digest (by an earlier version): the name decides, of a local path its last part
    assert CellClassifier.load(tmp_path / "head", model_id="reddino-small@sha256:0123456789abcdef").classes
    head.model_id = "/home/lab/models/s1"
    head.save(tmp_path / "local")
    assert CellClassifier.load(tmp_path / "local", model_id="s1@sha256:0123456789abcdef").classes
    with pytest.raises(HeadMismatchError):
        CellClassifier.load(tmp_path / "local", model_id="s2@sha256:0123456789abcdef")
    with pytest.raises(HeadMismatchError, match="of reddino-small, but these cells were embedded with reddino-base\\."):
        CellClassifier.load(tmp_path / "head", model_id="reddino-base@sha256:0123456789abcdef")  # the names suffice
    head.model_id = None  # trained through the API without naming the model
    head.save(tmp_path / "unnamed")
    assert CellClassifier.load(tmp_path / "unnamed").model_id is None
    with pytest.raises(HeadMismatchError, match="an unnamed model"):
        CellClassifier.load(tmp_path / "unnamed", model_id="reddino-small")


def test_model_ids_are_shown_by_name_unless_only_their_weights_differ():
    small, other = "reddino-small@sha256:" + "a" * 16, "reddino-small@sha256:" + "b" * 16
    assert readable_ids([small, "s1@sha256:" + "c" * 16, None]) == ["reddino-small", "s1", "an unnamed model"]
    assert readable_ids([small, other]) == [small, other]  # the same name: the digests tell them apart
    assert readable_ids(["/home/lab/models/s1"]) == ["s1"]  # an earlier version's path


def test_a_head_of_cells_cropped_otherwise_is_refused(tmp_path, smear_table):
    head, _ = trained_head(smear_table)
    head.crops = {"mode": "context", "scale": "cell", "margin": 0.25}
    head.save(tmp_path / "head")
    assert CellClassifier.load(tmp_path / "head").crops == head.crops
    assert CellClassifier.load(tmp_path / "head", crops=dict(head.crops)).classes == head.classes
    with pytest.raises(HeadMismatchError, match=r"from context crops at cell scale, margin 0.25, but these cells were "
                                                r"embedded from masked crops at smear scale, margin 0.25\. Embed them"):
        CellClassifier.load(tmp_path / "head", crops={"mode": "masked", "scale": "smear", "margin": 0.25})
    with pytest.raises(HeadMismatchError, match="margin 0.5"):
        CellClassifier.load(tmp_path / "head", crops=head.crops | {"margin": 0.5})
    head.crops = None  # trained through the API, or saved before heads recorded their crops: not checked
    head.save(tmp_path / "older")
    assert CellClassifier.load(tmp_path / "older", crops={"mode": "masked", "scale": "smear", "margin": 0.25}).classes
    about = head_paths(tmp_path / "older")[1]
    about.write_text(json.dumps(json.loads(about.read_text()) | {"crops": {"mode": "masked"}}))
    with pytest.raises(ValueError, match=r"wrong types for crops \(not a mode, scale and margin\)"):
        CellClassifier.load(tmp_path / "older")


def test_a_string_where_a_list_belongs_and_labels_of_another_count_are_refused(smear_table):
    head, embeddings = trained_head(smear_table)
    labels = np.where(np.arange(len(embeddings)) % 2, "normal", "spherocyte")
    with pytest.raises(ValueError, match=f"{len(embeddings) - 1} labels for {len(embeddings)} embedded cells"):
        head.held_out_recall(embeddings, labels[1:], measurements=smear_table)
    with pytest.raises(TypeError, match="labels must be one class name per cell, not the one string 'ab'"):
        CellClassifier().fit(embeddings[:2], "ab")
    with pytest.raises(TypeError, match=r"not the one string 'circularity' \(write \['circularity'\]\)"):
        CellClassifier().fit(embeddings, labels, measurements=smear_table, measurement_columns="circularity")


def test_damaged_or_missing_files_are_refused_by_name(tmp_path, smear_table):
    head, _ = trained_head(smear_table)
    head.save(tmp_path / "head")
    weights, about = head_paths(tmp_path / "head")
    weights.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=r"head.json is there but not head.safetensors, the head's weights \(a "
                                                r"head is the pair; copy both\)"):
        CellClassifier.load(about)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="head.safetensors does not belong to head.json"):
        CellClassifier.load(weights)
    other, noise = trained_head(smear_table)
    other.fit(noise[::-1], other.predict(noise, measurements=smear_table), measurements=smear_table)  # other weights
    other.save(tmp_path / "other_head")
    weights.write_bytes(head_paths(tmp_path / "other_head")[0].read_bytes())  # the pair mixed up, same shapes
    with pytest.raises(ValueError, match="head.safetensors does not belong to head.json"):
        CellClassifier.load(weights)
    (tmp_path / "elsewhere.safetensors").replace(weights)
    fields = json.loads(about.read_text())
    about.write_text(json.dumps(fields | {"classes": [*fields["classes"], "extra"]}))  # edited by hand
    with pytest.raises(ValueError, match="holds arrays of the wrong shape for head.json"):
        CellClassifier.load(weights)
    later = {key: value for key, value in fields.items() if key != "colours"} | {"version": 99}
    about.write_text(json.dumps(later))  # a later version, which may name its keys otherwise
    with pytest.raises(ValueError, match="is a head of format version 99; this version reads 1"):
        CellClassifier.load(weights)
    about.write_text(json.dumps(later | {"version": fields["version"]}))
    with pytest.raises(ValueError, match="is not a saved napari-reddino head: it lacks colours"):
        CellClassifier.load(weights)
    for classes in (["normal", "normal"], ["normal", 3], ["normal", " "]):  # edited by hand
        about.write_text(json.dumps(fields | {"classes": classes}))
        with pytest.raises(ValueError, match=r"wrong types for classes \(not distinct names\)"):
            CellClassifier.load(weights)
    weights.write_bytes(b"\x00" * 64)
    about.write_text(json.dumps(fields | {"weights_sha256": hashlib.sha256(b"\x00" * 64).hexdigest()}))
    with pytest.raises(ValueError, match="head.safetensors is not a readable head"):
        CellClassifier.load(weights)
    about.write_text("{not json")
    with pytest.raises(ValueError, match="head.json"):
        CellClassifier.load(weights)
    with pytest.raises(FileNotFoundError, match="other.json"):
        CellClassifier.load(tmp_path / "other")


def test_a_head_whose_json_lists_its_classes_in_another_order_is_refused(tmp_path, smear_table):
    """The weights file keeps the order of its classes and measurements (its sha256 is in the
    .json): two classes swapped by hand in the .json would swap their predictions silently."""
    head, noise = trained_head(smear_table)
    head.save(tmp_path / "head")
    weights, about = head_paths(tmp_path / "head")
    fields = json.loads(about.read_text())
    first, second, *rest = fields["classes"]
    about.write_text(json.dumps(fields | {"classes": [second, first, *rest]}))
    with pytest.raises(ValueError, match=rf"head.json lists the classes \['{second}', '{first}'.*but head.safetensors "
                                         rf"was saved for \['{first}', '{second}'.*edited by hand\?\): rename classes"):
        CellClassifier.load(weights)
    about.write_text(json.dumps(fields | {"classes": ["renamed", second, *rest]}))  # renamed in place: its row kept
    renamed = CellClassifier.load(weights)
    np.testing.assert_array_equal(renamed.predict_proba(noise, measurements=smear_table),
                                  head.predict_proba(noise, measurements=smear_table))
    assert renamed.classes[0] == "renamed"
    columns = fields["measurement_columns"]
    about.write_text(json.dumps(fields | {"measurement_columns": columns[::-1]}))
    with pytest.raises(ValueError, match="head.json lists the measurements .* but head.safetensors was saved for"):
        CellClassifier.load(weights)


def test_review_order_starts_with_the_smallest_margin():
    proba = np.array([[0.9, 0.1, 0.0], [0.5, 0.45, 0.05], [0.4, 0.3, 0.3], [0.6, 0.4, 0.0], [0.3, 0.4, 0.3]])
    assert uncertainty_order(proba).tolist() == [1, 2, 4, 3, 0]  # margins .8 .05 .1 .2 .1; ties keep row order


def test_a_head_on_micrometre_measurements_says_a_smear_without_a_pixel_size_needs_one():
    table = pd.DataFrame({"circularity": [0.9, 0.8]})  # cells of a smear segmented without a pixel size
    with pytest.raises(ValueError, match=r"^The head needs the measurements area_um2, which some of these cells lack: "
                                         r"area_um2 needs the smear's pixel size \(give it at Segment cells, or as "
                                         r"pixel_size_um=\); "):
        measurement_features(table, ["area_um2", "circularity"], 2)
    measured_then = table.assign(equivalent_diameter_um=[7.0, 7.5])  # a pixel size given: not what is missing
    with pytest.raises(ValueError, match=r"lack: a head trained with colour cannot read gray smears"):
        measurement_features(measured_then, ["area_um2", "circularity"], 2)
