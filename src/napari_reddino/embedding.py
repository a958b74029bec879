"""Embed every cell of a smear: one vector per label id, from a RedDino-style model.

:func:`list_devices` says where a model can run here (and why not elsewhere);
:func:`load_embedder` loads a model once per (model, device, dtype) and returns an
:class:`Embedder`. ``Embedder.embed(image, labels)`` cuts one crop per cell (see
:mod:`napari_reddino.crops`), runs the model in batches and returns the label ids in
ascending order with their embeddings: for RedDino the class token after the final norm. A
model exported by ``reddino-train`` records how the cells it trained on were cut, and its cells
are cut so unless asked otherwise (``Embedder.crops``); other models get the plugin's defaults.

While the model runs on one batch, a worker thread cuts the next, so the model never waits
for crops; on a GPU, a batch's embeddings come back to the CPU while the next batch runs (in
float16 each batch is first checked for overflow, which waits for it). Given an earlier run of
the same model (``reuse=``), a cell whose crop is what it was keeps its embedding and only the
others go through the model. The batch size follows the
free memory of the device and halves when a CUDA batch runs out of memory. Work can be
cancelled between batches, and :meth:`Embedder.embed_steps` is a generator that yields
progress, fit for a napari ``thread_worker``.

``compile=True`` runs the model through ``torch.compile``, which fuses the elementwise work
between its matrix products: on an H100, 1.2-1.3x the cells/s of ViT-S, B and L, after 20-32 s
of compiling in the first batch (benchmarks/RESULTS.md, "On an H100"); on a CPU, no gain. It
pays past about a million ViT-S cells or 300,000 ViT-L cells, as in ``reddino-analyse
--compile``; the widgets leave it off (it needs triton, which :mod:`.triton_guard` may keep out
of napari).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .crop_windows import CropMode, CropScale, chosen_crops
from .crops import (
    crop_checks,
    cuda_free_bytes,
    prepare_crops,
)
from .cell_embeddings import EmbeddedCells
from .hub_files import DownloadProgress
from .model_errors import DownloadCancelled
from .models import (
    LoadedModel,
    canonical_id,
    load_model,
    model_version,
)
from .precision_speed import auto_dtype
from .image_input import is_positive
from .model_ids import same_model
from .steps import Progress, StepsCancelled, run_steps

# Peak activation memory of one image in a ViT forward, as a multiple of its input tensor's
# bytes; generous so the first batch fits, and a CUDA out-of-memory error halves it anyway.
_ACTIVATION_FACTOR = 64
# Larger CPU batches were no faster (ViT-S, 2 cores; benchmarks/embedding.py) and report
# progress less often.
_MAX_BATCH = {"cuda": 512, "mps": 64, "cpu": 8}
LOAD_POLL_S = 0.2  # iter_load_embedder yields at least this often


# --- devices and precision -----------------------------------------------------------------


class DeviceError(ValueError):
    """The requested device does not exist or cannot be used here."""


@dataclass(frozen=True)
class DeviceOption:
    """One device a model could run on; ``detail`` names it, or says why it is unavailable."""

    name: str
    available: bool
    detail: str


def list_devices() -> list[DeviceOption]:
    """Every device kind this machine might offer, the unavailable ones with the reason."""
    options = [DeviceOption("cpu", True, f"{torch.get_num_threads()} threads")]
    if not torch.backends.cuda.is_built():
        options.append(DeviceOption("cuda", False, "this PyTorch was built without CUDA"))
    elif torch.cuda.device_count() == 0:
        options.append(DeviceOption("cuda", False, "no NVIDIA GPU or driver found"))
    else:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            options.append(DeviceOption(f"cuda:{index}", True, f"{props.name}, {props.total_memory / 2**30:.0f} GiB"))
    if not torch.backends.mps.is_built():
        options.append(DeviceOption("mps", False, "Apple GPUs (MPS) need PyTorch on macOS with Apple silicon"))
    elif not torch.backends.mps.is_available():
        options.append(DeviceOption("mps", False, "MPS is built in but unavailable (macOS 12.3+ needed)"))
    else:
        options.append(DeviceOption("mps", True, "Apple GPU"))
    return options


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; other names must exist here."""
    options = list_devices()
    available = [option.name for option in options if option.available]
    if str(device) == "auto":
        preferred = next((name for name in available if name.startswith("cuda")), None)
        return torch.device(preferred or ("mps" if "mps" in available else "cpu"))
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"{device!r} is not a device name; available here: {', '.join(available)}.") from error
    if chosen.type == "cuda" and chosen.index is None and torch.cuda.device_count() > 0:
        chosen = torch.device("cuda", torch.cuda.current_device())
    name = chosen.type if chosen.index is None else f"{chosen.type}:{chosen.index}"
    if name in available or (chosen.type == "mps" and "mps" in available):
        return chosen
    reasons = [f"{option.name}: {option.detail}" for option in options if not option.available]
    raise DeviceError(
        f"Device {name!r} is not available. Available here: {', '.join(available)}."
        + (f" ({'; '.join(reasons)})" if reasons else "")
    )


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute precision: ``None``/``"auto"`` is bf16 where it saves time (CUDA GPUs from Ampere on; CPUs
    with AVX512-BF16 or AMX whose bf16 matrix products time faster, see :mod:`.precision_speed`),
    else fp16 on GPUs with fast fp16 (Volta, Turing, the P100), else fp32. A model that overflows
    fp16 falls back to fp32 (:meth:`Embedder.embed_crops`).

    Measured on CPUs (benchmarks/RESULTS.md): where bf16 is fast (Zen 4), bf16 embeds 1.6x
    (ViT-S) and 1.9x (ViT-B) as many cells per second as fp32, within 7.6e-3 relative error;
    without bf16 instructions 1.9x fewer, and on a Sapphire Rapids VM without AMX 1.6x fewer.
    """
    if dtype is None or dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"Unsupported dtype {dtype!r}; use 'auto' or one of {', '.join(DTYPE_NAMES)}.")


# --- embedding ------------------------------------------------------------------------------


class EmbeddingCancelled(StepsCancelled):
    """Raised by :meth:`Embedder.embed` when ``should_stop()`` turned true between batches."""


class Embedder:
    """A loaded model on a device, turning (image, labels) into one embedding per cell."""

    def __init__(self, loaded: LoadedModel, *, device: torch.device, dtype: torch.dtype, compile: bool = False):
        self.model_id = loaded.model_id
        self.input_size = loaded.input_size
        self.mean, self.std = loaded.mean, loaded.std
        self.trained_crops = loaded.crops  # how its training cells were cut, where its config records it
        self.device, self.dtype = device, dtype
        self.model = loaded.module.to(device)
        self.dim = int(self.model.num_features)
        # what runs the crops: the model, or torch.compile's wrapper of it (compiled on first use)
        self.network: torch.nn.Module = torch.compile(self.model) if compile else self.model
        self._fitting_batch: int | None = None  # set after an out-of-memory error

    def __repr__(self) -> str:
        return (
            f"Embedder({self.model_id!r}, dim={self.dim}, device={self.device}, dtype={self.dtype}, "
            f"input_size={self.input_size}{', compiled' if self.compiled else ''})"
        )

    @property
    def crops(self) -> dict:
        """The crop mode, scale and margin :meth:`embed` cuts cells with when given none: those
        the model's training cells were cut with (``trained_crops``), else the plugin's defaults."""
        return chosen_crops(trained=self.trained_crops)

    @property
    def compiled(self) -> bool:
        return self.network is not self.model

    def embed(
        self,
        image,
        labels,
        *,
        mode: CropMode | None = None,
        margin: float | None = None,
        scale: CropScale | None = None,
        ids=None,
        batch_size: int | None = None,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(label_ids, embeddings)``: int64 ids ascending, float32 (n_cells, dim) in the same order.

        ``mode``, ``margin`` and ``scale`` left out are taken from :attr:`crops`: as the model's
        training cells were cut, where its config says, else the plugin's defaults.

        ``ids`` embeds only those cells; their crops are the same as when every cell is embedded
        (windows sized, neighbours blanked and padding coloured from all of ``labels``).

        ``should_stop`` (e.g. ``threading.Event().is_set``) is asked each time a batch's
        embeddings are in; when it answers true, :class:`EmbeddingCancelled` is raised. On a GPU
        they come in one batch late, while the next batch runs, so that one finishes first.
        """
        steps = self.embed_steps(image, labels, mode=mode, margin=margin, scale=scale, ids=ids,
                                 batch_size=batch_size)
        try:
            run = run_steps(steps, progress, should_stop)
        except StepsCancelled:
            raise EmbeddingCancelled(f"Embedding with {self.model_id} was cancelled.") from None
        return run.ids, run.embeddings

    def embed_steps(
        self,
        image,
        labels,
        *,
        mode: CropMode | None = None,
        margin: float | None = None,
        scale: CropScale | None = None,
        ids=None,
        batch_size: int | None = None,
        reuse: EmbeddedCells | None = None,
    ) -> Generator[tuple[int, int], None, EmbeddedCells]:
        """Like :meth:`embed`, as a generator: yields ``(done, total)`` after each batch and
        returns an :class:`EmbeddedCells`. Closing it stops the work after the current batch (on
        a GPU, whose results come one batch late, after the next one too).

        ``reuse``, an earlier run with this model (its weights' id), lends its embedding to each
        cell of the same label id whose crop has the same checks (``crops.crop_checks``); only
        the other cells go through the model. Its background colour is kept where the smear's
        own is within a level or two of it (see :class:`~napari_reddino.crops.CropSampler`)."""
        if batch_size is not None and not is_positive(batch_size, whole=True):
            raise ValueError(f"batch_size must be a positive whole number of cells, not {batch_size!r}.")
        if reuse is not None and (not same_model(reuse.model_id, self.model_id) or reuse.checks is None
                                  or reuse.embeddings.shape[1:] != (self.dim,)):  # vectors dropped, or another model
            reuse = None
        crops = chosen_crops(mode, scale, margin, trained=self.trained_crops)
        windows, sampler = prepare_crops(image, labels, size=self.input_size, **crops,
                                         device=self.device, mean=self.mean, std=self.std,
                                         earlier_background=reuse.background if reuse is not None else None)
        if ids is not None:
            windows = windows.of(ids)
        embedded = EmbeddedCells(windows.ids, np.zeros((len(windows), self.dim), dtype=np.float32),
                                 np.zeros((len(windows), 2), dtype=np.float32), self.model_id,
                                 background=sampler.background)
        if not len(windows):
            return embedded
        batch = batch_size or self.auto_batch_size()
        self._fitting_batch = None  # an earlier smear's out-of-memory may have been another program's

        # the cutting thread queues its work where this thread queues the model's, so one waits for the other
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def cut(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                crops = sampler(windows.ids[start : start + batch], windows.boxes[start : start + batch])
                return crops, crop_checks(crops)

        # On a GPU, a batch's results come back while the next one runs: waiting for them at once
        # would leave the GPU idle until the CPU had queued the next batch's work. (In float16
        # each batch is checked for overflow, and with reuse= its checks are needed, at once.)
        lag = 1 if self.device.type == "cuda" else 0
        on_the_way: deque[_BatchResults] = deque()
        reused = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reddino-crops") as cutter:
            upcoming = cutter.submit(cut, 0)
            for start in range(0, len(windows), batch):
                crops, checks = upcoming.result()
                if start + batch < len(windows):
                    upcoming = cutter.submit(cut, start + batch)
                rows = slice(start, start + len(crops))
                fresh = None  # every cell
                if reuse is not None:  # which cells the model must see depends on the checks: wait for them
                    embedded.checks[rows] = checks.cpu().numpy()
                    kept = _kept(reuse, windows.ids[rows], embedded.checks[rows])
                    fresh = kept < 0
                    embedded.embeddings[rows][~fresh] = reuse.embeddings[kept[~fresh]]
                    reused += int((~fresh).sum())
                    if not fresh.all():
                        crops = crops[torch.from_numpy(fresh).to(crops.device)]
                vectors = self.embed_crops(crops) if len(crops) else None
                on_the_way.append(_BatchResults(rows, fresh, vectors, checks, self.device))
                while len(on_the_way) > lag:
                    yield on_the_way.popleft().land(embedded), len(windows)
            while on_the_way:
                yield on_the_way.popleft().land(embedded), len(windows)
        return dataclasses.replace(embedded, reused=reused)

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Embeddings (float32, on the device) of normalised model inputs (n, 3, H, W).

        On CUDA an out-of-memory error halves the batch instead of failing; the smaller size
        is kept for later batches, until the next image is embedded. In float16, a batch whose
        embeddings are not finite (the model overflowed float16's range, 65,504) runs again in
        float32, as does all that follows, with a warning.
        """
        outputs, start = [], 0
        while start < len(crops):
            chunk = min(len(crops) - start, self._fitting_batch or len(crops))
            try:
                outputs.append(self._forward(crops[start : start + chunk]))
                start += chunk
                continue
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
            self._fitting_batch = chunk // 2
            torch.cuda.empty_cache()  # after the except block, whose traceback held the activations
        return torch.cat(outputs)

    def _forward(self, crops: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype  # another thread may switch it (float16 overflowed) while this one runs
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        inputs = crops.to(self.device, non_blocking=True).contiguous()
        count = len(inputs)
        if self.compiled and count == 1:  # torch.compile treats a batch of one apart: pad, not compile again
            inputs = torch.cat([inputs, inputs])  # here, not under inference_mode: that would recompile too
        with torch.inference_mode(), autocast:
            outputs = (self._run_compiled(inputs) if self.compiled else self.model(inputs))[:count].float()
        if dtype == torch.float16 and not torch.isfinite(outputs).all():  # waits for the GPU: fp16 only
            warnings.warn(f"{self.model_id} overflowed float16 on {self.device}; it runs in float32 from here on.",
                          RuntimeWarning, stacklevel=2)
            self.dtype = torch.float32
            return self._forward(crops)
        return outputs

    def _run_compiled(self, inputs: torch.Tensor) -> torch.Tensor:
        """The compiled network on ``inputs``, compiled once for any batch size; where the
        compiler fails (no C++ compiler, no triton), a warning and the model as it is."""
        torch._dynamo.maybe_mark_dynamic(inputs, 0)
        try:
            return self.network(inputs)
        except Exception as error:
            if (out_of_memory := _out_of_memory_in(error)) is not None:
                raise out_of_memory from None  # the batch halves, as uncompiled
            outputs = self.model(inputs)  # the model's own errors come from here, and compiling stays on
            reason = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
            warnings.warn(f"torch.compile could not compile {self.model_id} ({type(error).__name__}: {reason}); "
                          "it runs uncompiled.", RuntimeWarning, stacklevel=2)
            self.network = self.model
            return outputs

    def auto_batch_size(self) -> int:
        """Cells per batch: what half the free device memory holds, up to a per-device cap."""
        height, width = self.input_size
        per_image = 3 * height * width * 4 * _ACTIVATION_FACTOR
        cap = _MAX_BATCH.get(self.device.type, 8)
        free = _free_memory(self.device)
        return cap if free is None else int(np.clip(free // 2 // per_image, 1, cap))


def _out_of_memory_in(error: BaseException) -> torch.cuda.OutOfMemoryError | None:
    """The CUDA out-of-memory error ``error`` is or wraps (the compiler wraps its own), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _BatchResults:
    """One batch's embeddings and crop checks on their way to the CPU: on CUDA the copies are
    queued behind the model and :meth:`land` waits for them."""

    def __init__(self, rows: slice, fresh: np.ndarray | None, vectors: torch.Tensor | None, checks: torch.Tensor,
                 device: torch.device):
        self.rows, self.fresh = rows, fresh
        # non-blocking copies from a GPU land in pinned memory, which the copy engine writes on its own
        self.vectors = vectors.to("cpu", non_blocking=vectors.is_cuda) if vectors is not None else None
        self.checks = checks.to("cpu", non_blocking=checks.is_cuda)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(device))

    def land(self, embedded: EmbeddedCells) -> int:
        """Write the results into ``embedded``'s rows; returns how many cells are done after them."""
        if self.copied is not None:
            self.copied.synchronize()
        embedded.checks[self.rows] = self.checks.numpy()
        if self.vectors is not None:
            out = embedded.embeddings[self.rows]
            out[slice(None) if self.fresh is None else self.fresh] = self.vectors.numpy()
        return self.rows.stop


def _kept(reuse: EmbeddedCells | None, ids: np.ndarray, checks: np.ndarray) -> np.ndarray:
    """For each cell of ``ids``, its row in ``reuse`` when that run saw the same crop, else -1."""
    kept = np.full(len(ids), -1)
    if reuse is None or not len(reuse.ids):
        return kept
    rows = np.minimum(np.searchsorted(reuse.ids, ids), len(reuse.ids) - 1)
    same = (reuse.ids[rows] == ids) & (reuse.checks[rows] == checks).all(axis=1)
    kept[same] = rows[same]
    return kept


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``, or None where that cannot be asked."""
    if device.type == "cuda":
        return cuda_free_bytes(device)
    if device.type == "cpu":
        return _available_ram()
    return None


def _available_ram() -> int | None:
    """Memory that can be had without swapping: Linux's MemAvailable, which counts the page cache
    a workstation fills (MemFree does not), within the job's own limit where a container or a
    SLURM job sets one (cgroup v2); elsewhere the free pages."""
    available = [_meminfo_available(), _cgroup_room()]
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names and available[0] is None:
        available.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    known = [value for value in available if value is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _cgroup_room() -> int | None:
    """What this process's cgroup (v2) may still use; None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


# The models used last, kept loaded: RedDino small, base and large side by side, not every
# checkpoint a lab compares (a ViT-L is 1.2 GB in float32), which a job holding one keeps anyway.
CACHED_EMBEDDERS = 3
_EMBEDDERS: OrderedDict[tuple, Embedder] = OrderedDict()  # least recently used first
_EMBEDDERS_LOCK = threading.Lock()  # held only to read or change _EMBEDDERS
_LOADING: dict[str, threading.Lock] = {}  # one per model: a model loads once, and others load meanwhile


def load_embedder(
    model: str | os.PathLike = "reddino-small",
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    architecture: str | None = None,
    download_progress: DownloadProgress | None = None,
    compile: bool = False,
) -> Embedder:
    """Load ``model`` (or reuse it, cached per model, device, dtype and compile) as an :class:`Embedder`.

    ``model``: ``"reddino-small"``, ``"reddino-base"``, ``"reddino-large"``; ``"hf_hub:org/name"``
    (optionally ``@revision``); a folder with ``config.json`` + ``model.safetensors``; or a
    ``.safetensors`` file with ``architecture`` set to its timm name, e.g.
    ``load_embedder("w.safetensors", architecture="vit_small_patch14_dinov2")``.
    ``device``: ``"auto"`` (CUDA, then Apple MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    ``dtype``: ``None``/``"auto"`` (bf16 where it saves time: CUDA from Ampere on, CPUs timed
    faster; fp16 on older GPUs with fast fp16; else fp32), ``"float32"``, ``"bfloat16"``,
    ``"float16"`` (a model that overflows it goes on in float32, with a warning).
    ``download_progress(filename, bytes_done, bytes_total)`` follows a download, if one is needed.
    ``compile``: run the model through ``torch.compile`` (see the module's docstring); the
    first batch then waits for the compiler.
    A local model that changed on disk since it was cached is loaded again.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name = canonical_id(model, architecture)
    with _EMBEDDERS_LOCK:
        loading = _LOADING.setdefault(name, threading.Lock())
    with loading:  # a download of another model (minutes, or one cancelled that Xet goes on with) holds no one up
        # read after waiting: a Hub model that another call downloaded meanwhile is known by its commit now
        key = (name, model_version(model), str(torch_device), torch_dtype, bool(compile))
        with _EMBEDDERS_LOCK:
            found, twin = _EMBEDDERS.get(key), _EMBEDDERS.get((*key[:4], not key[4]))
            if found is not None:
                _EMBEDDERS.move_to_end(key)
        if found is not None:
            return found
        loaded = (LoadedModel(twin.model_id, twin.model, twin.input_size, twin.mean, twin.std, twin.trained_crops)
                  if twin else
                  load_model(model, architecture=architecture, download_progress=download_progress))
        if key[1] is None:  # a Hub model downloaded just now: known by its commit from now on
            key = (key[0], model_version(model), *key[2:])
        embedder = Embedder(loaded, device=torch_device, dtype=torch_dtype, compile=bool(compile))
        with _EMBEDDERS_LOCK:
            for stale in [k for k in _EMBEDDERS if k[0] == key[0] and k[1] != key[1] and k[2:4] == key[2:4]]:
                del _EMBEDDERS[stale]  # an older version of the same files (or Hub commit): free its memory
            _EMBEDDERS[key] = embedder
            while len(_EMBEDDERS) > CACHED_EMBEDDERS:
                _EMBEDDERS.popitem(last=False)
        return embedder


@dataclass(frozen=True)
class Downloaded:
    """How far the download of one of a model's files has come, in bytes."""

    filename: str
    done: int
    total: int


def iter_load_embedder(model: str | os.PathLike = "reddino-small", *, stop: threading.Event | None = None,
                       **options) -> Generator[Downloaded | None, None, Embedder]:
    """:func:`load_embedder` (same ``options``, but for ``download_progress``) as a generator:
    yields :class:`Downloaded` while a model file downloads, and None every
    :data:`LOAD_POLL_S` otherwise, so that a caller who can stop only between two yields (a
    napari worker) stops at once; returns the :class:`Embedder`.

    Setting ``stop``, or closing the generator, stops a plain download at its next chunk
    (10 MiB); nothing of it reaches the cache. A model being read from disk, or downloaded
    through the Hub's Xet storage (whose progress callbacks may not stop it), goes on in the
    background and is cached for the next call.
    """
    updates: queue.SimpleQueue[Downloaded | None] = queue.SimpleQueue()
    stop = stop or threading.Event()
    outcome: dict[str, object] = {}

    def report(filename: str, done: int, total: int) -> None:
        if stop.is_set():
            raise DownloadCancelled(f"the download of {filename} was cancelled")
        updates.put(Downloaded(filename, done, total))

    def load() -> None:
        try:
            outcome["embedder"] = load_embedder(model, download_progress=report, **options)
        except BaseException as error:  # noqa: BLE001  (raised again below, in the caller's thread)
            outcome["error"] = error
        finally:
            updates.put(None)

    threading.Thread(target=load, name="reddino-model-load", daemon=True).start()
    try:
        while True:
            try:
                update = updates.get(timeout=LOAD_POLL_S)
            except queue.Empty:
                yield None
                continue
            if update is None:
                break
            yield update
    finally:
        stop.set()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["embedder"]


def clear_embedder_cache() -> None:
    """Forget every cached model (frees its memory once no one else holds it)."""
    with _EMBEDDERS_LOCK:
        _EMBEDDERS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
