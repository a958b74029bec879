"""Long jobs as generators: they yield ``(done, total)`` and return their result.

A napari ``thread_worker`` runs such a generator directly (``yield from``) and cancels it by
asking for no further step (the generator is closed when it is collected); scripts and
notebooks use :func:`run_steps` with plain callbacks, which closes it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

Result = TypeVar("Result")
Progress = Callable[[int, int], None]


class StepsCancelled(Exception):
    """``should_stop()`` answered true between two steps; the work was stopped there."""


def run_steps(
    steps: Generator[tuple[int, int], None, Result],
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """Run ``steps`` to its return value, reporting each step and checking for a stop before it."""
    while True:
        if should_stop is not None and should_stop():
            steps.close()
            raise StepsCancelled("Stopped on request.")
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)
