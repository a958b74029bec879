"""What every dock widget's run machinery must do whatever its worker raises."""

import threading

import pytest
import torch
from magicgui.widgets import Container
from napari.utils import progress
from qtpy.QtCore import QThreadPool

from napari_reddino.widgets.job_widget import WAITING, JobWidget, job_worker


@job_worker
def _runs_out_of_gpu_memory():
    yield 1, 2
    # what a CUDA device raises when a batch does not fit (a RuntimeError subclass)
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@job_worker
def _hits_a_bad_value():
    yield 1, 2
    raise ValueError("not a smear")


@job_worker
def _runs_out_of_memory():
    yield 1, 2
    raise MemoryError()  # as numpy raises it, without a message


@job_worker
def _misses_a_column():
    yield 1, 2
    raise KeyError("centroid_y")


class OneJob(JobWidget):
    """The smallest dock widget: one Run button that starts ``job``."""

    def __init__(self, viewer, job):
        super().__init__(viewer)
        self.job = job
        self._lay_out(Container())

    def run(self):
        self._start(self.job)

    def _on_progress(self, item):
        self._count(*item, "Testing")

    def _failed_job(self):
        return "The test job"

    def _on_finished(self):
        self._end_run()
        self.finished.emit()


def _logging(entry: str, log: list):
    """A job of one step that adds ``entry`` to ``log``."""

    @job_worker
    def job():
        log.append(entry)
        yield 1, 1

    return job


def _run_docked(viewer, job) -> OneJob:
    """A panel of ``job``, docked in ``viewer``, its run started."""
    widget = OneJob(viewer, job)
    viewer.window.add_dock_widget(widget)
    widget.run()
    return widget


@pytest.mark.parametrize(
    ("job", "says"),
    [
        (_runs_out_of_gpu_memory, "The test job failed: OutOfMemoryError: CUDA out of memory. Tried to allocate"),
        (_hits_a_bad_value, "The test job failed: not a smear"),
        (_runs_out_of_memory, "The test job failed: MemoryError"),
        (_misses_a_column, "The test job failed: KeyError: 'centroid_y'"),
    ],
)
def test_a_worker_error_ends_the_run_with_its_message_and_run_works_again(make_napari_viewer, qtbot, job, says):
    widget = OneJob(make_napari_viewer(), job)
    for _ in range(2):  # the second run starts: the first one really ended
        with qtbot.waitSignal(widget.finished, timeout=10_000):
            widget.run()
        assert widget.status.value.startswith(says)
        assert widget._run_button.enabled and not widget._cancel_button.enabled
        assert widget._progress is None


def test_a_run_waits_for_the_step_a_closed_panel_s_run_is_in(make_napari_viewer, qtbot):
    # A UMAP layout or a download cannot stop midway: closing its panel lets that step end. A run
    # started meanwhile (the panel opened again) waits for it instead of running beside it.
    viewer, release, log = make_napari_viewer(), threading.Event(), []

    @job_worker
    def one_long_step():
        log.append("long step started")
        yield 0, 1
        release.wait(120)  # set by the test at once; the bound only ends a failed test's thread
        log.append("long step ended")
        yield 1, 1

    quick = _logging("second run started", log)
    first = _run_docked(viewer, one_long_step)
    qtbot.waitUntil(lambda: log == ["long step started"])
    viewer.window.remove_dock_widget(first)  # as its close button does
    second = OneJob(viewer, quick)
    viewer.window.add_dock_widget(second)
    second.run()
    qtbot.wait(300)
    assert log == ["long step started"] and second.status.value.endswith(WAITING)
    with qtbot.waitSignal(second.finished, timeout=10_000):  # a waiting run cancels at once
        second.cancel()
    assert log == ["long step started"] and second._run_button.enabled
    second.run()
    with qtbot.waitSignal(second.finished, timeout=10_000):
        release.set()
    assert log == ["long step started", "long step ended", "second run started"]
    assert not second.status.value.endswith(WAITING)
    assert second._run_button.enabled  # and a third run starts at once
    with qtbot.waitSignal(second.finished, timeout=10_000):
        second.run()
    assert log[-1] == "second run started" and len(log) == 4


def _until_the_thread_ends() -> None:
    """Wait, running no Qt events, until the workers' threads are done: their signals
    (``yielded``, ``finished``) then all wait in the queue, as when the GUI was busy as they ended."""
    assert QThreadPool.globalInstance().waitForDone(10_000), "a worker's thread did not end"


def test_a_panel_closed_as_its_run_ends_lets_later_runs_start(make_napari_viewer, qtbot):
    # The run's finished signal was sent before closing the panel connected to it: a run started
    # later must not wait for it forever.
    viewer, log = make_napari_viewer(), []
    short = _logging("ran", log)
    first = _run_docked(viewer, short)
    _until_the_thread_ends()
    viewer.window.remove_dock_widget(first)
    second = OneJob(viewer, short)
    viewer.window.add_dock_widget(second)
    with qtbot.waitSignal(second.finished, timeout=10_000):
        second.run()
    assert log == ["ran", "ran"] and not second.status.value.endswith(WAITING)


def test_a_run_that_ends_while_its_progress_bar_is_made_leaves_no_bar(make_napari_viewer, qtbot):
    # Making a napari progress bar runs Qt events: the run's end, handled among them, must not be
    # followed by a bar that nothing closes any more.
    viewer = make_napari_viewer()
    widget = OneJob(viewer, _hits_a_bad_value)
    viewer.window.add_dock_widget(widget)
    open_bars = len(progress._all_instances)
    with qtbot.waitSignal(widget.finished, timeout=10_000):
        widget.run()
        _until_the_thread_ends()
    assert widget.status.value == "The test job failed: not a smear"
    assert widget._progress is None and len(progress._all_instances) == open_bars
