"""Real napari cells layers for tests of the functions that take them.

napari's ``Labels`` turns a features table's text columns into pandas' string dtype and resets
its index, so a stand-in object would test tables no user has.
"""

import numpy as np
import pandas as pd
from napari.layers import Labels


def labels_layer(features: pd.DataFrame, name: str = "1 cells", data: np.ndarray | None = None,
                 **metadata) -> Labels:
    """A cells layer with this table (and label image, if given; else one background pixel)."""
    data = np.zeros((1, 1), np.int32) if data is None else data
    return Labels(data, name=name, features=features, metadata=dict(metadata))
