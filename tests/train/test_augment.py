import dataclasses
import typing

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from reddino_train.augment import (
    RBC_PIXEL_AUGMENTATION_PROBABILITY,
    RBC_PIXEL_POOL,
    ChannelDropout,
    Downscale,
    GaussianNoise,
    Normalize,
    RandomGamma,
    RandomSquareSymmetry,
    RandomSubset,
    RGBShift,
    geometry,
    make_multicrop,
)
from reddino_train.config import PixelAugmentation, load_config


@pytest.mark.parametrize("augmentation", ["dinov2", "rbc"])
def test_multicrop_shapes(augmentation):
    crops = dataclasses.replace(load_config("tiny").crops, augmentation=augmentation)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    views = make_multicrop(crops)(image)
    assert [tuple(c.shape) for c in views["global_crops"]] == [(3, 56, 56)] * 2
    assert [tuple(c.shape) for c in views["local_crops"]] == [(3, 28, 28)] * crops.local_number
    for crop in views["global_crops"] + views["local_crops"]:
        assert crop.dtype == torch.float32 and torch.isfinite(crop).all()


def parts(transform, p: float = 1.0):
    """Each transform inside ``transform`` (Compose and RandomApply opened) and how often it runs."""
    if isinstance(transform, v2.Compose | v2.RandomApply):
        for part in transform.transforms:
            yield from parts(part, p * getattr(transform, "p", 1.0))
    else:
        yield transform, p * getattr(transform, "p", 1.0)


def chances(transform) -> dict[str, float]:
    return {type(part).__name__: p for part, p in parts(transform)}


def test_dinov2_crops_are_augmented_as_dinov2_trained():
    # DINOv2's GaussianBlur(p) applies its blur with probability 1 - p: global crop 1 (p=1.0) is
    # never blurred, global crop 2 (p=0.1) nine times in ten, local crops (p=0.5) half the time.
    multicrop = make_multicrop(dataclasses.replace(load_config("tiny").crops, augmentation="dinov2"))
    shared = {"RandomResizedCrop": 1.0, "RandomHorizontalFlip": 0.5, "ColorJitter": 0.8, "RandomGrayscale": 0.2,
              "Normalize": 1.0}
    first, second = map(chances, multicrop.global_transforms)
    assert first == shared
    assert second == shared | {"GaussianBlur": 0.9, "RandomSolarize": 0.2}
    assert chances(multicrop.local_transform) == shared | {"GaussianBlur": 0.5}
    jitter = next(part for part, _ in parts(multicrop.local_transform) if isinstance(part, v2.ColorJitter))
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                                                (-0.1, 0.1))
    # and DINOv2's parameters: bicubic crops of its scales, a 9-px blur of sigma 0.1-2, solarize at 128
    second_parts = {type(part).__name__: part for part, _ in parts(multicrop.global_transforms[1])}
    crop = second_parts["RandomResizedCrop"]
    assert (crop.interpolation, crop.antialias, crop.size) == (v2.InterpolationMode.BICUBIC, True, (56, 56))
    blur = second_parts["GaussianBlur"]
    assert (blur.kernel_size, blur.sigma) == ((9, 9), [0.1, 2.0])
    assert second_parts["RandomSolarize"].threshold == 128


def test_random_subset_applies_n_distinct_transforms_with_probability_p():
    calls = []
    pool = [lambda x, i=i: calls.append(i) or x + 10**i for i in range(5)]
    torch.manual_seed(0)
    for _ in range(50):
        calls.clear()
        out = RandomSubset(pool, n=2, p=1.0)(torch.tensor(0))
        assert len(set(calls)) == 2 and out.item() == sum(10**i for i in calls)
    calls.clear()
    RandomSubset(pool, n=2, p=0.0)(torch.tensor(0))
    assert calls == []


