"""A Hugging Face Hub model's files: from the local cache without contacting the Hub whenever
they are there, else downloaded.

Only when files are missing does loading go online, after a one-second check that the Hub (or
the proxy) answers at all: huggingface_hub itself retries an unreachable host for about 20
seconds before it gives up, which reads as a frozen plugin. Settings (cache folder, offline,
endpoint) are read from the environment at each load, not when Python started.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

from .model_errors import CheckpointError, DownloadCancelled, ModelNotAvailableError, UnknownModelError

DownloadProgress = Callable[[str, int, int], None]
"""``(filename, bytes_done, bytes_total)``, called as a download advances."""

# timm's Hub layout (what save_for_hf writes); weights in the order they are preferred
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class HubSettings:
    """Hub settings read from the environment when a model is loaded, not when Python started."""

    cache_dir: Path
    offline: bool
    endpoint: str

    @classmethod
    def from_environment(cls) -> HubSettings:
        env = os.environ
        if env.get("HF_HUB_CACHE"):
            cache_dir = Path(env["HF_HUB_CACHE"])
        elif env.get("HF_HOME"):
            cache_dir = Path(env["HF_HOME"]) / "hub"
        else:
            cache_dir = Path(huggingface_hub.constants.HF_HUB_CACHE)
        flag = env.get("HF_HUB_OFFLINE", "").strip().lower()
        offline = flag in ("1", "true", "yes", "on") or (not flag and huggingface_hub.constants.HF_HUB_OFFLINE)
        endpoint = env.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT
        return cls(cache_dir.expanduser(), offline, endpoint.rstrip("/"))


def hub_snapshot(hub_id: str, name: str, download_progress: DownloadProgress | None) -> Path:
    """The snapshot folder holding ``config.json`` and the weights of ``hub_id`` (``org/name[@rev]``)."""
    repo_id, _, revision = hub_id.partition("@")
    revision = revision or None
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except HFValidationError as error:  # "hf_hub:my org/x": the Hub's own error names its Python argument
        raise UnknownModelError(f"{name!r} is no Hugging Face Hub model name (org/name): {error}") from error
    settings = HubSettings.from_environment()
    config = cached_file(repo_id, CONFIG_FILE, revision, settings)
    if config is not None and any(cached_file(repo_id, w, revision, settings) for w in WEIGHT_FILES):
        return config.parent
    unreachable = "HF_HUB_OFFLINE is set" if settings.offline else _hub_unreachable_reason(settings.endpoint)
    if unreachable:
        raise ModelNotAvailableError(_not_downloadable(name, repo_id, settings, unreachable))
    try:
        config = _download(repo_id, CONFIG_FILE, revision, settings, download_progress, name)
    except EntryNotFoundError as error:
        raise CheckpointError(f"Hugging Face repo {repo_id} has no {CONFIG_FILE}, so it is no timm model (timm's "
                              "config says which network its weights fit).") from error
    for weights_name in WEIGHT_FILES:
        try:
            _download(repo_id, weights_name, revision, settings, download_progress, name)
            return config.parent
        except EntryNotFoundError:
            continue
    raise CheckpointError(f"Hugging Face repo {repo_id} has none of {', '.join(WEIGHT_FILES)}.")


def _not_downloadable(name: str, repo_id: str, settings: HubSettings, why: str) -> str:
    """Why a model that is not cached cannot be had, and the ways to it without a download."""
    return (f"Model {name!r} (Hugging Face repo {repo_id}) is not in the local cache {settings.cache_dir} "
            f"and cannot be downloaded: {why}. Download it once on a machine with internet "
            f"(it is then cached), copy that cache folder here (or set HF_HUB_CACHE to it), or put "
            f"{CONFIG_FILE} and {WEIGHT_FILES[0]} from https://huggingface.co/{repo_id} in a folder and "
            f"load that folder (Embed cells: Browse…; Python: load_embedder('/path/to/folder')).")


def cached_file(repo_id: str, filename: str, revision: str | None, settings: HubSettings) -> Path | None:
    found = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=settings.cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _hub_unreachable_reason(endpoint: str) -> str | None:
    """None if the Hub (or the proxy that the environment sets for it) accepts a connection within a second."""
    proxies = urllib.request.getproxies()
    hub = urllib.parse.urlsplit(endpoint)
    bypassed = urllib.request.proxy_bypass(hub.hostname or "")  # NO_PROXY: an in-house mirror, say
    target = endpoint if bypassed else proxies.get(hub.scheme) or proxies.get("all") or endpoint
    url = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:  # getaddrinfo ignores socket timeouts, hence the thread
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S)
    if not outcome:
        return f"{host}:{port} did not answer within {HUB_PROBE_TIMEOUT_S:g} s"
    return None if outcome[0] is None else f"cannot connect to {host}:{port} ({outcome[0]})"


def _download(
    repo_id: str,
    filename: str,
    revision: str | None,
    settings: HubSettings,
    download_progress: DownloadProgress | None,
    name: str,
) -> Path:
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=settings.cache_dir,
                endpoint=settings.endpoint,
                tqdm_class=_reporting_tqdm(filename, download_progress) if download_progress else None,
            )
        )
    except EntryNotFoundError as error:
        if isinstance(error, LocalEntryNotFoundError):  # a network failure after the probe
            raise ModelNotAvailableError(_download_failed(name, repo_id, filename, settings, error)) from error
        raise
    except DownloadCancelled:
        raise
    except Exception as error:  # an HTTP error (a proxy's 403, the Hub down), one that wants a log-in, a connection dropped
        if isinstance(error, OSError) and error.errno in _CACHE_WRITE_ERRORS:
            raise ModelNotAvailableError(
                f"Cannot write the model cache {settings.cache_dir} ({error.strerror}: {error.filename}): make room "
                "there, or set HF_HUB_CACHE to a folder you can write that has room, then load the model again."
            ) from error
        raise ModelNotAvailableError(_download_failed(name, repo_id, filename, settings, error)) from error


# a cache folder shared read-only or another user's, a full disk or quota
_CACHE_WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _download_failed(name: str, repo_id: str, filename: str, settings: HubSettings, error: Exception) -> str:
    if isinstance(error, LocalEntryNotFoundError) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # what huggingface_hub met (a 403, a reset), not its summary
    why = (str(error).strip() or "no message").splitlines()[0]
    return _not_downloadable(name, repo_id, settings, f"the download of {filename} failed ({type(error).__name__}: {why})")


def _reporting_tqdm(filename: str, report: DownloadProgress) -> type:
    """A huggingface_hub progress bar class that also calls ``report(filename, done, total)``,
    counting bytes itself because a disabled bar (HF_HUB_DISABLE_PROGRESS_BARS) does not."""

    class ReportingTqdm(huggingface_hub.utils.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.bytes_done = int(kwargs.get("initial", 0))

        def update(self, n: float | None = 1) -> bool | None:
            self.bytes_done += int(n or 0)
            report(filename, self.bytes_done, int(self.total or 0))
            return super().update(n)

        # With these, huggingface_hub counts a Xet download's network bytes on this one bar too
        # rather than opening a second: the bytes written to the file are the ones reported.
        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_transfer_postfix_str(self, text: str = "", refresh: bool = True) -> None:
            pass

    return ReportingTqdm


def copied_cache_snapshot(folder: Path) -> Path | None:
    """The snapshot with a whole model that ``folder``, a Hugging Face cache's
    ``models--org--name``, holds: its main branch's, else the newest (a download of a tag or a
    commit, or one given up, leaves no whole main); None for any other folder."""
    if not folder.name.startswith("models--") or not (folder / "snapshots").is_dir():
        return None
    main = folder / "refs" / "main"
    named = [folder / "snapshots" / main.read_text(encoding="utf-8").strip()] if main.is_file() else []
    others = sorted((folder / "snapshots").iterdir(), key=lambda snapshot: snapshot.stat().st_mtime, reverse=True)
    whole = [snapshot for snapshot in (*named, *others) if snapshot.is_dir() and (snapshot / CONFIG_FILE).is_file()
             and any((snapshot / weights).is_file() for weights in WEIGHT_FILES)]
    return whole[0] if whole else None


def fresh_copy_advice(path: Path) -> str:
    """How to replace ``path`` where it is a Hugging Face cache's copy of a download: the cache
    keeps the damaged blob, and deleting the snapshot's file alone links it again."""
    parts = path.parts
    at = len(parts) - 1 - parts[::-1].index("snapshots") if "snapshots" in parts[:-1] else 0
    if at < 1 or not parts[at - 1].startswith("models--"):
        return ""
    repo = Path(*parts[:at])
    if repo.parent.resolve() != HubSettings.from_environment().cache_dir.resolve():  # a copy loaded with Browse…
        return f" It is a copy of a Hugging Face cache's {repo.name}: copy that folder here again from a whole cache."
    return f" It is the Hugging Face cache's copy: delete the folder {repo} and load the model again to download it anew."
