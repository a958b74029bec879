"""What every RedDino dock widget shares: Run and Cancel, a status line, one worker at a time,
and a napari progress bar made at the first step (no busy animation while nothing is counted)."""

import functools
from collections.abc import Callable
from typing import NamedTuple

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.layers import Image
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from ..image_input import ACCEPTED, CMYK, GRAY_ALPHA, ImageInputError, check_smear, stored_mode
from .image_renames import follow_image_renames
from .smear_links import level_0

# Runs of closed panels finish the step they are in (a UMAP layout or a download cannot stop
# midway); a run started meanwhile waits for them rather than halve their speed and its own.
_finishing: set = set()
_waiting: list = []
WAITING = " (waiting for the run of a closed panel to stop)"


# A pyramid's full resolution is read whole: 0.8 GB of RGB pixels and 1 GB of labels at this size.
MAX_PYRAMID_PIXELS = 2**28
_OPEN_AS_SMEAR = ("Open it with `python -m napari_reddino --image \"{}\"`, which reads it as the smear it is, or "
                  "save it as an ordinary RGB PNG, JPEG or TIFF.")


def smear_pixels(layer: Image) -> np.ndarray:
    """The layer's pixels as one 2-D smear, or :class:`ImageInputError` (see :func:`smear_source`)."""
    return check_smear(smear_source(layer))


def smear_source(layer: Image):
    """The array of the layer's pixels (a slide pyramid's full resolution, perhaps read lazily
    from disk), where it is one 2-D smear, else :class:`ImageInputError`; reads no pixels.

    napari's ``rgb`` flag, not the array's shape, says whether a last axis of 3 or 4 is colour:
    a layer napari shows as a stack of planes is refused, whatever its channel count. A slide
    pyramid's full resolution is read whole where it is at most :data:`MAX_PYRAMID_PIXELS`.
    """
    data = level_0(layer)
    shape = data.shape
    if layer.ndim == 3 and not layer.rgb and shape[-1] in (3, 4):
        raise ImageInputError(
            f"{layer.name!r} of shape {shape} is shown by napari as {shape[0]} planes of {shape[1]} x "
            f"{shape[2]}, not in colour: napari takes an image for colour only when both its sides exceed "
            "30 px. Pad it to 31 px or more, or add it from napari's console with "
            "viewer.add_image(data, rgb=True)."
        )
    source = layer.source.path
    mode = stored_mode(source) if source and len(shape) == 3 and shape[-1] in (2, 4) else None
    if layer.rgb and mode in CMYK:
        raise ImageInputError(
            f"{layer.name!r} is a CMYK image (a print workflow's), whose four inks napari shows as red, green, blue "
            f"and alpha. {_OPEN_AS_SMEAR.format(source)}"
        )
    if not layer.rgb and mode in GRAY_ALPHA:
        raise ImageInputError(
            f"{layer.name!r} of shape {shape} is a gray image with alpha, which napari shows as {shape[0]} planes. "
            f"{_OPEN_AS_SMEAR.format(source)}"
        )
    if layer.ndim != 2:
        raise ImageInputError(
            f"{layer.name!r} of shape {shape} is a {layer.ndim}-D stack of planes in napari, "
            "not one smear (a colour photo stored channel by channel? save it again as an ordinary PNG, JPEG "
            f"or TIFF and open that); expected {ACCEPTED}."
        )
    if layer.multiscale and (pixels := shape[0] * shape[1]) > MAX_PYRAMID_PIXELS:
        raise ImageInputError(
            f"{layer.name!r} is a slide pyramid whose full resolution, {shape[1]:,} x {shape[0]:,} px ({pixels:,} "
            f"pixels), is more than the widgets read at once ({MAX_PYRAMID_PIXELS:,} pixels): save the region to "
            "analyse as a TIFF (in QuPath, File > Export images) and open that."
        )
    return data


class _Reading(NamedTuple):
    """A smear being read in a worker before a run (:meth:`JobWidget._read_smear`)."""

    layer: Image
    then: Callable[[np.ndarray], None]
    failed: Callable[[Exception], None]
    error: Exception | None = None


class WorkerFailed(Exception):
    """A RuntimeError raised inside a worker (a CUDA error, torch out of memory), passed on as
    an error the worker reports: superqt takes a RuntimeError out of a generator worker for a
    sign that its Qt object was deleted, and emits neither ``errored`` nor ``finished``."""


def place_above(layers, layer, below) -> None:
    """Move ``layer`` in the layer list to just above ``below`` (found by name: a plugin's
    viewer hands out proxies of its layers, not the layers)."""
    names = [each.name for each in layers]
    layers.move(names.index(layer.name), names.index(below.name) + 1)


