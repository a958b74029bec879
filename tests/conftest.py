"""Fixtures shared across test modules."""

import pytest

from napari_reddino.umap_layout import warm_up_umap


@pytest.fixture(scope="session")
def umap_compiled() -> None:
    """umap's numba code compiled once per session, outside any test's signal timeout.

    The compile takes 45-95 s on a 2-core machine and more on a busy one; a test that waited
    for it inside a GUI timeout failed on CI.
    """
    warm_up_umap().join()
