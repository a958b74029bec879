"""What every dock widget's run machinery must do whatever its worker raises."""

import pytest
import torch
from magicgui.widgets import Container

from napari_reddino.widgets.job_widget import JobWidget, job_worker


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