def job_worker(generator_function):
    """napari's ``thread_worker`` for a generator function, reporting every error it raises."""

    @functools.wraps(generator_function)
    def reporting(*args, **kwargs):
        try:
            return (yield from generator_function(*args, **kwargs))
        except RuntimeError as error:
            raise WorkerFailed(f"{type(error).__name__}: {error}") from error

    return thread_worker(reporting)


@job_worker
def _read_whole(data):
    """The pixels of a level read lazily from disk (dask, zarr), checked; an indeterminate bar meanwhile."""
    yield 0, 0
    return check_smear(np.asarray(data))


class JobWidget(QWidget):
    """Base of the dock widgets: subclasses build a form, implement ``run`` and ``_on_finished``."""

    finished = Signal()  # a run ended, whatever the outcome (Embed cells: once per smear of "every open smear")

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = napari_viewer
        follow_image_renames(napari_viewer)
        self._worker = None
        self._result = None
        self._progress: progress | None = None
        self._making_bar = False  # making a napari progress bar runs Qt events, reports among them
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label()
        self.status.native.setWordWrap(True)
        # The panel's width decides where the status wraps; a long message must not widen the dock.
        self.status.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        self._docked = False
        self._selected_meanwhile: Image | None = None  # see _take_image_selected_meanwhile
        self._reading: _Reading | None = None

    def event(self, event: QEvent) -> bool:
        """Closing the dock (napari then takes the widget out of it) calls :meth:`_closed`."""
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._closed()
        return super().event(event)

    def _closed(self) -> None:
        """The panel is gone: a run still going is cancelled, so nothing lands in the viewer unseen."""
        if self._worker is not None and self._worker not in _waiting:  # one waiting starts, sees the cancel, ends
            worker = self._worker
            _finishing.add(worker)
            worker.finished.connect(lambda: _start_waiting(worker))
            if not worker.is_running:  # it ended just now, its finished signal on the way before this connection
                _start_waiting(worker)
        self.cancel()
        self._viewer.layers.selection.events.active.disconnect(self._follow_active_image)  # if connected

    def _follow_image_selection(self, image: ComboBox) -> None:
        """Let ``image`` (the panel's Image choice) follow the image layer selected in the layer
        list, so moving to another smear there moves every panel to it."""
        self._image_choice = image
        self._viewer.layers.selection.events.active.connect(self._follow_active_image)
        image.changed.connect(self._image_chosen)

    def _image_chosen(self) -> None:
        if self._busy():  # chosen in the panel during a run: a smear selected before in the layer list yields
            self._selected_meanwhile = None

    def _follow_active_image(self, event) -> None:
        layer = event.value
        if not isinstance(layer, Image):
            return
        if self._busy():  # the run uses the choice: the smear selected is taken when it ends
            self._selected_meanwhile = layer
            return
        self._choose_image(layer)

    def _choose_image(self, layer: Image) -> None:
        self.reset_choices()
        if layer in self._image_choice.choices:
            self._image_choice.value = layer

    def _take_image_selected_meanwhile(self) -> None:
        """At the end of a run, choose the smear selected in the layer list while it ran (else
        a pixel size typed next would go to the smear just segmented)."""
        layer, self._selected_meanwhile = self._selected_meanwhile, None
        if layer is not None:  # closed since: not among the choices, so not chosen
            self._choose_image(layer)

    def _busy(self) -> bool:
        """Whether a run is using the panel's choices."""
        return self._worker is not None

    def run(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop at the worker's next step; what is already in the viewer stays as it was."""
        if self._worker is not None:
            self._worker.quit()
            if self._worker in _waiting:  # started now, it sees the request at once and ends
                _waiting.remove(self._worker)
                self._worker.start()
            self._cancel_button.enabled = False
            self.status.value = "Cancelling…"

    def _lay_out(self, form: Container) -> None:
        buttons = Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False)
        layout = QVBoxLayout(self)
        for part in (form, buttons, self.status):
            layout.addWidget(part.native)
        layout.addStretch()

    def _read_smear(self, layer: Image | None, then: Callable[[np.ndarray], None],
                    failed: Callable[[Exception], None]) -> None:
        """Call ``then(pixels)`` with the pixels of the chosen image ``layer``, or refuse saying why.
        A level read lazily from disk (a slide pyramid's, from dask or zarr) is read in a worker
        first, with a bar, so napari goes on drawing (4 s at 268 Mpx); ``failed(error)`` if that
        read fails, a cancel ends the run there."""
        if layer is None:
            self._refuse("Open a smear first: File > Open, or File > Open Sample > RedDino.")
            return
        try:
            data = smear_source(layer)
            pixels = check_smear(data) if isinstance(data, np.ndarray) else None
        except ImageInputError as error:
            self._refuse(str(error))
            return
        if pixels is not None:
            then(pixels)
            return
        self._reading = _Reading(layer, then, failed)
        self.status.value = f"Reading {layer.name!r}…"
        self._start(_read_whole, data, handlers={"yielded": self._on_read_progress, "errored": self._on_read_failed,
                                                 "finished": self._on_read})

    def _on_read_progress(self, step: tuple[int, int]) -> None:
        self._count(*step, f"Reading {self._reading.layer.name!r}")

    def _on_read_failed(self, error: Exception) -> None:
        self._reading = self._reading._replace(error=error)

    def _on_read(self) -> None:
        worker, pixels = self._end_run()
        reading, self._reading = self._reading, None
        closed = reading.layer not in self._viewer.layers
        if worker.abort_requested or closed:  # closed: not segmented for minutes in vain
            self.status.value = (f"{reading.layer.name!r} was closed while it was read; nothing was changed." if closed
                                 else "Cancelled; nothing was changed.")
            self._take_image_selected_meanwhile()
            self.finished.emit()
        elif reading.error is not None:
            reading.failed(reading.error)
        else:
            reading.then(pixels)

    def _image_layers(self, _widget=None) -> list[Image]:
        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def _refuse(self, message: str, *, notify=show_error) -> None:
        """Say why not; a run that ends here ends now (``finished``). A refusal of something
        else while a run goes on (Train head during a UMAP) ends nothing."""
        notify(message)
        self.status.value = message
        self._refused()

    def _refused(self) -> None:
        """A request was refused: that ends a run only where none goes on."""
        if self._worker is None:
            self.finished.emit()

    def _start(self, worker_function, *args, handlers: dict | None = None) -> None:
        """Run ``worker_function(*args)`` (made by :func:`job_worker`) with this widget's handlers,
        or with ``handlers`` for some of its signals."""
        self._run_button.enabled = False
        self._cancel_button.enabled = True
        connections = {"yielded": self._on_progress, "returned": self._on_returned, "errored": self._on_errored,
                       "finished": self._on_finished}
        self._worker = worker_function(*args, _start_thread=False, _connect={**connections, **(handlers or {})})
        if _finishing:
            _waiting.append(self._worker)
            self.status.value += WAITING
            self._worker.started.connect(self._wait_over)
        else:
            self._worker.start()

    def _wait_over(self) -> None:
        if self.status.value.endswith(WAITING):
            self.status.value = self.status.value.removesuffix(WAITING)

    def _count(self, done: int, total: int, description: str) -> None:
        if self._progress is None:
            if self._making_bar:  # a report handled while the bar is made: the next one counts
                return
            self._making_bar, worker = True, self._worker
            try:
                bar = progress(total=total, desc=description)
            finally:
                self._making_bar = False
            if self._worker is not worker:  # making the bar ran Qt events, and the run (or its read) ended in them
                bar.close()
                return
            self._progress = bar
        bar = self._progress  # drawing the bar runs Qt events; the run may end (and close it) in them
        if bar.total != total:  # an indeterminate start (0) became a count
            bar.total = total
        bar.update(done - bar.n)

    def _on_returned(self, result) -> None:
        self._result = result

    def _end_run(self):
        """Close the bar and re-enable Run; return ``(worker, result)`` of the run that ended."""
        worker, self._worker = self._worker, None
        result, self._result = self._result, None
        self._close_bar()
        self._run_button.enabled = True
        self._cancel_button.enabled = False
        return worker, result

    def _close_bar(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _on_progress(self, item) -> None:
        raise NotImplementedError

    def _on_errored(self, error: Exception, failed_job: str | None = None) -> None:
        """Say why the run failed, as a notification and in the status line (a worker whose
        ``errored`` signal has a handler does not re-raise the error itself)."""
        message = f"{failed_job or self._failed_job()} failed: {_in_words(error)}"
        show_error(message)
        self.status.value = message

    def _failed_job(self) -> str:
        """What the running worker was doing, for the failure message ("Segmentation", ...)."""
        raise NotImplementedError

    def _on_finished(self) -> None:
        raise NotImplementedError


def _start_waiting(finished) -> None:
    """``finished``, a closed panel's run, ended: once none is left, the runs waiting for them start."""
    _finishing.discard(finished)
    if not _finishing:
        starting = list(_waiting)
        _waiting.clear()
        for worker in starting:
            worker.start()


def _in_words(error: Exception) -> str:
    """A worker's error for the status line: the message alone where it is meant for the user (a
    ValueError's, or a reported one's, which names its type already), else with the error's type,
    which may be all there is (a bare MemoryError)."""
    text = str(error)
    if text and isinstance(error, (ValueError, WorkerFailed)):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
