"""The cells layer a segmentation makes: the job a run carries, its worker, and how the layer
replaces an earlier one of the same smear or goes beside it, carrying the lab's labels over.

Shared by Segment cells and Embed cells ("segment first"), so both make the same cells layer.
"""

import time
from dataclasses import dataclass

import napari
import numpy as np
import pandas as pd
from napari.layers import Image, Labels

from ..cell_embeddings import METADATA_KEY, embeddings_of, image_digest, labels_digest
from ..cell_table import class_names
from ..cell_table import image_name as cell_image_name
from ..label_import import carry_manual_labels, manual_labels
from ..measurements import MEASUREMENT_COLUMNS, measure_cells
from ..segmentation import RBC_DIAMETER_UM, estimate_cell_diameter, iter_segment_cells, pixel_size_refusal
from ..wording import counted
from .job_widget import job_worker, place_above
from .smear_colours import coloured_smear, own_cells
from .smear_links import SOURCE_DIGEST, SOURCE_LAYER, of_image, placement

MEASURED_LABELS = "measured_labels"  # metadata: digest of the labels the layer's table was measured on
MEASURED_IMAGE = "measured_image"  # ... and of the pixels (colour, pallor); SOURCE_DIGEST in layers from before it
SEGMENTED_LABELS = "segmented_labels"  # metadata: digest of the labels as segmentation gave them
SEGMENTED_ELSEWHERE = "segmented_elsewhere"  # metadata: cells of another tool, tied to their smear when embedded
# metadata: the unique_id of the newer cells layer this one's labels went to (not its name: the
# user may rename it, and napari hands a removed layer's name to the next layer)
CARRIED_TO = "labels_carried_to"


@dataclass(frozen=True)
class SegmentJob:
    """What a run needs, once its worker returns, to build the cells layer."""

    image: Image  # the smear's layer: renamed while it is segmented, its cells take the new name
    placement: dict  # where the smear lay in the world when it was segmented (smear_links.placement)
    cell_diameter: float | None
    pixel_size_um: float | None
    started: float

    @classmethod
    def of(cls, image: Image, cell_diameter: float | None, pixel_size_um: float | None) -> "SegmentJob":
        """The job of segmenting ``image`` now, where it lies now."""
        return cls(image, placement(image), cell_diameter, pixel_size_um, time.perf_counter())

    @property
    def image_name(self) -> str:
        return self.image.name

    @property
    def layer_name(self) -> str:
        return f"{self.image_name} cells"


@job_worker
def segment_and_measure(pixels: np.ndarray, cell_diameter: float | None, pixel_size_um: float | None):
    if cell_diameter is not None:
        sizing = {"cell_diameter": cell_diameter}
    elif pixel_size_um:  # given so, a size that cannot be is refused in terms of the pixel size
        sizing, cell_diameter = {"pixel_size_um": pixel_size_um}, RBC_DIAMETER_UM / pixel_size_um
    else:
        cell_diameter = estimate_cell_diameter(pixels)  # estimated once, and recorded
        # ... unless larger than a tiny image, where estimating again costs nothing and is not a typed size
        sizing = {"cell_diameter": cell_diameter} if cell_diameter <= max(pixels.shape[:2]) else {}
    labels = yield from iter_segment_cells(pixels, **sizing)
    return labels, measure_cells(labels, pixels, pixel_size_um=pixel_size_um), cell_diameter, image_digest(pixels)


def unusable_pixel_size(pixel_size_um: float | None) -> str | None:
    """Why a smear's recorded pixel size (None: unknown) cannot be used, before any work that
    would measure with it, or None."""
    return pixel_size_refusal(pixel_size_um) if pixel_size_um else None


def _diameter_source(job: SegmentJob) -> str:
    if job.cell_diameter is not None:
        return "given"
    return "pixel size" if job.pixel_size_um is not None else "estimated from the image"


def measured_on(cells, labels_hash: str, image_hash: str) -> bool:
    """Whether the table of ``cells`` was measured on these labels and pixels (their digests)."""
    metadata = cells.metadata
    measured_image = metadata.get(MEASURED_IMAGE, metadata.get(SOURCE_DIGEST, image_hash))
    return metadata.get(MEASURED_LABELS) == labels_hash and measured_image == image_hash and "label" in cells.features


