"""import_manual_labels: labels exported yesterday come back onto the same smear segmented again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _layers import labels_layer
from napari.layers import Labels
from skimage.io import imread

from napari_reddino import measure_cells, segment_cells
from napari_reddino.cell_export import export_cells_csv
from napari_reddino.label_import import (
    AREA_RATIO,
    CENTRE_SHIFT,
    CENTROID_TOLERANCE_PX,
    LabelImport,
    LabelImportError,
    carry_manual_labels,
    import_manual_labels,
)

DATA = Path(__file__).parent / "data"
BOX = ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")


@pytest.fixture(scope="module")
def smear() -> np.ndarray:
    return imread(DATA / "chula_rbc12" / "1.jpg")


def cells_layer(smear: np.ndarray, name: str = "1 cells", **metadata) -> Labels:
    """A freshly segmented and measured cells layer, as Segment cells leaves it."""
    labels = segment_cells(smear)
    return labels_layer(measure_cells(labels, smear), name, labels, **metadata)


def labelled(layer: Labels, every: int = 3) -> Labels:
    """``layer`` with every ``every``-th cell labelled, the classes taking turns."""
    classes = np.array(["spherocyte", "target cell", "NA"], dtype=object)  # "NA" is a class, not a missing value
    n = len(layer.features)
    manual = np.where(np.arange(n) % every == 0, classes[np.arange(n) // every % 3], "")
    return labels_layer(layer.features.assign(manual_label=manual), layer.name, layer.data, **layer.metadata)


def exported_rows(smear: np.ndarray, tmp_path: Path) -> tuple[Labels, pd.DataFrame]:
    """Yesterday's labelled cells and their exported CSV as a spreadsheet reads it back."""
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    return yesterday, pd.read_csv(tmp_path / "cells.csv", dtype={"image": str}, keep_default_na=False)


def imported_as_yesterday(path: Path, smear: np.ndarray, yesterday: Labels) -> LabelImport:
    """Import ``path`` onto the smear segmented today, which must then hold yesterday's labels."""
    today = cells_layer(smear)
    report = import_manual_labels(path, today)
    assert today.features["manual_label"].tolist() == yesterday.features["manual_label"].tolist()
    return report


