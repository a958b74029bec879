"""What a run reports while it trains: log.csv rows and warnings of teacher collapse."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from napari_reddino.wording import counted

LOG_NAME = "log.csv"


class CsvLog:
    """Rows appended to a CSV file and synced to disk one by one, so a crash loses nothing.

    Opening it keeps only the rows up to ``resume_step``: a run that resumes from a checkpoint
    logs the later steps again, exactly as a run without the interruption would.
    """

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int) -> None:
        self.path, self.columns = path, list(columns)
        kept = _whole_rows(path, resume_step) if path.exists() else []
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            # a column an older version logged and this one does not is left out; a new one is empty
            writer = csv.DictWriter(handle, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)

    def write(self, row: dict[str, float]) -> None:
        """Append ``row``; a row that cannot be written (a full disk) is warned of and left out,
        not raised: rank 0 alone writes the log, and its error would stop the run on one rank only.
        What part of it reached the file is cut off again, so the next row starts a line."""
        size = None
        try:
            with self.path.open("a", newline="") as handle:
                size = handle.tell()
                csv.DictWriter(handle, self.columns).writerow({key: repr(value) for key, value in row.items()})
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            if size is not None:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
            warnings.warn(f"step {row.get('step')} is not in {self.path} ({error.strerror or error}); "
                          "training goes on", RuntimeWarning, stacklevel=2)


def _whole_rows(path: Path, resume_step: int) -> list[dict[str, str]]:
    """The rows of an earlier log up to ``resume_step`` that are whole: a row cut short by a kill
    or a power cut, or holding damaged bytes, is left out (with a warning), not the run."""
    kept, damaged = [], 0
    with path.open(newline="", errors="replace") as handle:
        reader = csv.DictReader(handle)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # a field past the csv module's size limit (bytes of no line): the reader goes on
                damaged += 1
                continue
            step = row.get("step") or ""
            if not step.isdigit() or not all(map(_number_or_empty, row.values())):
                damaged += 1  # too few fields (None), too many (a list of the rest) or one that is no number
            elif int(step) <= resume_step:
                kept.append(row)
    if damaged:
        warnings.warn(f"left out {counted(damaged, 'damaged row')} of {path} (cut short, or with bytes that are no "
                      "text)", RuntimeWarning, stacklevel=3)
    return kept


def _number_or_empty(value: str | list | None) -> bool:
    """A value a row of the log holds: a number, or nothing (a column added since the row was logged)."""
    if value == "":
        return True
    try:
        float(value)  # "nan" too: a metric that had none at that step
    except (TypeError, ValueError):
        return False
    return True


def is_training_log(path: Path) -> bool:
    """Whether ``path`` is a CSV whose first column is ``step``, as every log.csv has been."""
    try:
        with Path(path).open(newline="") as handle:
            header = next(csv.reader(handle), None)
        return bool(header) and header[0] == "step"
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def read_log(path: Path) -> list[dict[str, float]]:
    with Path(path).open(newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``probs`` (..., prototypes)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)


class CollapseWarning(UserWarning):
    pass


class CollapseDetector:
    """Warns when the teacher's targets stay collapsed for ``patience`` logging steps.

    Uniform collapse: every image's target is close to uniform over the prototypes (mean
    per-image entropy near log K). One-prototype collapse: all images of the batch put their
    mass on the same prototype (entropy of the batch-mean target near 0). The per-image
    entropy alone cannot show the latter: sharp targets on different prototypes are healthy.
    """

    def __init__(self, n_prototypes: int, patience: int = 5, tolerance: float = 0.02) -> None:
        self.max_entropy = math.log(n_prototypes)
        self.patience, self.tolerance = patience, tolerance
        self.kind, self.streak = None, 0

    def update(self, step: int, teacher_entropy: float, batch_entropy: float) -> str | None:
        """Record one logging step; returns (and warns with) a message when a collapse has
        just lasted ``patience`` logging steps."""
        kind = None
        if teacher_entropy >= (1 - self.tolerance) * self.max_entropy:
            kind = "uniform"
        elif batch_entropy <= self.tolerance * self.max_entropy:
            kind = "one-prototype"
        self.streak = self.streak + 1 if kind is not None and kind == self.kind else int(kind is not None)
        self.kind = kind
        if kind is None or self.streak != self.patience:
            return None
        message = f"step {step}: the teacher has collapsed ({kind}) for {self.patience} logging steps; " + (
            f"its targets are near uniform (entropy {teacher_entropy:.3f} of at most "
            f"{self.max_entropy:.3f} nats). Likely cause: a teacher temperature too high for "
            "the centering, or a learning rate so high the head stopped separating prototypes."
            if kind == "uniform"
            else f"every image maps to the same prototype (batch entropy {batch_entropy:.3f} "
            "nats). Likely cause: too weak centering (softmax centre momentum too high; try "
            "sinkhorn_knopp), a teacher temperature too low, or a learning rate too high."
        )
        warnings.warn(message, CollapseWarning, stacklevel=2)
        return message
