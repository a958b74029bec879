"""``reddino-train prepare``: from folders of smear images to a training set of image files.

Two kinds of sample, as PNG files in one folder per smear, ``OUT/<smear>/<n>.png``:

``cells``
    one square crop per red cell (segmented with :func:`napari_reddino.segment_cells`, cut
    with :func:`napari_reddino.cell_crops`: the cell's box plus a context margin, resampled to
    ``size``, by default as the plugin cuts cells to embed them: neighbours blanked, one window
    size per smear); cells cut by the image border or the edge of the field are left out, their
    crops would be partial.
    ``<n>`` is the cell's label id.
``patches``
    non-overlapping ``patch_size`` tiles of the smear, as RedDino was trained (resampled to
    ``size`` when given); the partial tiles along the right and bottom edges are left out.
    ``<n>`` is the tile's number in row-major order.

``OUT/index.csv`` lists every sample (file, source image, label, centroid, bounding box in
source pixels). The run is resumable: a smear is recorded (folder and source path) in the
journal ``OUT/done.txt``, and a digest of its file in ``OUT/digests.txt``, after its files and
its rows (``OUT/<smear>/index.csv``) are written; a re-run skips it (also where its folder was
renamed or moved since, found by file name and digest), and a smear cut short is redone from
scratch (each smear's folder is built as ``OUT/.partial-<smear>`` and renamed into place whole).
``index.csv`` is assembled from the per-smear rows at the end of every run, interrupted or not.
Files that cannot be read are skipped, listed in ``OUT/skipped.txt`` and retried on the next
run. ``OUT/prepare.json`` keeps the settings, so a re-run with other settings cannot mix two
kinds of sample in one folder. One prepare at a time writes to a folder
(``OUT/.reddino-prepare.lock``, as :mod:`~reddino_train.run_lock` holds a training run's); a
second is refused until the first ends.
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from napari_reddino.crop_windows import (
    DEFAULT_CROP_MODE,
    DEFAULT_CROP_SCALE,
    DEFAULT_MARGIN,
    CropMode,
    CropScale,
    margin_refusal,
)
from napari_reddino.segmentation import pixel_size_refusal
from napari_reddino.wording import shown

from .choices import MODES, Mode
from .data import EmptyDatasetError, UnreadableImageError, find_images, read_image, to_eight_bit
from .files import write_atomic
from .run_lock import hold_prepare_folder

INDEX_NAME, JOURNAL_NAME, SKIPPED_NAME, SETTINGS_NAME = "index.csv", "done.txt", "skipped.txt", "prepare.json"
DIGESTS_NAME = "digests.txt"  # key and content digest per smear: beside the journal, which older versions read
DIGEST_SPAN = 64 * 1024
# control characters and what else splits a line (Python's splitlines); bytes that are not UTF-8
_UNWRITABLE = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029\udc80-\udcff]")
PARTIAL = ".partial-"  # OUT/.partial-<smear>: a smear's folder while it is written
SYNC_THREADS = 8  # crops synced at once
MAX_SIZE, MAX_PATCH = 2048, 8192  # px: a crop's side, a patch's side
INDEX_COLUMNS = (
    "file", "source", "label", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
)


class PrepareError(ValueError):
    """Settings or folders that cannot make a training set."""


ONLY_IN_MODE = {"patch_size": "patches", "margin": "cells", "crop_mode": "cells", "crop_scale": "cells",
                "pixel_size_um": "cells"}  # the settings that only one mode uses


DEFAULT_CELL_SIZE = 224  # px: RedDino's crops
# what a folder was cut with where its prepare.json lacks a crop setting (written before it
# existed), and the defaults until 2026-12-07, when prepare took the plugin's
CROPS_BEFORE = {"crop_mode": "context", "crop_scale": "cell"}


@dataclass(frozen=True)
class PrepareSettings:
    mode: Mode = "cells"
    size: int | None = None  # output side in px; None: 224 for cells, patch_size for patches
    patch_size: int = 224
    margin: float = DEFAULT_MARGIN  # context around a cell, as a fraction of its box's longer side
    # None: the folder's where it holds smears already, else the plugin's (masked, smear)
    crop_mode: CropMode | None = None
    crop_scale: CropScale | None = None  # window per cell, or one per smear (cell size shows)
    pixel_size_um: float | None = None  # fixes the expected cell size for segmentation

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PrepareError(f"mode {self.mode!r}; choose one of {', '.join(MODES)}")
        defaults = PrepareSettings.__dataclass_fields__
        unused = [f"--{name.replace('_', '-')}" for name, mode in ONLY_IN_MODE.items()
                  if mode != self.mode and getattr(self, name) != defaults[name].default]
        if unused:  # it would do nothing, yet a later run giving it otherwise would be refused
            raise PrepareError(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} for --mode "
                               f"{'patches' if self.mode == 'cells' else 'cells'} only, not for --mode {self.mode}")
        if (self.size is not None and self.size < 1) or self.patch_size < 1:
            raise PrepareError("size and patch size must be positive numbers of pixels")
        for option, value, largest in (("--size", self.size, MAX_SIZE), ("--patch-size", self.patch_size, MAX_PATCH)):
            if value is not None and value > largest:  # a crop of 100,000 px asked for 14.7 TB
                raise PrepareError(f"{option} {value} px; give at most {largest:,} (RedDino's crops are 224)")
        if refusal := margin_refusal(self.margin):
            raise PrepareError(f"--margin {self.margin}: {refusal}")
        if self.pixel_size_um is not None and (refusal := pixel_size_refusal(self.pixel_size_um)):
            raise PrepareError(f"--pixel-size-um {self.pixel_size_um:g}: {refusal}")

    @property
    def output_size(self) -> int | None:
        """Side of the written images; None keeps the tiles as they are."""
        return self.size if self.size is not None or self.mode == "patches" else DEFAULT_CELL_SIZE


@dataclass
class PrepareReport:
    written: list[str] = field(default_factory=list)  # smears processed in this run
    already_done: list[str] = field(default_factory=list)  # smears found in the journal
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    samples_written: int = 0
    samples_total: int = 0  # rows of index.csv


@dataclass(frozen=True)
class Smear:
    key: str  # its folder name under OUT, unique in OUT
    path: Path


@dataclass(frozen=True)
class Samples:
    """What one smear gives: uint8 RGB images (n, h, w, 3) and their index rows."""

    names: list[int]
    images: np.ndarray
    centroids: np.ndarray  # (n, 2) row, col
    boxes: np.ndarray  # (n, 4) min row, min col, max row, max col (max exclusive)


def find_smears(sources: Iterable[str | os.PathLike], out: Path, done: dict[str, str] | None = None,
                contents: dict[str, str] | None = None) -> list[Smear]:
    """Every image file under the sources (files given count as themselves, wherever they lie),
    except those found in ``out``.

    A smear's key is its file stem, or, when another smear has that stem already (in this run
    or in ``done``, the journal's key -> source path), the stem and a hash of its path. A smear
    in ``done`` keeps its key, so listing other sources on a later run changes no key; so does
    one whose folder moved or was copied (renamed, mounted elsewhere, copied to scratch), found
    by its file name and ``contents`` digest (the journal's key -> :func:`content_digest`) where
    its recorded path is not among the sources.
    """
    paths: list[Path] = []
    out = out.resolve()
    for source in map(Path, sources):
        if source.is_file():
            paths.append(source)
            continue
        try:
            images = find_images(source)
        except EmptyDatasetError as error:
            raise PrepareError(str(error)) from None
        inside = {path for path in images if out in path.resolve().parents}  # a set: resumed, OUT holds 1 M crops
        paths += [path for path in images if path not in inside]
        if inside and len(inside) == len(images):
            raise PrepareError(f"every image under {source} lies inside the output folder {out}, where the crops go "
                               "(and which is never read as smears): give --out a folder outside the smears' folder")
    if not paths:
        raise PrepareError("no smear images in the sources")
    done, contents = done or {}, contents or {}
    keys = {source: key for key, source in done.items() if source}  # resolved path -> key
    # moved, or copied (to a cluster's scratch) and listed instead of the original: known by name
    # and content, not cut a second time (an original listed beside its copy is a smear of its own)
    listed = {str(path.resolve()) for path in paths}
    moved = {(Path(done[key]).name, digest): key for key, digest in contents.items()
             if done.get(key) and done[key] not in listed}
    taken, seen, smears = {key.casefold() for key in keys.values()}, set(), []
    for path in paths:
        source = str(path.resolve())
        if source in seen:
            continue  # listed twice
        seen.add(source)
        if source not in keys:
            match = (path.name, _digest_or_none(path)) if moved else None
            found = moved.get(match)
            if found and Path(done[found]).exists() and not filecmp.cmp(done[found], path, shallow=False):
                found = None  # the digest spans the ends of the file: a copy must match it whole
            if found:
                del moved[match]
            keys[source] = found or _new_key(path.stem, source, done, taken)
            taken.add(keys[source].casefold())
        smears.append(Smear(keys[source], path))
    return smears


def _new_key(stem: str, source: str, done: dict[str, str], taken: set[str]) -> str:
    """The stem, unless it cannot name a folder of its own in OUT (".", "..", a hidden name, one
    of prepare's files, a tab, a line break or bytes that are not UTF-8, which no index or journal
    line holds) or another smear has it, letter case aside (many file systems ignore it; ``taken``
    is case-folded): then the stem, less leading dots and such characters, and a hash of the
    resolved path."""
    # a journal written before sources were recorded names its smears by stem alone
    own_files = {name.casefold() for name in (INDEX_NAME, JOURNAL_NAME, SKIPPED_NAME, SETTINGS_NAME, DIGESTS_NAME)}
    plain = _UNWRITABLE.sub("_", stem).lstrip(".")
    if plain == stem and stem.casefold() not in taken | own_files and done.get(stem, "") == "":
        return stem
    return f"{plain or 'smear'}-{hashlib.sha1(source.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _smears_to_write(sources: Sequence[str | os.PathLike], out: Path,
                     ) -> tuple[dict[str, str], dict[str, str], list[Smear]]:
    """The journal (finished smears' sources and digests) and the smears, or :class:`PrepareError`
    where a smear's folder would replace files prepare did not write."""
    done, contents = _read_journal(out)
    smears = find_smears(sources, out, done, contents)
    if foreign := _not_written_by_prepare(out, smears, done):
        raise PrepareError(f"{', '.join(map(str, foreign[:3]))}{' and others' if len(foreign) > 3 else ''} "
                           f"{'is' if len(foreign) == 1 else 'are'} where the crops of a smear go, and "
                           f"{'holds' if len(foreign) == 1 else 'hold'} files that prepare did not write; move "
                           f"{'it' if len(foreign) == 1 else 'them'}, or give --out an empty folder")
    return done, contents, smears


def _not_written_by_prepare(out: Path, smears: Sequence[Smear], done: dict[str, str]) -> list[Path]:
    """The paths in ``out`` where a smear's folder would go that hold something prepare does not
    write there (a file, a folder of one's own): they would be replaced, so they are refused."""
    def prepares(folder: Path) -> bool:
        return folder.is_dir() and all(
            entry.is_file() and (entry.name == INDEX_NAME or re.fullmatch(r"\d+\.png", entry.name))
            for entry in folder.iterdir())

    return [out / smear.key for smear in smears
            if smear.key not in done and (out / smear.key).exists() and not prepares(out / smear.key)]


def prepare(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: PrepareSettings = PrepareSettings(),
    *,
    progress: bool = True,
) -> PrepareReport:
    """Write the training set of ``sources`` to ``out`` (resuming a previous run there)."""
    out = Path(out)
    _smears_to_write(sources, out)  # before anything is written: a failed start leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    with hold_prepare_folder(out):
        return _prepare_held(sources, out, settings, progress)


def _prepare_held(sources: Sequence[str | os.PathLike], out: Path, settings: PrepareSettings,
                  progress: bool) -> PrepareReport:
    """:func:`prepare` once no other prepare writes to ``out``: the journal is read again."""
    done, contents, smears = _smears_to_write(sources, out)
    settings = _settled(out, settings, bool(done))
    _check_settings(out, settings, bool(done))  # first: a refused run leaves the journal as it was
    moved = {smear.key: str(smear.path.resolve()) for smear in smears
             if done.get(smear.key) and done[smear.key] != str(smear.path.resolve())}
    if moved:  # found by name and digest: known by their new paths from now on
        done.update(moved)
        _write_journal(out, done)
    report = PrepareReport()
    cut = _cell_samples if settings.mode == "cells" else _patch_samples
    try:
        with tqdm(smears, desc="prepare", unit="smear", disable=not progress) as bar:
            for smear in bar:
                if smear.key in done and (out / smear.key / INDEX_NAME).is_file():
                    report.already_done.append(smear.key)
                    continue
                try:
                    if len(f"{smear.path.resolve()}.".splitlines()) > 1:  # "." : a break at the end splits too
                        raise _Unusable("its path holds a line break, which the journal of smears done cannot "
                                        "hold; rename it")
                    image = _read(smear.path)
                    samples = cut(image, settings)
                except _Unusable as error:
                    report.skipped.append((smear.path, " ".join(str(error).split())))  # one line per file
                    continue
                except MemoryError:  # a huge field: the others go on, and a re-run does not die on it again
                    report.skipped.append((smear.path, "out of memory (too large a field at this --size?)"))
                    continue
                _write_smear(out, smear, samples)
                done[smear.key] = str(smear.path.resolve())  # a smear redone keeps its place
                if (digest := _digest_or_none(smear.path)) is not None:
                    contents[smear.key] = digest
                    write_atomic(out / DIGESTS_NAME, "".join(f"{key}\t{value}\n" for key, value in contents.items()))
                _write_journal(out, done)
                report.written.append(smear.key)
                report.samples_written += len(samples.names)
                bar.set_postfix(samples=report.samples_written, skipped=len(report.skipped))
    finally:
        report.samples_total = _write_index(out, done)
        write_atomic(out / SKIPPED_NAME, "".join(f"{on_one_line(path)}\t{reason}\n" for path, reason in report.skipped))
    return report


class _Unusable(Exception):
    """A smear file that cannot be read or is not a smear image."""


def _read(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except UnreadableImageError as error:
        raise _Unusable(str(error)) from None


def _cell_samples(image: np.ndarray, settings: PrepareSettings) -> Samples:
    from napari_reddino import cell_crops, segment_cells  # torch loads here
    from napari_reddino.cell_lookup import cell_centres
    from napari_reddino.image_input import fit_stain_model
    from napari_reddino.measurements import cut_by_field_edge

    try:
        labels = segment_cells(image, pixel_size_um=settings.pixel_size_um)
    except ValueError as error:  # ImageInputError, or a cell larger than this image at this pixel size
        raise _Unusable(str(error)) from None
    ids, crops = cell_crops(
        image, labels, settings.output_size, mode=settings.crop_mode, margin=settings.margin, scale=settings.crop_scale
    )
    slices = ndimage.find_objects(labels)
    boxes = np.array(
        [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in (slices[i - 1] for i in ids)], dtype=np.int64
    ).reshape(-1, 4)
    inside = ~cut_by_field_edge(labels, ids, boxes, fit_stain_model(image).outside_field(image))
    rows, cols = cell_centres(labels)
    centroids = np.stack([rows[ids - 1], cols[ids - 1]], axis=1)
    pixels = to_eight_bit(crops[inside])
    return Samples(ids[inside].tolist(), pixels, centroids[inside], boxes[inside])


def _patch_samples(image: np.ndarray, settings: PrepareSettings) -> Samples:
    from napari_reddino.crops import as_rgb

    try:
        rgb = as_rgb(image)
    except ValueError as error:
        raise _Unusable(str(error)) from None
    side = settings.patch_size
    rows, cols = rgb.shape[0] // side, rgb.shape[1] // side
    if not rows * cols:
        raise _Unusable(f"{rgb.shape[1]}x{rgb.shape[0]} px holds no {side} px patch")
    tops, lefts = (grid.ravel() * side for grid in np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"))
    boxes = np.stack([tops, lefts, tops + side, lefts + side], axis=1).reshape(-1, 4)
    rgb8 = to_eight_bit(rgb)
    size = settings.output_size or side
    tiles = [rgb8[top : top + side, left : left + side] for top, left in boxes[:, :2]]
    if size != side:
        tiles = [_resized(tile, size) for tile in tiles]
    pixels = np.stack(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)
    centroids = (boxes[:, :2] + boxes[:, 2:]) / 2 - 0.5  # pixel centres, as cell centroids are
    return Samples(list(range(len(boxes))), pixels, centroids, boxes)


def _resized(tile: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def _write_smear(out: Path, smear: Smear, samples: Samples) -> None:
    """The smear's images and rows, written in ``OUT/.partial-<smear>`` (what a cut-short run left
    there goes first) and then renamed to its folder, which it replaces. Each image is on disk
    before the rename (and so before the journal's line): else a power cut could leave a smear
    journalled as done with empty images, which no re-run would cut again."""
    folder, partial = out / smear.key, out / f"{PARTIAL}{smear.key}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    files = [partial / f"{name}.png" for name in samples.names]
    for file, pixels in zip(files, samples.images):
        Image.fromarray(pixels).save(file)
    _sync(files)
    rows = [
        {
            "file": f"{smear.key}/{name}.png",
            "source": shown(smear.path),
            "label": name,
            "centroid_y": round(float(centroid[0]), 2),
            "centroid_x": round(float(centroid[1]), 2),
            **dict(zip(INDEX_COLUMNS[5:], map(int, box))),
        }
        for name, centroid, box in zip(samples.names, samples.centroids, samples.boxes)
    ]
    write_atomic(partial / INDEX_NAME, _csv_text(rows))
    if folder.exists():  # its own, from a run cut short before its journal line (checked up front)
        shutil.rmtree(folder)
    partial.rename(folder)


def _sync(files: list[Path]) -> None:
    """Put ``files`` on disk, several at a time: where each sync is a round trip to a server
    (NFS, Lustre) they overlap. On this machine's disk it cost 0-6 % of prepare's time, about
    its run-to-run spread (benchmarks/RESULTS.md, "Crops on disk before their journal line")."""
    def sync(file: Path) -> None:
        with open(file, "rb+") as handle:  # Windows syncs only a file open for writing
            os.fsync(handle.fileno())

    with ThreadPoolExecutor(SYNC_THREADS) as pool:
        list(pool.map(sync, files))


def on_one_line(path: str | os.PathLike) -> str:
    """``path`` as one field of a line: :func:`~napari_reddino.wording.shown`, and its tabs,
    line breaks and other control characters escaped (``a\\tb.png``)."""
    return _UNWRITABLE.sub(lambda found: found[0].encode("unicode_escape").decode(), shown(path))


def _csv_text(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _write_index(out: Path, done: dict[str, str]) -> int:
    """``out/index.csv``: the rows of every finished smear, in journal order; returns their number."""
    lines = [",".join(INDEX_COLUMNS) + "\n"]
    for key in done:
        part = out / key / INDEX_NAME
        if part.is_file():
            lines += part.read_text(encoding="utf-8").splitlines(keepends=True)[1:]
    write_atomic(out / INDEX_NAME, "".join(lines))
    return len(lines) - 1


def _write_journal(out: Path, done: dict[str, str]) -> None:
    """One ``key<TAB>source`` line a smear; a source's bytes that are not UTF-8 are kept as they
    are, so it reads back as the path it is."""
    lines = "".join(f"{key}\t{source}\n" for key, source in done.items())
    write_atomic(out / JOURNAL_NAME, lines.encode("utf-8", "surrogateescape"))


def _read_journal(out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Finished smears: key -> resolved source path ("" in a journal from before sources were
    kept), and key -> content digest (none in a journal from before digests were kept)."""
    path = out / JOURNAL_NAME
    lines = path.read_text("utf-8", "surrogateescape").splitlines() if path.is_file() else []  # names may hold spaces
    done = dict(line.partition("\t")[::2] for line in lines)
    digests = out / DIGESTS_NAME
    lines = digests.read_text(encoding="utf-8").splitlines() if digests.is_file() else []
    contents = {key: digest for key, _, digest in (line.rpartition("\t") for line in lines) if key in done}
    return done, contents


def _digest_or_none(path: Path) -> str | None:
    """:func:`content_digest`, or None for a file that cannot be read (skipped when it is cut)."""
    try:
        return content_digest(path)
    except OSError:
        return None


def content_digest(path: Path) -> str:
    """A digest of a smear file's size and its first and last 64 KiB: the same file wherever it
    is moved or copied, read in a moment however large the smear."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(DIGEST_SPAN))
        handle.seek(max(size - DIGEST_SPAN, 0))
        digest.update(handle.read(DIGEST_SPAN))
    return digest.hexdigest()[:16]


def saved_settings(out: Path) -> dict:
    """The settings ``out/prepare.json`` records, those added since it was written as they were
    then; an error where it cannot be read."""
    saved = json.loads((out / SETTINGS_NAME).read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
        raise ValueError(f"{out / SETTINGS_NAME} holds no settings")
    return asdict(PrepareSettings()) | CROPS_BEFORE | saved


def _settled(out: Path, settings: PrepareSettings, any_done: bool) -> PrepareSettings:
    """``settings`` with a crop setting left out (None) as the folder's, where it holds smears cut
    already (a run resumed after an upgrade goes on as it began), else as the plugin cuts cells."""
    if settings.mode != "cells":
        return settings
    saved = saved_settings(out) if any_done and (out / SETTINGS_NAME).is_file() else {}
    plugin = {"crop_mode": DEFAULT_CROP_MODE, "crop_scale": DEFAULT_CROP_SCALE}
    return replace(settings, **{name: saved.get(name) or plugin[name] for name in plugin
                                if getattr(settings, name) is None})


def _check_settings(out: Path, settings: PrepareSettings, any_done: bool) -> None:
    """Record the settings of a new folder, or refuse others than those its smears were cut with
    (a folder none was written to yet, as a run stopped at its first smear leaves, takes new ones)."""
    path = out / SETTINGS_NAME
    wanted = asdict(settings)
    if path.is_file() and any_done:
        # a setting added since the folder was made had its default then; one the mode does not use
        # (which earlier versions took and ignored) is no difference
        saved = saved_settings(out)
        for name, mode in ONLY_IN_MODE.items():
            if mode != settings.mode:
                saved[name] = wanted[name]
        saved, wanted = _as_cut(saved), _as_cut(wanted)
        if saved != wanted:
            changed = ", ".join(f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in wanted.items()
                                if saved.get(key) != value)
            raise PrepareError(
                f"{out} was prepared with other settings ({changed}); use another output folder, or "
                "delete this one to start afresh"
            )
    else:
        write_atomic(path, json.dumps(wanted, indent=2) + "\n")


def _as_cut(settings: dict) -> dict:
    """``settings`` with the default size spelt out (224 for cells; a patch's own for tiles):
    ``--size 224`` cuts what no ``--size`` did."""
    size = settings["size"]
    if size is None and settings["mode"] == "cells":
        size = DEFAULT_CELL_SIZE
    if settings["mode"] == "patches" and size == settings["patch_size"]:
        size = None
    return {**settings, "size": size}


def read_index(out: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``out/index.csv``."""
    with (Path(out) / INDEX_NAME).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))