def test_labels_come_back_onto_the_smear_segmented_again(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    today = cells_layer(smear)
    assert "manual_label" not in today.features
    report = import_manual_labels(tmp_path / "cells.csv", today)
    expected = yesterday.features["manual_label"].tolist()
    assert today.features["manual_label"].tolist() == expected
    assert report.written == {"1 cells": sum(label != "" for label in expected)} and report.written["1 cells"] > 10
    assert (report.already, report.kept, report.unmatched) == (0, 0, [])
    assert report.classes == ["spherocyte", "target cell", "NA"]
    again = import_manual_labels(tmp_path / "cells.csv", today)  # a second import changes nothing
    assert (again.written, again.already) == ({"1 cells": 0}, report.written["1 cells"])


def test_a_label_in_another_case_than_a_class_of_the_list_takes_its_spelling(smear, tmp_path):
    """A colleague's "Spherocyte" beside the list's "spherocyte" would be a class of its own, its
    cells counted apart."""
    export_cells_csv(tmp_path / "cells.csv", labelled(cells_layer(smear)))
    today = cells_layer(smear)
    report = import_manual_labels(tmp_path / "cells.csv", today, classes=["normal", "Spherocyte", "TARGET CELL"])
    assert report.respelled == {"spherocyte": "Spherocyte", "target cell": "TARGET CELL"}
    assert report.classes == ["Spherocyte", "TARGET CELL", "NA"]
    assert set(today.features["manual_label"]) == {"", "Spherocyte", "TARGET CELL", "NA"}
    again = cells_layer(smear)  # a list holding both spellings already: a label spelled as one of them stays so
    report = import_manual_labels(tmp_path / "cells.csv", again, classes=["spherocyte", "Spherocyte"])
    assert report.respelled == {} and "spherocyte" in set(again.features["manual_label"])


def test_a_label_given_since_the_export_is_kept(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    today = cells_layer(smear)
    relabelled = yesterday.features.index[yesterday.features["manual_label"] == "spherocyte"][0]
    fresh = yesterday.features.index[yesterday.features["manual_label"] == ""][0]
    manual = np.full(len(today.features), "", dtype=object)
    manual[[relabelled, fresh]] = ["normal", "normal"]
    today.features = today.features.assign(manual_label=manual)
    report = import_manual_labels(tmp_path / "cells.csv", [today])
    result = today.features["manual_label"]
    assert result[relabelled] == "normal" and result[fresh] == "normal"
    others = yesterday.features.index.drop([relabelled, fresh])
    assert result[others].tolist() == yesterday.features["manual_label"][others].tolist()
    assert report.kept == 1


def test_a_renamed_layer_of_the_same_smear_takes_its_labels_by_image(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    renamed = cells_layer(smear, name="patient 17", source_image="1")
    report = import_manual_labels(tmp_path / "cells.csv", renamed)
    assert renamed.features["manual_label"].tolist() == yesterday.features["manual_label"].tolist()
    assert report.written == {"patient 17": (yesterday.features["manual_label"] != "").sum()}


def test_cells_found_again_with_other_settings_get_their_labels_and_no_other_cell_does(smear, tmp_path):
    before_labels, today_labels = segment_cells(smear), segment_cells(smear, cell_diameter=32)
    yesterday = labelled(labels_layer(measure_cells(before_labels, smear), "1 cells", before_labels), every=1)
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    today = labels_layer(measure_cells(today_labels, smear), "1 cells", today_labels)
    report = import_manual_labels(tmp_path / "cells.csv", today)

    # The truth from the masks: yesterday's cell, today's cell that overlaps it most, and by how much.
    both = (before_labels > 0) & (today_labels > 0)
    pairs, shared = np.unique(np.stack([before_labels[both], today_labels[both]]), axis=1, return_counts=True)
    iou = shared / (np.bincount(before_labels.ravel())[pairs[0]] + np.bincount(today_labels.ravel())[pairs[1]] - shared)
    order = np.lexsort((-iou, pairs[0]))
    first = np.unique(pairs[0][order], return_index=True)[1]
    truth = pd.DataFrame({"today": pairs[1][order][first], "iou": iou[order][first]}, index=pairs[0][order][first])

    given = today.features.set_index("label")["manual_label"]
    given = given[given != ""]
    old = yesterday.features.set_index("label")["manual_label"]
    same = truth[truth["iou"] >= 0.8]
    came_back = given.reindex(same["today"]).to_numpy() == old[same.index].to_numpy()
    assert came_back.mean() > 0.95  # the same cell traced a little differently keeps its label
    wrong = [cell for cell, label in given.items()
             if not ((truth["today"] == cell) & (truth["iou"] >= 0.5) & (old.reindex(truth.index) == label)).any()]
    assert wrong == []  # no label went to another cell
    assert report.written == {"1 cells": len(given)} and report.missed == {"1 cells": len(old) - len(given)}
    renumbered = (truth.loc[same.index, "today"].to_numpy() != same.index.to_numpy()).mean()
    assert renumbered > 0.5  # the ids changed: the labels were found by place


def test_a_cell_edited_since_the_export_loses_only_its_own_label(smear, tmp_path):
    yesterday = labelled(cells_layer(smear), every=1)
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    labels = segment_cells(smear)
    merged = labels.copy()
    merged[merged == 5] = 4  # two cells painted into one
    today = labels_layer(measure_cells(merged, smear), "1 cells", merged)
    report = import_manual_labels(tmp_path / "cells.csv", today)
    assert report.missed == {"1 cells": 2} and report.written == {"1 cells": len(yesterday.features) - 2}
    back = today.features.set_index("label")["manual_label"]
    assert back[4] == "" and (back.drop(4) == yesterday.features.set_index("label")["manual_label"].drop([4, 5])).all()


def test_labels_carried_from_layer_to_layer_are_those_an_export_and_import_would_give(smear, tmp_path):
    yesterday = labelled(cells_layer(smear), every=2)
    yesterday.features.loc[4, "manual_label"] = "  "  # blank: no label
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    again = segment_cells(smear, cell_diameter=32)
    imported = labels_layer(measure_cells(again, smear), "1 cells [1]", again, source_image="1")
    carried = labels_layer(imported.features.copy(), "1 cells [1]", again, source_image="1")
    by_file = import_manual_labels(tmp_path / "cells.csv", imported)
    report = carry_manual_labels(yesterday, carried)
    assert carried.features["manual_label"].tolist() == imported.features["manual_label"].tolist()
    assert report.written == by_file.written and report.missed == by_file.missed == {"1 cells": report.missed["1 cells"]}
    assert report.classes == by_file.classes and 0 < report.missed["1 cells"] < report.written["1 cells [1]"]
    # A layer whose boxes and areas are text (a lab's table), one of them empty, gives what it can.
    boxed = labels_layer(yesterday.features.astype({column: str for column in (*BOX, "area_px")}), "1 cells",
                         yesterday.data)
    boxed.features.loc[boxed.features["manual_label"].str.strip() != "", "bbox_min_x"] = ""
    again_carried = labels_layer(imported.features.drop(columns="manual_label"), "1 cells [1]", again,
                                 source_image="1")
    by_centroid = carry_manual_labels(boxed, again_carried)
    assert 0 < by_centroid.written["1 cells [1]"] < report.written["1 cells [1]"]  # the boxes' finds are gone
    unlabelled = cells_layer(smear, "x")
    assert carry_manual_labels(unlabelled, carried) == LabelImport()  # nothing to carry, nothing said
    # Labels of cells without a place (another tool's table, an unmeasured centroid) are missed.
    placeless = labels_layer(pd.DataFrame({"label": [1, 2, 3], "manual_label": ["a", "b", ""]}), "mask")
    assert carry_manual_labels(placeless, carried).missed == {"mask": 2}
    same = labelled(cells_layer(smear), every=1)  # the same cells: every label finds its cell
    same.features.loc[0, "centroid_x"] = np.nan
    fresh = cells_layer(smear, name="fresh")
    report = carry_manual_labels(same, fresh)
    assert report.missed == {"1 cells": 1} and report.written == {"fresh": len(fresh.features) - 1}
    assert fresh.features["manual_label"].tolist() == ["", *same.features["manual_label"][1:]]


def test_a_cell_traced_a_little_differently_is_found_by_its_box_area_and_centre(smear, tmp_path):
    yesterday = labelled(cells_layer(smear), every=1)
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    exported = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str}, keep_default_na=False)
    diameter = np.sqrt(4 * exported["area_px"] / np.pi)
    exported.loc[0:4, "centroid_x"] += 1.0  # past the centroid tolerance: each is found by the second rule
    exported.loc[1, "area_px"] *= AREA_RATIO * 1.01  # grown too much to be the same cell
    exported.loc[2, "centroid_x"] += (CENTRE_SHIFT * 1.05) * diameter[2]  # moved too far
    exported.loc[3, "bbox_max_x"] += (exported.loc[3, "bbox_max_x"] - exported.loc[3, "bbox_min_x"]) * 0.3
    exported.loc[4, "area_px"] /= AREA_RATIO * 1.01  # shrunk too much
    exported.to_csv(tmp_path / "edited.csv", index=False)
    today = cells_layer(smear)
    report = import_manual_labels(tmp_path / "edited.csv", today)
    back = today.features["manual_label"]
    assert back[0] == yesterday.features["manual_label"][0] and list(back[1:5]) == ["", "", "", ""]
    assert (back[5:] == yesterday.features["manual_label"][5:]).all() and report.missed == {"1 cells": 4}

    without_boxes = exported.drop(columns=["bbox_min_x", "bbox_max_x"])  # an older or trimmed CSV: centroids only
    without_boxes.to_csv(tmp_path / "trimmed.csv", index=False)
    today = cells_layer(smear)
    report = import_manual_labels(tmp_path / "trimmed.csv", today)
    assert today.features["manual_label"][0] == "" and report.missed == {"1 cells": 5}


def test_cells_found_nowhere_are_refused_and_nothing_is_written(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    shifted = cells_layer(smear[6:])  # the same name, other cells: 6 rows cut off the top
    other_smear = cells_layer(smear, name="2 cells")
    with pytest.raises(LabelImportError, match=r"No label of cells.csv could be given to a cell: its \d+ labelled "
                                               r"cells from '1 cells' are at the place of no cell in '1 cells' \(was the "
                                               r"smear cropped or edited since the export\?\)\.$"):
        import_manual_labels(tmp_path / "cells.csv", [shifted])
    assert "manual_label" not in shifted.features
    with pytest.raises(LabelImportError, match=r"No label of cells.csv could be given to a cell: the cells from "
                                               r"'1 cells' are of smears with no cells layer among '2 cells' \(open "
                                               r"and segment those smears first\)\.$"):
        import_manual_labels(tmp_path / "cells.csv", other_smear)
    assert "manual_label" not in other_smear.features


def test_a_cell_at_the_tolerance_is_found_one_claimed_twice_or_unmeasured_is_not(smear, tmp_path):
    yesterday = labelled(cells_layer(smear), every=1)
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    exported = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str}, keep_default_na=False)
    exported.loc[0, "centroid_x"] += CENTROID_TOLERANCE_PX  # exactly at the tolerance: still that cell
    exported.loc[2, ["centroid_x", "centroid_y"]] = exported.loc[1, ["centroid_x", "centroid_y"]].to_numpy()
    exported.to_csv(tmp_path / "edited.csv", index=False)
    today = cells_layer(smear)
    today.features.loc[3, "centroid_x"] = np.nan  # a cell whose centroid could not be measured
    report = import_manual_labels(tmp_path / "edited.csv", today)
    back = today.features["manual_label"]
    assert back[0] == yesterday.features["manual_label"][0]
    assert list(back[1:4]) == ["", "", ""]  # rows 1 and 2 both claim cell 1; cell 3 has no centroid
    assert report.missed == {"1 cells": 3} and report.written == {"1 cells": len(today.features) - 3}
    exported.loc[5, "centroid_y"] = np.inf
    exported.to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(LabelImportError, match=r"inf.csv has 1 labelled row without a readable centroid \(lines 7\)"):
        import_manual_labels(tmp_path / "inf.csv", today)
    # Rows go to cells by place: a CSV from another tool, without label ids, gives the same labels.
    exported.drop(index=[1, 2, 5], columns="label").to_csv(tmp_path / "no_ids.csv", index=False)
    fresh = cells_layer(smear)
    import_manual_labels(tmp_path / "no_ids.csv", fresh)
    np.testing.assert_array_equal(fresh.features["manual_label"].drop(index=[1, 2, 5]),
                                  yesterday.features["manual_label"].drop(index=[1, 2, 5]))


