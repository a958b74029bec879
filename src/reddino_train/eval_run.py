"""``reddino-train eval``: features of a labelled data set, cached, through the protocol of
:mod:`.evaluate`, into a table and a JSON record.

Feature sets: ``cls`` (the model's frozen CLS embedding), ``random-init`` (the same
architecture with fresh weights, the baseline pretraining must beat) and ``measurements``
(the plugin's hand-made shape and colour measurements; points data only). With ``json_out``
each feature set is kept in ``<json stem>.<set>.npz`` beside it, tagged with a digest of the
model and the data, so a re-run (another split, say) skips the embedding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from napari_reddino.cell_embeddings import crops_in_words
from napari_reddino.crop_windows import chosen_crops, margin_refusal
from napari_reddino.segmentation import pixel_size_refusal
from napari_reddino.wording import counted

from .eval_data import (
    DataSummary,
    EmbeddingFeatures,
    EvalDataError,
    FeatureSet,
    Format,
    MeasurementFeatures,
    crops_are_grouped,
    crops_features,
    data_key,
    detect_format,
    points_features,
    random_init,
)
from .evaluate import (
    EvaluationError,
    Scores,
    Split,
    evaluate,
    format_per_class,
    format_table,
    make_folds,
)
from .files import write_atomic

FEATURE_SETS = ("cls", "random-init", "measurements")
EMBEDDING_METHODS = ("knn1", "knn20", "knn20w", "logreg")
METHODS = {"cls": EMBEDDING_METHODS, "random-init": EMBEDDING_METHODS, "measurements": ("logreg",)}


@dataclass(frozen=True)
class EvalRequest:
    model: str
    data: Path
    format: Format | None = None  # None: detected from the folder
    split: Split | None = None  # None: by image for points and crops laid out by smear, else 5-fold
    feature_sets: Sequence[str] = ("cls",)
    limit_images: int | None = None
    max_per_class: int | None = None
    seed: int = 0
    pixel_size_um: float | None = None
    device: str = "auto"
    architecture: str | None = None  # for a bare .safetensors file
    batch_size: int | None = None
    # how cells become model inputs; each None: as the model's training cells were cut where its
    # config records it, else the plugin's default (see ``crops``)
    crop_mode: str | None = None
    crop_scale: str | None = None  # window per cell or per smear
    margin: float | None = None
    json_out: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:  # refused before any smear is segmented or model loaded
        counts = {"limit_images": self.limit_images, "max_per_class": self.max_per_class,
                  "batch_size": self.batch_size}
        for name, value in counts.items():
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: give a whole number of 1 or more")
        if self.margin is not None and (refusal := margin_refusal(self.margin)):
            raise ValueError(f"--margin {self.margin}: {refusal}")
        if self.pixel_size_um is not None and (refusal := pixel_size_refusal(self.pixel_size_um)):
            raise ValueError(f"--pixel-size-um {self.pixel_size_um:g}: {refusal}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed {self.seed}: give a whole number from 0 to {2**32 - 1}")

    @property
    def crops(self) -> dict:
        """Crop mode, scale and margin: as given, else as the model's training cells were cut
        (where its config records it, as ``reddino-train export`` writes), else the plugin's defaults."""
        from napari_reddino.models import trained_crops  # torch: only once a model is asked about

        trained = None if self.architecture else trained_crops(self.model)  # a bare weights file records none
        return chosen_crops(self.crop_mode, self.crop_scale, self.margin, trained=trained)


@dataclass
class EvalReport:
    request: EvalRequest
    format: Format
    split: Split
    n_folds: int
    results: dict[str, dict[str, Scores]]
    class_counts: dict[str, int]
    summary: DataSummary | None  # None when every feature set came from a cache older than summaries
    cached: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        request = self.request
        return {
            "model": request.model,
            "data": str(request.data),
            "format": self.format,
            "split": self.split,
            "folds": self.n_folds,
            "samples": sum(self.class_counts.values()),
            "classes": self.class_counts,
            "limit_images": request.limit_images,
            "max_per_class": request.max_per_class,
            "seed": request.seed,
            "crops": request.crops if self.format == "points" else None,
            "data_summary": None if self.summary is None else self.summary.to_dict(),
            "results": {name: {m: s.to_dict() for m, s in by.items()} for name, by in self.results.items()},
        }

    def text(self) -> str:
        lines = [
            (f"{sum(self.class_counts.values())} samples in {len(self.class_counts)} classes; "
            f"{self.format} data, split {self.split} ({self.n_folds} folds)"),
        ]
        if self.summary is not None and self.format == "points":
            summary = self.summary
            lines.append(f"{summary.images} smears; {summary.matched} of {summary.points} point labels "
                         f"matched to a segmented cell; {crops_in_words(self.request.crops)}")
        if self.summary is not None and self.summary.skipped:
            lines.append(f"skipped {counted(len(self.summary.skipped), 'file')}: "
                         + "; ".join(f"{path} ({reason})" for path, reason in self.summary.skipped))
        if self.cached:
            lines.append(f"features from the cache: {', '.join(self.cached)}")
        return "\n".join([*lines, "", format_table(self.results), "", format_per_class(self.results)])


