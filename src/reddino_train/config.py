"""Typed training configuration: YAML recipes plus ``key=value`` overrides.

A recipe may start from another with ``base: NAME`` (a shipped recipe such as
``dinov2-vits14``, or a path relative to the file) and then list only what it changes, so
every shipped recipe reads as a diff of the one it builds on. Every key is checked against
the dataclasses below; an unknown key is an error that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .files import write_atomic

CONFIG_DIR = Path(__file__).parent / "configs"
BASE_KEY = "base"

Centering = Literal["softmax_center", "sinkhorn_knopp"]
Augmentation = Literal["dinov2", "rbc"]
PixelAugmentation = Literal[
    "colour_jitter", "blur", "sharpness", "autocontrast", "equalize",
    "posterize", "solarize", "invert", "channel_permutation", "grayscale",
    "channel_dropout", "gaussian_noise", "downscale", "gamma", "rgb_shift",
]
# what every config drew from before the pool was configurable (4 of these 10)
POOL_BEFORE_IT_WAS_CONFIGURABLE = (
    "colour_jitter", "blur", "sharpness", "autocontrast", "equalize",
    "posterize", "solarize", "invert", "channel_permutation", "grayscale",
)
DRAWS_BEFORE_IT_WAS_CONFIGURABLE = 4
Precision = Literal["fp32", "bf16", "fp16", "auto"]
Parallel = Literal["ddp", "fsdp"]


CONFIG_NAME = "config.yaml"  # the resolved config, in a run's output folder


def settings_until(step: int) -> str:
    """The file that keeps a run's settings when a resume changes them at ``step``."""
    return f"config-until-step-{step}.yaml"


def run_settings_files(folder: Path) -> list[Path]:
    """The files in ``folder`` that :func:`settings_until` named and a run wrote (not a copy of one
    under another name, nor another file of that name)."""
    return sorted(path for path in folder.glob("config-until-step-*.yaml")
                  if re.fullmatch(r"config-until-step-\d+\.yaml", path.name) and is_training_config(path))
MAY_BE_INFINITE = ("optim.clip_grad", "train.checkpoint_minutes")  # .inf: never (a saved config may say so)


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str  # timm architecture, e.g. vit_small_patch14_dinov2
    patch_size: int
    depth: int | None  # None keeps the architecture's depth; tests use a shallow model
    embed_dim: int | None  # None keeps the architecture's width
    num_heads: int | None  # None keeps the architecture's number of attention heads
    drop_path_rate: float
    drop_path_uniform: bool  # DINOv2's: the rate in every block (false: timm's ramp from 0 to it)
    layerscale: float  # LayerScale init value
    pretrained: str  # "" random init, "timm" timm's weights for `arch`, else a weights file (timm's or Meta's)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    n_prototypes: int
    hidden_dim: int
    bottleneck_dim: int
    n_layers: int