def test_a_layer_whose_cells_moved_is_counted_and_the_others_get_their_labels(smear, tmp_path):
    first, second = labelled(cells_layer(smear)), labelled(cells_layer(smear, name="26 cells"), every=4)
    export_cells_csv(tmp_path / "cells.csv", [first, second])
    good, shifted = cells_layer(smear), cells_layer(smear[6:], name="26 cells")
    report = import_manual_labels(tmp_path / "cells.csv", [good, shifted])
    assert good.features["manual_label"].tolist() == first.features["manual_label"].tolist()
    assert "manual_label" not in shifted.features
    assert report.missed == {"26 cells": (second.features["manual_label"] != "").sum()}
    assert report.written == {"1 cells": (first.features["manual_label"] != "").sum()}


def test_labels_of_another_smear_of_the_same_name_are_not_written_where_a_few_of_its_cells_fall_on_cells(
        smear, tmp_path):
    # Two cameras both write "Image001": Chula smear 1's labels put onto smear 26 found a cell at
    # the place of 1 of 124 rows, and gave that unrelated cell its label.
    yesterday = labelled(cells_layer(smear), every=1)
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    other = cells_layer(imread(DATA / "chula_rbc12" / "26.jpg"))
    assert other.name == yesterday.name
    with pytest.raises(LabelImportError, match=rf"^No label of cells.csv could be given to a cell: only [1-9]\d* of its "
                                               rf"{len(yesterday.features)} labelled cells from '1 cells' (is|are) at "
                                               r"the place of a cell in '1 cells', too few to tell that it is that smear "
                                               r"\(another smear of that name, or one "
                                               r"segmented with very different settings\)\.$"):
        import_manual_labels(tmp_path / "cells.csv", other)
    assert "manual_label" not in other.features
    # Beside a layer that takes its labels, it is reported, and nothing of it written.
    second = labelled(cells_layer(smear, name="2 cells"))
    export_cells_csv(tmp_path / "two.csv", [yesterday, second])
    today = cells_layer(smear, name="2 cells")
    report = import_manual_labels(tmp_path / "two.csv", [other, today])
    assert report.foreign == {"1 cells": "1 cells"} and report.missed == {"1 cells": len(yesterday.features)}
    assert report.written == {"2 cells": (second.features["manual_label"] != "").sum()}
    assert "manual_label" not in other.features
    # Of a few labelled rows the share tells nothing: the ones that match are written.
    few = yesterday.features.assign(manual_label=np.where(np.arange(len(yesterday.features)) < 4, "normal", ""))
    export_cells_csv(tmp_path / "few.csv", labels_layer(few, yesterday.name, yesterday.data))
    moved = pd.read_csv(tmp_path / "few.csv", dtype={"image": str}, keep_default_na=False)
    moved.loc[[1, 2, 3], "centroid_x"] += 20  # three of the four cells were cut otherwise since
    moved.loc[[1, 2, 3], ["bbox_min_x", "bbox_max_x"]] += 20
    moved.to_csv(tmp_path / "few.csv", index=False)
    again = cells_layer(smear)
    report = import_manual_labels(tmp_path / "few.csv", again)
    assert report.written == {"1 cells": 1} and report.missed == {"1 cells": 3} and not report.foreign


