"""Labelled data for ``reddino-train eval``, turned into feature arrays.

Two layouts:

``crops``
    a folder per class of single-cell images, ``DATA/<class>/*.png`` (any image format).
    Each crop is resampled whole to the model's input size, the way the plugin resamples a
    cell's window (:class:`napari_reddino.crops.CropSampler`).
``points``
    smears with point labels in the Chula RBC-12 format: ``Dataset/<n>.jpg`` with
    ``Label/<n>.txt`` (or ``<n>.txt`` beside the image), one ``x y class_id`` line per cell.
    Each smear is segmented (:func:`napari_reddino.segment_cells`), every point is matched to
    the cell under it (:func:`napari_reddino.cells_at_points`; points on background or on a
    cell already claimed by a nearer point are dropped), and the matched cells are embedded
    as the plugin embeds them (``Embedder.embed``).

Features come from *extractors*: a model's CLS embedding (:class:`EmbeddingFeatures`), or
the plugin's hand-made shape and colour measurements (:class:`MeasurementFeatures`, points
data only). Several extractors share one pass over the data, so a smear is segmented once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from .data import (
    IMAGE_SUFFIXES,
    EmptyDatasetError,
    UnreadableImageError,
    find_images,
    not_a_folder,
    read_image,
)
from .choices import Format
from .files import write_atomic_with

CHULA_CLASSES = (
    "normal", "macrocyte", "microcyte", "spherocyte", "target cell", "stomatocyte", "ovalocyte",
    "teardrop", "burr cell", "schistocyte", "uncategorised", "hypochromia", "elliptocyte",
)
LABEL_FOLDER = "Label"
CROPS_PER_READ = 256  # crops held in memory at a time


class EvalDataError(ValueError):
    """A data folder that holds no usable labelled sample."""


@dataclass(frozen=True)
class FeatureSet:
    """One feature row per labelled sample."""

    features: np.ndarray  # (n, dim) float32
    targets: np.ndarray  # (n,) int64, indices into class_names
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None  # (n,) the image each sample comes from (points data)
    summary: DataSummary | None = None  # what reading the data found (files it could not read)

    def save(self, path: Path, key: str) -> None:
        """Write to an .npz file (atomically) tagged with ``key``, what the features depend on."""
        arrays = {"features": self.features, "targets": self.targets, "class_names": np.array(self.class_names),
                  "key": np.array(key)}
        if self.groups is not None:
            arrays["groups"] = self.groups
        if self.summary is not None:
            arrays["summary"] = np.array(json.dumps(self.summary.to_dict()))
        write_atomic_with(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load(cls, path: Path, key: str) -> FeatureSet | None:
        """The features saved at ``path`` under ``key``; None when absent, stale or unreadable."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["key"]) != key:
                    return None
                groups = saved.get("groups")
                summary = DataSummary.from_dict(json.loads(str(saved["summary"]))) if "summary" in saved else None
                return cls(saved["features"], saved["targets"], tuple(saved["class_names"].tolist()), groups, summary)
        except Exception:  # noqa: BLE001  cut short or damaged, whatever numpy or zipfile raise: computed again
            return None


@dataclass
class DataSummary:
    images: int = 0  # smears (points) or crops read
    points: int = 0  # point labels considered (points data)
    matched: int = 0  # of which matched to a segmented cell
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"images": self.images, "points": self.points, "matched": self.matched,
                "skipped": [[str(path), reason] for path, reason in self.skipped]}

    @classmethod
    def from_dict(cls, data: dict) -> DataSummary:
        skipped = [(Path(path), reason) for path, reason in data["skipped"]]
        return cls(data["images"], data["points"], data["matched"], skipped)


# --- feature extractors ---------------------------------------------------------------------


class Extractor(Protocol):
    def cells(self, image: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) features of the cells ``ids`` of a segmented smear, in that order."""

    def crops(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(len(images), dim) features of single-cell images."""


