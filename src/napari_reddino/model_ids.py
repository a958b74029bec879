"""How records name the model that made an embedding.

A Hub model is named as the user named it (``reddino-small``, ``hf_hub:org/name``). A local
model (a folder, or a weights file with its architecture) is named by its file name and a
digest of its weights, ``s1@sha256:3fa2c91b0d4e5f60``: the same weights keep their identity
wherever they are copied, so a head trained on them works on a colleague's machine, and a
folder overwritten with other weights under the same path is a different model. The digest,
not the name, decides: a renamed copy is still the same model.

No torch: the cell map and the head compare ids without loading a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS_MARK = "@sha256:"
DIGEST_LENGTH = 16  # hex digits: 64 bits, beyond any lab's number of models


def local_model_id(name: str, weights: Path) -> str:
    """``name`` with the digest of the weights file: ViT-L's 1.2 GB take about 0.8 s to hash."""
    with open(weights, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return f"{name}{WEIGHTS_MARK}{digest[:DIGEST_LENGTH]}"


def weights_key(model_id: str | None) -> str | None:
    """What two ids must share to name the same model: a local model's digest, else the id."""
    if model_id and WEIGHTS_MARK in model_id:
        return model_id.rpartition(WEIGHTS_MARK)[2]
    return model_id
