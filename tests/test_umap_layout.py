"""fit_umap: separated clusters stay separated; small and bad inputs are handled without umap."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from tqdm import tqdm

from napari_reddino import umap_layout
from napari_reddino.steps import StepsCancelled
from napari_reddino.umap_layout import N_EPOCHS, fit_umap, warm_up_umap

N_CLUSTERS, PER_CLUSTER, DIM = 3, 100, 384


def clustered(per_cluster: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clusters around orthogonal directions (cosine 0 apart), each point within ~0.3 rad of its centre."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(DIM, N_CLUSTERS)))[0].T * 10
    membership = np.repeat(np.arange(N_CLUSTERS), per_cluster)
    points = centres[membership] + rng.normal(scale=0.15, size=(len(membership), DIM))
    return points.astype(np.float32), membership


@pytest.fixture(scope="session")
def layout(umap_compiled) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points, membership = clustered(PER_CLUSTER)
    return points, membership, fit_umap(points)


def test_separated_clusters_stay_separated_in_the_map(layout):
    points, membership, xy = layout
    assert xy.shape == (len(points), 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    centroids = np.stack([xy[membership == c].mean(axis=0) for c in range(N_CLUSTERS)])
    to_centroids = np.linalg.norm(xy[:, None, :] - centroids[None], axis=2)
    assert (to_centroids.argmin(axis=1) == membership).all()
    radius = max(to_centroids[membership == c, c].max() for c in range(N_CLUSTERS))
    gap = min(np.linalg.norm(centroids[a] - centroids[b]) for a in range(N_CLUSTERS) for b in range(a))
    assert gap > 2 * radius


def test_the_same_seed_gives_the_same_map(layout):
    points, _, xy = layout
    np.testing.assert_array_equal(fit_umap(points), xy)


def test_progress_follows_the_epochs_and_leaves_the_map_as_it_is(layout):
    points, _, xy = layout
    reports = []
    np.testing.assert_array_equal(fit_umap(points, progress=lambda *step: reports.append(step)), xy)
    done = [step[0] for step in reports]
    assert reports[0] == (0, N_EPOCHS) and reports[-1] == (N_EPOCHS, N_EPOCHS)
    assert done == sorted(done) and {total for _, total in reports} == {N_EPOCHS}


def test_a_stop_before_the_layout_ends_the_fit_there(layout):
    points, _, _ = layout
    reports = []
    with pytest.raises(StepsCancelled):
        fit_umap(points, progress=lambda *step: reports.append(step), should_stop=lambda: True)
    assert reports == []


def test_a_failing_progress_callback_fails_the_fit_after_the_layout_and_frees_tqdm(layout):
    points, _, _ = layout

    def broken(done, total):
        raise RuntimeError("widget deleted")

    with pytest.raises(RuntimeError, match="widget deleted"):
        fit_umap(points, progress=broken)
    another_bar = threading.Thread(target=lambda: list(tqdm(range(3), file=io.StringIO())), daemon=True)
    another_bar.start()  # from another thread: tqdm's lock is reentrant for this one
    another_bar.join(timeout=10)
    assert not another_bar.is_alive(), "tqdm's lock was left held"


def test_n_neighbors_is_clamped_for_few_cells(layout):  # after the fixture: umap is compiled
    points, _, _ = layout
    xy = fit_umap(points[::25], n_neighbors=15)  # 12 cells
    assert xy.shape == (12, 2) and np.isfinite(xy).all()


def test_the_exact_search_finds_the_cosine_neighbours():
    points, _ = clustered(20, seed=1)
    indices, distances = umap_layout._knn(umap_layout._unit_rows(points), 5, 0)
    expected = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute").fit(points).kneighbors(points)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(expected[1], axis=1))
    np.testing.assert_allclose(distances, np.sqrt(2 * expected[0]), atol=1e-3)  # |a - b| = sqrt(2 - 2 cos)
    assert indices.dtype == np.int32 and distances.dtype == np.float32
    # Each cell is its own nearest neighbour at exactly 0: umap reads the first nonzero distance as the nearest.
    assert (indices[:, 0] == np.arange(len(points))).all() and (distances[:, 0] == 0).all()


def test_tiny_inputs_are_laid_out_without_umap():
    assert fit_umap(np.zeros((0, 8))).shape == (0, 2)
    np.testing.assert_array_equal(fit_umap(np.ones((1, 8))), np.zeros((1, 2), np.float32))
    points, membership = clustered(3)  # 9 cells: below MIN_UMAP_POINTS
    xy = fit_umap(points)
    assert xy.shape == (9, 2) and xy.dtype == np.float32
    nearest = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(9) * 1e9
    assert (membership[nearest.argmin(axis=1)] == membership).all()


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [(np.zeros(5), "2-D"), (np.zeros((2, 3, 4)), "2-D"), (np.array([[0.0, np.nan]] * 3), "NaN"),
     (np.array([[np.inf, 1.0]] * 3), "infinite")],
)
def test_bad_embeddings_are_refused(embeddings, message):
    with pytest.raises(ValueError, match=message):
        fit_umap(embeddings)


def test_too_few_neighbours_are_refused():
    with pytest.raises(ValueError, match="n_neighbors"):
        fit_umap(np.ones((20, 4)), n_neighbors=1)


def test_warm_up_starts_one_daemon_thread_per_process(monkeypatch):
    ran = []
    monkeypatch.setattr(umap_layout, "_warm_up", None)
    monkeypatch.setattr(umap_layout, "_compile", lambda: ran.append(threading.current_thread().name))
    thread = warm_up_umap()
    assert isinstance(thread, threading.Thread) and thread.daemon
    assert warm_up_umap() is thread
    thread.join(5)
    assert ran == [thread.name]


def test_large_maps_get_the_neighbours_the_exact_search_finds(umap_compiled):
    # Maps above EXACT_KNN_MAX cells take NNDescent's neighbours: the same rows, by the same distance.
    x = umap_layout._unit_rows(np.random.default_rng(3).normal(size=(600, 16)))
    exact_rows, exact_distances = umap_layout._knn(x, 15, 0)
    rows, distances = umap_layout._nndescent_knn(x, 15, 0)
    assert (rows.shape, rows.dtype, distances.dtype) == ((600, 15), exact_rows.dtype, exact_distances.dtype)
    assert (rows[:, 0] == np.arange(600)).all() and (distances[:, 0] == 0).all()  # each row itself, first
    found = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(rows, exact_rows)])
    assert found > 0.95
    for row in range(0, 600, 37):
        exact = dict(zip(exact_rows[row], exact_distances[row]))
        shared = [column for column, neighbour in enumerate(rows[row]) if neighbour in exact]
        np.testing.assert_allclose(distances[row, shared], [exact[rows[row, c]] for c in shared], atol=1e-4)