@dataclass(frozen=True, kw_only=True)
class HeadsConfig:
    dino: HeadConfig
    ibot: HeadConfig  # used only when ibot_separate is true
    ibot_separate: bool


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    dino_weight: float
    ibot_weight: float
    koleo_weight: float
    student_temp: float
    centering: Centering
    center_momentum: float  # EMA of the softmax centre


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    sample_probability: float  # fraction of global crops that get an iBOT mask
    ratio_min_max: tuple[float, float]  # masked fraction of patches in a masked crop


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    momentum: float
    final_momentum: float
    temp: float
    warmup_temp: float
    warmup_temp_epochs: float


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    epochs: int
    base_lr: float  # for a global batch of 1024; scaled by sqrt(batch / 1024)
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    clip_grad: float  # per part (backbone, each head); 0 or less: no clipping
    freeze_last_layer_epochs: float
    layerwise_decay: float
    patch_embed_lr_mult: float
    adamw_betas: tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class CropsConfig:
    global_size: int
    global_scale: tuple[float, float]
    local_number: int
    local_size: int
    local_scale: tuple[float, float]
    augmentation: Augmentation
    pixel_augmentations: tuple[PixelAugmentation, ...]  # the rbc pool; dinov2's pipeline is fixed
    pixel_augmentations_per_crop: int  # how many of the rbc pool each crop draws


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    batch_size_per_gpu: int
    iterations_per_epoch: int  # an "epoch" is a fixed number of iterations, as in DINOv2
    seed: int
    num_workers: int
    precision: Precision  # bf16 or fp16 (loss scaled): forward passes under autocast; auto: train.precision_for
    log_every: int  # iterations between rows of log.csv
    checkpoint_every: int  # iterations between periodic checkpoints
    checkpoint_minutes: float  # also one when this long has passed since the last (0: steps alone decide)
    keep_checkpoints: int  # checkpoint.pt and this many less one earlier ones, as earlier-checkpoints/step-<N>.pt
    parallel: Parallel  # under torchrun: replicate (ddp) or shard (fsdp, FSDP2) the models
    activation_checkpointing: bool  # the student's blocks recompute their activations in the backward pass


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig
    heads: HeadsConfig
    loss: LossConfig
    masking: MaskingConfig
    teacher: TeacherConfig
    optim: OptimConfig
    crops: CropsConfig
    train: LoopConfig

    def __post_init__(self) -> None:
        counts = [("model.patch_size", self.model.patch_size), ("crops.global_size", self.crops.global_size),
                  ("crops.local_size", self.crops.local_size)]
        for which in ("dino", "ibot"):
            head = getattr(self.heads, which)
            counts += [(f"heads.{which}.{name}", getattr(head, name))
                       for name in ("n_prototypes", "hidden_dim", "bottleneck_dim", "n_layers")]
        for key, value in counts:
            if value < 1:
                raise ConfigError(f"{key}={value} must be at least 1")
        if self.crops.local_number < 0:
            raise ConfigError(f"crops.local_number={self.crops.local_number} must be 0 or more")
        not_finite = [f"{key}={value}" for key, value in _leaves(config_to_dict(self)).items()
                      if isinstance(value, float) and not math.isfinite(value)
                      and not (value == math.inf and key in MAY_BE_INFINITE)]
        if not_finite:
            raise ConfigError(f"{', '.join(not_finite)}: each must be a finite number")
        for key, size in (("crops.global_size", self.crops.global_size),
                          ("crops.local_size", self.crops.local_size)):
            if size % self.model.patch_size:
                raise ConfigError(
                    f"{key}={size} is not a multiple of model.patch_size={self.model.patch_size}"
                )
        for key, (low, high) in (("masking.ratio_min_max", self.masking.ratio_min_max),
                                 ("crops.global_scale", self.crops.global_scale),
                                 ("crops.local_scale", self.crops.local_scale)):
            if not 0 <= low <= high <= 1:
                raise ConfigError(f"{key}=({low}, {high}) must satisfy 0 <= min <= max <= 1")
        if not 0 <= self.masking.sample_probability <= 1:
            raise ConfigError("masking.sample_probability must lie in [0, 1]")
        for key in ("batch_size_per_gpu", "iterations_per_epoch", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self.train, key)} must be at least 1")
        if self.optim.epochs < 1:
            raise ConfigError(f"optim.epochs={self.optim.epochs} must be at least 1")
        for key, value in (("train.seed", self.train.seed), ("train.num_workers", self.train.num_workers),
                           ("train.checkpoint_minutes", self.train.checkpoint_minutes)):
            if value < 0:
                raise ConfigError(f"{key}={value} must be 0 or more")
        temperatures = [("loss.student_temp", self.loss.student_temp), ("teacher.temp", self.teacher.temp)]
        if self.teacher.warmup_temp_epochs > 0:  # else never used
            temperatures.append(("teacher.warmup_temp", self.teacher.warmup_temp))
        for key, value in temperatures:
            if not value > 0:  # the softmax divides by it
                raise ConfigError(f"{key}={value} must be above 0")
        crops = self.crops
        if len(set(crops.pixel_augmentations)) != len(crops.pixel_augmentations):
            raise ConfigError(f"crops.pixel_augmentations={list(crops.pixel_augmentations)} names one twice")
        if not 0 <= crops.pixel_augmentations_per_crop <= len(crops.pixel_augmentations):
            raise ConfigError(
                f"crops.pixel_augmentations_per_crop={crops.pixel_augmentations_per_crop} must "
                f"lie between 0 and the {len(crops.pixel_augmentations)} pixel_augmentations"
            )