@pytest.mark.parametrize("every", [1, 40])  # 124 labelled cells of smear 1, then 4 (fewer than FEW_ROWS)
def test_two_smears_of_one_name_opened_again_in_the_other_order_each_take_their_own_labels(smear, tmp_path, every):
    # napari names the second image "1 [1]"; opened again in the other order, the names swap.
    other_smear = imread(DATA / "chula_rbc12" / "26.jpg")
    first = labelled(cells_layer(smear, source_image="1"), every=every)
    second = labelled(cells_layer(other_smear, name="1 [1] cells", source_image="1 [1]"), every=every)
    export_cells_csv(tmp_path / "cells.csv", [first, second])
    now_second = cells_layer(smear, name="1 [1] cells", source_image="1 [1]")
    now_first = cells_layer(other_smear, source_image="1")
    report = import_manual_labels(tmp_path / "cells.csv", [now_first, now_second])
    assert report.missed == {} and not report.foreign
    for before, now in ((first, now_second), (second, now_first)):
        assert (now.features["manual_label"] == before.features["manual_label"]).all()
        assert report.written[now.name] == (before.features["manual_label"] != "").sum()


def test_a_few_labels_of_another_smear_numbered_by_napari_are_not_written_where_some_fall_on_cells(smear, tmp_path):
    # "1 [1]" was another smear; only "1" is open today. Two of its three rows happen to lie on cells.
    other = labelled(cells_layer(smear, name="1 [1] cells", source_image="1 [1]"), every=1)
    export_cells_csv(tmp_path / "cells.csv", other)
    table = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str, "layer": str}, keep_default_na=False)
    table = table.iloc[:3].copy()
    table.loc[table.index[2], ["centroid_x", "bbox_min_x", "bbox_max_x"]] += 20
    table.to_csv(tmp_path / "cells.csv", index=False)
    today = cells_layer(smear, source_image="1")
    with pytest.raises(LabelImportError, match=r"only 2 of its 3 labelled cells from '1 \[1\] cells' are at the "
                                               r"place of a cell in '1 cells', too few to tell that it is that smear "
                                               r"\(another smear"):
        import_manual_labels(tmp_path / "cells.csv", today)
    table.iloc[:2].to_csv(tmp_path / "two.csv", index=False)  # of two labelled cells, both must be there
    assert import_manual_labels(tmp_path / "two.csv", today).written == {"1 cells": 2}
    today = cells_layer(smear, source_image="1")
    table.iloc[:1].to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(LabelImportError, match=r"its 1 labelled cell from '1 \[1\] cells' is at the place of a cell "
                                               r"in '1 cells', too few to tell"):
        import_manual_labels(tmp_path / "one.csv", today)
    # Three of three are no chance: the smear it was, opened today without its number.
    table.loc[table.index[2], ["centroid_x", "bbox_min_x", "bbox_max_x"]] -= 20
    table.to_csv(tmp_path / "cells.csv", index=False)
    report = import_manual_labels(tmp_path / "cells.csv", today)
    assert report.onto == {"1 [1] cells": "1 cells"} and report.written == {"1 cells": 3}


