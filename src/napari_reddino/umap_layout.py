"""2-D UMAP layout of cell embeddings, with umap's numba code compiled in the background.

Geometry: cosine, computed as euclidean distance between L2-normalised rows. DINO-family CLS
embeddings are compared by direction (their norms vary with contrast and crop); on unit rows
euclidean ranks neighbours exactly as cosine does, the exact search is one matrix product and
NNDescent uses its fastest (squared euclidean) kernel.

Speed: umap's own neighbour search switches from exact to pynndescent at 4,096 points, and
pynndescent's numba code is not cached across processes (about 45 s to compile on a 2-core
CPU). Here the neighbours are found first (exact up to :data:`EXACT_KNN_MAX` points, NNDescent
above) and handed to umap as ``precomputed_knn``, so one code path serves every size and
:func:`warm_up_umap` compiles all of it on a few hundred points. Each fit runs 200 epochs,
umap's own default above 10,000 points (its 500 below that more than doubles the time for
10,000 cells; 200 already separates their clusters cleanly).

Progress rides on umap's own epoch bar (umap has no callback): its tqdm writes ``done/total``
to a file object of ours, at most every 0.1 s. A stop is honoured before the layout starts,
not inside it: tqdm writes while holding its process-wide lock and does not release it when
the file raises, so raising there would hang every later tqdm bar. Where ``tqdm.auto`` picks
its notebook bar (Jupyter with ipywidgets) the file is not written and nothing is reported.

umap and pynndescent are imported on first use: importing them takes seconds, which the
warm-up thread then spends in the background.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable

import numpy as np

from .cell_embeddings import check_embeddings
from .steps import Progress, StepsCancelled

N_EPOCHS = 200
EXACT_KNN_MAX = 4096  # above this NNDescent is faster than the exact search
MIN_UMAP_POINTS = 10  # below this the layout is PCA: umap's spectral start needs more points
WARM_UP_POINTS = 300

_warm_up: threading.Thread | None = None
_warm_up_lock = threading.Lock()


def fit_umap(
    embeddings,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    random_state: int | None = 0,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """UMAP of ``embeddings`` (n, dim) to float32 (n, 2); row i is the point of embedding i.

    ``n_neighbors`` is clamped to n - 1 for small n; fewer than :data:`MIN_UMAP_POINTS` points
    are laid out by PCA instead (n = 1 gives the origin). ``random_state=None`` lets umap run
    its epochs in parallel, at the cost of a layout that differs from run to run.
    ``progress(epochs_done, epochs)`` follows the layout's epochs; ``should_stop()`` is asked
    after the neighbour search, before the layout, and a true answer raises
    :class:`~napari_reddino.steps.StepsCancelled` there.
    """
    x = _unit_rows(embeddings)
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be at least 2; got {n_neighbors}.")
    if len(x) < MIN_UMAP_POINTS:
        return _pca_layout(x)
    import umap

    k = min(n_neighbors, len(x) - 1)
    indices, distances = _knn(x, k, random_state)
    if should_stop is not None and should_stop():
        raise StepsCancelled("Stopped on request.")
    epochs = _EpochReports(progress)
    reducer = umap.UMAP(
        n_neighbors=k,
        min_dist=min_dist,
        n_epochs=N_EPOCHS,
        random_state=random_state,
        n_jobs=1 if random_state is not None else -1,  # a seed makes umap serial; say so, not warn
        precomputed_knn=(indices, distances, None),
        tqdm_kwds=epochs.tqdm_settings(),
    )
    with warnings.catch_warnings():
        # umap warns that transform() needs a search index; a cell map never calls it.
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        xy = reducer.fit_transform(x).astype(np.float32, copy=False)
    if epochs.error is not None:
        raise epochs.error
    return xy


class _EpochReports:
    """The file umap's epoch bar writes ``done/total`` to; passes it on to ``progress``.

    Never raises into tqdm (see the module notes): an error of ``progress`` is kept, reports
    stop, and :func:`fit_umap` raises it once the layout is done.
    """

    _COUNT = re.compile(r"(\d+)/(\d+)")

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.error: Exception | None = None

    def tqdm_settings(self) -> dict:
        if self.progress is None:
            return {"disable": True}
        # only the count, at most every 0.1 s; a fixed miniters keeps tqdm's monitor thread out
        return {"disable": False, "file": self, "bar_format": "{n}/{total}", "mininterval": 0.1, "miniters": 1}

    def write(self, text: str) -> int:
        counts = self._COUNT.findall(text)
        if counts and self.progress is not None:
            done, total = counts[-1]
            try:
                self.progress(int(done), int(total))
            except Exception as error:  # noqa: BLE001  (kept, raised after the layout)
                self.error, self.progress = error, None
        return len(text)

    def flush(self) -> None:
        pass


def warm_up_umap() -> threading.Thread:
    """Compile what :func:`fit_umap` needs in a daemon thread, once per process.

    Later calls return the same thread; ``fit_umap`` works whether or not it has finished
    (it then compiles what is still missing itself). It keeps one core busy for 45-95 s on
    the 2-core test machine: imports, umap's layout, then pynndescent.
    """
    global _warm_up
    with _warm_up_lock:
        if _warm_up is None:
            _warm_up = threading.Thread(target=_compile, name="umap-warm-up", daemon=True)
            _warm_up.start()
        return _warm_up


def _compile() -> None:
    points = np.random.default_rng(0).normal(size=(WARM_UP_POINTS, 8)).astype(np.float32)
    fit_umap(points)  # the layout first: every map needs it; only maps above EXACT_KNN_MAX need NNDescent
    _nndescent_knn(_unit_rows(points), 15, 0)


def _unit_rows(embeddings) -> np.ndarray:
    x = check_embeddings(embeddings)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny))


def _knn(x: np.ndarray, k: int, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and distances (float32) of each row's k nearest rows, itself included.

    The dtypes are pynndescent's, so umap's numba code compiles once for both searches.
    """
    if len(x) > EXACT_KNN_MAX:
        return _nndescent_knn(x, k, random_state)
    indices = np.empty((len(x), k), dtype=np.int32)
    distances = np.empty((len(x), k), dtype=np.float32)
    step = max(1, 2**24 // len(x))  # rows per block: a 64 MB similarity block
    for start in range(0, len(x), step):
        similarity = x[start:start + step] @ x.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        nearest_similarity = np.take_along_axis(similarity, nearest, axis=1)
        order = np.argsort(-nearest_similarity, axis=1, kind="stable")
        indices[start:start + step] = np.take_along_axis(nearest, order, axis=1)
        best = np.take_along_axis(nearest_similarity, order, axis=1)
        distances[start:start + step] = np.sqrt(np.maximum(2 - 2 * best, 0))
    # Rounding leaves a cell ~1e-3 from itself; umap would take that for its nearest neighbour's distance.
    distances[indices == np.arange(len(x))[:, None]] = 0
    return indices, distances


def _nndescent_knn(x: np.ndarray, k: int, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
    from pynndescent import NNDescent

    index = NNDescent(
        x, metric="euclidean", n_neighbors=k, random_state=random_state,
        n_jobs=1 if random_state is not None else -1, low_memory=True, compressed=True,
    )
    return index.neighbor_graph


def _pca_layout(x: np.ndarray) -> np.ndarray:
    """The rows projected on their two main axes (zeros where there is no spread)."""
    layout = np.zeros((len(x), 2), dtype=np.float32)
    if len(x) > 1:
        centred = x - x.mean(axis=0)
        _, _, axes = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ axes[:2].T
        layout[:, :projected.shape[1]] = projected
    return layout
