"""Plugins > RedDino > Embed cells: one RedDino embedding per cell, kept on the cells layer.

The embeddings are stored in the cells Labels layer's metadata, keyed by label id, together
with a fingerprint of the image, the labels, the model and the crop settings (the layout is
described in :mod:`napari_reddino.cell_embeddings`). They therefore outlive the widget, and a
Run whose fingerprint equals the stored one says the embeddings are up to date and does
nothing; any other Run runs the model only on cells whose crop changed since the stored run
(after a brush stroke: the painted cell and the neighbours its window shows). Cells painted
while they are embedded keep the embeddings of the cells as they were, so the next Run is
short too; the Cell map refuses them until then. Read them with :func:`embeddings_of`::

    label_ids, embeddings, model_id = embeddings_of(viewer.layers["smear cells"])

When the image has no cells layer yet, "segment first" runs the Segment widget's worker and
adds the cells layer exactly as that widget does, then embeds its cells. "Every open smear"
does this for each image layer in turn (its own cells layer, else segmented first) and sums
up at the end; a cancel or a model that does not load stops the rest. The model is loaded
(cached per model, device and dtype) and the cells embedded in one worker; a model that
cannot be loaded is reported and changes nothing. Choosing a model whose config records how
its training cells were cut (``reddino-train export`` writes it) sets the crop settings to those;
Run reads the record again and takes it where no one chose the crops shown.
"""

import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog

from ..cell_embeddings import (
    METADATA_KEY,
    EmbeddedCells,
    changed_embeddings,
    crop_settings,
    crops_in_words,
    earlier_run,
    embeddings_of,
    fingerprint,
    image_digest,
    labels_digest,
    store_run,
    stored_fingerprint,
)
from ..cell_table import clear_predictions, remeasured, with_own_columns
from ..crop_windows import (
    CROP_MODES,
    CROP_SCALES,
    DEFAULT_CROP_MODE,
    DEFAULT_CROP_SCALE,
    DEFAULT_MARGIN,
    MAX_MARGIN,
    SMEAR_SCALE_CELLS,
    chosen_crops,
    valid_crops,
)
from ..embedding import DeviceError, Downloaded, Embedder, iter_load_embedder, list_devices
from ..image_input import ImageInputError
from ..label_geometry import cells_in_pieces
from ..measurements import measure_cells
from ..model_ids import readable_ids
from ..model_errors import ModelLoadError, UnknownModelError
from ..models import KNOWN_MODELS, cached_hub_revision, hub_id, trained_crops
from ..wording import counted, first_few
from .cells_layer import (
    MEASURED_IMAGE,
    MEASURED_LABELS,
    SEGMENTED_ELSEWHERE,
    SegmentJob,
    add_cells_layer,
    measured_on,
    segment_and_measure,
    unusable_pixel_size,
)
from .job_widget import JobWidget, job_worker, smear_pixels
from .smear_colours import is_map_colours, own_cells
from .smear_links import SOURCE_DIGEST, SOURCE_LAYER, level_0, of_image

__all__ = ["EmbedCellsWidget", "embeddings_of"]

SEGMENT_FIRST = "segment first"
MODEL_TOOLTIP = "A RedDino model, 'hf_hub:org/name', or a folder with config.json + model.safetensors."


@dataclass(frozen=True)
class _EmbedJob:
    """What a run needs, once its worker returns, to store the embeddings."""

    cells: Labels
    model: str
    image_hash: str  # the image_digest of the pixels embedded
    image: Image  # the smear's layer
    segmented: bool  # the cells layer was made by this run ("segment first")


@dataclass
class _Batch:
    """An "every open smear" run: the smears still to do, and what became of the others."""

    waiting: list[Image]
    total: int
    current: Image | None = None
    current_embedded: bool = False
    embedded: dict[str, int] = field(default_factory=dict)  # image name: cells embedded (not those kept)
    kept: int = 0  # cells whose embeddings were kept, their crops unchanged
    up_to_date: list[str] = field(default_factory=list)  # images whose embeddings were already current
    not_embedded: list[str] = field(default_factory=list)  # "<image>: <why>"
    stopped: str | None = None  # why the smears still waiting were not run


@dataclass(frozen=True)
class _LoadFailure:
    message: str