def add_cells_layer(viewer: napari.viewer.Viewer, labels: np.ndarray, table: pd.DataFrame, job: SegmentJob,
                    cell_diameter: float, image_hash: str) -> tuple[Labels, str]:
    """Add the cells layer, or replace the data and table of the one from an earlier run, unless
    that one holds labels the user gave its cells or cells edited by hand: then the new layer goes
    beside it, named by napari with a number, and the earlier one is left as it was, hidden, its
    labels carried over to the same cells of the new one (see :func:`carry_labels`). Returns the
    layer and what was carried over or kept, in words ("" when nothing was)."""
    digest = labels_digest(labels)  # a pass over the whole label image: once
    metadata = {
        "source_image": job.image_name,
        SOURCE_DIGEST: image_hash,  # another image of the same name, with other pixels, is another smear
        SOURCE_LAYER: str(job.image.unique_id),  # ... but the same layer, its pixels edited, is the same
        "cell_diameter_px": cell_diameter,
        "cell_diameter_from": _diameter_source(job),
        "pixel_size_um": job.pixel_size_um,
        MEASURED_LABELS: digest,
        MEASURED_IMAGE: image_hash,
        SEGMENTED_LABELS: digest,
    }
    layers = viewer.layers
    # by its link to the smear (a renamed smear keeps its cells); never another tool's cells, nor a layer
    # that has no record of being segmented here (masks a lab saved as "<smear> cells.tif"): they go on beside
    earlier = own_cells([layer for layer in layers if _segmented_here(layer)], job.image_name)
    same_smear = earlier is not None and of_image(earlier, job.image, image_hash)
    edited = same_smear and _edited_by_hand(earlier)
    if same_smear and not _has_manual_labels(earlier) and not edited:
        layer, before, was = earlier, pd.DataFrame(earlier.features), earlier.metadata
        # the labels and pixels its table and embeddings were made from: both hold
        same_cells = all(was.get(key) == value for key, value in (
            (SEGMENTED_LABELS, digest), (MEASURED_LABELS, digest), (MEASURED_IMAGE, image_hash))) and "label" in before
        # ... and measured at the same pixel size: so does what the head predicted from them, and the lab's columns
        measured_alike = same_cells and was.get("pixel_size_um") == job.pixel_size_um
        layer.data = labels
        _forget_strokes(layer)
        if measured_alike:
            kept = ["label", *(column for column in before.columns if column not in MEASUREMENT_COLUMNS)]
            layer.features = table.merge(before[kept], on="label", how="left")
            layer.metadata = {**{key: value for key, value in was.items() if key != CARRIED_TO}, **metadata}
        else:
            layer.features = table
            layer.metadata = {**metadata, METADATA_KEY: was[METADATA_KEY]} if same_cells and METADATA_KEY in was else metadata
        for key, value in job.placement.items():
            setattr(layer, key, value)
        layer.visible = True  # it may have been hidden when its labels went to a newer layer
        carried = carry_labels(viewer, layer, job, image_hash)
        if not measured_alike and "predicted_class" in before and (class_names(before, "predicted_class") != "").any():
            cleared = "the head's predictions were cleared: " + (
                "the cells were measured at another pixel size (apply the head again)" if same_cells
                else "the cells changed (embed them and apply the head again)")
            carried = f"{carried}; {cleared}" if carried else cleared
        return layer, carried
    layer = viewer.add_labels(
        labels, name=job.layer_name, features=table, metadata=metadata, **job.placement
    )
    layer.contour = 2
    # Right above its smear, its earlier cells and their map colours, not over the other smears.
    # By name, not identity: a plugin's viewer hands out proxies of its layers.
    own = {other.name for other in layers if other.name != layer.name and (
        other.name == job.image_name or other.metadata.get("source_image") == job.image_name)}
    own |= {other.name for other in layers if coloured_smear(other) in own | {job.image_name}}
    if own:
        place_above(layers, layer, [other for other in layers if other.name in own][-1])
    carried = carry_labels(viewer, layer, job, image_hash)
    if edited and earlier.visible:  # not hidden by carrying its labels: it had none
        earlier.visible = False
        kept = f"{earlier.name!r}, its cells edited by hand since they were segmented, is kept as it was, hidden"
        return layer, f"{carried}; {kept}" if carried else kept
    return layer, carried


