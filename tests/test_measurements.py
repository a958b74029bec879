"""measure_cells: known shapes give their known numbers; real smears give a sane table."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from skimage.filters import gaussian
from skimage.io import imread
from skimage.segmentation import find_boundaries

from napari_reddino import measure_cells, measurements, segment_cells
from napari_reddino.measurements import MEASUREMENT_COLUMNS

DATA = Path(__file__).parent / "data"
SLIDE = (225, 230, 228)
CELL = (200, 110, 130)


def painted(labels: np.ndarray, colour_of=lambda label: CELL) -> np.ndarray:
    image = np.empty(labels.shape + (3,), np.uint8)
    image[:] = SLIDE
    for label in np.unique(labels[labels > 0]):
        image[labels == label] = colour_of(label)
    return image


def test_a_disc_has_its_known_area_diameter_and_circularity():
    labels = np.zeros((200, 200), np.int32)
    labels[disk((80, 90), 30)] = 4
    row = measure_cells(labels, painted(labels)).iloc[0]
    assert row["label"] == row["index"] == 4
    assert row["area_px"] == pytest.approx(np.pi * 30**2, rel=0.01)
    assert row["equivalent_diameter_px"] == pytest.approx(60, rel=0.01)
    assert row["perimeter_px"] == pytest.approx(2 * np.pi * 30, rel=0.02)
    assert row["circularity"] == pytest.approx(1.0, abs=0.03)
    assert row["major_axis_px"] == pytest.approx(60, rel=0.01)
    assert row["minor_axis_px"] == pytest.approx(60, rel=0.01)
    assert row["eccentricity"] < 0.05
    assert row["solidity"] > 0.98
    assert (row["centroid_y"], row["centroid_x"]) == pytest.approx((80, 90), abs=0.01)
    assert (row["bbox_min_y"], row["bbox_min_x"], row["bbox_max_y"], row["bbox_max_x"]) == (51, 61, 110, 120)
    assert (row["mean_red"], row["mean_green"], row["mean_blue"]) == CELL
    assert not row["touches_border"]


def test_an_ellipse_has_its_axes_and_eccentricity():
    labels = np.zeros((200, 200), np.int32)
    labels[ellipse(100, 100, 20, 40, rotation=0.6)] = 1
    row = measure_cells(labels, painted(labels)).iloc[0]
    assert row["major_axis_px"] == pytest.approx(80, rel=0.02)
    assert row["minor_axis_px"] == pytest.approx(40, rel=0.02)
    assert row["eccentricity"] == pytest.approx(np.sqrt(1 - 0.25), abs=0.01)
    assert row["circularity"] < 0.9


def test_a_thin_strip_has_the_axes_of_its_pixels_as_unit_squares():
    # The ellipse of a w x l rectangle's second moments has axes 4 / sqrt(12) times its sides:
    # a pixel is a square, not a point (as point moments, a 2 px strip would be 2.0 across).
    labels = np.zeros((30, 60), np.int32)
    labels[10:12, 5:55] = 1
    row = measure_cells(labels, painted(labels)).iloc[0]
    assert row["minor_axis_px"] == pytest.approx(2 * 4 / np.sqrt(12), rel=1e-9)
    assert row["major_axis_px"] == pytest.approx(50 * 4 / np.sqrt(12), rel=1e-9)


def test_micrometre_columns_follow_the_pixel_size():
    labels = np.zeros((100, 100), np.int32)
    labels[disk((50, 50), 20)] = 1
    table = measure_cells(labels, painted(labels), pixel_size_um=0.25)
    row = table.iloc[0]
    assert row["area_um2"] == pytest.approx(row["area_px"] * 0.0625)
    for name in ("perimeter", "equivalent_diameter", "major_axis", "minor_axis"):
        assert row[f"{name}_um"] == pytest.approx(row[f"{name}_px"] * 0.25)
    assert "area_um2" not in measure_cells(labels, painted(labels)).columns
    for wrong in (-1, True, "0.25", float("inf")):
        with pytest.raises(ValueError, match=r"^The pixel size must be a positive number of micrometres; got "):
            measure_cells(labels, painted(labels), pixel_size_um=wrong)
    with pytest.raises(ValueError, match=r"^At 250 µm per pixel a red cell would be 0.03 px across"):
        measure_cells(labels, painted(labels), pixel_size_um=250)  # nanometres typed for micrometres
    with pytest.raises(ValueError, match=r"^2.5e-07 µm per pixel is finer than a light microscope images"):
        measure_cells(labels, painted(labels), pixel_size_um=2.5e-7)  # metres typed for micrometres


def test_central_pallor_tells_a_pale_centre_from_a_full_one():
    labels = np.zeros((120, 240), np.int32)
    labels[disk((60, 60), 40)] = 1
    labels[disk((60, 180), 40)] = 2
    image = painted(labels)
    image[disk((60, 60), 15)] = (215, 190, 200)  # cell 1: a pale centre (a normal discocyte)
    table = measure_cells(labels, image).set_index("label")
    assert table.loc[1, "central_pallor"] > 0.4
    assert abs(table.loc[2, "central_pallor"]) < 0.05  # uniform (a spherocyte)


@pytest.mark.parametrize("radius", [8, 12, 20])
def test_a_uniform_cell_has_no_pallor_however_blurred_or_small(radius):
    labels = np.zeros((80, 80), np.int32)
    labels[disk((40, 40), radius)] = 1
    image = gaussian(painted(labels), sigma=1.0, channel_axis=-1, preserve_range=True).astype(np.uint8)
    assert abs(measure_cells(labels, image)["central_pallor"].iloc[0]) < 0.03


def test_cells_of_a_few_painted_pixels_get_finite_measurements():
    # A dot and a one-pixel stroke painted by hand have no centre or rim: a NaN would keep every
    # head from training or predicting on a map that holds them.
    labels = np.zeros((40, 40), np.int32)
    labels[10, 10], labels[20, 5:15], labels[30:32, 30:32] = 1, 2, 3
    image = np.full((40, 40, 3), 220, np.uint8)
    image[labels > 0] = (200, 120, 140)
    table = measure_cells(labels, image)
    numbers = table.select_dtypes("number")
    assert np.isfinite(numbers.to_numpy()).all()
    assert (table["central_pallor"] == 0).all()


def test_border_cells_are_flagged():
    labels = np.zeros((100, 120), np.int32)  # not square: height and width are not mixed up
    labels[disk((0, 50), 15, shape=labels.shape)] = 1  # top
    labels[disk((50, 50), 15)] = 2
    labels[disk((70, 119), 10, shape=labels.shape)] = 3  # right
    labels[disk((99, 60), 8, shape=labels.shape)] = 4  # bottom
    labels[disk((30, 0), 8, shape=labels.shape)] = 5  # left
    labels[disk((85, 101), 8)] = 6  # near the right edge (one px from it) without touching it
    table = measure_cells(labels, painted(labels)).set_index("label")
    assert table["touches_border"].to_dict() == {1: True, 2: False, 3: True, 4: True, 5: True, 6: False}


@pytest.mark.parametrize("angle", [0, 10, 22.5, 30, 45])
def test_the_outline_shared_with_a_neighbour_is_its_share_of_the_outline_at_any_angle(angle):
    size, radius, cut = 400, 60, 36  # a disc split along a line 0.6 of its radius from its centre
    rows, cols = np.mgrid[:size, :size] - size / 2
    along = cols * np.cos(np.deg2rad(angle)) + rows * np.sin(np.deg2rad(angle))
    disc = rows**2 + cols**2 < radius**2
    labels = np.zeros((size, size), np.int32)
    labels[disc & (along < cut)], labels[disc & (along >= cut)] = 1, 2
    labels[disk((40, 40), 20)] = 3  # free-standing
    labels[350:, :30] = 4  # against the image's border only: that is no outline
    chord = 2 * np.sqrt(radius**2 - cut**2)
    arc = radius * (2 * np.pi - 2 * np.arccos(cut / radius))
    shared = measure_cells(labels, painted(labels)).set_index("label")["outline_shared"]
    assert shared[1] == pytest.approx(chord / (chord + arc), rel=0.05)
    assert shared[3] == 0 and shared[4] == 0


def test_cells_cut_by_a_round_field_stop_are_flagged_and_ink_within_the_field_is_not_an_edge():
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    rows, cols = np.indices(image.shape[:2])
    radius = 0.45 * min(image.shape[:2])
    from_centre = np.hypot(rows - image.shape[0] / 2, cols - image.shape[1] / 2)
    image[from_centre > radius] = 0  # the dark surround of an eyepiece photograph
    image[243:246, 292:306] = 0  # a black ink mark inside the field, across the edge of a central cell
    labels = segment_cells(image)
    table = measure_cells(labels, image).set_index("label")
    reach = np.zeros(labels.max() + 1)
    np.maximum.at(reach, labels.ravel(), from_centre.ravel())  # how far out each cell goes
    at_edge, inside = reach[table.index] >= radius - 1.5, reach[table.index] < radius - 3
    assert at_edge.sum() >= 10 and table["touches_border"][at_edge].all()
    assert not table["touches_border"][inside].any()
    inked = labels[244, 306]
    assert inked > 0 and inked in table.index[inside]


def test_grayscale_images_get_a_mean_gray_column():
    labels = np.zeros((60, 60), np.int32)
    labels[disk((30, 30), 10)] = 1
    gray = np.full((60, 60), 220, np.uint8)
    gray[labels > 0] = 120
    table = measure_cells(labels, gray)
    assert table["mean_gray"].tolist() == [120]
    assert "mean_red" not in table.columns


def test_rows_follow_label_ids_not_their_order():
    labels = np.zeros((60, 120), np.int32)
    labels[disk((30, 30), 10)] = 9
    labels[disk((30, 90), 12)] = 2
    table = measure_cells(labels, painted(labels))
    assert table["label"].tolist() == [2, 9]
    assert table.set_index("label").loc[9, "centroid_x"] == pytest.approx(30)


def test_sparse_label_ids_are_measured_as_numbered_ones_and_keep_their_ids():
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    labels = segment_cells(image)
    dense = measure_cells(labels, image)
    sparse_ids = np.r_[0, 2**24 - 3 * labels.max() + 3 * np.arange(labels.max())]  # tiles numbered apart
    sparse = measure_cells(sparse_ids[labels], image)
    assert sparse["label"].tolist() == sparse_ids[1:].tolist() and sparse["label"].dtype == np.int64
    pd.testing.assert_frame_equal(sparse.drop(columns=["label", "index"]), dense.drop(columns=["label", "index"]))
    assert (sparse["index"] == sparse["label"]).all()


def test_sparse_label_ids_take_no_slot_per_id():
    labels = np.zeros((120, 120), np.int32)
    for k, centre in enumerate([(30, 30), (30, 90), (90, 60)]):
        labels[disk(centre, 20)] = 2**24 - 10 + k  # a slot per id up to there: 134 MB an array
    image = painted(labels)
    tracemalloc.start()
    try:
        table = measure_cells(labels, image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table["label"].tolist() == [2**24 - 10, 2**24 - 9, 2**24 - 8] and peak < 20 * 2**20


def test_no_cells_give_an_empty_table_with_the_columns():
    table = measure_cells(np.zeros((30, 30), np.int32), np.full((30, 30, 3), 200, np.uint8))
    assert table.empty
    assert {"label", "index", "area_px", "central_pallor", "touches_border"} <= set(table.columns)
    labels = np.zeros((30, 30), np.int32)
    labels[disk((15, 15), 5)] = 1
    stacked = pd.concat([table, measure_cells(labels, painted(labels))])  # as an export stacks its smears
    assert all(stacked[f"bbox_{corner}"].dtype == np.int64 for corner in ("min_y", "min_x", "max_y", "max_x"))


def test_labels_must_match_the_image():
    with pytest.raises(ValueError, match="labels have shape"):
        measure_cells(np.zeros((30, 30), np.int32), np.zeros((31, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        measure_cells(np.zeros((30, 30), np.float32), np.zeros((30, 30, 3), np.uint8))


def test_real_smear_table_is_sane():
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    labels = segment_cells(image)
    table = measure_cells(labels, image, pixel_size_um=0.2)
    assert len(table) == labels.max()
    # Chula smears are ~0.2 µm/px: red cells come out at 6-9 µm across.
    assert 6.0 < table["equivalent_diameter_um"].median() < 9.0
    assert table["circularity"].between(0, 1).all() and table["solidity"].between(0, 1).all()
    assert table["circularity"].median() > 0.8
    # Normal discocytes of this smear have pale centres.
    assert table["central_pallor"].median() > 0.1
    assert table["touches_border"].sum() >= 5
    # Most cells of this thin part of the smear stand free; a cell shares outline exactly when another
    # touches it, diagonally too.
    touching = {label for label in table["label"]
                if np.setdiff1d(labels[ndi.binary_dilation(labels == label, np.ones((3, 3)))], [0, label]).size}
    assert set(table.loc[table["outline_shared"] > 0, "label"]) == touching
    assert 0.5 < (table["outline_shared"] == 0).mean() < 0.9


def test_a_smear_summed_in_many_strips_gives_the_table_of_one(monkeypatch):
    """Large smears are summed strip by strip; where the strips join must not show."""
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    labels = segment_cells(image)
    whole = measure_cells(labels, image)
    monkeypatch.setattr(measurements, "STRIP_PIXELS", 7 * image.shape[1] + 5)  # 7 rows: cells span many strips
    pd.testing.assert_frame_equal(measure_cells(labels, image), whole, rtol=1e-12)


def test_a_cells_interior_is_what_lies_inside_its_inner_boundary():
    """measurements' own four comparisons against skimage's find_boundaries, on random cells."""
    rng = np.random.default_rng(3)
    labels = ndi.zoom(rng.integers(0, 6, (12, 15)), 4, order=0).astype(np.int32)  # blocks touching the border
    labels[rng.random(labels.shape) < 0.05] = 0
    expected = (labels > 0) & ~find_boundaries(labels, mode="inner")
    np.testing.assert_array_equal(measurements._interior(labels), expected)


def test_measure_cells_writes_its_columns_in_the_export_s_order():
    smear = imread(DATA / "chula_rbc12" / "1.jpg")
    labels = segment_cells(smear)
    for image, pixel_size in ((smear, 0.2), (smear[..., 1], None)):
        columns = list(measure_cells(labels, image, pixel_size_um=pixel_size).columns)
        assert columns == [column for column in MEASUREMENT_COLUMNS if column in columns]