def test_square_symmetries_are_exact_and_uniform():
    image = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3)
    symmetries = [torch.rot90(flipped, k, dims=(-2, -1)) for flipped in (image, image.flip(-1)) for k in range(4)]
    torch.manual_seed(0)
    counts = [0] * 8
    for _ in range(800):
        out = RandomSquareSymmetry()(image)
        counts[next(i for i, s in enumerate(symmetries) if s.shape == out.shape and s.equal(out))] += 1
    assert min(counts) > 60 and max(counts) < 140  # 100 each expected; 60 and 140 lie over 4 sd away


def test_normalize_scales_to_unit_range_then_standardises_each_channel():
    image = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 3).expand(3, 2, 3)
    out = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(image)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 3)
    np.testing.assert_allclose(out[:, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], [-2.117904, -1.244541, 2.248908], rtol=1e-5)
    np.testing.assert_allclose(out[2, 0, 1], (0.2 - 0.406) / 0.225, rtol=1e-6)


def _distinct_outputs(transform, image, n=200):
    return {tuple(transform(image).flatten().tolist()) for _ in range(n)}


def test_rbc_geometry_covers_all_symmetries_of_the_square():
    # full-image crops of an asymmetric image: only the flips and turns change it
    image = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4)
    torch.manual_seed(0)
    assert len(_distinct_outputs(geometry(4, (1.0, 1.0), all_symmetries=True), image)) == 8
    assert len(_distinct_outputs(geometry(4, (1.0, 1.0), all_symmetries=False), image)) == 2


def test_pixel_pool_names_match_the_config_schema():
    assert tuple(RBC_PIXEL_POOL) == typing.get_args(PixelAugmentation)


def _crop_colours(crops, n=40):
    """The distinct colours of the first global crop of a plain-colour image, over n draws."""
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    multicrop = make_multicrop(crops)
    torch.manual_seed(0)
    return {tuple(multicrop(image)["global_crops"][0][:, 0, 0].round(decimals=4).tolist()) for _ in range(n)}


def test_rbc_pixel_augmentations_come_from_the_configured_pool():
    base = load_config("tiny").crops
    geometry_only = dataclasses.replace(base, pixel_augmentations=(), pixel_augmentations_per_crop=0)
    assert len(_crop_colours(geometry_only)) == 1  # flips and turns leave a plain colour as it is
    none_drawn = dataclasses.replace(base, pixel_augmentations=("grayscale",), pixel_augmentations_per_crop=0)
    assert _crop_colours(none_drawn) == _crop_colours(geometry_only)
    greys = dataclasses.replace(base, pixel_augmentations=("grayscale",), pixel_augmentations_per_crop=1)
    colours = _crop_colours(greys)
    assert len(colours) == 2  # kept (p 0.15) or made grey (p 0.85), nothing else
    assert _crop_colours(geometry_only) < colours


def _grey(level: int, size: int = 32) -> torch.Tensor:
    return torch.full((3, size, size), level, dtype=torch.uint8)


def test_gaussian_noise_has_albumentations_default_variance_and_no_bias():
    torch.manual_seed(0)
    sds = [GaussianNoise()(_grey(128)).float().std().item() for _ in range(200)]
    assert 10**0.5 - 0.3 < min(sds) and max(sds) < 50**0.5 + 0.3 and np.std(sds) > 0.8  # drawn, not fixed
    noisy = GaussianNoise()(_grey(128, 256))
    assert noisy.dtype == torch.uint8 and abs(noisy.float().mean().item() - 128) < 0.2
    assert GaussianNoise()(_grey(255)).max() == 255  # clipped, not wrapped round to black


def test_downscale_keeps_the_size_and_gives_blocks_of_four_pixels():
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    coarse = Downscale()(image)
    assert coarse.shape == image.shape and coarse.dtype == torch.uint8
    blocks = coarse.reshape(3, 4, 4, 6, 4).permute(0, 1, 3, 2, 4).reshape(3, 4, 6, 16)
    assert (blocks == blocks[..., :1]).all() and not coarse.equal(image)