def test_a_layer_numbered_by_napari_that_matches_convincingly_beats_a_chance_match_of_the_csv_layer_s_name(
        smear, tmp_path):
    yesterday = labelled(cells_layer(smear, source_image="1"), every=40)  # 4 labelled cells
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    labelled_ids = yesterday.features["label"][yesterday.features["manual_label"] != ""].to_numpy()
    chance = cells_layer(smear, source_image="1")  # named as in the CSV, but only one of the four cells is there
    moved = chance.features["label"].isin(labelled_ids[1:])
    chance.features = chance.features.assign(
        centroid_x=chance.features["centroid_x"] + 20 * moved, bbox_min_x=chance.features["bbox_min_x"] + 20 * moved,
        bbox_max_x=chance.features["bbox_max_x"] + 20 * moved)
    same = cells_layer(smear, name="1 [1] cells", source_image="1 [1]")
    report = import_manual_labels(tmp_path / "cells.csv", [chance, same])
    assert report.onto == {"1 cells": "1 [1] cells"} and report.written == {"1 [1] cells": 4}
    assert "manual_label" not in chance.features


def test_labels_of_a_smear_of_the_same_name_that_is_not_open_are_said_to_need_it_opened(smear, tmp_path):
    # Two cameras' "1": the CSV holds both; today only the first is open.
    first = labelled(cells_layer(smear, source_image="1"))
    second = labelled(cells_layer(imread(DATA / "chula_rbc12" / "26.jpg"), name="1 [1] cells", source_image="1 [1]"))
    export_cells_csv(tmp_path / "cells.csv", [first, second])
    report = import_manual_labels(tmp_path / "cells.csv", cells_layer(smear, source_image="1"))
    assert report.onto == {"1 cells": "1 cells"} and report.unmatched == ["1 [1] cells"]
    assert not report.taken and not report.foreign


