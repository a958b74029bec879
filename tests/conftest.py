"""Fixtures shared across test modules."""

import signal
import sys
import time

import pytest

from napari_reddino.umap_layout import warm_up_umap


@pytest.fixture(scope="session")
def umap_compiled() -> None:
    """umap's numba code compiled once per session, outside any test's signal timeout.

    The compile takes 45-95 s on a 2-core machine and more on a busy one; a test that waited
    for it inside a GUI timeout failed on CI.
    """
    warm_up_umap().join()


@pytest.fixture
def terminal_ctrl_c():
    """Ctrl-C as Python takes it in a terminal, however the tests were started (a job a script
    sent to the background ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def fp32_on_every_cpu(monkeypatch):
    """ "auto" precision is fp32 in every test, as on this machine, unless a test pretends to be
    another CPU: on one with native bf16 it times bf16 faster and picks it, and comparisons of
    embeddings made in batches of other sizes no longer hold to 1e-4."""
    from napari_reddino import precision_speed

    monkeypatch.setattr(precision_speed, "cpu_features", lambda: {})


@pytest.fixture(autouse=True)
def no_run_left_waiting():
    """A closed panel's run still finishing holds every later run (job_widget's module state):
    one that never ends would turn one failure into a session of timeouts. Each test leaves none."""
    yield
    job_widget = sys.modules.get("napari_reddino.widgets.job_widget")
    if job_widget is None or not (job_widget._finishing or job_widget._waiting):
        return
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + 15
    while job_widget._finishing and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    left = (len(job_widget._finishing), len(job_widget._waiting))
    job_widget._finishing.clear()
    job_widget._waiting.clear()
    assert left == (0, 0), f"{left[0]} closed panels' runs still running, {left[1]} runs waiting for them"