def _segmented_here(layer) -> bool:
    """Whether ``layer`` holds cells segmented by this plugin (it records the labels it gave)."""
    metadata = layer.metadata
    return not metadata.get(SEGMENTED_ELSEWHERE) and (SEGMENTED_LABELS in metadata or MEASURED_LABELS in metadata)


def _edited_by_hand(layer: Labels) -> bool:
    """Whether the cells of ``layer`` were painted, erased, split or merged since segmentation
    gave them (a layer of an older version knows only the labels it was measured on)."""
    segmented = layer.metadata.get(SEGMENTED_LABELS, layer.metadata.get(MEASURED_LABELS))
    return segmented is not None and segmented != labels_digest(np.asarray(layer.data))


def _forget_strokes(layer: Labels) -> None:
    """Empty the layer's undo history: napari keeps it across new data, and an undo would write
    a brush stroke on the old cells into the new ones. (Making a Labels layer read-only is what
    empties it.)"""
    editable = layer.editable
    layer.editable = False
    layer.editable = editable


def carry_labels(viewer: napari.viewer.Viewer, layer: Labels, job: SegmentJob, image_hash: str) -> str:
    """Give the cells of ``layer`` the manual labels of the same cells (found by place, as Import
    labels does) in the other labelled cells layers of its smear, the top one first, then hide
    those and mark them (:data:`CARRIED_TO`): the smear was segmented again, and its labels belong
    on its new cells. A marked layer gives nothing while the layer its labels went to is there,
    so a label cleared or changed since on that layer stays so. Says what was carried."""
    sources = [other for other in viewer.layers if isinstance(other, Labels) and other.name != layer.name
               and not coloured_smear(other) and carried_to(viewer, other) is None
               and cell_image_name(other) == job.image_name and other.data.shape == layer.data.shape
               and of_image(other, job.image, image_hash) and _has_manual_labels(other)]
    said = []
    for source in reversed(sources):
        report = carry_manual_labels(source, layer)
        carried, missed = report.written.get(str(layer.name), 0), report.missed.get(str(source.name), 0)
        source.visible = False
        source.metadata = {**source.metadata, CARRIED_TO: str(layer.unique_id)}
        said.append(f"{counted(carried, 'label')} of {source.name!r} carried over to the same cells"
                    + (f", {missed:,} not (those cells were split, merged or drawn otherwise)" if missed else "")
                    + (f", {counted(report.kept, 'cell')} kept the label of a layer above" if report.kept else "")
                    + f"; {source.name!r} is hidden")
    return "; ".join(said)


def carried_to(viewer: napari.viewer.Viewer, layer: Labels) -> Labels | None:
    """The newer cells layer that took ``layer``'s labels (:func:`carry_labels`), while it is open."""
    mark = layer.metadata.get(CARRIED_TO)
    return next((other for other in viewer.layers if mark is not None and str(other.unique_id) == mark), None)


def _has_manual_labels(layer: Labels) -> bool:
    return bool((manual_labels(layer.features) != "").any())


def embedded_cells_layers(viewer) -> list[Labels]:
    """The embedded cells layers to map: not one whose labels went to a newer layer of its smear
    that is still there (segmented again): its cells would count twice."""
    return [layer for layer in viewer.layers if isinstance(layer, Labels) and embeddings_of(layer) is not None
            and not segmented_again_as(viewer, layer)]


def segmented_again_as(viewer, layer) -> str | None:
    """The name of the newer cells layer that took ``layer``'s labels (see :func:`carry_labels`),
    if it is there."""
    newer = carried_to(viewer, layer)
    return None if newer is None else newer.name


def left_out_words(viewer) -> str:
    """Says which embedded cells layers the map leaves out, and why ("" when none)."""
    return "".join(f" {layer.name!r} is left out: it was segmented again as {newer!r} (embed that layer to map it)."
                   for layer in viewer.layers if isinstance(layer, Labels) and embeddings_of(layer) is not None
                   and (newer := segmented_again_as(viewer, layer)))