def test_one_layer_takes_the_labels_of_one_csv_layer_of_its_smear_and_the_other_is_said_taken(smear, tmp_path):
    # One smear opened twice yesterday ("1" and "1 [1]"), labelled in both; today opened once.
    first = labelled(cells_layer(smear, source_image="1"), every=12)
    second = labelled(cells_layer(smear, name="1 [1] cells", source_image="1 [1]"), every=10)
    assert (first.features["manual_label"] != "").sum() < (second.features["manual_label"] != "").sum()
    export_cells_csv(tmp_path / "cells.csv", [second, first])
    today = cells_layer(smear, source_image="1")
    report = import_manual_labels(tmp_path / "cells.csv", today)
    assert report.onto == {"1 cells": "1 cells"} and report.taken == {"1 [1] cells": "1 cells"}
    assert (today.features["manual_label"] == first.features["manual_label"]).all()
    assert not report.unmatched and not report.missed and not report.foreign


def test_of_layers_matching_equally_each_csv_layer_takes_the_one_of_its_name(smear, tmp_path):
    # The same smear segmented the same way twice, labelled differently in each layer.
    mine = labelled(cells_layer(smear, source_image="1"), every=1)
    yours = labelled(cells_layer(smear, name="1 cells (yours)", source_image="1"), every=2)
    export_cells_csv(tmp_path / "cells.csv", [mine, yours])
    now_yours = cells_layer(smear, name="1 cells (yours)", source_image="1")
    now_mine = cells_layer(smear, source_image="1")
    import_manual_labels(tmp_path / "cells.csv", [now_yours, now_mine])
    assert (now_mine.features["manual_label"] == mine.features["manual_label"]).all()
    assert (now_yours.features["manual_label"] == yours.features["manual_label"]).all()


