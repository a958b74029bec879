"""Cell crops: geometry, masking, borders and input formats, against known answers."""

from importlib.resources import files

import numpy as np
import pytest
import torch
from skimage.io import imread
from torchvision.ops import roi_align

from napari_reddino import crop_windows, segment_cells
from napari_reddino import crops as crops_module
from napari_reddino.crop_windows import bounding_boxes
from napari_reddino.crops import (
    CropInputError,
    CropSampler,
    _label_type,
    as_rgb,
    background_colour,
    cell_crops,
    cell_windows,
    crop_checks,
    smear_home,
)
from napari_reddino.image_input import LabelsInputError
from napari_reddino.measurements import measure_cells

BACKGROUND = (200, 190, 210)
CELL = (150, 40, 90)
NEIGHBOUR = (20, 160, 20)


def disc(shape, centre, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def smear(cells, shape=(100, 120)):
    """An RGB image and labels with discs ``{label: (centre, radius, colour)}`` on a flat background."""
    image = np.empty((*shape, 3), np.uint8)
    image[:] = BACKGROUND
    labels = np.zeros(shape, np.int32)
    for label, (centre, radius, colour) in cells.items():
        inside = disc(shape, centre, radius)
        image[inside], labels[inside] = colour, label
    return image, labels


def centroid(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


def near(crop, colour, tolerance=0.02):
    return np.abs(crop - np.array(colour) / 255).max(axis=-1) < tolerance


def is_cell(crop):
    """Pixels closer to the cell colour than to the background (half-way through the edge)."""
    to_cell = np.abs(crop - np.array(CELL) / 255).sum(axis=-1)
    return to_cell < np.abs(crop - np.array(BACKGROUND) / 255).sum(axis=-1)


def test_window_is_a_square_around_the_bounding_box_with_the_margin():
    _, labels = smear({4: ((40, 60), 10, CELL)})
    windows = cell_windows(labels, margin=0.5, scale="cell")
    # bounding box: rows and columns 30..50 inclusive = [30, 51) -> 21 px, centred on 40.5
    np.testing.assert_array_equal(windows.ids, [4])
    np.testing.assert_allclose(windows.boxes, [[60.5 - 21, 40.5 - 21, 60.5 + 21, 40.5 + 21]])


def test_a_cell_ends_up_centred_in_its_crop():
    image, labels = smear({1: ((37, 71), 9, CELL)})
    _, crops = cell_crops(image, labels, 64, margin=0.3, scale="cell")
    assert crops.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(centroid(near(crops[0], CELL, 0.1)), (31.5, 31.5), atol=0.25)


def test_small_and_large_cells_fill_their_crops_as_they_fill_their_windows():
    image, labels = smear({1: ((30, 30), 6, CELL), 2: ((60, 80), 15, CELL)})
    _, crops = cell_crops(image, labels, 64, margin=0.25, scale="cell")
    shares = [is_cell(crop).mean() for crop in crops]
    # window side = 1.5 x bounding box side (2 r + 1)
    expected = [(labels == 1).sum() / (1.5 * 13) ** 2, (labels == 2).sum() / (1.5 * 31) ** 2]
    np.testing.assert_allclose(shares, expected, rtol=0.03)


def test_smear_scale_gives_every_cell_the_window_of_a_cell_a_quarter_larger_than_the_median():
    # boxes of 13, 21 (the median) and 41 px; 1.25 x 21 = 26.25 px
    _, labels = smear({1: ((25, 25), 6, CELL), 2: ((25, 80), 10, CELL), 3: ((80, 50), 20, CELL)}, shape=(130, 130))
    windows = cell_windows(labels, margin=0.25, scale="smear")
    sides = windows.boxes[:, 2] - windows.boxes[:, 0]
    np.testing.assert_allclose(sides, [1.5 * 26.25] * 2 + [1.5 * 41])  # the largest keeps its own
    centres = (windows.boxes[:, :2] + windows.boxes[:, 2:]) / 2
    by_cell = cell_windows(labels, scale="cell").boxes
    np.testing.assert_allclose(centres, (by_cell[:, :2] + by_cell[:, 2:]) / 2)


def test_smear_scale_crops_show_how_big_each_cell_is():
    image, labels = smear({1: ((30, 30), 6, CELL), 2: ((60, 80), 10, CELL), 3: ((30, 95), 10, CELL)})
    _, by_cell = cell_crops(image, labels, 64, scale="cell")
    _, by_smear = cell_crops(image, labels, 64, scale="smear")
    small_to_large = [is_cell(crops[0]).mean() / is_cell(crops[1]).mean() for crops in (by_cell, by_smear)]
    assert small_to_large[0] > 0.9  # each cell fills its own window alike
    assert small_to_large[1] < 0.4  # about the ratio of the areas, (13 / 21)^2
    window = 1.5 * 1.25 * 21  # the median box is 21 px
    expected = [(labels == label).sum() / window**2 for label in (1, 2)]
    np.testing.assert_allclose([is_cell(crop).mean() for crop in by_smear[:2]], expected, rtol=0.03)


@pytest.mark.parametrize("threads", [1, 5])
def test_bounding_boxes_of_a_real_smear_are_each_cells_extent_however_many_bands_find_them(monkeypatch, threads):
    labels = segment_cells(imread(files("napari_reddino") / "data" / "chula_rbc12" / "1.jpg"))
    labels[3:470, 630:633] = labels.max() + 1  # one cell across every band
    labels[labels == 7] = 0  # an id missing in the middle
    monkeypatch.setattr(crop_windows, "_threads", lambda: threads)
    monkeypatch.setattr(crop_windows, "_BAND_PIXELS", 2**14)  # a 640 x 480 smear in five bands
    bands = []
    find_objects = crop_windows.ndimage.find_objects
    monkeypatch.setattr(crop_windows.ndimage, "find_objects", lambda band, top: bands.append(band.shape) or
                        find_objects(band, top))
    ids, boxes = bounding_boxes(labels)
    assert len(bands) == threads and sum(rows for rows, _ in bands) == labels.shape[0]
    expected_ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, expected_ids)
    for label, box in zip(ids, boxes, strict=True):
        rows, cols = np.nonzero(labels == label)
        np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    assert len(ids) > 50 and 7 not in ids


@pytest.mark.parametrize("shape", [(0, 0), (480, 640), (1, 2**15), (3, 2**15)])
def test_bounding_boxes_of_no_cells_or_of_a_strip_need_no_band_of_their_own(monkeypatch, shape):
    monkeypatch.setattr(crop_windows, "_threads", lambda: 8)
    monkeypatch.setattr(crop_windows, "_BAND_PIXELS", 2**10)
    empty = np.zeros(shape, np.int32)
    ids, boxes = bounding_boxes(empty)
    assert ids.shape == (0,) and boxes.shape == (0, 4)
    if empty.size:
        strip = empty.copy()
        strip[0, 5:9], strip[-1, -1] = 3, 1
        ids, boxes = bounding_boxes(strip)
        np.testing.assert_array_equal(ids, [1, 3])
        np.testing.assert_array_equal(boxes, [[shape[1] - 1, shape[0] - 1, shape[1], shape[0]], [5, 0, 9, 1]])


def test_an_unknown_crop_scale_is_refused_with_the_known_ones():
    _, labels = smear({1: ((40, 60), 10, CELL)})
    with pytest.raises(CropInputError, match="cell, smear"):
        cell_windows(labels, scale="image")


def test_masked_mode_blanks_the_neighbour_exactly_as_if_it_was_not_there():
    image, labels = smear({3: ((40, 60), 10, CELL), 5: ((40, 80), 8, NEIGHBOUR)})  # touching
    alone, alone_labels = smear({3: ((40, 60), 10, CELL)})
    _, context = cell_crops(image, labels, 56, mode="context", margin=0.5, scale="cell")
    _, masked = cell_crops(image, labels, 56, mode="masked", margin=0.5, scale="cell")
    _, reference = cell_crops(alone, alone_labels, 56, mode="context", margin=0.5, scale="cell")
    assert near(context[0], NEIGHBOUR).sum() > 50
    np.testing.assert_allclose(masked[0], reference[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.int64, ">i4"])
def test_labels_of_any_integer_type_give_the_same_crops_and_int32_or_int64_ones_are_not_copied(dtype):
    image, labels = smear({3: ((40, 60), 10, CELL), 5: ((40, 80), 8, NEIGHBOUR)})
    typed = labels.astype(dtype)
    sampler = CropSampler(image, typed, size=(56, 56), mode="masked")
    windows = cell_windows(typed, margin=0.5, scale="cell")
    reference = CropSampler(image, labels, size=(56, 56), mode="masked")(windows.ids, windows.boxes)
    np.testing.assert_array_equal(sampler(windows.ids, windows.boxes).numpy(), reference.numpy())
    # a napari layer's int64 labels of a 133-megapixel smear would be another 530 MB as int32
    assert np.shares_memory(sampler._labels.numpy(), typed) == (np.dtype(dtype) in (np.int32, np.int64))


def test_crops_at_the_border_are_padded_with_background_not_shifted():
    image, labels = smear({1: ((50, 11), 10, CELL)})  # 1 px from the left edge
    # the same cell 30 px further from the edge, on a wider background
    wide, wide_labels = smear({1: ((50, 41), 10, CELL)}, shape=(100, 150))
    _, crops = cell_crops(image, labels, 42, margin=0.5)
    _, reference = cell_crops(wide, wide_labels, 42, margin=0.5)
    np.testing.assert_allclose(crops, reference, atol=1e-6)
    np.testing.assert_allclose(centroid(is_cell(crops[0])), (20.5, 20.5), atol=0.25)


def test_background_colour_is_the_median_of_unlabelled_pixels_in_the_images_own_levels():
    image, labels = smear({1: ((40, 60), 30, CELL)})
    image[:5, :5] = 0  # a few dark specks do not move a median
    np.testing.assert_array_equal(background_colour(image, labels), BACKGROUND)
    np.testing.assert_allclose(background_colour(as_rgb(image), labels), np.array(BACKGROUND) / 255, atol=1e-6)
    np.testing.assert_array_equal(background_colour(image[..., 1], labels), [BACKGROUND[1]] * 3)


def test_grayscale_rgba_uint16_and_float_images_give_the_same_crops():
    image, labels = smear({1: ((40, 60), 10, CELL), 2: ((70, 30), 12, NEIGHBOUR)})
    _, reference = cell_crops(image, labels, 32)
    rgba = np.concatenate([image, np.full((*image.shape[:2], 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(cell_crops(rgba, labels, 32)[1], reference)
    np.testing.assert_allclose(cell_crops(image / 255.0, labels, 32)[1], reference, atol=1e-6)
    twelve_bit = image.astype(np.uint16) * 16 + 15  # 255 -> 4095
    np.testing.assert_allclose(cell_crops(twelve_bit, labels, 32)[1], reference, atol=1e-2)
    gray = image[..., 1]
    _, gray_crops = cell_crops(gray, labels, 32)
    np.testing.assert_allclose(gray_crops, np.repeat(reference[..., 1:2], 3, axis=-1), atol=1e-6)


def test_a_hot_pixel_or_a_flat_field_overshoot_does_not_rescale_the_smear():
    """The levels in use are read from all but the brightest and darkest 0.1 % of the pixels."""
    image, labels = smear({1: ((40, 60), 10, CELL), 2: ((70, 30), 12, NEIGHBOUR)})
    _, reference = cell_crops(image, labels, 32)
    hot = image / 255.0
    hot[5, 5] = 1.01  # outside both cells' windows; read as 255 levels, it dimmed them 255-fold
    np.testing.assert_allclose(cell_crops(hot, labels, 32)[1], reference, atol=1e-6)
    twelve_bit = image.astype(np.uint16) * 16 + 15
    _, twelve_bit_crops = cell_crops(twelve_bit, labels, 32)
    twelve_bit[5, 5] = 4096  # one value past 12 bits: read as 13 bits, it halved every crop
    np.testing.assert_allclose(cell_crops(twelve_bit, labels, 32)[1], twelve_bit_crops, atol=1e-6)
    flat_fielded = image / 200.0  # the background at (1.0, 0.95, 1.05): still levels of 0 to 1
    np.testing.assert_allclose(as_rgb(flat_fielded), np.clip(flat_fielded, 0, 1), atol=1e-7)
    crops = cell_crops(flat_fielded, labels, 32)[1]
    assert crops.max() < 1.001 and np.abs(crops - reference * 255 / 200).max() < 0.06  # the blue overshoot clipped
    vignetted = image / 255.0
    vignetted[:2] = 1.6  # an over-corrected edge, 1.7 % of the pixels: read as 255 levels, every crop went black
    np.testing.assert_allclose(cell_crops(vignetted, labels, 32)[1], reference, atol=1e-6)
    canvas = np.zeros((200, 240, 3))  # a stitched scan on a black canvas, as 32-bit float 0-255: still 0-255
    canvas[50:150, 60:180] = image
    padded = np.zeros(canvas.shape[:2], labels.dtype)
    padded[50:150, 60:180] = labels
    np.testing.assert_allclose(cell_crops(canvas, padded, 32)[1], cell_crops(canvas.astype(np.uint8), padded, 32)[1],
                               atol=1e-6)


def test_a_cameras_counts_saved_as_float_read_as_the_same_counts_in_integers():
    image, labels = smear({1: ((40, 60), 10, CELL), 2: ((70, 30), 12, NEIGHBOUR)})
    counts = image.astype(np.uint16) * 257  # 16-bit levels, not stretched to their own range
    _, reference = cell_crops(image, labels, 32)
    np.testing.assert_allclose(cell_crops(counts.astype(np.float32), labels, 32)[1], reference, atol=1e-6)
    np.testing.assert_array_equal(cell_crops(counts.astype(np.float32), labels, 32)[1], cell_crops(counts, labels, 32)[1])
    nudged = counts.astype(np.float32)
    nudged[::7, ::7, 0] += 0.5  # a few pixels interpolated (hot pixels mended): still a camera's counts
    np.testing.assert_allclose(cell_crops(nudged, labels, 32)[1], reference, atol=1e-4)


def test_labels_of_another_shape_or_type_are_refused():
    image, labels = smear({1: ((40, 60), 10, CELL)})
    with pytest.raises(LabelsInputError, match=r"labels have shape \(100, 119\) but the image is \(100, 120\)"):
        cell_crops(image, labels[:, 1:])
    with pytest.raises(LabelsInputError, match="integers"):
        cell_crops(image, labels.astype(float))
    with pytest.raises(LabelsInputError, match=r"Label ids go up to 1,000,000,000 in a 100x120 image; number"):
        cell_crops(image, np.where(labels > 0, 10**9, 0))
    with pytest.raises(LabelsInputError, match="negative"):  # measuring the cells refuses the same labels
        measure_cells(np.where(labels > 0, -1, 0), image)
    with pytest.raises(CropInputError, match="Unknown crop mode"):
        cell_crops(image, labels, mode="cutout")
    with pytest.raises(CropInputError, match="margin"):
        cell_crops(image, labels, margin=-0.1)
    with pytest.raises(CropInputError, match=r"margin 100: give a fraction of the cell's box on each side, from 0 to "
                                             r"4 \(0.25: a quarter\)"):
        cell_crops(image, labels, margin=100)  # read as pixels: windows 200 cells wide, gigabytes for two cells
    for margin in ("0.25", True, np.array([0.2, 0.3]), 10**400):  # a typed text, a flag, an array, an integer past
        # float's range: said, not a TypeError or an OverflowError
        with pytest.raises(CropInputError, match="from 0 to 4"):
            cell_crops(image, labels, margin=margin)
    np.testing.assert_array_equal(cell_crops(image, labels, 16, margin=np.array(0.5))[1],
                                  cell_crops(image, labels, 16, margin=0.5)[1])  # a number in a 0-d array is one
    for size in (-3, 0, (32,), 2.5, True):
        with pytest.raises(CropInputError, match="size must be a positive whole number of pixels or"):
            cell_crops(image, labels, size)
    assert cell_crops(image, labels, (8, 12))[1].shape == (1, 8, 12, 3)


def test_no_cells_give_no_crops():
    image, labels = smear({})
    ids, crops = cell_crops(image, labels, 16)
    assert ids.shape == (0,) and crops.shape == (0, 16, 16, 3)


def test_real_smear_gives_one_centred_crop_per_cell_in_label_order():
    image = imread(files("napari_reddino") / "data" / "chula_rbc12" / "1.jpg")
    labels = np.zeros(image.shape[:2], np.int32)
    # three hand-placed cells of a real smear, labelled out of order
    for label, (centre, radius) in {9: ((240, 320), 25), 2: ((100, 100), 20), 5: ((400, 600), 30)}.items():
        labels[disc(labels.shape, centre, radius)] = label
    ids, crops = cell_crops(image, labels, 56, mode="masked", margin=0.25, scale="cell")
    np.testing.assert_array_equal(ids, [2, 5, 9])
    assert crops.shape == (3, 56, 56, 3) and np.isfinite(crops).all()
    assert crops.min() >= 0 and crops.max() <= 1
    # every crop shows exactly its own label's pixels in the middle: compare to a direct cut
    row0, col0 = 240 - 25, 320 - 25  # label 9: bbox side 51 = window 76.5 at margin .25
    direct = image[row0 + 10 : row0 + 41, col0 + 10 : col0 + 41].astype(np.float32).mean(axis=(0, 1)) / 255
    np.testing.assert_allclose(crops[2][16:40, 16:40].mean(axis=(0, 1)), direct, atol=0.03)


def test_a_crops_checks_do_not_depend_on_its_batch_and_move_with_any_pixel():
    image = imread(files("napari_reddino") / "data" / "chula_rbc12" / "1.jpg")
    labels = np.zeros(image.shape[:2], np.int32)
    for label, (centre, radius) in enumerate([((240, 320), 25), ((100, 100), 20), ((400, 600), 30), ((250, 370), 22)], 1):
        labels[disc(labels.shape, centre, radius)] = label
    sampler, windows = CropSampler(image, labels, size=(56, 56), mode="masked"), cell_windows(labels)
    whole = crop_checks(sampler(windows.ids, windows.boxes)).numpy()
    assert whole.shape == (4, 2) and len(np.unique(whole, axis=0)) == 4
    for size in (1, 3):  # other batches pad their windows to other sizes: the same crops, the same checks
        parts = [crop_checks(sampler(windows.ids[i:i + size], windows.boxes[i:i + size])).numpy() for i in range(0, 4, size)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    crops = sampler(windows.ids, windows.boxes)
    crops[2, 1, 30, 30] += 1e-3  # one value of one crop, a little
    moved = crop_checks(crops).numpy()
    assert (moved[2] != whole[2]).all() and (np.delete(moved, 2, axis=0) == np.delete(whole, 2, axis=0)).all()


def test_flipped_views_of_the_smear_and_labels_give_the_crops_of_their_copies():
    image, labels = smear({1: ((40, 60), 10, CELL), 2: ((70, 30), 12, NEIGHBOUR)})
    flipped_image, flipped_labels = image[::-1, ::-1], labels[::-1]  # negative strides, as np.flipud gives
    expected = cell_crops(flipped_image.copy(), flipped_labels.copy(), 32)[1]
    np.testing.assert_array_equal(cell_crops(flipped_image, flipped_labels, 32)[1], expected)


class OutOfMemoryAbove(CropSampler):
    """A real sampler on a device whose memory holds the windows of only ``limit`` cells at once."""

    def __init__(self, *args, limit, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit, self.cuts = limit, []

    def _cut(self, ids, boxes):
        if len(ids) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.cuts.append(len(ids))
        return super()._cut(ids, boxes)


def test_running_out_of_memory_while_cutting_cuts_in_halves():
    image, labels = smear({1: ((20, 20), 8, CELL), 2: ((50, 60), 9, CELL), 3: ((80, 100), 7, NEIGHBOUR)})
    windows = cell_windows(labels)
    whole = CropSampler(image, labels, size=(24, 24))(windows.ids, windows.boxes)
    halved = OutOfMemoryAbove(image, labels, size=(24, 24), limit=1)
    np.testing.assert_array_equal(halved(windows.ids, windows.boxes), whole)
    assert halved.cuts == [1, 1, 1]


def test_labels_go_to_a_gpu_as_int16_only_while_their_ids_fit():
    labels, cuda, cpu = np.zeros((4, 4), np.int32), torch.device("cuda"), torch.device("cpu")
    assert _label_type(labels, 2**15 - 1, cuda) == np.int16
    assert _label_type(labels, 2**15, cuda) == np.int32  # as int16, 32,768 would be -32,768: another cell
    assert _label_type(labels, 2**31, cuda) == np.int64
    assert _label_type(labels, 7, cpu) == np.int32 and _label_type(labels.astype(np.uint16), 7, cpu) == np.int32


@pytest.mark.parametrize("mode", ["masked", "context"])
def test_crops_for_a_device_neither_cpu_nor_cuda_are_cut_there(mode):
    """Apple's MPS keeps the smear as CUDA does; "meta" stands in for it (shapes, no values)."""
    image, labels = smear({1: ((20, 20), 8, CELL), 2: ((50, 60), 9, CELL)})
    windows = cell_windows(labels)
    crops = CropSampler(image, labels, size=(24, 24), mode=mode, device="meta")(windows.ids, windows.boxes)
    assert crops.device.type == "meta" and crops.shape == (2, 3, 24, 24)


def test_a_smear_stays_on_a_gpu_only_within_a_quarter_of_its_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4_000, 8_000))  # free, total bytes
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    cuda = torch.device("cuda")
    assert smear_home(cuda, 1_000) == cuda and smear_home(cuda, 1_001) == torch.device("cpu")
    # after an earlier smear, what PyTorch's allocator keeps unused counts as free too
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1_000)
    assert smear_home(cuda, 1_500) == cuda and smear_home(cuda, 1_501) == torch.device("cpu")
    assert smear_home(torch.device("cpu"), 10**12) == torch.device("cpu")


def test_a_label_over_the_whole_smear_is_read_thinned_and_cut_alone(monkeypatch):
    """One label the size of the image (a foreground mask given as labels) made a window copy of
    gigabytes, at margin 4 more than the machine had; it is read at every stride-th pixel, cut
    apart from the cells beside it, whose crops do not change."""
    image = imread(files("napari_reddino") / "data" / "chula_rbc12" / "1.jpg")
    labels = np.ones(image.shape[:2], np.int32)
    labels[100:120, 100:120], labels[300:320, 400:420] = 2, 3
    windows = []

    def recording_roi_align(window, *args, **kwargs):
        windows.append(window.shape[-1])
        return roi_align(window, *args, **kwargs)

    monkeypatch.setattr(crops_module, "roi_align", recording_roi_align)
    ids, _ = cell_crops(image, labels, 32, mode="context", margin=4)  # a window 9 smears wide, 33 Mpx
    assert ids.tolist() == [1, 2, 3] and max(windows) <= 4096 and len(windows) == 2  # the mask alone, then the cells
    monkeypatch.setattr(crops_module, "_THINNED_ABOVE_PX", 256)  # to compare with a window read whole
    _, thinned = cell_crops(image, labels, 32, mode="context", margin=1)
    monkeypatch.setattr(crops_module, "_THINNED_ABOVE_PX", 10**6)  # every window read whole
    windows.clear()
    _, whole = cell_crops(image, labels, 32, mode="context", margin=1)
    assert max(windows) > 3 * 640
    np.testing.assert_array_equal(thinned[1:], whole[1:])
    assert np.abs(thinned[0] - whole[0]).mean() < 0.02  # the same picture, averaged over fewer samples