@job_worker
def _load_and_embed(model: str, device: str, pixels: np.ndarray, labels: np.ndarray, crops: dict | None,
                    measured: bool, pixel_size_um: float | None, digests: tuple[str, str],
                    reuse: EmbeddedCells | None, stop_download: threading.Event):
    """Yields :class:`Downloaded` while the model downloads (None while it loads: Cancel is
    looked at between two yields; ``stop_download``, which Cancel sets, stops a download), the
    loaded :class:`Embedder`, then ``(done, total)`` cells; returns ``(run, table, fingerprint,
    embedded, crops, split)``: the
    :class:`EmbeddedCells` (cells whose crop is as in ``reuse`` keep its embedding), ``table``
    the cells' measurements unless the layer's table was ``measured`` on these very labels and pixels (else
    they were made by another tool, or painted since), then None; ``fingerprint`` of the image
    and labels with the model as loaded (a Hub model downloaded now is known by its commit only
    from now on); ``embedded``, the :func:`labels_digest` of the labels embedded; ``crops``, those
    the cells were cut with: as given, or None for the loaded model's :attr:`Embedder.crops` (a Hub
    model downloaded now tells how its training cells were cut only now); ``split``, the ids of
    cells left in pieces by hand (an eraser across one), looked for only where the labels are
    measured again (painted since they were measured).

    ``labels`` are the layer's own: copied first thing, here rather than on the GUI thread (2.3 s
    for 133 Mpx), so that painting during the run does not change what is embedded. A stroke
    made between Run and the copy makes the copy's digest differ from the one ``digests`` holds
    (image, labels at Run): the copy's is the one that counts, even if the stroke is undone."""
    labels = labels.copy()
    image_hash, digest = digests
    if (embedded := labels_digest(labels)) != digest:  # painted since Run: these labels are measured too
        measured, digest = False, embedded
    try:
        embedder = yield from iter_load_embedder(model, device=device, stop=stop_download)
    except UnknownModelError as error:  # the library's message names its API; say what this widget offers
        if Path(model).expanduser().is_file():
            return _LoadFailure(str(error))  # a bare weights file: that message names the folder needed
        return _LoadFailure(f"No model {model!r}: it is neither a known model nor a model folder on this computer. "
                            f"Choose {', '.join(KNOWN_MODELS)} in the list, type hf_hub:org/name for a model on the "
                            "Hugging Face Hub, or use Browse… for a model folder (config.json + model.safetensors).")
    except (ModelLoadError, DeviceError) as error:  # said to the user plainly, without a traceback
        return _LoadFailure(str(error))
    crops = embedder.crops if crops is None else crops
    loaded = fingerprint(image_hash, digest, model, **crops)
    yield embedder
    run = yield from embedder.embed_steps(pixels, labels, **crops, reuse=reuse)
    table = None if measured else measure_cells(labels, pixels, pixel_size_um=pixel_size_um)
    split = np.zeros(0, np.int64) if measured else cells_in_pieces(labels)  # edited by hand since segmented
    return run, table, loaded, digest, crops, split


def _tie_to_smear(cells: Labels, image: Image, image_hash: str) -> None:
    """Tie cells another tool segmented (Cellpose masks, say) to the smear they were embedded
    from, as Segment cells ties its own: the map, the export, the gallery and "every open smear"
    then take them for that smear's cells, and a smear renamed keeps them. Segmenting the smear
    again never replaces them (:data:`SEGMENTED_ELSEWHERE`), and embedding them from another
    smear ties them to that one: the tie is the last embedding's, not a segmentation's."""
    cells.metadata = {**cells.metadata, "source_image": image.name, SOURCE_DIGEST: image_hash,
                      SOURCE_LAYER: str(image.unique_id), SEGMENTED_ELSEWHERE: True}