@pytest.mark.parametrize(("rows", "still"), [(9, 4), (10, 4), (10, 5)])
def test_the_share_of_matching_rows_is_judged_from_few_rows_on(smear, tmp_path, rows, still):
    yesterday = cells_layer(smear)
    n = len(yesterday.features)
    export_cells_csv(tmp_path / "cells.csv", labels_layer(
        yesterday.features.assign(manual_label=np.where(np.arange(n) < rows, "normal", "")), yesterday.name,
        yesterday.data))
    table = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str}, keep_default_na=False)
    table.loc[table.index[still:rows], ["centroid_x", "bbox_min_x", "bbox_max_x"]] += 20  # cut otherwise since
    table.to_csv(tmp_path / "cells.csv", index=False)
    again = cells_layer(smear)
    if rows < 10 or still / rows >= 0.5:  # of 9 rows any match counts; of 10, half of them must
        report = import_manual_labels(tmp_path / "cells.csv", again)
        assert report.written == {"1 cells": still} and report.missed == {"1 cells": rows - still}
    else:
        with pytest.raises(LabelImportError, match=rf"only {still} of its {rows} labelled cells from '1 cells' are at"):
            import_manual_labels(tmp_path / "cells.csv", again)
        assert "manual_label" not in again.features


def test_of_two_layers_of_the_image_the_one_whose_cells_match_takes_the_labels(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    wrong = cells_layer(smear[6:], name="1 cells (other settings)", source_image="1")
    right = cells_layer(smear, name="1 cells (again)", source_image="1")
    report = import_manual_labels(tmp_path / "cells.csv", [wrong, right])
    assert report.written == {"1 cells (again)": (yesterday.features["manual_label"] != "").sum()}
    assert report.missed == {} and "manual_label" not in wrong.features
    with pytest.raises(LabelImportError, match=r"are at the place of no cell in '1 cells \(other settings\)' \("):
        import_manual_labels(tmp_path / "cells.csv", [wrong])


def test_a_csv_from_before_the_layer_column_is_read_by_image(smear, tmp_path):
    yesterday, old = exported_rows(smear, tmp_path)
    old = old.drop(columns="layer")
    old["manual_label"] = " " + old["manual_label"] + " "  # stray spaces, as in a hand-edited file
    old.to_csv(tmp_path / "old.csv", index=False)
    assert imported_as_yesterday(tmp_path / "old.csv", smear, yesterday).classes == ["spherocyte", "target cell", "NA"]


def test_a_csv_saved_again_by_a_spreadsheet_in_another_locale_gives_its_labels(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    yesterday.features["manual_label"] = yesterday.features["manual_label"].replace("target cell", "Schießscheibe")
    export_cells_csv(tmp_path / "cells.csv", yesterday, summary_path=tmp_path / "summary.csv")
    assert (tmp_path / "cells.csv").read_bytes().startswith(b"\xef\xbb\xbflayer,")  # Excel reads it as UTF-8
    summary = (tmp_path / "summary.csv").read_bytes()  # its class columns are named too: n_Schießscheibe
    assert summary.startswith(b"\xef\xbb\xbf") and "n_Schießscheibe".encode() in summary
    table = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str}, keep_default_na=False)
    assert table.columns[0] == "layer" and "Schießscheibe" in set(table["manual_label"])
    # German Excel's "CSV (Trennzeichen-getrennt)": Windows-1252, fields split by ;, decimal commas
    table.to_csv(tmp_path / "excel.csv", index=False, sep=";", decimal=",", encoding="cp1252")
    assert b";" in (tmp_path / "excel.csv").read_bytes()[:100] and b"\xdf" in (tmp_path / "excel.csv").read_bytes()
    today = cells_layer(smear)
    report = import_manual_labels(tmp_path / "excel.csv", today)
    assert today.features["manual_label"].tolist() == yesterday.features["manual_label"].tolist()
    assert report.classes == ["spherocyte", "Schießscheibe", "NA"]


@pytest.mark.parametrize(("saved_as", "point"), [("semicolons", ","), ("unicode text", ","), ("unicode text", "."),
                                               ("commas", ",")],
                         ids=["semicolons", "unicode-text", "unicode-text-english", "commas-quoting-decimal-commas"])
