"""The pooled cell map without Qt: which point is which cell, selections, colours, feature writes."""


import numpy as np
import pandas as pd
import pytest
from _layers import labels_layer
from napari.utils.colormaps import ensure_colormap

from napari_reddino.cell_classifier import measurement_features
from napari_reddino.cell_embeddings import METADATA_KEY, store_embeddings
from napari_reddino.cell_map import (
    DIM_FACTOR,
    LUT_SIZE,
    MUTED,
    PooledCells,
    PoolingError,
    class_colours,
    emphasise,
    points_in_polygon,
    rank_lut,
    value_colours,
)
from napari_reddino.cell_table import SOURCE_DIGEST


def cells_layer(name: str, labels: np.ndarray, *, model_id="m", dim=4, embed=True):
    ids = np.unique(labels[labels > 0]).astype(np.int64)
    layer = labels_layer(pd.DataFrame({"label": ids, "area": ids * 10.0}), name, labels)
    if embed:
        store_embeddings(layer, ids, np.arange(len(ids) * dim, dtype=np.float32).reshape(-1, dim),
                         model_id=model_id, fingerprint="f")
    return layer


@pytest.fixture
def two_smears():
    first = np.zeros((6, 6), dtype=np.int32)
    first[0:2, 0:2], first[3:5, 3:5] = 7, 70_000  # label ids beyond uint16 are fine
    second = np.zeros((4, 4), dtype=np.int32)
    second[0:2, 0:2], second[2:4, 2:4], second[0, 3] = 1, 2, 3
    return cells_layer("a cells", first), cells_layer("b cells", second)