def run_evaluation(request: EvalRequest) -> EvalReport:
    unknown = set(request.feature_sets) - set(FEATURE_SETS)
    if unknown or not request.feature_sets:
        raise ValueError(f"feature sets {sorted(unknown)}; choose from {', '.join(FEATURE_SETS)}")
    data_format = request.format or detect_format(request.data)
    # crops laid out by smear are split by smear unless asked otherwise: split by cell, a test crop's
    # smear is in the training folds, and a classifier scores by telling smears apart
    split = request.split or ("by-image" if data_format == "points" or crops_are_grouped(request.data) else "5-fold")
    if data_format == "crops" and split == "by-image" and not crops_are_grouped(request.data):
        raise EvaluationError("a split by image needs to know each sample's image: use points data, crops laid out "
                              "as DATA/<class>/<smear>/*.png (each class from two smears or more, or smears that hold cells of "
                              "several classes), or --split 5-fold")
    if data_format == "crops" and "measurements" in request.feature_sets:
        raise EvalDataError("measurements need smears with point labels (--format points), not crops")
    smear_options = {"limit_images": request.limit_images, "pixel_size_um": request.pixel_size_um,
                     "crop_mode": request.crop_mode, "crop_scale": request.crop_scale, "margin": request.margin}
    if data_format == "crops" and (given := [name for name, value in smear_options.items() if value is not None]):
        options = " and ".join(f"--{name.replace('_', '-')}" for name in given)  # none would change a crop
        raise EvalDataError(f"{options} {'is' if len(given) == 1 else 'are'} for smears with point labels "
                            "(--format points); crops are taken as they are (--max-per-class limits them)")
    if request.json_out is not None:
        request.json_out.parent.mkdir(parents=True, exist_ok=True)
    sets, summary, cached = _feature_sets(request, data_format)
    first = next(iter(sets.values()))
    try:
        folds = make_folds(first.targets, split, first.groups, request.seed)
    except EvaluationError as error:  # too few images or cells: say which files were not read, if any
        if summary is not None and summary.skipped:
            unread = "; ".join(f"{path} ({reason})" for path, reason in summary.skipped)
            raise EvaluationError(f"{error} ({counted(len(summary.skipped), 'file')} could not be read or segmented: {unread})") \
                from error
        raise
    results = {
        name: evaluate(sets[name].features, sets[name].targets, sets[name].class_names, folds, METHODS[name])
        for name in request.feature_sets
    }
    counts = np.bincount(first.targets, minlength=len(first.class_names))
    report = EvalReport(request, data_format, split, len(folds), results,
                        dict(zip(first.class_names, map(int, counts))), summary, cached)
    if request.json_out is not None:
        write_atomic(request.json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _feature_sets(request: EvalRequest, data_format: Format) -> tuple[dict[str, FeatureSet], DataSummary | None,
                                                                       list[str]]:
    """Every requested feature set, from the cache where it is there, the rest in one pass."""
    from napari_reddino.models import model_version

    keys = _cache_keys(request, data_format) if request.json_out is not None else {}
    # a Hub model downloaded by this run is known by its commit, and tells how its cells are cut, only then
    downloading = model_version(request.model) is None
    sets: dict[str, FeatureSet] = {}
    for name, key in keys.items():
        if (loaded := FeatureSet.load(_cache_path(request.json_out, name), key)) is not None:
            sets[name] = loaded
    cached = list(sets)
    missing = [name for name in request.feature_sets if name not in sets]
    summary = None
    if missing:
        extractors = _extractors(request, missing)
        if data_format == "points":
            computed, summary = points_features(
                request.data, extractors, limit_images=request.limit_images, max_per_class=request.max_per_class,
                seed=request.seed, pixel_size_um=request.pixel_size_um, progress=request.progress,
            )
        else:
            computed, summary = crops_features(
                request.data, extractors, max_per_class=request.max_per_class, seed=request.seed,
                progress=request.progress,
            )
        if keys and downloading:  # (a model changed meanwhile keeps the keys of what was read)
            keys = _cache_keys(request, data_format)
        for name, features in computed.items():
            sets[name] = features = replace(features, summary=summary)
            if name in keys:
                features.save(_cache_path(request.json_out, name), keys[name])
    else:  # all from the cache: what reading the data found then (files it could not read) still holds
        summary = next((sets[name].summary for name in request.feature_sets if sets[name].summary), None)
    return {name: sets[name] for name in request.feature_sets}, summary, cached


def _extractors(request: EvalRequest, names: Sequence[str]) -> dict:
    embedder = None
    if "cls" in names or "random-init" in names:
        from napari_reddino import load_embedder

        # fp32 on every machine: the plugin's "auto" is bf16 on some CPUs, and the protocol's
        # numbers (and its feature cache) must not depend on which CPU ran it
        embedder = load_embedder(request.model, device=request.device, dtype="float32",
                                 architecture=request.architecture)
    crops = request.crops  # after the load: a Hub model downloaded now tells how its training cells were cut only now
    builders = {
        "cls": lambda: EmbeddingFeatures(embedder, request.batch_size, **crops),
        "random-init": lambda: EmbeddingFeatures(random_init(embedder, request.seed), request.batch_size, **crops),
        "measurements": MeasurementFeatures,
    }
    return {name: builders[name]() for name in names}


def _cache_keys(request: EvalRequest, data_format: Format) -> dict[str, str]:
    from napari_reddino.cell_embeddings import model_key

    data = data_key(request.data, format=data_format, limit_images=request.limit_images,
                    max_per_class=request.max_per_class, seed=request.seed, pixel_size_um=request.pixel_size_um)
    if data_format == "crops":
        data += "|with smears|square windows"  # cached before crops carried their smear, or were squashed: read again
    crops = ":".join(str(value) for value in request.crops.values())
    model = f"{model_key(request.model)}:{request.architecture}:{crops}"
    return {
        "cls": f"cls|{model}|{data}",
        "random-init": f"random-init|{model}|seed {request.seed}|{data}",
        "measurements": f"measurements|v{MeasurementFeatures.VERSION}|{data}",
    }


def _cache_path(json_out: Path, name: str) -> Path:
    return Path(json_out).with_name(f"{Path(json_out).stem}.{name}.npz")