def test_a_spreadsheet_s_csv_with_empty_cells_gives_its_labels(smear, tmp_path, saved_as, point):
    # One empty cell makes a column text; its numbers keep their decimal commas then, and must
    # still read as numbers (before, every labelled row was said to lack a centroid).
    yesterday, table = exported_rows(smear, tmp_path)
    unlabelled = table.index[table["manual_label"] == ""]
    text = table.copy()
    for column in ("centroid_x", "area_px", "bbox_min_x"):  # one cell emptied where no label is
        text[column] = [str(value).replace(".", point) for value in table[column]]
        text.loc[unlabelled[0], column] = ""
    sep, encoding = {"semicolons": (";", "cp1252"), "unicode text": ("\t", "utf-16"), "commas": (",", "utf-8")}[saved_as]
    # German Excel: ; between fields, rows cleared at the end; Excel's "Unicode Text": UTF-16 with its mark,
    # tabs, the locale's decimal mark; LibreOffice where commas are decimal: commas between fields all the same
    text.to_csv(tmp_path / "saved.csv", index=False, sep=sep, decimal=point, encoding=encoding)
    if saved_as == "semicolons":
        with open(tmp_path / "saved.csv", "a", encoding=encoding) as file:
            file.write(";" * (len(text.columns) - 1) + "\n" + ";" * (len(text.columns) - 1) + "\n")
    saved = pd.read_csv(tmp_path / "saved.csv", sep=sep, encoding=encoding, dtype=str, keep_default_na=False)
    assert [saved.loc[0, column] for column in ("centroid_x", "centroid_y")] == [
        f"{table.loc[0, column]}".replace(".", point) for column in ("centroid_x", "centroid_y")]
    assert imported_as_yesterday(tmp_path / "saved.csv", smear, yesterday).classes == ["spherocyte", "target cell",
                                                                                       "NA"]


def test_three_decimals_after_a_comma_are_decimals_where_semicolons_split_the_fields(smear, tmp_path):
    # Excel shows (and saves) what the column's format shows: "338,521" is no thousand in a ;-split file
    yesterday, table = exported_rows(smear, tmp_path)
    table.to_csv(tmp_path / "excel.csv", index=False, sep=";", decimal=",", float_format="%.3f")
    assert ";338,521;" in (tmp_path / "excel.csv").read_text()  # Chula smear 1's first cell
    imported_as_yesterday(tmp_path / "excel.csv", smear, yesterday)


@pytest.mark.parametrize("content, says", [
    ("layer,image,manual_label,centroid_x,centroid_y\n1 cells,1,normal,10,abc\n\n1 cells,1,,x,1\n1 cells,1,a,x,1\n",
     r"cells.csv has 2 labelled rows without a readable centroid \(lines 2, 5\)"),  # the blank line 3 counts too
    ("\n\nlayer,image,manual_label,centroid_x,centroid_y\n1 cells,1,normal,x,1\n",
     r"cells.csv has 1 labelled row without a readable centroid \(lines 4\)"),  # blank lines before the header too
    ('layer,image,manual_label,centroid_x,centroid_y\n1 cells,1,normal,"1,234",56\n',
     r"cells.csv has 1 labelled row without a readable centroid \(lines 2\)"),  # a thousand, not 1.234: commas split fields
    ("layer\timage\tmanual_label\tcentroid_x\tcentroid_y\n1 cells\t1\tnormal\t1,234\t56.5\n",
     r"cells.csv has 1 labelled row without a readable centroid \(lines 2\)"),  # tabs, decimal points: a thousand again
    ("layer;image;manual_label;centroid_x;centroid_y\n1 cells;1;normal;1.234,5;56,5\n",
     r"cells.csv has 1 labelled row without a readable centroid \(lines 2\)"),  # a thousands point: no number we can be sure of
    ("layer,image,cells,whole_cells\n1 cells,1,3,2\n", "is a smear summary; import the cells CSV written beside it"),
    ("layer,image,label,centroid_x\n1 cells,1,1,10\n", "lacks the columns manual_label, centroid_y"),
    ("layer,image,label,manual_label,centroid_x,centroid_y\n1 cells,1,1,,10,10\n", "holds no manual labels"),
    ("", "is not a readable CSV"),
])
def test_a_csv_that_cannot_give_labels_says_why(smear, tmp_path, content, says):
    path = tmp_path / "cells.csv"
    path.write_text(content)
    with pytest.raises(LabelImportError, match=says):
        import_manual_labels(path, cells_layer(smear))
