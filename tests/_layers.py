"""Real napari cells layers for tests of the functions that take them, and a lazy pyramid level.

napari's ``Labels`` turns a features table's text columns into pandas' string dtype and resets
its index, so a stand-in object would test tables no user has.
"""

import threading

import numpy as np
import pandas as pd
from napari.layers import Labels


def labels_layer(features: pd.DataFrame, name: str = "1 cells", data: np.ndarray | None = None,
                 **metadata) -> Labels:
    """A cells layer with this table (and label image, if given; else one background pixel)."""
    data = np.zeros((1, 1), np.int32) if data is None else data
    return Labels(data, name=name, features=features, metadata=dict(metadata))


class LazyLevel:
    """A slide pyramid's full resolution as a reader opens it, read from disk only when asked
    (dask, zarr): records the thread of each whole read, and may wait for ``gate`` (an Event)
    or fail with ``error`` while read."""

    def __init__(self, array: np.ndarray, *, gate=None, error: Exception | None = None):
        self.array, self.gate, self.error, self.read_in = array, gate, error, []
        self.shape, self.dtype, self.ndim, self.size = array.shape, array.dtype, array.ndim, array.size

    def __getitem__(self, key):
        return self.array[key]

    def __array__(self, dtype=None, copy=None):
        self.read_in.append(threading.current_thread())
        if self.gate is not None:
            self.gate.wait(30)
        if self.error is not None:
            raise self.error
        return self.array
