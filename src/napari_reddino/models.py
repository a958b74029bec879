"""Model registry and loading: which models exist, where their files are, how they are built.

A model is named in one of four ways (see :func:`load_model`): a RedDino name
(``"reddino-small"``), any timm model on the Hugging Face Hub (``"hf_hub:org/name"``), a local
folder in timm's ``save_for_hf`` layout (``config.json`` + ``model.safetensors``), or a single
weights file plus the timm architecture it belongs to. Hub files come through :mod:`.hub_files`
(the local cache first, a download only where they are missing).

A folder's ``config.json`` may also record how the cells the model trained on were cropped
(:data:`CROPS_KEY`, written by ``reddino-train export``); :func:`trained_crops` reads it alone.

Weights are read only with safetensors or ``torch.load(weights_only=True)`` and loaded
strictly, so a wrong or damaged file fails with the file's name and what did not fit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.models import PretrainedCfg

from .crop_windows import CROP_MODES, CROP_SCALES, MAX_MARGIN, valid_crops
from .hub_files import (
    CONFIG_FILE,
    WEIGHT_FILES,
    DownloadProgress,
    HubSettings,
    cached_file,
    copied_cache_snapshot,
    fresh_copy_advice,
    hub_snapshot,
)
from .model_errors import CheckpointError, UnknownModelError
from .model_ids import digested_id
from .wording import counted, first_few


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo_id: str
    architecture: str
    dim: int


KNOWN_MODELS: dict[str, KnownModel] = {
    known.name: known
    for known in (
        KnownModel("reddino-small", "Snarcy/RedDino-small", "vit_small_patch14_dinov2", 384),
        KnownModel("reddino-base", "Snarcy/RedDino-base", "vit_base_patch14_dinov2", 768),
        KnownModel("reddino-large", "Snarcy/RedDino-large", "vit_large_patch14_dinov2", 1024),
    )
}
HUB_PREFIXES = ("hf_hub:", "hf-hub:")
LOCAL_PREFIX = "local-dir:"
# config.json's record of how the cells a model trained on were cropped (mode, scale, margin), as
# reddino-train export writes it: the plugin cuts cells for the model so unless told otherwise
CROPS_KEY = "reddino_crops"
# Pickled weights are read with torch.load(weights_only=True).
PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


@dataclass(frozen=True)
class ModelFiles:
    """Where one model's weights are and how to build the network they belong to."""

    model_id: str
    weights: Path
    architecture: str
    model_args: dict = field(default_factory=dict)
    pretrained_cfg: dict | None = None
    crops: dict | None = None  # the crop settings its training cells were cut with, where recorded


@dataclass(frozen=True)
class LoadedModel:
    """A timm model with its weights, in eval mode, returning pooled features (no classifier)."""

    model_id: str
    module: torch.nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crops: dict | None = None  # as ModelFiles.crops


def describe_names() -> str:
    """One line listing every way to name a model, for error messages and help texts."""
    known = ", ".join(KNOWN_MODELS)
    return (
        f"known models: {known}; or 'hf_hub:org/name' for a timm model on the Hugging Face Hub; "
        f"or a folder with {CONFIG_FILE} + {WEIGHT_FILES[0]} (timm save_for_hf layout); "
        "or a .safetensors file with architecture='vit_small_patch14_dinov2' (or another timm name)"
    )


def hub_id(model: str | os.PathLike) -> str | None:
    """``org/name[@revision]`` for a known or ``hf_hub:`` name; None for local files."""
    name = os.fspath(model)
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name].repo_id
    prefix = next((prefix for prefix in HUB_PREFIXES if name.startswith(prefix)), None)
    return name.removeprefix(prefix) if prefix else None


def local_path(model: str | os.PathLike) -> Path:
    """The file or folder a non-Hub model name points at."""
    return Path(os.fspath(model).removeprefix(LOCAL_PREFIX)).expanduser()


def local_version(model: str | os.PathLike) -> str | None:
    """A stamp that changes when a local model's files change; None for Hub models and missing paths.

    It looks at every file of a model folder (its inode, size and times): a file rewritten in
    place (as ``save_for_hf`` and safetensors' ``save_file`` do) leaves the folder's own
    modification time as it was, and one copied in with its times kept (``cp -p``, ``rsync -t``,
    ``unzip``) keeps the size and modification time of a twin checkpoint, but not its inode
    change time.
    """
    if hub_id(model):
        return None
    path = local_path(model)
    if not path.exists():
        return None
    path = _model_folder(path) if path.is_dir() else path
    files = [path] if path.is_file() else sorted(file for file in path.iterdir() if file.is_file())
    stats = [(file.name, file.stat()) for file in files]
    parts = [(name, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) for name, stat in stats]
    return hashlib.blake2b(repr((path.stat().st_mtime_ns, parts)).encode(), digest_size=8).hexdigest()