class EmbedCellsWidget(JobWidget):
    """Embed every cell of a cells layer with a RedDino model; the result stays on the layer."""

    embedded = Signal(object)  # the cells Labels layer whose embeddings were (re)computed
    every_smear_done = Signal()  # an "every open smear" run ended, all its smears done or stopped

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        self._segment_job: SegmentJob | None = None
        self._segmented_pixels: tuple | None = None  # (the layer's full-resolution data, its pixels) as segmented
        self._embed_job: _EmbedJob | None = None
        self._embedder: Embedder | None = None
        self._embed_started = 0.0
        self._batch: _Batch | None = None
        self._stop_download = threading.Event()  # the running run's: Cancel sets it

        self.image = ComboBox(label="Image", choices=self._image_layers)
        self.cells = ComboBox(
            label="Cells", choices=self._cells_choices,
            tooltip="The cells layer; 'segment first' segments the image as the Segment cells widget does.",
        )
        self.model = ComboBox(label="Model", choices=list(KNOWN_MODELS), tooltip=MODEL_TOOLTIP)
        self.model.native.setEditable(True)
        self.model.native.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.model.native.editTextChanged.connect(self._show_whole_model_name)
        self._show_whole_model_name(self.model_name)
        self._crops_of_model: dict | None = None  # the chosen model's record of its training crops
        self._exact_margin: tuple[float, float] | None = None  # a margin put in the panel, and as its box shows it
        self._crops_chosen, self._showing = False, False  # the crops shown were chosen (by hand, or for a stored run)
        self._model_read, self._crops_said = self.model_name, ""  # the model whose record was read; what was said of it
        for chosen in (self.model.native.textActivated, self.model.native.currentIndexChanged,
                       self.model.native.lineEdit().editingFinished):  # not each keystroke of a path typed
            chosen.connect(self._model_chosen)
        self._browse_button = PushButton(text="Browse…", tooltip="Choose a local model folder")
        self.device = ComboBox(label="Device", choices=["auto", *(option.name for option in list_devices())])
        self._describe_devices()
        self.crop_mode = ComboBox(
            label="Crop", choices=list(CROP_MODES), value=DEFAULT_CROP_MODE,
            tooltip="masked: neighbouring cells painted out (classifies better); context: each cell with its surroundings.",
        )
        self.crop_scale = ComboBox(
            label="Scale", choices=list(CROP_SCALES), value=DEFAULT_CROP_SCALE,
            tooltip="cell: each crop sized to its cell; smear: most cells share one crop size (that of a cell "
            f"{SMEAR_SCALE_CELLS} times the median), so a crop shows its cell's size next to the others (micro- and "
            "macrocytes); "
            "larger cells get a larger crop.",
        )
        self.margin = FloatSpinBox(
            label="Margin", value=DEFAULT_MARGIN, min=0, max=MAX_MARGIN, step=0.05,
            tooltip="Room around each cell in its crop, as a share of the cell's size on each side.",
        )
        model_row = Container(widgets=[self.model, self._browse_button], layout="horizontal", labels=False)
        model_row.label = "Model"
        model_row.margins = (0, 0, 0, 0)
        crop_settings = [self.crop_mode, self.crop_scale, self.margin]
        for setting in crop_settings:
            setting.changed.connect(self._crops_changed)
        self.every_smear = CheckBox(
            text="Every open smear", value=False,
            tooltip="Embed each image layer in turn: its own cells layer, or segmented first when it has none.",
        )
        self.every_smear.changed.connect(self._on_every_smear)
        self._lay_out(Container(widgets=[self.image, self.cells, self.every_smear, model_row, self.device,
                                         *crop_settings]))
        self.finished.connect(self._after_run)
        self.image.changed.connect(self._pick_cells)
        self._browse_button.changed.connect(self._browse)
        self._pick_cells(self.image.value)
        self._take_settings_of(self.cells.value)
        self._follow_image_selection(self.image)

    @property
    def model_name(self) -> str:
        """The model as typed or chosen: a known name, ``hf_hub:org/name`` or a local folder."""
        return self.model.native.currentText().strip()

    @model_name.setter
    def model_name(self, name: str) -> None:
        self.model.native.setEditText(str(name))
        self._model_chosen()

    def _show_whole_model_name(self, text: str) -> None:
        """The box is narrower than a model folder's path: its tooltip holds the whole of it."""
        self.model.native.setToolTip(f"{text.strip()}\n\n{MODEL_TOOLTIP}" if text.strip() else MODEL_TOOLTIP)

    def _busy(self) -> bool:
        return super()._busy() or self._batch is not None

    def reset_choices(self, *_) -> None:
        """Follow the viewer's layers (napari calls this when layers change)."""
        self.image.reset_choices()
        self.cells.reset_choices()
        if self.cells.value == SEGMENT_FIRST:  # a cells layer may have appeared for the image
            self._pick_cells(self.image.value)

    def run(self) -> None:
        """Segment first if asked, then load the model and embed the cells in a worker."""
        if self._worker is not None or self._batch is not None:  # one run at a time
            return
        if not self.model_name:
            self._refuse("Choose a model: reddino-small, -base, -large, hf_hub:org/name or a local folder.")
            return
        self._model_chosen(at_run=True)  # a model exported again, or its config downloaded since, may record others
        self._freeze_settings(True)  # a smear segmented first is embedded with the settings of now
        if self.every_smear.value:
            images = self._image_layers()
            if not images:
                self._refuse("Open a smear first: File > Open, or File > Open Sample > RedDino.")
                return
            self._batch = _Batch(waiting=images, total=len(images))
            self._run_next_smear()
            return
        self._begin(self.image.value, None if self.cells.value == SEGMENT_FIRST else self.cells.value)

    # --- choices ---------------------------------------------------------------------------

    def _cells_choices(self, _widget=None) -> list[tuple[str, object]]:
        labels = [(layer.name, layer) for layer in self._viewer.layers
                  if isinstance(layer, Labels) and not is_map_colours(layer)]
        return [*labels, (SEGMENT_FIRST, SEGMENT_FIRST)]

    def _pick_cells(self, image: Image | None) -> None:
        """The image's own cells layer (made by the Segment widget), else 'segment first'."""
        if image is not None:
            self.cells.value = self._own_cells(image) or SEGMENT_FIRST

    def _take_settings_of(self, cells) -> None:
        """A panel opened again shows the model and crops its smear was embedded with: Run with
        the defaults would embed every cell again, and clear the head's predictions."""
        record = cells.metadata.get(METADATA_KEY) if isinstance(cells, Labels) else None
        crops = crop_settings(cells) if record else None
        if not crops or valid_crops(crops) is None:
            return
        self.model_name = record.get("model") or self.model_name
        self._show_crops(crops, chosen=True)
        if crops != self._crops_of_model:  # not the model's own, which its choice may have just said
            self._say_of_crops("")

    def _model_chosen(self, *_, at_run: bool = False) -> None:
        """A model whose config records how its training cells were cut (``reddino-train
        export``) sets the crop settings to those; choosing one that records none then brings back
        the defaults, unless the crops were chosen meanwhile. ``at_run``: read the record again, and
        take it unless the crops were chosen."""
        name = self.model_name
        if name == self._model_read and not at_run:
            return
        self._model_read = name
        try:
            trained = trained_crops(name) if name else None
        except (ModelLoadError, OSError):  # Run says what is wrong with the model
            trained = None
        said = ""
        if trained is not None and not (at_run and self._crops_chosen):
            self._show_crops(trained)
            said = f"{name!r} was trained on {crops_in_words(trained)}: its cells are cut so."
        elif trained is None and self._crops_of_model is not None and not self._crops_chosen:
            self._show_crops(chosen_crops())
            said = f"{name!r} records no training crops: back to the default {crops_in_words(chosen_crops())}."
        self._crops_of_model = trained
        self._say_of_crops(said)

    def _say_of_crops(self, said: str) -> None:
        """Say what a model's choice did to the crops, in place of what an earlier choice said."""
        if said or self.status.value == self._crops_said:
            self.status.value = self._crops_said = said

    def _shown_crops(self) -> dict:
        """The crop settings as the panel shows them, as ``Embedder.embed`` takes them, with the
        margin a model's record or a stored run put there while the box shows it still (it rounds
        a margin of 0.125 to 0.13)."""
        margin = float(self.margin.value)
        if self._exact_margin is not None and self._exact_margin[1] == margin:
            margin = self._exact_margin[0]
        return {"mode": self.crop_mode.value, "scale": self.crop_scale.value, "margin": margin}

    def _show_crops(self, crops: dict, *, chosen: bool = False) -> None:
        """Put ``crops`` in the panel; ``chosen``: as someone chose them (a stored run's), which a
        model's record read at Run does not replace."""
        self._showing = True
        try:
            self.crop_mode.value, self.crop_scale.value, self.margin.value = crops["mode"], crops["scale"], crops["margin"]
        finally:
            self._showing = False
        self._exact_margin = (float(crops["margin"]), float(self.margin.value))
        self._crops_chosen = chosen

    def _crops_changed(self, *_) -> None:
        if not self._showing:
            self._crops_chosen = True

    def _own_cells(self, image: Image) -> Labels | None:
        return own_cells(self._viewer.layers, image.name)

    def _on_every_smear(self, every: bool) -> None:
        self.image.enabled = self.cells.enabled = not every

    def _freeze_settings(self, frozen: bool) -> None:
        """Model, device and crops stay as they were for every smear of one run."""
        for setting in (self.every_smear, self.model, self._browse_button, self.device, self.crop_mode,
                        self.crop_scale, self.margin):
            setting.enabled = not frozen

    def _describe_devices(self) -> None:
        """Unavailable devices stay listed, greyed out, with the reason as their tooltip."""
        combo = self.device.native
        combo.setItemData(0, "CUDA, then Apple MPS, then the CPU", Qt.ItemDataRole.ToolTipRole)
        for option in list_devices():
            index = combo.findText(option.name)
            combo.setItemData(index, option.detail, Qt.ItemDataRole.ToolTipRole)
            if not option.available:
                combo.model().item(index).setEnabled(False)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder (config.json + model.safetensors)")
        if folder:
            self.model_name = folder

    # --- running ---------------------------------------------------------------------------

    def cancel(self) -> None:
        if self._batch is not None:
            self._batch.stopped = "cancelled"
        self._stop_download.set()  # the worker stops at its next yield; the download in its own thread too
        super().cancel()

    def _run_next_smear(self) -> None:
        """Start on the next smear of an "every open smear" run (from the event loop, after the last one ended)."""
        batch = self._batch
        if batch.stopped is not None:  # cancelled between two smears
            self._sum_up(batch)
            return
        batch.current, batch.current_embedded = batch.waiting.pop(0), False
        image = batch.current
        if image not in self._viewer.layers:
            self._refuse(f"{image.name!r} was closed before its turn.", notify=show_info)
            return
        self._begin(image, self._own_cells(image), own=True)

    def _begin(self, image: Image | None, cells: Labels | None, *, own: bool = False) -> None:
        """Segment ``image`` first (``cells`` None), or embed ``cells``, once its pixels are read
        (:meth:`_read_smear`); an error before the worker starts (reading the smear's pixels too)
        ends the run and says why, rather than leave the panel's settings frozen. ``own``: the
        cells were found for the image, which segments first where they are of another image."""
        try:
            self._read_smear(image, functools.partial(self._begin_with, image, cells, own), self._failed_to_begin)
        except Exception as error:
            self._failed_to_begin(error)

    def _begin_with(self, image: Image, cells: Labels | None, own: bool, pixels: np.ndarray) -> None:
        if cells is not None and cells not in self._viewer.layers:  # while a slide's level was read
            self._refuse(f"{cells.name!r} was removed while {image.name!r} was read; nothing was changed.")
            return
        try:
            if own and cells is not None and not of_image(cells, image, lambda: image_digest(pixels)):
                cells = None  # the cells of a closed image of the same name
            if cells is None:
                self._segment_first(image, pixels)
            else:
                self._embed(image, pixels, cells)
        except Exception as error:
            self._failed_to_begin(error)

    def _failed_to_begin(self, error: Exception) -> None:
        if self._worker is not None:  # it started: its own handlers end the run
            raise error
        if self._batch is not None:
            self._batch.stopped = "an error"
        self._on_errored(error, "Embedding")
        self.finished.emit()

    def _after_run(self) -> None:
        """Note how the smear of an "every open smear" run ended; go on to the next, or sum up."""
        batch = self._batch
        if batch is None:
            self._freeze_settings(False)  # the end of a one-smear run
            self._take_image_selected_meanwhile()
            return
        if batch.current is None:
            return
        if not batch.current_embedded and batch.current.name not in batch.up_to_date:
            batch.not_embedded.append(f"{batch.current.name!r}: {self.status.value}")
        batch.current = None
        if batch.waiting and batch.stopped is None:
            QTimer.singleShot(0, self._run_next_smear)  # after this run's handlers have all run
            return
        self._sum_up(batch)

    def _sum_up(self, batch: _Batch) -> None:
        self._batch = None
        self._freeze_settings(False)
        self.reset_choices()  # the run added cells layers: the chosen image's own comes first again
        self._pick_cells(self.image.value)
        self._take_image_selected_meanwhile()
        cells = sum(batch.embedded.values())
        current = ", ".join(map(repr, batch.up_to_date))
        if len(batch.up_to_date) == batch.total:
            summary = [f"Every open smear was already up to date: {current}."]
        else:
            up_to_date = f"; already up to date: {current}" if batch.up_to_date else ""
            kept = f", and {batch.kept:,} kept unchanged" if batch.kept else ""
            summary = [f"Every open smear: {len(batch.embedded)} of {counted(batch.total, 'smear')} embedded now "
                       f"({counted(cells, 'cell')}{kept}){up_to_date}."]
        if batch.not_embedded:
            summary.append("Not embedded: " + "; ".join(batch.not_embedded).rstrip(".") + ".")
        if batch.waiting:
            summary.append(f"Stopped ({batch.stopped}) before {', '.join(repr(image.name) for image in batch.waiting)}.")
        self.status.value = " ".join(summary)
        self.every_smear_done.emit()

    def _segment_first(self, layer: Image, pixels: np.ndarray) -> None:
        """The Segment widget's worker with the cell size typed there for this smear, else from its
        pixel size or the image."""
        pixel_size_um = layer.metadata.get("pixel_size_um") or None
        if why := unusable_pixel_size(pixel_size_um):
            self._refuse(why)  # an "every open smear" run names the smear in its summary
            return
        self._segmented_pixels = (level_0(layer), pixels)  # a pyramid's, read lazily, is not read again to embed
        # the cell diameter typed in Segment cells for this smear
        self._segment_job = SegmentJob.of(layer, layer.metadata.get("cell_diameter_px") or None, pixel_size_um)
        self.status.value = f"Segmenting {layer.name!r}…"
        self._start(segment_and_measure, pixels, self._segment_job.cell_diameter, self._segment_job.pixel_size_um)

    def _embed(self, image: Image, pixels: np.ndarray, cells: Labels, *, segmented: bool = False) -> None:
        if cells.multiscale:
            self._refuse(f"{cells.name!r} is a multiscale (pyramid) labels layer; open its full-resolution "
                         "level as a plain labels layer, or choose 'segment first' under Cells.")
            return
        source = cells.metadata.get("source_image")
        elsewhere = bool(cells.metadata.get(SEGMENTED_ELSEWHERE))  # another tool's cells: tied to the smear embedded
        if source != image.name and source in self._viewer.layers and not elsewhere:
            self._refuse(f"The cells layer {cells.name!r} was segmented from {source!r}, not from {image.name!r}; "
                         "choose its own cells layer, or 'segment first'.")
            return
        labels = np.asarray(cells.data)
        if labels.shape != pixels.shape[:2]:
            self._refuse(
                f"The cells layer {cells.name!r} ({labels.shape[0]}x{labels.shape[1]}) does not match "
                f"the image {image.name!r} ({pixels.shape[0]}x{pixels.shape[1]}); choose its own cells layer."
            )
            return
        if not labels.any():
            self._refuse(f"No cells in {cells.name!r} to embed.", notify=show_warning)
            return
        model = self.model_name
        crops = self._shown_crops()
        digest, image_hash = labels_digest(labels), image_digest(pixels)
        if not elsewhere and not of_image(cells, image, image_hash):
            why = "closed, and another opened under its name?" if source == image.name else "another smear"
            self._refuse(f"{cells.name!r} was segmented from another image called {source!r} (its pixels differ "
                         f"from those of {image.name!r}: {why}); choose 'segment first' under Cells.")
            return
        try:
            current = fingerprint(image_hash, digest, model, **crops)
        except OSError as error:
            if self._batch is not None:
                self._batch.stopped = "the model cannot be read"
            self._refuse(f"Cannot read the model {model!r}: {error}")
            return
        if stored_fingerprint(cells) == current:
            if self._batch is not None:
                self._batch.up_to_date.append(image.name)
            ids, _, model_id = embeddings_of(cells)
            self._refuse(
                f"The embeddings of the {counted(len(ids), 'cell')} of {cells.name!r} ({readable_ids([model_id])[0]}) "
                "are already up to date; nothing to do.",
                notify=show_info,
            )
            return
        measured = measured_on(cells, digest, image_hash)
        pixel_size = cells.metadata.get("pixel_size_um") or image.metadata.get("pixel_size_um") or None
        if not measured and (why := unusable_pixel_size(pixel_size)):  # the cells are measured after embedding
            self._refuse(why)
            return
        self._embed_job = _EmbedJob(cells, model, image_hash, image, segmented)
        self.status.value = f"Loading {model}…"
        self._stop_download = threading.Event()
        self._start(_load_and_embed, model, self.device.value, pixels, labels,
                    None if self._record_unread(model) else crops, measured, pixel_size,
                    (image_hash, digest), earlier_run(cells), self._stop_download)

    def _record_unread(self, model: str) -> bool:
        """Whether ``model`` is a Hub model not downloaded yet, whose config (read once it is)
        may record how its training cells were cut, and no one chose the crops the panel shows."""
        return not self._crops_chosen and hub_id(model) is not None and cached_hub_revision(model) is None

    def _on_progress(self, item) -> None:
        if item is None:  # the model is still loading
            return
        if isinstance(item, Downloaded):
            self._show_download(item)
            return
        if isinstance(item, Embedder):  # loaded: the embedding starts now
            self._close_bar()  # the download's, if there was one
            self._embedder, self._embed_started = item, time.perf_counter()
            self.status.value = f"Embedding {self._embed_job.cells.name!r} with {self._embed_job.model} on {item.device}…"
            return
        done, total = item
        desc = f"Embedding {self._embed_job.cells.name!r}" if self._embed_job else f"Segmenting {self._segment_job.image_name!r}"
        self._count(done, total, desc)
        if self._embed_job is not None:
            rate = done / max(time.perf_counter() - self._embed_started, 1e-9)
            self.status.value = f"Embedding {self._embed_job.cells.name!r}: {done:,} of {total:,} cells ({rate:,.0f} cells/s)…"

    def _show_download(self, download: Downloaded) -> None:
        """A bar per file, in MB: the first use of reddino-large downloads 1.2 GB."""
        description = f"Downloading {download.filename}"
        if self._progress is not None and self._progress.desc != description:
            self._close_bar()
        megabytes = 2**20
        # said first: making the bar runs Qt events, in which the next report may be shown
        self.status.value = (f"Downloading {self._embed_job.model}: {download.filename}, {download.done / megabytes:,.2f} "
                             f"of {download.total / megabytes:,.2f} MB…")
        self._count(download.done // megabytes, max(1, -(-download.total // megabytes)), description)

    def _failed_job(self) -> str:
        return "Embedding" if self._embed_job is not None else "Segmentation"

    def _on_finished(self) -> None:
        """Show the outcome once the worker is done; after segmenting, go on to embed."""
        worker, result = self._end_run()
        segment_job, self._segment_job = self._segment_job, None
        segmented_pixels, self._segmented_pixels = self._segmented_pixels, None
        embed_job, self._embed_job = self._embed_job, None
        embedder, self._embedder = self._embedder, None
        try:
            if worker.abort_requested:
                self.status.value = ("Cancelled; the cells were segmented and kept in "
                                     f"{embed_job.cells.name!r}, not embedded." if embed_job is not None and
                                     embed_job.segmented else "Cancelled; the embeddings were not changed.")
            elif result is not None and segment_job is not None:
                self._segmented(segment_job, segmented_pixels, *result)
                return  # _segmented goes on to embed, or ends the run
            elif isinstance(result, _LoadFailure):
                if self._batch is not None:
                    self._batch.stopped = "the model did not load"
                show_error(result.message)
                kept = (f"the cells were segmented and kept in {embed_job.cells.name!r}" if embed_job.segmented
                        else "nothing was changed")
                self.status.value = f"Could not load the model; {kept}. {result.message}"
            elif result is not None:
                self._store(embed_job, embedder, *result)
        except Exception as error:  # the run still ends (an "every open smear" run goes on), and says why
            self._on_errored(error, "Storing the embeddings" if segment_job is None else "Adding the cells layer")
            if self._worker is not None:  # it had gone on to embed: that run ends by itself
                return
        self.finished.emit()

    def _segmented(self, job: SegmentJob, segmented_pixels: tuple, labels: np.ndarray, table, cell_diameter: float,
                   image_hash: str) -> None:
        if job.image not in self._viewer.layers:
            self._refuse(f"{job.image_name!r} was closed while it was segmented; nothing was changed.")
            return
        if table.empty:
            self._refuse(f"No cells found in {job.image_name!r}: is it a blood smear? Try the Segment cells widget.", notify=show_warning)
            return
        cells, carried = add_cells_layer(self._viewer, labels, table, job, cell_diameter, image_hash)
        if carried:
            show_info(f"{cells.name!r}: {carried}.")
        self.reset_choices()
        self.cells.value = cells
        image = self._viewer.layers[job.image_name]
        source, pixels = segmented_pixels
        if level_0(image) is not source:  # its data replaced while it was segmented
            try:
                pixels = smear_pixels(image)
            except ImageInputError as error:
                self._refuse(str(error))
                return
        self._embed(image, pixels, cells, segmented=True)

    def _store(self, job: _EmbedJob, embedder: Embedder, run: EmbeddedCells, table: pd.DataFrame | None,
               loaded_fingerprint: str, embedded: str, crops: dict, split: np.ndarray) -> None:
        cut = ""
        if crops != self._shown_crops():  # a Hub model just downloaded records its training crops: shown from now on
            self._show_crops(crops)
            self._crops_of_model = crops
            cut = f"; cut as it was trained: {crops_in_words(crops)}"
        if job.cells not in self._viewer.layers:
            self.status.value = f"{job.cells.name!r} was removed while its cells were embedded; nothing was stored."
            return
        changed = labels_digest(job.cells.data) != embedded  # segmented again or painted meanwhile
        # what the head said of these cells no longer holds: their crops, or the measurements it also reads, changed
        unpredicted = changed_embeddings(job.cells, run)
        if table is not None and not changed:
            unpredicted = np.union1d(unpredicted, remeasured(table, job.cells.features))
        # Up to date only once all is stored: a failure on the way leaves a run that measures and stores again.
        # Changed: the embeddings are kept for the next run to reuse, but are never up to date, even
        # if an undo brings the labels back: that run must also measure the cells this one did not.
        store_run(job.cells, run, model=job.model, device=embedder.device, crops=crops,
                  fingerprint="", labels_digest=embedded, image_hash=job.image_hash)
        unpredicted = clear_predictions(job.cells, unpredicted)
        if changed:
            self.status.value = (f"The cells of {job.cells.name!r} changed while they were embedded. The embeddings "
                                 "of the cells as they were are kept: Run again embeds only the changed ones.")
            return
        unlabelled = 0
        if table is not None:  # measured now: the layer's own columns (labels, notes) stay with their cells
            job.cells.features, unlabelled = with_own_columns(table, job.cells.features)
            job.cells.metadata[MEASURED_LABELS], job.cells.metadata[MEASURED_IMAGE] = embedded, job.image_hash
        tied = ""
        was = job.cells.metadata.get("source_image")
        if (not was or job.cells.metadata.get(SEGMENTED_ELSEWHERE)) and job.image in self._viewer.layers:
            _tie_to_smear(job.cells, job.image, job.image_hash)
            if was and was != job.image.name:
                tied = f"; {job.cells.name!r} belongs to {job.image.name!r} now, no longer to {was!r}"
        store_run(job.cells, run, model=job.model, device=embedder.device, crops=crops,
                  fingerprint=loaded_fingerprint, labels_digest=embedded, image_hash=job.image_hash)
        seconds = time.perf_counter() - self._embed_started
        fresh = len(run.ids) - run.reused
        if self._batch is not None:
            self._batch.current_embedded = True
            self._batch.embedded[self._batch.current.name] = fresh
            self._batch.kept += run.reused
        shown = Path(job.model).expanduser().name if Path(job.model).expanduser().exists() else job.model
        kept = f"; the embeddings of {counted(run.reused, 'unchanged cell')} were kept" if run.reused else ""
        cleared = (f"; the head's predictions for {counted(unpredicted, 'cell')} are cleared (train or apply it "
                   "again)" if unpredicted else "")
        if unlabelled:
            cleared += (f"; {counted(unlabelled, 'manual label')} went with {'its cell' if unlabelled == 1 else 'their cells'} "
                        "(erased, merged, or their ids given to cells painted elsewhere)")
        if len(split):
            cleared += (f"; {counted(len(split), 'cell')} ({first_few(split)}) {'is' if len(split) == 1 else 'are'} in pieces apart, "
                        "measured and cut as one (erased across?): give each piece a label of its own")
        self.status.value = (
            f"{counted(fresh, 'cell')} embedded in {seconds:.1f} s ({fresh / max(seconds, 1e-9):,.0f} cells/s) "
            f"with {shown} on {embedder.device}{cut}{kept}{cleared}{tied}"
        )
        self.embedded.emit(job.cells)