def _check_ranges(cfg: TrainConfig) -> None:
    """:class:`ConfigError` for a rate, weight or momentum outside the range it has a meaning
    in: a teacher momentum of 1.5, say, would train on, the teacher running away from the student.
    Checked where a recipe and overrides are read, not in a run's saved settings: a run an earlier
    version trained with such a value still exports."""
    optim, loss, teacher = cfg.optim, cfg.loss, cfg.teacher
    fractions = [("teacher.momentum", teacher.momentum), ("teacher.final_momentum", teacher.final_momentum),
                 ("loss.center_momentum", loss.center_momentum), ("model.drop_path_rate", cfg.model.drop_path_rate),
                 *((f"optim.adamw_betas[{index}]", beta) for index, beta in enumerate(optim.adamw_betas))]
    for key, value in fractions:
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must lie between 0 and 1")
    if not 0 <= optim.layerwise_decay <= 1:
        raise ConfigError(f"optim.layerwise_decay={optim.layerwise_decay} must lie between 0 (the heads alone "
                          "learn) and 1 (no decay)")
    for key, value in (("optim.patch_embed_lr_mult", optim.patch_embed_lr_mult), ("optim.base_lr", optim.base_lr),
                       ("optim.min_lr", optim.min_lr),
                       ("optim.weight_decay", optim.weight_decay), ("optim.weight_decay_end", optim.weight_decay_end),
                       ("optim.warmup_epochs", optim.warmup_epochs),
                       ("optim.freeze_last_layer_epochs", optim.freeze_last_layer_epochs),
                       ("teacher.warmup_temp_epochs", teacher.warmup_temp_epochs),
                       ("loss.dino_weight", loss.dino_weight), ("loss.ibot_weight", loss.ibot_weight),
                       ("loss.koleo_weight", loss.koleo_weight), ("model.layerscale", cfg.model.layerscale)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be 0 or more")


def check_architecture(cfg: TrainConfig) -> None:
    """:class:`ConfigError` unless timm knows ``model.arch``: checked before a run makes its
    folder (not with the rest: importing timm takes seconds, and reading a config needs none)."""
    import timm

    if not timm.is_model(cfg.model.arch):
        raise ConfigError(f"model.arch={cfg.model.arch!r} is not a timm architecture (the recipes use "
                          "vit_small_patch14_dinov2 and its base, large and _reg4_ kin)")


def shipped_configs() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config section."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def load_config(source: str | os.PathLike, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load a shipped recipe (by name) or a YAML file, then apply ``key=value`` overrides."""
    data = _read_recipe(_resolve(source), seen=())
    override_data = parse_overrides(overrides)
    _check_keys(override_data, TrainConfig, "", "overrides")
    cfg = _build(TrainConfig, _with_keys_added_later(_merge(data, override_data)), "")
    _check_ranges(cfg)
    return cfg


def config_from_dict(data: Mapping[str, Any], source: str = "a saved config") -> TrainConfig:
    """The inverse of ``config_to_dict``, with the same checks as a recipe."""
    _check_keys(data, TrainConfig, "", source)
    return _build(TrainConfig, _with_keys_added_later(data), "")


def _with_keys_added_later(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A config saved before a key existed, with the value that then applied."""
    data = dict(data)
    crops, model = data.get("crops"), data.get("model")
    if isinstance(crops, Mapping) and "pixel_augmentations" not in crops:
        data["crops"] = {
            "pixel_augmentations": list(POOL_BEFORE_IT_WAS_CONFIGURABLE),
            "pixel_augmentations_per_crop": DRAWS_BEFORE_IT_WAS_CONFIGURABLE,
            **crops,
        }
    if isinstance(model, Mapping) and "drop_path_uniform" not in model:
        data["model"] = {"drop_path_uniform": False, **model}  # timm's ramp was all there was
    if isinstance(data.get("train"), Mapping):
        data["train"] = {"activation_checkpointing": False, "checkpoint_minutes": 0.0, "keep_checkpoints": 1,
                         **data["train"]}
    return data


# How a run is looked after, not how it trains: a resume that changes them (more loader workers on
# another node, a checkpoint every 30 minutes before a scheduler's limit, a recipe that sets
# keep_checkpoints resuming a run from before it existed) has not changed the run's settings.
# The loader workers change no crop (each sample's augmentations are seeded by its position).
NOT_TRAINING_SETTINGS = ("train.keep_checkpoints", "train.num_workers", "train.log_every", "train.checkpoint_every",
                         "train.checkpoint_minutes")


def changed_settings(before: TrainConfig, after: TrainConfig) -> list[str]:
    """``["optim.epochs: 10 -> 20", ...]``: the leaf keys whose values differ (but those of
    :data:`NOT_TRAINING_SETTINGS`)."""
    old, new = _leaves(config_to_dict(before)), _leaves(config_to_dict(after))
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in old
            if old[key] != new[key] and key not in NOT_TRAINING_SETTINGS]


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    return {key: value for name, item in data.items() for key, value in _leaves(item, f"{prefix}{name}.").items()}


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["optim.base_lr=1e-3"]`` -> ``{"optim": {"base_lr": "1e-3"}}``; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        *sections, leaf = key.strip().split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        try:
            node[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: its value is not valid YAML ({_yaml_problem(error)})") from None
    return nested


def _yaml_problem(error: yaml.YAMLError) -> str:
    """YAML's complaint on one line: what and where (its own message spans several)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(item) for item in cfg]
    return cfg


def is_training_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` reads as a run's config.yaml (a mapping with the sections of one)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {field.name for field in dataclasses.fields(TrainConfig)} <= data.keys()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically; ``load_config(path)`` reads it back unchanged."""
    write_atomic(path, config_text(cfg))


def config_text(cfg: TrainConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _resolve(source: str | os.PathLike, relative_to: Path | None = None) -> Path:
    candidate = Path(source)
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if candidate.is_file():
        return candidate
    shipped = CONFIG_DIR / f"{source}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"no config file {str(source)!r}; shipped configs: {', '.join(shipped_configs())}"
    )


class _EachKeyOnce(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: PyYAML would keep the
    last, and a section written twice would lose the first one's settings without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in seen and key != "<<":  # merge keys: PyYAML merges every one, losing nothing
                raise yaml.constructor.ConstructorError(problem=f"{key!r} is written twice in one section",
                                                        problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_recipe(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"config {path} inherits from itself via {BASE_KEY}:")
    try:
        data = yaml.load(path.read_text(), Loader=_EachKeyOnce) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    base = data.pop(BASE_KEY, None)
    _check_keys(data, TrainConfig, "", str(path))
    if base is None:
        return data
    parent = _read_recipe(_resolve(base, relative_to=path.parent), seen + (path.resolve(),))
    return _merge(parent, data)


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(data: Mapping[str, Any], cls: type, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            section = prefix.rstrip(".") or "top level"
            valid = valid_keys(cls, prefix) if prefix else list(hints)
            close = difflib.get_close_matches(f"{prefix}{key}", valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown key {prefix}{key} in {source}{hint}; valid keys in {section}: "
                + ", ".join(valid)
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{prefix}{key} in {source} is a section; set its keys: "
                    + ", ".join(valid_keys(tp, f"{prefix}{key}."))
                )
            _check_keys(value, tp, f"{prefix}{key}.", source)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    missing = [f"{prefix}{name}" for name in hints if name not in data]
    if missing:
        raise ConfigError(f"missing config keys: {', '.join(missing)}")
    return cls(**{name: _coerce(data[name], tp, f"{prefix}{name}") for name, tp in hints.items()})


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple and args[-1:] == (Ellipsis,):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}; expected a list")
        return tuple(_coerce(item, args[0], key) for item in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}; expected a list of {len(args)} values")
        return tuple(_coerce(item, arg, key) for item, arg in zip(value, args))
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: type, key: str) -> Any:
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif (tp is int and isinstance(value, int) and not isinstance(value, bool)) or (
        tp in (bool, str) and isinstance(value, tp)
    ):
        return value
    elif tp is str and value is None:  # `model.pretrained=""`, its quotes taken by the shell, or an empty key
        return ""
    raise ConfigError(f"{key}={value!r}; expected {tp.__name__}")
