"""import_manual_labels: labels exported yesterday come back onto the same smear segmented again."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from skimage.io import imread

from napari_reddino import measure_cells, segment_cells
from napari_reddino.cell_export import export_cells_csv
from napari_reddino.label_import import LabelImportError, import_manual_labels

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def smear() -> np.ndarray:
    return imread(DATA / "chula_rbc12" / "1.jpg")


def cells_layer(smear: np.ndarray, name: str = "1 cells", **metadata) -> SimpleNamespace:
    """A freshly segmented and measured cells layer, as Segment cells leaves it."""
    return SimpleNamespace(name=name, features=measure_cells(segment_cells(smear), smear), metadata=metadata)


def labelled(layer: SimpleNamespace, every: int = 3) -> SimpleNamespace:
    """``layer`` with every ``every``-th cell labelled, the classes taking turns."""
    classes = np.array(["spherocyte", "target cell", "NA"], dtype=object)  # "NA" is a class, not a missing value
    n = len(layer.features)
    manual = np.where(np.arange(n) % every == 0, classes[np.arange(n) // every % 3], "")
    return SimpleNamespace(name=layer.name, features=layer.features.assign(manual_label=manual), metadata=layer.metadata)


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


def test_cells_segmented_otherwise_are_refused_and_nothing_is_written(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    shifted = cells_layer(smear[6:])  # the same name, other cells: 6 rows cut off the top
    other_smear = cells_layer(smear, name="2 cells")
    with pytest.raises(LabelImportError, match=r"of the \d+ labelled cells of cells.csv from '1 cells' are not cells "
                                               r"of '1 cells' \(no cell of that id, or one elsewhere\)"):
        import_manual_labels(tmp_path / "cells.csv", [shifted])
    assert "manual_label" not in shifted.features
    with pytest.raises(LabelImportError, match="None of the labelled cells of cells.csv belong to '2 cells'; "
                                               "its cells come from '1 cells'"):
        import_manual_labels(tmp_path / "cells.csv", other_smear)
    assert "manual_label" not in other_smear.features


def test_nothing_is_written_unless_every_layer_of_the_csv_matches(smear, tmp_path):
    first, second = labelled(cells_layer(smear)), labelled(cells_layer(smear, name="26 cells"), every=4)
    export_cells_csv(tmp_path / "cells.csv", [first, second])
    good, shifted = cells_layer(smear), cells_layer(smear[6:], name="26 cells")
    with pytest.raises(LabelImportError, match="from '26 cells' are not cells of '26 cells'"):
        import_manual_labels(tmp_path / "cells.csv", [good, shifted])
    assert "manual_label" not in good.features and "manual_label" not in shifted.features


def test_of_two_layers_of_the_image_the_one_whose_cells_match_takes_the_labels(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    wrong = cells_layer(smear[6:], name="1 cells (other settings)", source_image="1")
    right = cells_layer(smear, name="1 cells (again)", source_image="1")
    report = import_manual_labels(tmp_path / "cells.csv", [wrong, right])
    assert report.written == {"1 cells (again)": (yesterday.features["manual_label"] != "").sum()}
    assert "manual_label" not in wrong.features
    with pytest.raises(LabelImportError, match=r"are not cells of '1 cells \(other settings\)' \("):
        import_manual_labels(tmp_path / "cells.csv", [wrong])


def test_a_csv_from_before_the_layer_column_is_read_by_image(smear, tmp_path):
    yesterday = labelled(cells_layer(smear))
    export_cells_csv(tmp_path / "cells.csv", yesterday)
    old = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str}, keep_default_na=False).drop(columns="layer")
    old["manual_label"] = " " + old["manual_label"] + " "  # stray spaces, as in a hand-edited file
    old.to_csv(tmp_path / "old.csv", index=False)
    today = cells_layer(smear)
    report = import_manual_labels(tmp_path / "old.csv", today)
    assert today.features["manual_label"].tolist() == yesterday.features["manual_label"].tolist()
    assert report.classes == ["spherocyte", "target cell", "NA"]


@pytest.mark.parametrize("content, says", [
    ("layer,image,label,manual_label,centroid_x,centroid_y\n1 cells,1,abc,normal,10,10\n1 cells,1,2,,x,1\n",
     r"cells.csv has 1 labelled row without a whole-number label or a centroid \(lines 2\)"),
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