def model_version(model: str | os.PathLike) -> str | None:
    """When a local model last changed on disk, or which commit of a Hub model is cached: None
    for a Hub model not cached yet."""
    return local_version(model) or cached_hub_revision(model)


def cached_hub_revision(model: str | os.PathLike) -> str | None:
    """The commit of the cached copy of a Hub model (it changes when the cache is refreshed with
    newer weights); None for local models and Hub models not cached. Reads no file."""
    config = _cached_hub_config(model)
    return config.parent.name if config is not None else None


def _cached_hub_config(model: str | os.PathLike) -> Path | None:
    """The cached config.json of a Hub model; None for local models and Hub models not cached."""
    if not (hub := hub_id(model)):
        return None
    repo_id, _, revision = hub.partition("@")
    try:
        return cached_file(repo_id, CONFIG_FILE, revision or None, HubSettings.from_environment())
    except ValueError:  # a name the Hub refuses ("my org/x"); loading it says so
        return None


def canonical_id(model: str | os.PathLike, architecture: str | None = None) -> str:
    """The identity of a model name without reading any file: equal ids load equal models."""
    if hub := hub_id(model):
        return f"hf-hub:{hub}"
    path = local_path(model).resolve()
    return f"{path}:{architecture}" if architecture else str(path)


def find_model_files(
    model: str | os.PathLike,
    *,
    architecture: str | None = None,
    download_progress: DownloadProgress | None = None,
) -> ModelFiles:
    """Locate (downloading if needed and possible) the files of ``model``."""
    name = os.fspath(model)
    if hub := hub_id(name):
        return _folder_files(hub_snapshot(hub, name, download_progress), name)
    path = local_path(name)
    if path.is_dir():
        if architecture:
            raise ValueError(
                f"architecture={architecture!r} is only for a single weights file; the folder {path} "
                f"names its architecture in {CONFIG_FILE}."
            )
        if (snapshot := copied_cache_snapshot(path)) is not None:  # a Hub model's folder of a copied cache
            return _folder_files(snapshot, f"hf_hub:{path.name.removeprefix('models--').replace('--', '/', 1)}")
        return _folder_files(path)
    if path.is_file():
        return _single_file(path, architecture)
    if name.startswith(LOCAL_PREFIX) or path.suffix in (".safetensors", *PICKLE_SUFFIXES) or any(
            sep in name for sep in (os.sep, os.altsep) if sep):  # Windows takes C:/models/s1 too
        raise UnknownModelError(f"No such model file or folder: {path}. ({describe_names()})")
    raise UnknownModelError(f"Unknown model {name!r}: {describe_names()}.")


def _model_folder(folder: Path) -> Path:
    """The folder with a model's files: ``folder``, or the snapshot inside it where it is a copied
    Hugging Face cache's ``models--org--name``."""
    return copied_cache_snapshot(folder) or folder


def load_model(
    model: str | os.PathLike = "reddino-small",
    *,
    architecture: str | None = None,
    download_progress: DownloadProgress | None = None,
) -> LoadedModel:
    """Build a timm model from its files, load its weights strictly, and drop its classifier.

    ``architecture`` is needed (and only allowed) when ``model`` is a single weights file.
    The input size of a ViT is read from its position embeddings, so a DINOv2 checkpoint
    trained at 224 px gives a 224 px model rather than timm's 518 px default.
    """
    files = find_model_files(model, architecture=architecture, download_progress=download_progress)
    state = read_weights(files.weights)
    trained_size = _trained_image_size(state)
    # Built on the meta device (no memory, no random init: ViT-L's init takes ~20 s on a CPU),
    # then given the file's tensors. Models that compute a buffer in __init__ are built for real.
    module = _build(files, trained_size, device="meta")
    load_strict(module, state, files.weights, files.architecture)
    if any(tensor.is_meta for tensor in (*module.parameters(), *module.buffers())):
        module = _build(files, trained_size, device="cpu")
        load_strict(module, state, files.weights, files.architecture)
    module.reset_classifier(0)
    module.eval().requires_grad_(False)
    data = timm.data.resolve_model_data_config(module)
    return LoadedModel(
        model_id=files.model_id,
        module=module,
        input_size=_built_input_size(module, tuple(data["input_size"][1:])),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        crops=files.crops,
    )


