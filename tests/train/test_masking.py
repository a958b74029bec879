import numpy as np
import pytest
from scipy import ndimage

from reddino_train.masking import BlockMaskGenerator, sample_masks


@pytest.mark.parametrize("n_masked", [0, 1, 5, 26, 77, 128, 200, 256])
def test_mask_covers_exactly_the_requested_patches(n_masked):
    generator = BlockMaskGenerator((16, 16))
    for seed in range(5):
        mask = generator(n_masked, np.random.default_rng(seed))
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert mask.sum() == n_masked


def test_masks_are_made_of_blocks():
    generator = BlockMaskGenerator((16, 16))
    rng = np.random.default_rng(0)
    pieces = [ndimage.label(generator(100, rng))[1] for _ in range(50)]
    # scattered patches would make dozens of pieces; rectangles of >= 4 patches make a few
    assert np.mean(pieces) < 6


def test_one_square_block():
    # area fixed at 16 and aspect ratio fixed at 1: a single 4 x 4 square
    generator = BlockMaskGenerator((10, 12), min_block=16, max_block=16, min_aspect=1.0)
    mask = generator(16, np.random.default_rng(3))
    rows, cols = np.nonzero(mask)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (4, 4)


def test_batch_masks_fraction_and_ratio_spread():
    generator = BlockMaskGenerator((16, 16))
    masks = sample_masks(generator, 20, (0.1, 0.5), 0.5, np.random.default_rng(0))
    assert masks.shape == (20, 256)
    counts = masks.sum(dim=1).numpy()
    assert (counts > 0).sum() == 10  # int(20 * 0.5) crops masked
    # the 10 masked crops draw their ratio from 10 equal slices of [0.1, 0.5]
    edges = np.linspace(0.1, 0.5, 11)
    masked = np.sort(counts[counts > 0])
    assert np.all(masked >= np.floor(edges[:-1] * 256)) and np.all(masked <= np.floor(edges[1:] * 256))
    # shuffled: masked crops are not all at the front
    assert not np.all(counts[:10] > 0)


def test_batch_masks_probability_extremes_and_seed():
    generator = BlockMaskGenerator((4, 4))
    assert sample_masks(generator, 6, (0.1, 0.5), 0.0, np.random.default_rng(0)).sum() == 0
    everything = sample_masks(generator, 6, (0.5, 0.5), 1.0, np.random.default_rng(0))
    assert everything.sum(dim=1).tolist() == [8] * 6
    first, again = (sample_masks(generator, 6, (0.1, 0.5), 0.5, np.random.default_rng(9)) for _ in range(2))
    assert first.equal(again)


def test_blocks_lie_both_ways_as_well_as_square():
    """DINOv2 draws each rectangle's aspect ratio log-uniformly from [0.3, 1/0.3]: masks of one
    rectangle of 6 patches come tall (3 x 2) and wide (2 x 3): square blocks could not make them."""
    generator, rng = BlockMaskGenerator((16, 16)), np.random.default_rng(0)
    shapes = []
    for _ in range(200):
        rows, cols = np.nonzero(generator(6, rng))
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        if height * width == 6:  # one whole rectangle
            shapes.append(height / width)
    tall, wide = sum(shape > 1 for shape in shapes), sum(shape < 1 for shape in shapes)
    assert tall >= 20 and wide >= 20
