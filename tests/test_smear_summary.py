"""summarise_smears: counts, sizes and class shares per smear, against hand-counted answers and a real smear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _layers import labels_layer
from napari.layers import Labels
from scipy import stats
from skimage.io import imread

from napari_reddino import measure_cells, segment_cells
from napari_reddino.cell_embeddings import store_embeddings
from napari_reddino.cell_export import export_cells_csv
from napari_reddino.smear_summary import share_interval, summarise_smears
from napari_reddino.wording import counted

DATA = Path(__file__).parent / "data"


def counted_layer(name: str = "A cells") -> Labels:
    """Six cells worked out by hand: the last touches the border and counts only in ``cells``."""
    features = pd.DataFrame({
        "label": [1, 2, 3, 4, 5, 6],
        "equivalent_diameter_px": [30.0, 35.0, 40.0, 45.0, 50.0, 20.0],
        "equivalent_diameter_um": [6.0, 7.0, 8.0, 9.0, 10.0, 4.0],
        "central_pallor": [0.1, 0.2, 0.3, 0.4, 0.5, -1.0],
        "outline_shared": [0.0, 0.05, 0.1, 0.3, 0.0, 0.9],
        "touches_border": [False, False, False, False, False, True],
        "manual_label": ["spherocyte", "", "", "", "", "spherocyte"],
        "predicted_class": ["normal", "normal", "spherocyte", "target cell", "", "normal"],
    })
    return labels_layer(features, name)


def test_a_hand_counted_smear():
    layer = counted_layer()
    layer.features.loc[4, "predicted_class"] = "normal"  # every whole cell has a class
    [row] = summarise_smears(layer, classes=["normal", "spherocyte", "schistocyte"]).to_dict("records")
    assert (row["layer"], row["image"], row["cells"], row["whole_cells"]) == ("A cells", "A", 6, 5)
    assert row["pixel_size_um"] == pytest.approx(0.2)
    assert row["diameter_mean_um"] == pytest.approx(8.0) and row["diameter_mean_px"] == pytest.approx(40.0)
    assert row["diameter_sd_um"] == pytest.approx(np.sqrt(2.5))  # sample SD of 6..10
    assert row["diameter_cv_pct"] == pytest.approx(100 * np.sqrt(2.5) / 8)
    assert row["central_pallor_median"] == pytest.approx(0.3)
    assert row["overlapping_pct"] == pytest.approx(40.0)  # cells 3 and 4: a tenth of their outline or more
    # the manual label wins over the prediction; cell 6 touches the border
    assert (row["labelled"], row["classified"], row["unclassified"]) == (1, 5, 0)
    assert (row["n_normal"], row["n_spherocyte"], row["n_schistocyte"], row["n_target cell"]) == (2, 2, 0, 1)
    assert (row["pct_normal"], row["pct_spherocyte"], row["pct_schistocyte"], row["pct_target cell"]) == (
        40.0, 40.0, 0.0, 20.0)
    assert row["model_id"] == ""
    # 2 of 5 cells: an exact 95 % interval of 5.3-85.3 % (binomial tails of 2.5 % each)
    assert (row["pct_normal_low95"], row["pct_normal_high95"]) == pytest.approx((5.27, 85.34), abs=0.01)
    assert (row["pct_schistocyte_low95"], row["pct_schistocyte_high95"]) == pytest.approx((0.0, 52.18), abs=0.01)


@pytest.mark.parametrize(("count", "total", "low", "high"), [
    (5, 100, 1.64, 11.28),  # Rümke's table for a differential count of 100 cells: 1.6-11.3 %
    (0, 100, 0.0, 3.62),
    (50, 100, 39.83, 60.17),
    (100, 100, 96.38, 100.0),
])
def test_a_share_s_interval_is_the_exact_binomial_one(count, total, low, high):
    assert 100 * np.array(share_interval(count, total)) == pytest.approx((low, high), abs=0.01)


def test_each_end_of_the_interval_leaves_two_and_a_half_percent_of_counts_beyond_the_seen_one():
    for count, total in [(1, 7), (12, 290), (140, 290), (3, 1000), (999, 1000)]:
        low, high = share_interval(count, total)
        assert stats.binom.sf(count - 1, total, low) == pytest.approx(0.025, abs=1e-9)  # P(>= count | low)
        assert stats.binom.cdf(count, total, high) == pytest.approx(0.025, abs=1e-9)  # P(<= count | high)
    with pytest.raises(ValueError, match="3 of 2"):
        share_interval(3, 2)
    with pytest.raises(ValueError, match="0 of 0"):
        share_interval(0, 0)


def test_shares_wait_until_every_whole_cell_has_a_class():
    """Before a head predicted every cell, a share would be one of the hand-picked examples."""
    [row] = summarise_smears(counted_layer(), classes=["normal"]).to_dict("records")  # cell 5 has no class
    assert (row["classified"], row["unclassified"], row["n_normal"]) == (4, 1, 1)
    assert np.isnan(row["pct_normal"]) and np.isnan(row["pct_spherocyte"])
    assert np.isnan(row["pct_normal_low95"]) and np.isnan(row["pct_normal_high95"])
    categorical = counted_layer()
    categorical.features["manual_label"] = categorical.features["manual_label"].astype("category")
    assert summarise_smears(categorical).loc[0, "n_spherocyte"] == 2


def test_a_class_the_predicting_head_does_not_know_gets_a_count_but_no_share():
    # 0 % of a class the head could not name is no measurement: the lab would read "absent, below 60 %"
    layer = counted_layer()
    layer.features["predicted_class"] = ["normal", "normal", "spherocyte", "target cell", "normal", "normal"]
    layer.metadata["predicted_classes"] = ["normal", "spherocyte", "target cell"]
    [row] = summarise_smears(layer, classes=["normal", "spherocyte", "target cell", "stomatocyte"]).to_dict("records")
    assert (row["n_stomatocyte"], row["pct_normal"], row["pct_spherocyte"]) == (0, 40.0, 40.0)  # cell 1 by hand
    assert np.isnan([row["pct_stomatocyte"], row["pct_stomatocyte_low95"], row["pct_stomatocyte_high95"]]).all()
    # every whole cell labelled by hand: any class could have been named, and 0 % is a count
    layer.features["manual_label"] = ["normal", "normal", "spherocyte", "target cell", "normal", ""]
    [row] = summarise_smears(layer, classes=["stomatocyte"]).to_dict("records")
    assert (row["pct_stomatocyte"], row["pct_stomatocyte_low95"]) == (0.0, 0.0) and row["pct_stomatocyte_high95"] > 0


def test_a_table_read_back_from_a_csv_counts_as_the_layer_it_came_from():
    """Blank labels are no label, an empty ``touches_border`` is not a cut, "False" as text is False."""
    layer = counted_layer()
    layer.features["manual_label"] = ["spherocyte", "  ", "", " ", "", "spherocyte"]
    layer.features["touches_border"] = pd.Series(["False", None, "FALSE", np.nan, "0", "TRUE"], dtype=object)
    [row] = summarise_smears(layer).to_dict("records")
    assert (row["whole_cells"], row["labelled"], row["classified"]) == (5, 1, 4)
    assert (row["n_normal"], row["n_spherocyte"], row["n_target cell"]) == (1, 2, 1)


def test_class_columns_follow_the_given_order_then_the_rest_by_name():
    table = summarise_smears([counted_layer("A cells"), counted_layer("B cells")], classes=["spherocyte"])
    assert [c for c in table.columns if c.startswith("n_")] == ["n_spherocyte", "n_normal", "n_target cell"]
    assert table["image"].tolist() == ["A", "B"]
    unordered = summarise_smears(counted_layer())
    assert [c for c in unordered.columns if c.startswith(("n_", "pct_"))][:4] == [
        "n_normal", "pct_normal", "pct_normal_low95", "pct_normal_high95"]
    assert [c for c in unordered.columns if c.startswith("pct_") and c.count("_") == 1] == [
        "pct_normal", "pct_spherocyte", "pct_target cell"]


def test_cells_without_a_pixel_size_labels_or_whole_cells_give_empty_values_not_errors():
    features = counted_layer().features.drop(columns=["equivalent_diameter_um", "manual_label", "predicted_class"])
    [row] = summarise_smears(labels_layer(features, "bare")).to_dict("records")
    assert np.isnan(row["diameter_mean_um"]) and row["diameter_mean_px"] == pytest.approx(40.0)
    assert row["diameter_cv_pct"] == pytest.approx(100 * np.std([30, 35, 40, 45, 50], ddof=1) / 40)  # in pixels
    assert (row["labelled"], row["classified"]) == (0, 0) and np.isnan(row["pixel_size_um"])
    edge = features.assign(touches_border=True)
    [row] = summarise_smears(labels_layer(edge, "edge")).to_dict("records")
    assert (row["cells"], row["whole_cells"]) == (6, 0)
    assert np.isnan(row["diameter_mean_px"]) and np.isnan(row["diameter_cv_pct"]) and np.isnan(row["central_pallor_median"])
    assert np.isnan(row["overlapping_pct"])


def test_a_real_smear_has_red_cells_of_a_red_cells_size():
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    table = measure_cells(segment_cells(image, pixel_size_um=0.2), image, pixel_size_um=0.2)
    layer = labels_layer(table)
    store_embeddings(layer, np.sort(table["label"].to_numpy()), np.zeros((len(table), 4)), model_id="reddino-small",
                     fingerprint="f")
    [row] = summarise_smears(layer).to_dict("records")
    assert row["whole_cells"] == int((~table["touches_border"]).sum()) > 20
    assert 5 < row["overlapping_pct"] < 50  # a thin part of the smear: most cells stand free
    assert 6.0 < row["diameter_mean_um"] < 9.0  # a red cell is 6-8 µm across (Chula is 0.2 µm/px)
    assert 3 < row["diameter_cv_pct"] < 30
    assert row["model_id"] == "reddino-small"


def test_the_export_writes_the_summary_beside_the_cells_and_refuses_to_replace_it(tmp_path):
    cells, summary = tmp_path / "cells.csv", tmp_path / "cells_summary.csv"
    export_cells_csv(cells, counted_layer(), summary_path=summary, classes=["normal", "spherocyte"])
    back = pd.read_csv(summary, dtype={"image": str, "model_id": str}).fillna({"model_id": ""})  # "" reads as NaN
    pd.testing.assert_frame_equal(back, summarise_smears(counted_layer(), ["normal", "spherocyte"]),
                                  check_dtype=False)
    summary.write_text("keep me")
    cells.unlink()
    with pytest.raises(FileExistsError, match="cells_summary.csv"):
        export_cells_csv(cells, counted_layer(), summary_path=summary)
    assert summary.read_text() == "keep me" and not cells.exists()
    with pytest.raises(ValueError, match="overwrite the export's other file cells.csv"):
        export_cells_csv(cells, counted_layer(), summary_path=cells, overwrite=True)


def test_counts_in_sentences_take_the_plural_their_noun_needs():
    assert [counted(n, "cell") for n in (0, 1, 2, 1200)] == ["0 cells", "1 cell", "2 cells", "1,200 cells"]
    assert [counted(n, "class") for n in (1, 9)] == ["1 class", "9 classes"]


def test_a_table_or_a_string_where_layers_or_classes_belong_is_refused():
    layer = counted_layer()
    with pytest.raises(TypeError, match=r"not the one string 'normal' \(write \['normal'\]\)"):
        summarise_smears(layer, classes="normal")  # it counted classes n, o, r, m, a, l
    with pytest.raises(TypeError, match=r"cells must be a cells layer \(a napari Labels layer with a cell table\) or a "
                                        r"list of them, not a DataFrame \(a table from measure_cells goes on a layer"):
        summarise_smears(layer.features)
    with pytest.raises(TypeError, match="not a ndarray"):
        export_cells_csv("never.csv", np.zeros((4, 4), np.int32))
