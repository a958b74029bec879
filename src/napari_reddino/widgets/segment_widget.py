"""Plugins > RedDino > Segment cells: an image layer in, a cells Labels layer with its table out."""

import time

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import ComboBox, Container, FloatSpinBox
from napari.layers import Image
from napari.utils.notifications import show_warning
from qtpy.QtCore import Signal

from ..wording import counted
from .cells_layer import SegmentJob, add_cells_layer, segment_and_measure, unusable_pixel_size
from .job_widget import JobWidget


class SegmentCellsWidget(JobWidget):
    """Segment the red cells of an image layer; hovering a cell shows its measurements."""

    segmented = Signal(object)  # the cells Labels layer, added or updated

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        self._job: SegmentJob | None = None

        self.image = ComboBox(label="Image", choices=self._image_layers)
        self.cell_diameter = FloatSpinBox(
            label="Cell diameter (px)", min=0, max=1000, step=1,
            tooltip="Typical red-cell diameter in pixels. Auto (0): 7.5 µm at the pixel size below where one is "
                    "given, else estimated from the image.",
        )
        self.pixel_size = FloatSpinBox(
            label="Pixel size (µm)", min=0, max=100, step=0.01,
            tooltip="Micrometres per pixel: sets the cell size and adds µm columns to the table.",
        )
        self.cell_diameter.native.setSpecialValueText("auto")
        self.pixel_size.native.setSpecialValueText("unknown")
        self.pixel_size.native.setDecimals(4)
        self._lay_out(Container(widgets=[self.image, self.cell_diameter, self.pixel_size]))
        # Each smear keeps what was typed for it (on its image layer, where Embed cells finds it too)
        self._per_smear = {self.cell_diameter: "cell_diameter_px", self.pixel_size: "pixel_size_um"}
        self.image.changed.connect(self._prefill)
        self._follow_image_selection(self.image)
        self._prefill(self.image.value)
        for box, key in self._per_smear.items():
            box.changed.connect(lambda value, key=key: self._remember(key, value))

    def reset_choices(self, *_) -> None:
        """Follow the viewer's image layers (napari calls this when layers change)."""
        self.image.reset_choices()

    def run(self) -> None:
        """Segment the chosen image in a worker; the result arrives on the main thread."""
        if self._worker is not None:  # one run at a time (the Run button is disabled meanwhile)
            return
        layer = self.image.value
        sizes = (None, None) if layer is None else (self._setting(self.cell_diameter, layer),
                                                    self._setting(self.pixel_size, layer))
        if why := unusable_pixel_size(sizes[1]):
            self._refuse(why)
            return
        self._read_smear(layer, lambda pixels: self._segment(layer, pixels, *sizes), self._read_failed)

    def _segment(self, layer: Image, pixels: np.ndarray, cell_diameter: float | None,
                 pixel_size_um: float | None) -> None:
        self._job = SegmentJob.of(layer, cell_diameter, pixel_size_um)
        self.status.value = f"Segmenting {layer.name!r}…"
        self._start(segment_and_measure, pixels, cell_diameter, pixel_size_um)

    def _read_failed(self, error: Exception) -> None:
        self._on_errored(error)
        self._take_image_selected_meanwhile()
        self.finished.emit()

    def _prefill(self, layer: Image | None) -> None:
        """Show the chosen smear's own cell diameter and pixel size (auto and unknown if none)."""
        if layer is not None:
            for box, key in self._per_smear.items():
                with box.changed.blocked():  # shown, not typed: the layer's own value stays unrounded
                    box.value = layer.metadata.get(key) or 0.0

    def _setting(self, box: FloatSpinBox, layer: Image) -> float | None:
        """What ``box`` says for ``layer``: the smear's own value where the box shows it rounded
        (0.12345 µm shows as 0.1235), else the box's; None for auto or unknown."""
        own = layer.metadata.get(self._per_smear[box])
        if own and round(own, box.native.decimals()) == box.value:
            return own
        return box.value or None

    def _remember(self, key: str, value: float) -> None:
        """Keep a typed value on the image layer: it comes back when the image is chosen again,
        and Embed cells uses it when it segments that image first."""
        layer = self.image.value
        if layer is not None:
            layer.metadata[key] = value or None

    def _on_progress(self, tiles: tuple[int, int]) -> None:
        self._count(*tiles, f"Segmenting {self._job.image_name!r}")

    def _failed_job(self) -> str:
        return "Segmentation"

    def _on_finished(self) -> None:
        """Show the outcome once the worker is done, so a new run can start from any signal."""
        worker, result = self._end_run()
        try:
            if worker.abort_requested:  # also when cancelled while the result was on its way
                self.status.value = "Cancelled; nothing was changed."
            elif result is not None:
                self._show_result(*result)
        except Exception as error:  # adding the layer failed: said, and the panel stays usable
            self._on_errored(error, "Adding the cells layer")
        finally:
            self._job = None  # it holds the smear: a closed smear's pixels are let go
        self._take_image_selected_meanwhile()
        self.finished.emit()

    def _show_result(self, labels: np.ndarray, table: pd.DataFrame, cell_diameter: float, image_hash: str) -> None:
        job = self._job
        if job.image not in self._viewer.layers:
            self.status.value = f"{job.image_name!r} was closed while it was segmented; no cells layer was added."
            return
        if table.empty:
            message = f"No cells found in {job.image_name!r}: is it a blood smear? Try setting the cell diameter."
            show_warning(message)
            self.status.value = message
            return
        layer, carried = add_cells_layer(self._viewer, labels, table, job, cell_diameter, image_hash)
        found = f"{counted(len(table), 'cell')} found in {job.image_name!r} in {time.perf_counter() - job.started:.1f} s"
        self.status.value = f"{found}; {carried}" if carried else found
        self.segmented.emit(layer)
