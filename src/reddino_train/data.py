"""Training data: every image under a folder, multi-cropped, in a deterministic resumable order.

Augmentation randomness is seeded per sample from its position in the sample stream, so a
run that resumes (or uses another number of loader workers) sees exactly the same crops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

log = logging.getLogger(__name__)


class EmptyDatasetError(ValueError):
    """The data folder holds no readable image."""


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root``, recursively, in a stable (sorted) order; hidden ones (a name
    starting with ".", or in such a folder: macOS's ``._`` copies, ``.ipynb_checkpoints``) left out."""
    root = Path(root)
    if not root.is_dir():
        raise EmptyDatasetError(not_a_folder(root))
    images = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in path.relative_to(root).parts))
    if not images:
        raise EmptyDatasetError(
            f"no images under {root}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return images


def not_a_folder(root: Path) -> str:
    """What is wrong with a data folder that is not one."""
    return f"data folder {root} " + ("is a file, not a folder of images" if root.exists() else "does not exist")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The pixels of an image file as the plugin reads a smear (any bit depth, TIFF included)."""
    from napari_reddino.image_input import read_smear

    try:
        return np.asarray(read_smear(path))
    # decoders of untrusted files raise many kinds of error (OSError, ValueError, SyntaxError
    # from PIL's PNG parser, struct.error, ...): each means "unreadable", nothing more
    except Exception as error:  # noqa: BLE001
        said = str(error) if isinstance(error, OSError) and str(error) else f"{type(error).__name__}: {error}"
        raise UnreadableImageError(f"unreadable: {said}") from None


_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _rgb8(path: Path) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit and float images are scaled by their bit depth as the
    plugin scales them: PIL's own conversion clips a 16-bit gray smear to white, and keeps only
    the high byte of 16-bit RGB (a 12-bit camera's smear comes out nearly black)."""
    try:
        with Image.open(path) as image:
            if _eight_bit(image):
                return image.convert("RGB")
    except Exception:  # noqa: BLE001  PIL reads fewer TIFFs (float RGB, planar) than skimage: ask it next
        pass
    from napari_reddino.crops import as_rgb

    return Image.fromarray(to_eight_bit(as_rgb(read_image(path))))


def to_eight_bit(unit: np.ndarray) -> np.ndarray:
    """Values in 0-1 (the plugin's crops and images) as the nearest of 256 levels."""
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


def _eight_bit(image: Image.Image) -> bool:
    """Whether PIL decodes ``image`` as what it holds: 8 bits a sample. A TIFF says its depth in
    BitsPerSample (PIL calls a planar 16-bit RGB TIFF "RGB" and decodes it wrongly); other
    formats in their raw modes ("I;16" and the like)."""
    bits = getattr(image, "tag_v2", {}).get(258, 8)  # TIFF BitsPerSample
    if any(depth > 8 for depth in (bits if isinstance(bits, tuple) else (bits,))):
        return False
    raw = [tile[3][0] if isinstance(tile[3], tuple) else tile[3] for tile in image.tile]
    return image.mode in _EIGHT_BIT_MODES and not any("16" in str(mode) for mode in raw)


class PackedPaths(Sequence[Path]):
    """File paths kept as one bytes string and an array of where each ends (56 bytes for a
    path of 48 characters). A data loader's forked workers only read them, so their memory stays
    shared with the main process. A list of Path objects is written to by every read (reference
    counts, a cached string and hash): a worker that had read RedDino's 1.25 million paths held
    554 MiB of copies, against 21 MiB packed (benchmarks/path_memory.py)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self._ends = np.cumsum([len(name) for name in encoded], dtype=np.int64)
        self._names = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._ends)

    def folders(self) -> set[str]:
        """The folders the files lie in, read from the packed bytes: a Path made for each of 1.25
        million files would take 6 s, on the rank the others wait for."""
        names, separator, folders, start = self._names, os.fsencode(os.sep), set(), 0
        for end in self._ends.tolist():
            folders.add(names[start:max(names.rfind(separator, start, end), start)])
            start = end
        return {os.fsdecode(folder) for folder in folders}

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[each] for each in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices count from the end; beyond it, IndexError
        start = int(self._ends[index - 1]) if index else 0
        return Path(os.fsdecode(self._names[start : int(self._ends[index])]))


class ImageFolder(Dataset):
    """Images under ``root`` as transformed RGB images, indexed by (image index, sample seed).

    A file that cannot be read is reported once by each loader process that meets it (a logging
    warning) and replaced by the next readable image, so one corrupt file in a million does not stop a run.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable) -> None:
        self.root = Path(root)
        self.paths = PackedPaths(find_images(root))
        self.transform = transform
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def listing(self) -> str:
        """How many images, and a digest of their paths under the root: ranks that see as many
        but other files would otherwise train on different data under one index, and a resume
        on other images would not know it."""
        names = "\n".join(path.relative_to(self.root).as_posix() for path in self.paths)
        digest = hashlib.sha256(names.encode(errors="surrogateescape")).hexdigest()  # names as the disk holds them
        return f"{len(self):,} images ({digest[:8]})"

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        image = self._first_readable(index)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also queue a CUDA seeding with
            # a captured stack trace, a seventh of a 64-px sample's time
            torch.default_generator.manual_seed(seed)
            return self.transform(image)

    def _first_readable(self, index: int) -> Image.Image:
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            if path in self.skipped:
                continue
            try:
                return _rgb8(path)
            except Exception as error:  # noqa: BLE001  (decoders raise many kinds; each means unreadable)
                self.skipped.add(path)
                log.warning("skipping unreadable image %s: %s", path, error)
        raise EmptyDatasetError(f"none of the {len(self.paths)} images under {self.root} is readable")


class ResumableSampler(Sampler):
    """An endless stream of (image index, sample seed) for one rank.

    The global stream concatenates one seeded permutation of the images per epoch; rank r of
    W takes global positions r, r + W, r + 2W, ...  ``start`` is the number of samples this
    rank has already consumed, so a resumed run continues exactly where it stopped.
    """

    def __init__(self, n_images: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.n_images, self.seed = n_images, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, permutation = -1, None
        position = self.start
        while True:
            global_position = position * self.world_size + self.rank
            if global_position // self.n_images != epoch:
                epoch = global_position // self.n_images
                permutation = self.permutation(epoch)
            yield int(permutation[global_position % self.n_images]), self.sample_seed(global_position)
            position += 1

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_images, generator=generator)

    def sample_seed(self, global_position: int) -> int:
        return (self.seed * 2_654_435_761 + global_position) % 2**63


def collate_crops(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stack MultiCrop outputs crop-major: all images' crop 0, then all images' crop 1, ...

    global_crops: (2 * batch, C, H, W); local_crops: (n_local * batch, C, h, w), empty when
    there are no local crops.
    """
    stacked = {}
    for key in ("global_crops", "local_crops"):
        crops = [crop for index in range(len(samples[0][key])) for crop in (s[key][index] for s in samples)]
        stacked[key] = torch.stack(crops) if crops else torch.empty(0)
    return stacked