class EmbeddingFeatures:
    """A model's CLS embeddings, as the plugin computes them (its crop mode, scale and margin):
    only the annotated cells go through the model, their crops cut as among all cells."""

    def __init__(self, embedder, batch_size: int | None = None, *, mode: str, scale: str, margin: float) -> None:
        self.embedder, self.batch_size = embedder, batch_size
        self.options = {"mode": mode, "scale": scale, "margin": margin}

    def cells(self, image: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        embedded_ids, embeddings = self.embedder.embed(image, labels, ids=ids, batch_size=self.batch_size,
                                                       **self.options)
        return embeddings[np.searchsorted(embedded_ids, ids)]

    def crops(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        from napari_reddino.crops import CropSampler

        embedder = self.embedder
        batch = self.batch_size or embedder.auto_batch_size()
        out = []
        for start in range(0, len(images), batch):
            inputs = []
            for image in images[start : start + batch]:
                height, width = image.shape[:2]
                inside = np.zeros((height, width), np.int32)  # unlabelled, the outermost pixels give the
                inside[1:-1, 1:-1] = 1  # slide's colour, which pads the window beyond the crop
                sampler = CropSampler(image, inside, size=embedder.input_size, device=embedder.device,
                                      mean=embedder.mean, std=embedder.std, mode="context")
                inputs.append(sampler(np.array([1]), square_around(height, width)))
            out.append(embedder.embed_crops(torch.cat(inputs)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


def square_around(height: int, width: int) -> np.ndarray:
    """The square window (x0, y0, x1, y1) centred on an image, its side the longer one: the
    plugin's windows are square, and a crop resampled to a square input whole would squash a
    cell elongated along its longer side towards round."""
    side = max(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    return np.array([[left, top, left + side, top + side]])


class MeasurementFeatures:
    """The plugin's per-cell measurements (:func:`napari_reddino.measure_cells`): size, shape,
    mean colour, central pallor and the outline shared with neighbours (in pixels and pixel
    values), without positions, ids or flags."""

    VERSION = 2  # part of the feature cache's key; 2: with outline_shared, measured among all cells

    @staticmethod
    def is_feature(column: str) -> bool:
        excluded = column in ("label", "index", "touches_border") or column.startswith(("centroid_", "bbox_"))
        return not excluded and not column.endswith(("_um", "_um2"))  # the same lengths in µm

    def cells(self, image: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        from napari_reddino import measure_cells

        # among all the smear's cells: a cell's outline_shared depends on its neighbours, annotated or not
        table = measure_cells(labels, image).set_index("label", drop=False).loc[ids]
        return table[[c for c in table.columns if self.is_feature(c)]].to_numpy(np.float32)

    def crops(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise EvalDataError("measurements need smears with point labels (--format points), not crops")


def random_init(embedder, seed: int = 0):
    """An Embedder of ``embedder``'s architecture with freshly initialised weights (timm's own
    initialisation, LayerScale included), the baseline a pretrained model must beat."""
    import torch

    from napari_reddino.embedding import Embedder
    from napari_reddino.models import LoadedModel

    module = copy.deepcopy(embedder.model).cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "init_weights"):
            module.init_weights()
        else:
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
    loaded = LoadedModel(f"{embedder.model_id} (random init, seed {seed})", module, embedder.input_size,
                         embedder.mean, embedder.std)
    return Embedder(loaded, device=embedder.device, dtype=embedder.dtype)


# --- layouts --------------------------------------------------------------------------------


def detect_format(root: str | os.PathLike) -> Format:
    """``points`` when the folder holds Chula-style label files (``Label/``, a ``.txt`` beside an
    image, or ``../Label/<n>.txt`` for Chula's ``Dataset/`` itself), else ``crops``."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(not_a_folder(root))
    images = (path for path in root.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    has_labels = (root / LABEL_FOLDER).is_dir() or any(  # Chula's Dataset/ itself, with ../Label/<n>.txt
        path.with_suffix(".txt").is_file() or (root.parent / LABEL_FOLDER / f"{path.stem}.txt").is_file()
        for path in images)
    return "points" if has_labels else "crops"


def natural_key(path: Path) -> tuple:
    """Sort key that puts 2.jpg before 10.jpg."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)), str(path)


def _subsample_per_class(classes: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """A boolean mask keeping at most ``max_per_class`` random samples of each class."""
    keep = np.ones(len(classes), dtype=bool)
    if max_per_class is None:
        return keep
    rng = np.random.default_rng(seed)
    for value in np.unique(classes):
        members = np.flatnonzero(classes == value)
        if len(members) > max_per_class:
            keep[rng.choice(members, len(members) - max_per_class, replace=False)] = False
    return keep


def _progress(items, desc: str, show: bool):
    return tqdm(items, desc=desc, disable=not show, leave=False)


def crops_features(
    root: str | os.PathLike,
    extractors: Mapping[str, Extractor],
    *,
    max_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, FeatureSet], DataSummary]:
    """Features of ``root/<class>/*`` crops; classes in sorted order of their folder names. Crops
    laid out as ``root/<class>/<smear>/*`` carry their smear as their group (a split by image)."""
    root = Path(root)
    paths, classes, class_dirs = _crop_files(root)
    expected = "expected one folder of images per class, DATA/<class>/*.png"
    if root.is_dir() and detect_format(root) == "points":
        expected += " (this folder holds smears with point labels: use --format points)"
    if not paths:
        raise EvalDataError(f"no crops under {root}; {expected}")
    if len(set(classes)) < 2:
        raise EvalDataError(f"every crop under {root} is of one class, {class_dirs[classes[0]].name!r}; "
                            f"{expected}, two classes at least")
    keep = _subsample_per_class(np.array(classes), max_per_class, seed)
    chosen = [(path, target) for path, target, kept in zip(paths, classes, keep) if kept]
    summary = DataSummary()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in extractors}
    targets, groups = [], []
    for start in _progress(range(0, len(chosen), CROPS_PER_READ), f"crops (x{CROPS_PER_READ})", progress):
        images = []
        for path, target in chosen[start : start + CROPS_PER_READ]:
            try:
                images.append(read_image(path))
                targets.append(target)
                groups.append(crop_group(path, class_dirs[target]))
            except UnreadableImageError as error:
                summary.skipped.append((path, str(error)))
        for name, extractor in extractors.items():
            parts[name].append(np.asarray(extractor.crops(images), np.float32))
    summary.images = len(targets)
    if not targets:
        raise EvalDataError(f"none of the crops under {root} is readable")
    present = sorted(set(targets))
    names = tuple(class_dirs[c].name for c in present)
    remapped = np.searchsorted(present, targets).astype(np.int64)
    grouped = np.array(groups) if None not in groups else None
    return {name: FeatureSet(np.concatenate(parts[name]), remapped, names, grouped) for name in extractors}, summary


def _crop_files(root: Path) -> tuple[list[Path], list[int], list[Path]]:
    """The crops under ``root``, each one's class (an index into the class folders), and the class folders."""
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    paths, classes = [], []
    for index, folder in enumerate(class_dirs):
        try:
            found = find_images(folder)
        except EmptyDatasetError:
            continue
        paths += found
        classes += [index] * len(found)
    return paths, classes, class_dirs


def crop_group(path: Path, class_dir: Path) -> str | None:
    """The smear of a crop at ``<class>/<smear>/...``; None for one directly in its class folder."""
    parts = path.relative_to(class_dir).parts
    return parts[0] if len(parts) > 1 else None


def crops_are_grouped(root: str | os.PathLike) -> bool:
    """Whether every crop under ``root`` lies in a smear's (or a patient's) folder inside its
    class folder, and a split by those folders keeps every class in training: some folder holds
    several classes, or every class has two folders or more (``<class>/<patient>/``). A folder
    per class (``<class>/<class>_crops/``) is no smear: a split by it would test each class on a
    classifier that never saw it."""
    paths, classes, class_dirs = _crop_files(Path(root))
    groups = [crop_group(path, class_dirs[c]) for path, c in zip(paths, classes)]
    if not paths or None in groups:
        return False
    classes_of: dict[str, set[int]] = {}
    folders_of: dict[int, set[str]] = {}
    for group, c in zip(groups, classes):
        classes_of.setdefault(group, set()).add(c)
        folders_of.setdefault(c, set()).add(group)
    return (any(len(held) > 1 for held in classes_of.values())
            or len(folders_of) > 1 and all(len(folders) > 1 for folders in folders_of.values()))


@dataclass(frozen=True)
class PointLabels:
    image: Path
    points: np.ndarray  # (n, 2) row, col (the files hold x, y)
    classes: np.ndarray  # (n,) int64 class ids


def read_point_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(points (n, 2) as row, col; class ids (n,))`` from an ``x y class_id`` file: one line a
    cell; blank lines, ``#`` comments and a first line of names (``x y class_id``) are passed
    over, and a byte-order mark (Windows Notepad's) too. A line that is none of these, a class
    id that is no whole number of 0 or more or a position that is no finite number is refused
    with its file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 or ASCII text (saved as 'Unicode', UTF-16?); save it as UTF-8") from None
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields or (number == 1 and not any(_numbers([field]) for field in fields[:3])):
            continue  # blank, a comment, or the column names
        if len(fields) < 3 or not _numbers(fields[:3]):
            raise ValueError(f"{path}, line {number}: {line.strip()!r} is not 'x y class_id'")
        x, y, class_id = map(float, fields[:3])
        if not (np.isfinite([x, y, class_id]).all() and 0 <= class_id < 2**31 and class_id == int(class_id)):
            raise ValueError(f"{path}, line {number}: {line.strip()!r} needs a finite x and y and a class id that is "
                             "a whole number from 0")
        values.append((y, x, class_id))
    table = np.array(values, dtype=np.float64).reshape(-1, 3)
    return table[:, :2], table[:, 2].astype(np.int64)


def _numbers(fields: list[str]) -> bool:
    try:
        [float(field) for field in fields]
    except ValueError:
        return False
    return True


def point_label_files(root: str | os.PathLike, limit_images: int | None = None) -> list[PointLabels]:
    """The annotated smears under ``root`` in natural order (the first ``limit_images``)."""
    root = Path(root)
    try:
        images = sorted(find_images(root), key=natural_key)
    except EmptyDatasetError as error:
        raise EvalDataError(str(error)) from None
    annotated = []
    for image in images:
        beside = image.with_suffix(".txt")
        in_label_folder = image.parent.parent / LABEL_FOLDER / f"{image.stem}.txt"
        label_file = in_label_folder if in_label_folder.is_file() else beside
        if label_file.is_file():
            try:
                points, classes = read_point_labels(label_file)
            except ValueError as error:
                raise EvalDataError(str(error)) from None
            annotated.append(PointLabels(image, points, classes))
        if limit_images is not None and len(annotated) >= limit_images:
            break
    if not annotated:
        raise EvalDataError(
            f"no smear under {root} has point labels: expected Dataset/<n>.jpg with Label/<n>.txt, or <n>.txt "
            "beside each image, one 'x y class_id' line per cell"
        )
    return annotated


def class_name(class_id: int) -> str:
    return CHULA_CLASSES[class_id] if 0 <= class_id < len(CHULA_CLASSES) else f"class {class_id}"


def points_features(
    root: str | os.PathLike,
    extractors: Mapping[str, Extractor],
    *,
    limit_images: int | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    pixel_size_um: float | None = None,
    progress: bool = True,
) -> tuple[dict[str, FeatureSet], DataSummary]:
    """Features of the annotated cells of the smears under ``root`` (see the module's docstring).

    ``max_per_class`` draws the points before matching (so only smears with a drawn point are
    segmented); a smear's points are matched all together, so a drawn point keeps the cell it
    would have in a full run.
    """
    from napari_reddino import cells_at_points, segment_cells

    root = Path(root)
    smears = point_label_files(root, limit_images)
    drawn = np.split(
        _subsample_per_class(np.concatenate([s.classes for s in smears]), max_per_class, seed),
        np.cumsum([len(s.classes) for s in smears])[:-1],
    )
    summary = DataSummary()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in extractors}
    class_ids, groups = [], []
    for smear, keep in _progress(list(zip(smears, drawn)), "smears", progress):
        if not keep.any():
            continue
        try:
            image = read_image(smear.image)
            labels = segment_cells(image, pixel_size_um=pixel_size_um)
        except (UnreadableImageError, ValueError) as error:  # ImageInputError, or a cell larger than this image
            summary.skipped.append((smear.image, str(error)))
            continue
        summary.images += 1
        cell_of_point = cells_at_points(labels, smear.points)
        chosen = keep & (cell_of_point > 0)
        summary.points += int(keep.sum())
        summary.matched += int(chosen.sum())
        if not chosen.any():
            continue
        for name, extractor in extractors.items():
            parts[name].append(np.asarray(extractor.cells(image, labels, cell_of_point[chosen]), np.float32))
        class_ids.append(smear.classes[chosen])
        groups += [str(smear.image.relative_to(root))] * int(chosen.sum())
    if not class_ids:
        raise EvalDataError(f"no point label under {root} fell on a segmented cell")
    all_ids = np.concatenate(class_ids)
    present = np.unique(all_ids)
    names = tuple(class_name(int(c)) for c in present)
    targets = np.searchsorted(present, all_ids).astype(np.int64)
    sets = {
        name: FeatureSet(np.concatenate(parts[name]), targets, names, np.array(groups)) for name in extractors
    }
    return sets, summary


def data_key(root: str | os.PathLike, **settings) -> str:
    """A digest of the images and label files under ``root`` (names, sizes, modification times),
    and in the ``Label/`` beside it (Chula's ``Dataset/`` given as the data), and the settings;
    other files do not count, such as the results and feature caches of an evaluation whose
    ``--json`` lies in the data folder, which would otherwise change the key."""
    digest = hashlib.blake2b(digest_size=8)
    root = Path(root).resolve()
    digest.update(repr((str(root), sorted(settings.items()))).encode())
    beside = root.parent / LABEL_FOLDER
    labels_beside = sorted(beside.glob("*.txt")) if settings.get("format") == "points" and beside.is_dir() else []
    for path in [*sorted(root.rglob("*")), *labels_beside]:
        if path.suffix.lower() in (*IMAGE_SUFFIXES, ".txt") and path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(root.parent)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
