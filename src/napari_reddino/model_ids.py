"""How records name the model that made an embedding.

Every model is named as the user named it plus a digest of its weights file:
``reddino-small@sha256:3fa2c91b0d4e5f60``, ``hf_hub:lab/rbc-s1@sha256:…``, and for a local
folder (or a weights file with its architecture) its file name, ``s1@sha256:…``. The digest
decides: the same weights keep their identity wherever they are copied and whatever they are
called, so a head trained on them works on a colleague's machine, while a folder overwritten
with other weights, or a Hub model whose authors published new weights, is another model.

Ids written without a digest (by earlier versions: a Hub name, or a local model's full path)
are compared by name, a path by its last part.

No torch: the cell map and the head compare ids without loading a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePath

WEIGHTS_MARK = "@sha256:"
DIGEST_LENGTH = 16  # hex digits: 64 bits, beyond any lab's number of models


def digested_id(name: str, weights: Path) -> str:
    """``name`` with the digest of the weights file: ViT-L's 1.2 GB take about 0.8 s to hash."""
    with open(weights, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return f"{name}{WEIGHTS_MARK}{digest[:DIGEST_LENGTH]}"


def weights_key(model_id: str | None) -> str | None:
    """What names the weights: the digest of an id that has one, else the id itself."""
    if model_id and WEIGHTS_MARK in model_id:
        return model_id.rpartition(WEIGHTS_MARK)[2]
    return model_id


def named_as(model_id: str | None) -> str | None:
    """The name the user gave the model of ``model_id``, without its digest."""
    return (model_id or "").partition(WEIGHTS_MARK)[0] or None


def same_model(first: str | None, second: str | None) -> bool:
    """Whether two ids name the same weights: by digest where both have one, else by name."""
    if first and second and WEIGHTS_MARK in first and WEIGHTS_MARK in second:
        return weights_key(first) == weights_key(second)
    return _name(first) == _name(second)


def readable_ids(model_ids: list[str | None]) -> list[str]:
    """The ids as messages show them: by their names, unless two differ only in their weights'
    digests (then in full, since that is what differs)."""
    names = [_name(model_id) or "an unnamed model" for model_id in model_ids]
    if len(set(names)) == len(set(model_ids)):
        return names
    return [model_id or "an unnamed model" for model_id in model_ids]


def _name(model_id: str | None) -> str:
    """The name part of an id; of an earlier version's local path, its last part."""
    name = named_as(model_id) or ""
    return PurePath(name).name if PurePath(name).is_absolute() else name