def test_gamma_stays_within_80_to_120_percent():
    torch.manual_seed(0)
    mids = {RandomGamma()(_grey(128))[0, 0, 0].item() for _ in range(200)}
    assert len(mids) > 20 and min(mids) >= int(255 * (128 / 255) ** 1.2) and max(mids) <= round(255 * (128 / 255) ** 0.8)


def test_rgb_shift_moves_each_channel_by_its_own_whole_shift_within_20_levels():
    torch.manual_seed(0)
    shifts = set()
    for _ in range(100):
        shifted = RGBShift()(_grey(128)).to(torch.int16) - 128
        assert (shifted == shifted[:, :1, :1]).all() and shifted.abs().max() <= 20
        shifts.add(tuple(shifted[:, 0, 0].tolist()))
    assert len(shifts) > 90 and len({shift[0] for shift in shifts}) > 25
    assert RGBShift()(_grey(250)).max() <= 255 and RGBShift()(_grey(250)).dtype == torch.uint8


def test_channel_dropout_blacks_out_one_channel_and_leaves_the_input():
    torch.manual_seed(0)
    image = _grey(90)
    dropped = [int(torch.nonzero(ChannelDropout()(image).amax(dim=(1, 2)) == 0).item()) for _ in range(300)]
    assert sorted(set(dropped)) == [0, 1, 2] and image.eq(90).all()


def test_the_reddino_recipe_draws_its_kinds_about_as_often_as_reddino_and_never_greys_a_crop():
    crops = load_config("reddino-vits14").crops
    assert "grayscale" not in crops.pixel_augmentations and "autocontrast" not in crops.pixel_augmentations
    # RedDino fired each of its 33 kinds in 4/33 x 0.85 of crops
    rate = crops.pixel_augmentations_per_crop / len(crops.pixel_augmentations) * RBC_PIXEL_AUGMENTATION_PROBABILITY
    assert 4 / 33 * 0.85 <= rate < 0.15
    fired = np.zeros(len(crops.pixel_augmentations))

    def counter(index):
        def count(image):
            fired[index] += 1
            return image
        return count

    pixels = RandomSubset([counter(i) for i in range(len(fired))], crops.pixel_augmentations_per_crop,
                          RBC_PIXEL_AUGMENTATION_PROBABILITY)
    torch.manual_seed(0)
    for _ in range(4000):
        pixels(torch.zeros(()))
    assert np.all(np.abs(fired / 4000 - rate) < 0.025)  # 4.7 standard errors


def test_rbc_crops_take_every_symmetry_of_the_square():
    image = (torch.arange(56 * 56).reshape(1, 56, 56) * 7 % 251).to(torch.uint8).expand(3, -1, -1)
    crops = dataclasses.replace(load_config("tiny").crops, pixel_augmentations=(), pixel_augmentations_per_crop=0,
                                global_scale=(1.0, 1.0))  # the whole image, only turned and flipped
    multicrop = make_multicrop(crops)
    torch.manual_seed(0)
    seen = {tuple(multicrop(image)["global_crops"][0][0].flatten().tolist()) for _ in range(120)}
    assert len(seen) == 8


@pytest.mark.parametrize("augmentation, symmetry", [("dinov2", v2.RandomHorizontalFlip), ("rbc", RandomSquareSymmetry)])
def test_global_and_local_crops_take_their_own_scales_and_symmetries(augmentation, symmetry):
    crops = dataclasses.replace(load_config("tiny").crops, augmentation=augmentation, global_scale=(0.4, 1.0),
                                local_scale=(0.06, 0.3))
    multicrop = make_multicrop(crops)
    kinds = [(transform, crops.global_size, crops.global_scale) for transform in multicrop.global_transforms]
    for transform, size, scale in [*kinds, (multicrop.local_transform, crops.local_size, crops.local_scale)]:
        found = {type(part): part for part, _ in parts(transform)}
        assert found[v2.RandomResizedCrop].scale == scale and found[v2.RandomResizedCrop].size == (size, size)
        assert symmetry in found  # RedDino's: every flip and quarter turn, local crops too