def _built_input_size(module: torch.nn.Module, configured: tuple[int, int]) -> tuple[int, int]:
    """The input size the network was built for: a config's ``model_args.img_size`` can differ
    from its ``pretrained_cfg.input_size`` (older exports kept the source model's), and a ViT of
    fixed size refuses any other."""
    patch_embed = getattr(module, "patch_embed", None)
    built = getattr(patch_embed, "img_size", None)
    if built is None or getattr(module, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", True):
        return configured  # it takes any size: the one its config asks for
    return tuple(int(side) for side in built)


def _build(files: ModelFiles, trained_size: int | None, device: str) -> torch.nn.Module:
    """The network ``files`` describe, at the input size its weights were trained at."""
    sized = {}
    if trained_size and "img_size" not in files.model_args:
        sized = {"img_size": trained_size, "pretrained_cfg_overlay": {"input_size": (3, trained_size, trained_size)}}
    try:
        with torch.device(device):
            return timm.create_model(
                files.architecture, pretrained=False, pretrained_cfg=files.pretrained_cfg, **files.model_args, **sized
            )
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"Cannot build {files.architecture} with {files.model_args} for {files.weights}: {error}"
        ) from error


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat state dict with safetensors, or torch.load(weights_only=True) for pickles."""
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path, device="cpu")
        elif path.suffix in PICKLE_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: weights must be .safetensors or {'/'.join(PICKLE_SUFFIXES)}.")
    except CheckpointError:
        raise
    except Exception as error:  # each reader raises its own error types for damaged files
        raise CheckpointError(f"Cannot read weights from {path} (damaged or not a weights file): "
                              f"{why_unreadable(error)}.{fresh_copy_advice(path)}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict (parameter name -> tensor).")
    return state


def why_unreadable(error: Exception) -> str:
    """Why torch or safetensors could not read a file, in one line. torch's refusal of a pickle
    that holds more than tensors comes with advice to load it unsafely, which is never done
    here: only its own reason is kept."""
    text = str(error)
    refusal = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if refusal:
        return f"not tensors alone ({refusal.group(1).strip()})"
    return text.splitlines()[0] if text else type(error).__name__


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, architecture: str) -> None:
    """Load ``state`` into ``module`` or say exactly which names and shapes do not fit."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{name}: file {tuple(state[name].shape)}, model {tuple(expected[name].shape)}"
        for name in sorted(expected.keys() & state.keys())
        if state[name].shape != expected[name].shape
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatch": wrong_shape}
    problems = [
        f"{label} ({len(items)}): {first_few(items)}"
        for label, items in found.items()
        if items
    ]
    if problems:
        raise CheckpointError(f"The weights in {path} do not fit {architecture}: " + "; ".join(problems))
    # assign=True keeps the file's tensors (no copy, and fills a meta-built module); in the
    # module's dtype, so fp16 or bf16 files still give an fp32 model.
    state = {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}
    not_finite = [name for name, tensor in state.items() if not _all_finite(tensor)]
    if not_finite:  # else every embedding would be NaN, and the map and the classifier fail far from here
        raise CheckpointError(
            f"The weights in {path} hold NaN or infinite values (in the model's precision), in "
            f"{counted(len(not_finite), 'tensor')} ({first_few(not_finite)}): "
            "the file is damaged, or the training run that wrote it diverged."
        )
    module.load_state_dict(state, strict=True, assign=True)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``. A sum is NaN or infinite when any value is (and where
    finite values add up past float32's range): 0.05 s for ViT-L's weights here, against 0.4 s
    for ``isfinite`` on every value, which is then asked only to be sure."""
    if not tensor.is_floating_point():
        return True
    return bool(tensor.sum(dtype=torch.float32).isfinite()) or bool(tensor.isfinite().all())


def _trained_image_size(state: dict[str, torch.Tensor]) -> int | None:
    """Square input size a ViT checkpoint was trained at, from its position embeddings."""
    pos_embed, patch_weight = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos_embed is None or patch_weight is None or pos_embed.ndim != 3:
        return None
    tokens = pos_embed.shape[1]
    for prefix_tokens in (0, 1):  # position embeddings with or without the class token
        grid = math.isqrt(tokens - prefix_tokens)
        if grid * grid == tokens - prefix_tokens:
            return grid * patch_weight.shape[-1]
    return None


def _folder_files(folder: Path, name: str | None = None) -> ModelFiles:
    """The files of a Hub snapshot (``name``: the model as the user named it) or of a local folder."""
    config_path = folder / CONFIG_FILE
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise CheckpointError(
            f"{folder} is not a model folder: it needs {CONFIG_FILE} and one of {', '.join(WEIGHT_FILES)} "
            "(timm.models.save_for_hf writes this layout)."
        )
    architecture, model_args, pretrained_cfg, crops = _read_config(config_path)
    return ModelFiles(_weights_id(name or folder.resolve().name, weights), weights, architecture, model_args,
                      pretrained_cfg, crops)


def trained_crops(model: str | os.PathLike) -> dict | None:
    """The crop settings (mode, scale, margin) that ``model``'s config.json records its training
    cells were cut with, read without its weights and without going online: None for a model that
    records none (RedDino's own, a bare weights file) and for a Hub model not downloaded yet.
    A config that cannot be read raises :class:`CheckpointError`."""
    if hub_id(model):
        config = _cached_hub_config(model)
    else:
        path = local_path(model)
        config = _model_folder(path) / CONFIG_FILE if path.is_dir() else None
    return _read_config(config)[3] if config is not None and config.is_file() else None


def _read_config(path: Path) -> tuple[str, dict, dict, dict | None]:
    """(architecture, model_args, pretrained_cfg, crops) from a timm Hub config, current or legacy
    layout; ``crops`` as :func:`trained_crops` gives them."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if "pretrained_cfg" in config:
            pretrained_cfg = dict(config["pretrained_cfg"])
            architecture = config["architecture"]
        else:  # legacy layout: one flat dict
            pretrained_cfg = dict(config)
            architecture = pretrained_cfg.pop("architecture")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Cannot read {path}: {error!r} (expected a timm config with 'architecture').") from error
    if not timm.is_model(architecture):
        raise CheckpointError(f"{path} names architecture {architecture!r}, which this timm {timm.__version__} lacks.")
    if "num_classes" in config:
        pretrained_cfg["num_classes"] = config["num_classes"]
    known_fields = PretrainedCfg.__dataclass_fields__
    pretrained_cfg = {key: value for key, value in pretrained_cfg.items() if key in known_fields}
    pretrained_cfg["architecture"] = architecture
    return architecture, dict(config.get("model_args", {})), pretrained_cfg, _recorded_crops(config, path)


def _recorded_crops(config: dict, path: Path) -> dict | None:
    """The crop settings under :data:`CROPS_KEY`, or None; a record that is not one is refused
    rather than passed over, which would cut the cells otherwise than the model learnt, unseen."""
    if (crops := config.get(CROPS_KEY)) is None:
        return None
    if (valid := valid_crops(crops)) is None:
        raise CheckpointError(
            f"{path} records the model's training crops as {CROPS_KEY}={json.dumps(crops)}, which is not a crop "
            f"mode ({' or '.join(CROP_MODES)}), scale ({' or '.join(CROP_SCALES)}) and margin (0 to {MAX_MARGIN:g}); "
            f"mend it, or remove {CROPS_KEY} to cut cells as the plugin does by default.")
    return valid


def _single_file(path: Path, architecture: str | None) -> ModelFiles:
    if not architecture:
        raise UnknownModelError(
            f"{path} is a bare weights file: say which timm architecture it belongs to, e.g. "
            f"load_embedder({str(path)!r}, architecture='vit_small_patch14_dinov2'); the Embed cells "
            f"widget takes a model folder with {CONFIG_FILE} beside the weights (as reddino-train export writes)."
        )
    if not timm.is_model(architecture):
        examples = ", ".join(known.architecture for known in KNOWN_MODELS.values())
        raise UnknownModelError(f"Unknown timm architecture {architecture!r} (RedDino uses {examples}).")
    return ModelFiles(_weights_id(f"{path.name}:{architecture}", path), path, architecture)


def _weights_id(name: str, weights: Path) -> str:
    """:func:`digested_id`, with a file that cannot be read (permissions, a failing disk) as a
    :class:`CheckpointError` that names it."""
    try:
        return digested_id(name, weights)
    except OSError as error:
        raise CheckpointError(f"Cannot read the weights {weights}: {error.strerror or error}.") from error
