"""Cell embeddings kept on the cells Labels layer, keyed by label id, with what they came from.

Embeddings are not feature columns (napari shows every column on hover; 384-1024 of them would
drown the table). They live in the cells layer's metadata under one key::

    cells.metadata["reddino_embeddings"] = {
        "label_ids":   int64 array (n,), ascending: the cells' label ids,
        "embeddings":  float32 array (n, dim): row i belongs to label_ids[i],
        "model_id":    the model's id (Embedder.model_id: its name and a digest of its weights,
                       "reddino-small@sha256:…"; see napari_reddino.model_ids),
        "fingerprint": hex digest of the inputs (see :func:`fingerprint`),
        "labels_digest": hex digest of the labels embedded (see :func:`repainted_since_embedded`),
        "image_digest": hex digest of the smear's pixels embedded (see :func:`image_changed_since_embedded`),
        "crop_checks": float32 array (n, 2): each cell's crop as the model saw it, in two numbers
                       (``crops.crop_checks``), so the next run can keep what it would compute again,
        "crop_background": float32 array (3,): the colour blanked and padded pixels took, which the
                       next run keeps while its own lies within a level or two (a stroke moves it),
        "crop_mode", "crop_scale", "margin": how each cell was cropped (:func:`crop_settings`),
        "model", "device": how they were computed, for people.
    }

So they travel with the layer: closing and reopening a widget finds them, and a layer removed
takes its embeddings with it. Read them with :func:`embeddings_of`; look a cell up by its
label id (``np.searchsorted(label_ids, label)``), never by row order.

The fingerprint digests the whole image (shape, dtype and every pixel), the whole label image,
the model's identity (its canonical id, plus the modification time of a local model or the
cached commit of a Hub model) and the crop settings. Embeddings are up to date when the stored
fingerprint equals the current one. The device and precision are not part of it: switching CPU
for GPU does not recompute. When it differs, :func:`earlier_run` hands the stored run to
``Embedder.embed_steps(reuse=)``, which runs the model only on cells whose crop changed: after a
brush stroke, the painted cell and the neighbours whose windows it reaches.

No Qt, no napari: ``layer`` is anything with a ``metadata`` dict (a napari Labels layer).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

METADATA_KEY = "reddino_embeddings"


def _digest(array: np.ndarray) -> str:
    """SHA-256 of the shape, dtype and every value of ``array``. Current x86 and ARM CPUs hash
    SHA-256 in hardware: 80 ms for an 8000 x 6000 RGB smear here, half of BLAKE2b's time."""
    digest = hashlib.sha256(repr((array.shape, array.dtype.str)).encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class EmbeddedCells:
    """One embedding run: label ids ascending, their float32 embeddings (n, dim), the
    ``crops.crop_checks`` of their crops (n, 2; None when not recorded), the model's id, how
    many cells kept an earlier embedding because their crop had not changed, and the colour the
    crops' blanked and padded pixels took (RGB in the image's levels; None when not recorded)."""

    ids: np.ndarray
    embeddings: np.ndarray
    checks: np.ndarray | None
    model_id: str
    reused: int = 0
    background: np.ndarray | None = None


def image_digest(image) -> str:
    """A digest of the whole image: shape, dtype and every pixel."""
    return _digest(np.asarray(image))


def model_key(model: str | os.PathLike) -> str:
    """What names a model's weights: its canonical id, plus when a local model last changed or
    which commit of a Hub model is cached."""
    from .models import canonical_id, model_version  # torch and timm, imported on first use

    version = model_version(model)
    return canonical_id(model) + (f"@{version}" if version else "")


def fingerprint(image, labels_hash: str, model: str | os.PathLike, *, mode: str, scale: str, margin: float) -> str:
    """A digest of everything the embeddings of some labels in ``image`` with ``model`` depend on.

    The labels come as their :func:`labels_digest` (``labels_hash``), which the run records too:
    they are hashed once. ``image`` may come as its :func:`image_digest` too.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update((image if isinstance(image, str) else image_digest(image)).encode())
    digest.update(labels_hash.encode())
    digest.update(repr((model_key(model), mode, scale, float(margin))).encode())
    return digest.hexdigest()


def check_embeddings(embeddings) -> np.ndarray:
    """``embeddings`` as a finite float32 (cells x features) array, or a ValueError that says what is wrong."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"Embeddings must be a 2-D array (cells x features); got shape {embeddings.shape}.")
    if not np.isfinite(embeddings).all():
        raise ValueError("Embeddings contain NaN or infinite values; embed the cells again.")
    return embeddings


def store_embeddings(
    layer, label_ids: np.ndarray, embeddings: np.ndarray, *, model_id: str, fingerprint: str, **about
) -> dict:
    """Put the embeddings on ``layer`` (replacing earlier ones) and return the stored record."""
    label_ids = np.asarray(label_ids, dtype=np.int64)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(label_ids):
        raise ValueError(f"{len(label_ids)} label ids but embeddings of shape {embeddings.shape}.")
    record = {
        "label_ids": label_ids,
        "embeddings": embeddings,
        "model_id": str(model_id),
        "fingerprint": fingerprint,
        **about,
    }
    layer.metadata = {**layer.metadata, METADATA_KEY: record}  # a new dict: a napari layer tells its listeners
    return record


def store_run(layer, run: EmbeddedCells, *, model: str | os.PathLike, device, crops: dict, fingerprint: str,
              labels_digest: str, image_hash: str) -> dict:
    """:func:`store_embeddings` with what every embedding run records: the model as it was named,
    the crop settings (``crops``: mode, scale, margin, as ``Embedder.embed`` takes them), the
    device, the :func:`labels_digest` of the labels and the :func:`image_digest` of the pixels
    embedded, and the crops' checks. The Embed widget and ``reddino-analyse`` both store through
    here, so their records match."""
    return store_embeddings(layer, run.ids, run.embeddings, model_id=run.model_id, fingerprint=fingerprint,
                            model=str(model), crop_mode=crops["mode"], crop_scale=crops["scale"],
                            margin=crops["margin"], device=str(device), labels_digest=labels_digest,
                            image_digest=image_hash, crop_checks=run.checks, crop_background=run.background)


def crop_settings(layer) -> dict | None:
    """How the cells of ``layer`` were cropped for their embeddings (``mode``, ``scale``,
    ``margin``, as ``Embedder.embed`` takes them), or None where that was not recorded."""
    record = getattr(layer, "metadata", {}).get(METADATA_KEY)
    if not isinstance(record, dict) or not {"crop_mode", "crop_scale", "margin"} <= record.keys():
        return None
    return {"mode": str(record["crop_mode"]), "scale": str(record["crop_scale"]), "margin": float(record["margin"])}


def crops_in_words(crops: dict) -> str:
    """``masked crops at smear scale, margin 0.25``: crop settings as the widgets name them."""
    return f"{crops['mode']} crops at {crops['scale']} scale, margin {crops['margin']:g}"


def earlier_run(layer) -> EmbeddedCells | None:
    """The embedding run stored on ``layer``, for ``Embedder.embed_steps(reuse=)``; None when it
    has none, or one stored without crop checks (nothing could be reused from it)."""
    record = getattr(layer, "metadata", {}).get(METADATA_KEY)
    if not isinstance(record, dict) or record.get("crop_checks") is None:
        return None
    return EmbeddedCells(record["label_ids"], record["embeddings"], record["crop_checks"], record["model_id"],
                         background=record.get("crop_background"))


def changed_embeddings(layer, run: EmbeddedCells) -> np.ndarray:
    """The label ids of ``run`` whose embedding is not the one stored on ``layer`` (all of them
    when it has none, or none of that size): what a head predicted for those cells no longer
    holds. The vectors decide, not the model's name. Call it before storing ``run``."""
    stored = embeddings_of(layer)
    if stored is None or stored[1].shape[1:] != run.embeddings.shape[1:]:
        return np.asarray(run.ids)
    ids, vectors, _ = stored
    rows = np.clip(np.searchsorted(ids, run.ids), 0, max(len(ids) - 1, 0))
    same = np.zeros(len(run.ids), dtype=bool)
    if len(ids):
        same = (ids[rows] == run.ids) & np.all(vectors[rows] == run.embeddings, axis=1)
    return np.asarray(run.ids)[~same]


def labels_digest(labels) -> str:
    """A digest of the whole label image (about 15 ms for 2400 x 3200 int32 labels)."""
    return _digest(np.asarray(labels))


def _recorded(layer, key: str):
    """``key`` of the embedding record on ``layer``; None where it has no record, or none of that key."""
    record = getattr(layer, "metadata", {}).get(METADATA_KEY)
    return record.get(key) if isinstance(record, dict) else None


def repainted_since_embedded(layer) -> bool:
    """Whether the labels of ``layer`` changed (painted, segmented again) since its embeddings
    were stored: then some embeddings describe cells that are no longer there."""
    known = _recorded(layer, "labels_digest")
    return bool(known) and known != labels_digest(layer.data)


def image_changed_since_embedded(layer, pixels) -> bool:
    """Whether ``pixels``, the smear under ``layer``, changed since its cells were embedded (a
    correction applied to the image in place): then the embeddings describe the old pixels.
    Records from before the image digest was kept cannot tell, and say no."""
    known = _recorded(layer, "image_digest")
    return bool(known) and known != image_digest(pixels)


def stored_fingerprint(layer) -> str | None:
    """The fingerprint of the embeddings on ``layer``, or None when it has none."""
    return _recorded(layer, "fingerprint")


def embeddings_of(layer) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``(label_ids, embeddings, model_id)`` stored on a cells layer, or None when it has none.

    ``label_ids`` are int64 ascending; row i of the float32 ``embeddings`` is the cell labelled
    ``label_ids[i]``.
    """
    record = getattr(layer, "metadata", {}).get(METADATA_KEY)
    if not isinstance(record, dict):
        return None
    return record["label_ids"], record["embeddings"], record["model_id"]
