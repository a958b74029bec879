import logging
import shutil

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from reddino_train.augment import make_multicrop
from reddino_train.config import load_config
from reddino_train.data import (
    EmptyDatasetError,
    ImageFolder,
    PackedPaths,
    ResumableSampler,
    collate_crops,
    find_images,
)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_find_images_recurses_sorted_and_ignores_other_files(smear_images, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(smear_images, root)
    (root / "notes.txt").write_text("not an image")
    (root / "smear0" / "deep").mkdir()
    (root / "smear0" / "deep" / "UPPER.TIF").write_bytes(b"")
    (root / "smear0" / "._UPPER.TIF").write_bytes(b"")  # macOS's copy of its attributes
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "smear.png").write_bytes(b"")
    images = find_images(root)
    assert len(images) == 17
    assert images == sorted(images)
    assert {path.suffix for path in images} == {".jpg", ".png", ".TIF"}


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(EmptyDatasetError, match=r"no images under .*\.png, \.jpg"):
        ImageFolder(tmp_path, transform=lambda image: image)
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        find_images(tmp_path / "missing")
    with pytest.raises(EmptyDatasetError, match=r"notes.txt is a file, not a folder of images$"):
        find_images(tmp_path / "notes.txt")


def test_the_image_paths_come_back_as_found_from_one_bytes_string(tmp_path):
    for name in ["a.png", "ü é/b.tif", "z.jpg", b"raw\xff.png".decode(errors="surrogateescape")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    found = find_images(tmp_path)
    dataset = ImageFolder(tmp_path, transform=lambda image: image)
    paths = dataset.paths
    assert isinstance(paths, PackedPaths) and list(paths) == found and len(paths) == 4
    assert dataset.listing.startswith("4 images (")  # a name that is not UTF-8 is recorded as it is
    assert paths[-1] == found[-1] and paths[1:3] == found[1:3]
    with pytest.raises(IndexError):
        paths[4]


def test_unreadable_image_is_reported_and_replaced_by_the_next(smear_images, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(smear_images, root)
    corrupt = find_images(root)[0]
    corrupt.write_bytes(b"\x89PNG truncated")
    dataset = ImageFolder(root, transform=lambda image: image)
    with caplog.at_level(logging.WARNING):
        image = dataset[(0, 0)]
    assert image.size == (64, 64)
    assert dataset.skipped == {corrupt}
    assert f"skipping unreadable image {corrupt}" in caplog.text
    for path in dataset.paths[1:]:
        path.write_bytes(b"junk")
    with pytest.raises(EmptyDatasetError, match="none of the 16 images"):
        dataset[(0, 0)]


def test_a_twelve_bit_smear_in_sixteen_bit_files_trains_as_its_eight_bit_self(smear_images, tmp_path):
    source = find_images(smear_images)[0]
    rgb8 = np.asarray(Image.open(source).convert("RGB"))
    (tmp_path / "data").mkdir()
    tifffile.imwrite(tmp_path / "data" / "camera.tif", rgb8.astype(np.uint16) * 16 + 15)  # 255 -> 4095
    image = ImageFolder(tmp_path / "data", transform=lambda image: image)[(0, 0)]
    assert image.mode == "RGB"
    np.testing.assert_allclose(np.asarray(image), rgb8, atol=1)  # PIL's own conversion: all 255


@pytest.mark.parametrize("layout", ["float RGB", "planar RGB", "planar 16-bit RGB"])
def test_a_tiff_that_pil_cannot_open_trains_as_the_plugin_reads_it(smear_images, tmp_path, layout):
    rgb8 = np.asarray(Image.open(find_images(smear_images)[0]).convert("RGB"))
    (tmp_path / "data").mkdir()
    if layout == "float RGB":
        tifffile.imwrite(tmp_path / "data" / "smear.tif", rgb8.astype(np.float32) / 255, photometric="rgb")
    elif layout == "planar RGB":
        tifffile.imwrite(tmp_path / "data" / "smear.tif", rgb8, photometric="rgb", planarconfig="separate")
    else:  # PIL opens it as "RGB" and decodes it wrongly
        tifffile.imwrite(tmp_path / "data" / "smear.tif", rgb8.astype(np.uint16) * 16 + 15, photometric="rgb",
                         planarconfig="separate")
    image = ImageFolder(tmp_path / "data", transform=lambda image: image)[(0, 0)]
    np.testing.assert_allclose(np.asarray(image), rgb8, atol=1)


def test_sampler_epochs_are_permutations_and_ranks_share_the_stream():
    whole = take(iter(ResumableSampler(10, seed=3)), 30)
    for epoch in range(3):
        assert sorted(index for index, _ in whole[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    orders = [[index for index, _ in whole[epoch * 10 : (epoch + 1) * 10]] for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]  # each epoch shuffled anew
    rank0 = take(iter(ResumableSampler(10, seed=3, rank=0, world_size=2)), 15)
    rank1 = take(iter(ResumableSampler(10, seed=3, rank=1, world_size=2)), 15)
    assert rank0 == whole[0::2] and rank1 == whole[1::2]
    assert len({seed for _, seed in whole}) == 30  # every sample draws its own augmentation


def test_sampler_resumes_at_its_position():
    full = take(iter(ResumableSampler(7, seed=1, rank=1, world_size=2)), 20)
    resumed = take(iter(ResumableSampler(7, seed=1, rank=1, world_size=2, start=13)), 7)
    assert resumed == full[13:]


def test_a_stream_left_by_two_ranks_goes_on_in_one_or_three_processes():
    whole = take(iter(ResumableSampler(7, seed=1)), 40)
    consumed = 2 * 5  # each of two ranks took 5 samples: global positions 0-9
    continued = take(iter(ResumableSampler(7, seed=1, start=consumed)), 12)
    assert continued == whole[10:22]
    # 10 samples do not split over 3 ranks: they go back to position 9, which is seen twice.
    three = [take(iter(ResumableSampler(7, seed=1, rank=r, world_size=3, start=consumed // 3)), 4) for r in range(3)]
    assert [sample for step in zip(*three) for sample in step] == whole[9:21]


def test_same_sample_seed_gives_the_same_crops_and_collate_is_crop_major(smear_images):
    cfg = load_config("tiny")
    dataset = ImageFolder(smear_images, make_multicrop(cfg.crops))
    first, again, other = dataset[(2, 11)], dataset[(2, 11)], dataset[(2, 12)]
    assert torch.equal(first["global_crops"][0], again["global_crops"][0])
    assert torch.equal(first["local_crops"][1], again["local_crops"][1])
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])
    samples = [dataset[(index, index)] for index in range(3)]
    batch = collate_crops(samples)
    assert batch["global_crops"].shape == (2 * 3, 3, 56, 56)
    assert batch["local_crops"].shape == (cfg.crops.local_number * 3, 3, 28, 28)
    assert torch.equal(batch["global_crops"][3 + 2], samples[2]["global_crops"][1])
    assert torch.equal(batch["local_crops"][3 + 1], samples[1]["local_crops"][1])