def test_points_are_cells_of_the_right_layer(two_smears):
    pool = PooledCells.from_layers(two_smears)
    assert len(pool) == 5 and pool.model_id == "m"
    np.testing.assert_array_equal(pool.label_ids, [7, 70_000, 1, 2, 3])
    np.testing.assert_array_equal(pool.layer_index, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(pool.points_of(1, [3, 1, 99]), [4, 2])  # 99 has no point
    np.testing.assert_array_equal(pool.points_of(0, [70_000]), [1])
    np.testing.assert_array_equal(pool.column("area"), [70.0, 700_000.0, 10.0, 20.0, 30.0])
    table = pool.table()  # each point's row, with its layer: the head compares a cell's size within it
    assert table["layer"].tolist() == [0, 0, 1, 1, 1]  # places, not names: a renamed layer may share a name
    np.testing.assert_array_equal(table["label"], pool.label_ids)

    ranks = pool.rank_image(0)
    assert ranks.dtype == np.uint16
    np.testing.assert_array_equal(np.unique(ranks), [0, 1, 2])
    assert ranks[0, 0] == 1 and ranks[4, 4] == 2  # 1 + the cell's place in its layer
    lut = rank_lut(np.eye(4, dtype=np.float32)[:2])
    np.testing.assert_array_equal(lut[ranks[4, 4]], [0, 1, 0, 0])
    assert not lut[0].any() and not lut[3:].any()


def test_writes_land_on_the_cells_own_rows(two_smears):
    first, second = two_smears
    pool = PooledCells.from_layers(two_smears)
    pool.write("manual_label", "normal", [1, 3])
    assert list(first.features["manual_label"]) == ["", "normal"]
    assert list(second.features["manual_label"]) == ["", "normal", ""]
    pool.write("umap_x", np.arange(5.0), empty=np.nan)
    np.testing.assert_array_equal(second.features["umap_x"], [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(pool.table()["umap_x"], np.arange(5.0))


def test_cells_are_found_by_label_id_in_a_table_of_another_order_with_a_cell_not_embedded():
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0, :2], labels[1, :2], labels[2, :2], labels[3, :2] = 2, 5, 9, 11
    table = pd.DataFrame({"label": [11, 9, 2, 5], "area": [110.0, 90.0, 20.0, 50.0],
                          "manual_label": ["x", "", "", "b"]})
    layer = labels_layer(table, "cells", labels)
    store_embeddings(layer, np.array([2, 5, 9]), np.eye(3, 4, dtype=np.float32), model_id="m", fingerprint="f")
    pool = PooledCells.from_layers([layer])
    np.testing.assert_array_equal(pool.label_ids, [2, 5, 9])  # cell 11 has no embedding, so no point
    np.testing.assert_array_equal(pool.column("area"), [20.0, 50.0, 90.0])
    assert pool.column("manual_label", "").tolist() == ["", "b", ""]
    assert pool.table()["label"].tolist() == [2, 5, 9] and pool.table()["area"].tolist() == [20.0, 50.0, 90.0]
    np.testing.assert_array_equal(pool.points_of(0, [9, 2, 11]), [2, 0])
    pool.write("manual_label", "z", [0])
    assert dict(zip(layer.features["label"], layer.features["manual_label"])) == {11: "x", 9: "", 2: "z", 5: "b"}
    ranks = pool.rank_image(0)
    assert ranks[0, 0] == 1 and ranks[2, 0] == 3 and ranks[3, 0] == 0  # cell 11 is not on the map


def test_labels_are_written_into_a_column_read_back_as_numbers_or_categories(two_smears):
    first, second = two_smears
    first.features["manual_label"] = np.nan  # a table read back from a CSV where nobody had labelled yet
    second.features["manual_label"] = pd.Categorical(["normal", "normal", "normal"])
    pool = PooledCells.from_layers(two_smears)
    pool.write("manual_label", "target cell", [1, 3])
    assert pool.column("manual_label", "").tolist() == ["", "target cell", "normal", "target cell", "normal"]
    # read before any write: a category column with blanks (its fillna takes only its categories)
    second.features["manual_label"] = pd.Categorical(["normal", None, "normal"])
    assert PooledCells.from_layers(two_smears).column("manual_label", "").tolist()[2:] == ["normal", "", "normal"]
    second.features["manual_label"] = [" normal", "  ", "normal "]  # blanks are no label; spaces are not a class
    assert PooledCells.from_layers(two_smears).column("manual_label", "").tolist()[2:] == ["normal", "", "normal"]


def test_a_smear_with_two_cells_layers_in_the_pool_is_named_with_them(two_smears):
    first, second = two_smears
    assert PooledCells.from_layers(two_smears).smears_mapped_twice() == {}
    again = cells_layer("a cells [1]", first.data)  # segmented again beside the labelled layer
    again.metadata["source_image"] = "a"
    second.metadata["source_image"] = "b"
    pool = PooledCells.from_layers([first, second, again])
    assert pool.smears_mapped_twice() == {"a": ["a cells", "a cells [1]"]}
    # two cameras' files of one name, told apart by their pixels: two smears, each mapped once
    first.metadata[SOURCE_DIGEST], again.metadata[SOURCE_DIGEST] = "pixels of camera A", "pixels of camera B"
    assert PooledCells.from_layers([first, second, again]).smears_mapped_twice() == {}
    again.metadata[SOURCE_DIGEST] = "pixels of camera A"
    assert PooledCells.from_layers([first, second, again]).smears_mapped_twice() == {"a": ["a cells", "a cells [1]"]}


def test_two_layers_of_one_name_keep_their_own_cell_sizes(two_smears):
    for layer, diameters in zip(two_smears, ([40.0, 20.0], [100.0, 100.0, 100.0])):
        layer.features["equivalent_diameter_px"] = diameters
        layer.name = "cells"  # napari keeps names unique when a layer is added, not when it is renamed
    table = PooledCells.from_layers(two_smears).table()
    relative = measurement_features(table, ["relative_diameter"], len(table))[:, 0]
    np.testing.assert_allclose(relative, [40 / 30, 20 / 30, 1, 1, 1])


def test_several_columns_are_written_with_one_table_per_layer(two_smears):
    replaced = {}
    first, second = two_smears
    for layer in two_smears:  # count how often each layer's table is replaced
        layer.events.features.connect(lambda event, name=layer.name: replaced.update({name: replaced.get(name, 0) + 1}))
    pool = PooledCells.from_layers([first, second])
    pool.write_columns({"p_a": [0.25, 0.75], "p_b": [0.75, 0.25], "prediction_probability": 0.75}, [1, 4], empty=np.nan)
    assert replaced == {"a cells": 1, "b cells": 1}
    np.testing.assert_array_equal(first.features["p_a"], [np.nan, 0.25])
    np.testing.assert_array_equal(second.features["p_b"], [np.nan, np.nan, 0.25])
    np.testing.assert_array_equal(pool.table()["prediction_probability"], [np.nan, 0.75, np.nan, np.nan, 0.75])


def test_pooling_refuses_layers_whose_cells_were_cropped_otherwise(two_smears):
    first, second = two_smears
    for layer, crops in ((first, ("masked", "smear", 0.25)), (second, ("context", "cell", 0.25))):
        layer.metadata[METADATA_KEY].update(crop_mode=crops[0], crop_scale=crops[1], margin=crops[2])
    with pytest.raises(PoolingError, match="'a cells': masked crops at smear scale, margin 0.25; 'b cells': context "
                                           "crops at cell scale, margin 0.25"):
        PooledCells.from_layers(two_smears)
    second.metadata[METADATA_KEY].update(crop_mode="masked", crop_scale="smear", margin=0.5)
    with pytest.raises(PoolingError, match="'b cells': masked crops at smear scale, margin 0.5"):
        PooledCells.from_layers(two_smears)
    second.metadata[METADATA_KEY].update(margin=0.25)
    assert PooledCells.from_layers(two_smears).crops == {"mode": "masked", "scale": "smear", "margin": 0.25}
    del second.metadata[METADATA_KEY]["crop_mode"]  # not recorded: no objection
    assert PooledCells.from_layers(two_smears).crops == {"mode": "masked", "scale": "smear", "margin": 0.25}


def test_pooling_refuses_layers_it_cannot_compare(two_smears):
    with pytest.raises(PoolingError, match="Embed cells"):
        PooledCells.from_layers([two_smears[0], cells_layer("raw", np.ones((2, 2), np.int32), embed=False)])
    with pytest.raises(PoolingError, match="different models"):
        PooledCells.from_layers([two_smears[0], cells_layer("c", np.ones((2, 2), np.int32), model_id="other")])
    here = cells_layer("here", np.ones((2, 2), np.int32), model_id="s1@sha256:0123456789abcdef")
    copied = cells_layer("copied", np.ones((2, 2), np.int32), model_id="s1-final@sha256:0123456789abcdef")
    assert PooledCells.from_layers([here, copied]).model_id == "s1@sha256:0123456789abcdef"  # the same weights
    retrained = cells_layer("retrained", np.ones((2, 2), np.int32), model_id="s1@sha256:fedcba9876543210")
    with pytest.raises(PoolingError, match="different models"):
        PooledCells.from_layers([here, retrained])


def test_embedded_cells_without_a_row_in_the_cell_table_are_refused(two_smears):
    first, second = two_smears
    second.features = second.features[second.features["label"] != 3]  # say, a cell painted after segmenting
    with pytest.raises(PoolingError, match="'b cells' have no row in the layer's cell table"):
        PooledCells.from_layers([first, second])
    first.features = pd.DataFrame({"area": [1.0, 2.0]})  # a table without label ids
    with pytest.raises(PoolingError, match="'a cells'"):
        PooledCells.from_layers([first])


def test_polygon_selection_and_colours():
    coords = np.array([[0.5, 0.5], [2.0, 2.0], [0.9, 0.1], [-1.0, 0.5]])
    square = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal(points_in_polygon(coords, square), [True, False, True, False])
    assert not points_in_polygon(coords, square[:2]).any()  # two vertices enclose nothing

    red = np.array([1, 0, 0, 1], dtype=np.float32)
    colours = class_colours(np.array(["spherocyte", "", "other"], dtype=object), {"spherocyte": red})
    np.testing.assert_array_equal(colours, [red, MUTED, MUTED])
    dimmed = emphasise(colours, np.array([True, False, False]))
    np.testing.assert_allclose(dimmed[:, 3], [1.0, MUTED[3] * DIM_FACTOR, MUTED[3] * DIM_FACTOR])
    np.testing.assert_array_equal(emphasise(colours, np.zeros(3, bool)), colours)


def test_a_measurement_is_coloured_between_its_2nd_and_98th_percentile():
    viridis = ensure_colormap("viridis")
    values = np.r_[np.arange(101.0), np.nan]  # percentiles 2 and 98 are the values 2 and 98
    colours = value_colours(values, viridis)
    np.testing.assert_allclose(colours[[0, 2, 50, 98, 100]], viridis.map(np.array([0, 0, 0.5, 1, 1])), atol=1e-6)
    np.testing.assert_array_equal(colours[-1], MUTED)  # not measured: grey, like an unlabelled cell
    np.testing.assert_allclose(value_colours(np.full(3, 7.0), viridis), viridis.map(np.zeros(3)))  # all alike
    np.testing.assert_array_equal(value_colours(np.full(2, np.nan), viridis), [MUTED, MUTED])


def test_a_layer_of_more_cells_than_one_colour_table_holds_is_refused_and_one_less_is_coloured():
    most = LUT_SIZE - 1  # row 0 of the table is the background
    for n, fits in ((most, True), (most + 1, False)):
        labels = np.zeros(256 * 257, dtype=np.int32)
        labels[:n] = np.arange(1, n + 1)
        layer = cells_layer(f"{n} cells", labels.reshape(256, 257), dim=1)
        if not fits:
            with pytest.raises(PoolingError, match=r"'65536 cells' holds more than 65,535 cells"):
                PooledCells.from_layers([layer])
            continue
        pool = PooledCells.from_layers([layer])
        ranks = pool.rank_image(0).ravel()
        np.testing.assert_array_equal(ranks[:n], np.arange(1, n + 1))  # every cell its own row of the table
        lut = rank_lut(np.tile([1.0, 0.0, 0.0, 1.0], (n, 1)))
        assert lut[ranks[n - 1], 3] == 1.0 and lut[0, 3] == 0.0
