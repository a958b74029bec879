"""The errors of finding, downloading and reading a model, each with a message that says why
and what to do (shared by :mod:`.models` and :mod:`.hub_files`)."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class UnknownModelError(ModelLoadError, ValueError):
    """The name is neither a known model, a Hub id, nor an existing file or folder."""


class ModelNotAvailableError(ModelLoadError):
    """The model is not in the local cache and cannot be downloaded now."""


class DownloadCancelled(Exception):
    """The loading was given up during a download (see ``embedding.iter_load_embedder``)."""


class CheckpointError(ModelLoadError):
    """A weights or config file is unreadable or does not fit its architecture."""
