"""``reddino-train``: command line of the pretraining package."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml
from tqdm import tqdm

from napari_reddino.crop_windows import CROP_MODES, CROP_SCALES, DEFAULT_MARGIN
from napari_reddino.stop_signals import handling_signals

from .choices import FORMATS, MODES
from .config import CONFIG_NAME, ConfigError, config_to_dict, load_config, shipped_configs


def _config_command(args: argparse.Namespace) -> int:
    if args.recipe is None:
        print("\n".join(shipped_configs()))
        return 0
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as error:
        print(f"reddino-train config: {error}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _iterations(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of iterations of 1 or more")
    return int(text)


def _warning_line(python_show, message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (a collapse, changed settings on resume) as one line above the progress bar,
    not broken into it and followed by the Python source line that raised them; other
    libraries' as Python shows them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        tqdm.write(f"reddino-train: warning: {message}", file=sys.stderr)
    else:
        python_show(message, category, filename, lineno, file, line)


def _fit_command(args: argparse.Namespace) -> int:
    from napari_reddino.wording import counted

    from .checkpoint import CheckpointError
    from .data import EmptyDatasetError
    from .distributed import LaunchError
    from .model import PretrainedWeightsError
    from .run_lock import RunFolderError
    from .train import (  # torch and timm load only when training
        RanksDisagreeError,
        TrainingDivergedError,
        fit,
    )

    try:
        cfg = load_config(args.recipe, args.overrides)
        with warnings.catch_warnings():  # restores Python's own display afterwards
            warnings.showwarning = functools.partial(_warning_line, warnings.showwarning)
            result = fit(cfg, args.data_dir, args.out, max_steps=args.max_steps)
    except (PretrainedWeightsError, LaunchError) as error:  # each rank's own: one may fail alone (a node without
        # the file, a rank beyond the node's GPUs)
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"reddino-train fit: {rank}{error}", file=sys.stderr)
        return 2
    except (ConfigError, EmptyDatasetError, CheckpointError, TrainingDivergedError, RanksDisagreeError,
            RunFolderError) as error:
        _say(f"reddino-train fit: {error}", file=sys.stderr)  # raised alike on every rank: said once
        return 2
    if result.stopped_by_signal:  # not finished: a script or scheduler must see that
        own_settings = shlex.join(["reddino-train", "fit", str(Path(args.out) / CONFIG_NAME), args.data_dir,
                                   "--out", args.out, *(["--max-steps", str(args.max_steps)] if args.max_steps else [])])
        own = f"; so does {own_settings}, with the run's own settings" if result.config_current else ""
        _say(f"reddino-train fit: stopped after {counted(result.iterations_done, 'iteration')}; checkpoint in {args.out}; "
             f"the same command resumes it{own}", file=sys.stderr)
        return 130
    if result.iterations_this_run == 0:  # a finished run started again (a scheduler's requeue, a reused --out)
        limit, raise_it = (f"--max-steps {args.max_steps}", "--max-steps") \
            if args.max_steps and result.iterations_done >= args.max_steps else ("the end of its schedule", "optim.epochs")
        stretched = (" (every schedule then stretches to the new length: the learning rate jumps back up its "
                     "cosine, with no warm-up)") if raise_it == "optim.epochs" else ""
        _say(f"reddino-train fit: {args.out} holds a run already at iteration {result.iterations_done}, {limit}: "
             f"nothing to do. To train it further, raise {raise_it}{stretched}; to start afresh, give another --out")
        return 0
    _say(f"reddino-train fit: {counted(result.iterations_done, 'iteration')} done; checkpoint in {args.out}")
    return 0


def _say(message: str, file=None) -> None:
    """Print on rank 0 alone: under torchrun each rank ends ``fit`` with the same outcome."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's; the process group has been closed by now
        print(message, file=file)


def _export_command(args: argparse.Namespace) -> int:
    from napari_reddino.cell_embeddings import crops_in_words
    from napari_reddino.crop_windows import chosen_crops
    from napari_reddino.models import trained_crops

    from .checkpoint import CheckpointError
    from .export import PushError, export_teacher, push_to_hub

    if args.private and not args.push_to_hub:
        print("reddino-train export: --private is for --push-to-hub (a folder on disk is as private as its disk)",
              file=sys.stderr)
        return 2
    try:
        folder = export_teacher(args.run_dir, args.out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, CheckpointError, ConfigError) as error:  # the last: a newer run's
        print(f"reddino-train export: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only or full disk
        print(f"reddino-train export: cannot write {args.out} ({error.strerror or error}); nothing was exported",
              file=sys.stderr)
        return 2
    print(f"reddino-train export: wrote {folder}; use it in napari (Embed cells > Browse…), with "
          f"reddino-analyse --model {folder}, or in Python as load_embedder({str(folder)!r})")
    crops = trained_crops(folder)
    print(f"reddino-train export: it trained on {crops_in_words(crops)} (reddino-train prepare), and cells are cut so "
          "for it unless told otherwise" if crops else
          "reddino-train export: it records no crop settings (its training images were not all cut alike by "
          "reddino-train prepare --mode cells, or the run is older than the record), so cells are cut for it as for "
          f"RedDino: {crops_in_words(chosen_crops())}")
    if args.push_to_hub:
        try:
            url = push_to_hub(folder, args.push_to_hub, private=args.private)
        except PushError as error:
            print(f"reddino-train export: {error}", file=sys.stderr)
            return 2
        print(f'reddino-train export: pushed to {url}; load it with load_embedder("hf_hub:{args.push_to_hub}")')
    return 0


def _prepare_command(args: argparse.Namespace) -> int:
    from .prepare import PrepareError, PrepareSettings, on_one_line, prepare
    from .run_lock import RunFolderBusyError

    try:
        settings = PrepareSettings(
            mode=args.mode, size=args.size, patch_size=args.patch_size, margin=args.margin,
            crop_mode=args.crop_mode, crop_scale=args.crop_scale, pixel_size_um=args.pixel_size_um,
        )
        report = prepare(args.sources, args.out, settings)
    except (PrepareError, RunFolderBusyError) as error:
        print(f"reddino-train prepare: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only or full disk, --out naming a file; the smears done so far are kept
        out, where = Path(args.out).resolve(), Path(error.filename).resolve() if error.filename else None
        outside = where is not None and where != out and out not in where.parents and where not in out.parents
        what = f"cannot read {on_one_line(where)}" if outside else f"cannot write in {args.out}"  # a source gone (a share)
        print(f"reddino-train prepare: {what} ({error.strerror or error}); the smears done before are kept, and "
              "the same command goes on from there", file=sys.stderr)
        return 2
    print(f"reddino-train prepare: {len(report.written)} smears done now ({report.samples_written} images), "
          f"{len(report.already_done)} done before; {report.samples_total} images listed in {args.out}/index.csv")
    if report.skipped:
        print(f"reddino-train prepare: skipped {len(report.skipped)} files (listed in {args.out}/skipped.txt):",
              file=sys.stderr)
        for path, reason in report.skipped:
            print(f"  {on_one_line(path)}: {reason}", file=sys.stderr)
        return 1  # as reddino-analyse: the rest is written, but not every file
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from napari_reddino.model_errors import ModelLoadError
    from napari_reddino.wording import counted

    from .eval_data import EvalDataError
    from .eval_run import EvalRequest, run_evaluation
    from .evaluate import EvaluationError

    if args.json is not None and (refusal := _json_refusal(Path(args.json), args.overwrite)):
        print(f"reddino-train eval: {refusal}", file=sys.stderr)  # before the work, not after it
        return 2
    if args.no_cls and not (args.random_init or args.with_measurements):
        print("reddino-train eval: --no-cls leaves nothing to evaluate: add --random-init or --with-measurements",
              file=sys.stderr)
        return 2
    feature_sets = ["cls"] * (not args.no_cls) + ["random-init"] * args.random_init
    feature_sets += ["measurements"] * args.with_measurements
    try:
        request = EvalRequest(
            model=args.model, data=Path(args.data), format=args.format, split=args.split, feature_sets=feature_sets,
            limit_images=args.limit_images, max_per_class=args.max_per_class, seed=args.seed,
            pixel_size_um=args.pixel_size_um, device=args.device, architecture=args.architecture,
            batch_size=args.batch_size, crop_mode=args.crop_mode, crop_scale=args.crop_scale, margin=args.margin,
            json_out=None if args.json is None else Path(args.json),
        )
        report = run_evaluation(request)
    except (EvalDataError, EvaluationError, ModelLoadError, ValueError) as error:
        # ModelLoadError and ValueError: the plugin's model and device errors (unknown name,
        # no network, bad checkpoint, no such device)
        print(f"reddino-train eval: {error}", file=sys.stderr)
        return 2
    print(report.text())
    if args.json is not None:
        print(f"\nreddino-train eval: wrote {args.json}")
    if report.summary is not None and report.summary.skipped:  # as prepare and reddino-analyse: a script must see it
        print(f"reddino-train eval: {counted(len(report.summary.skipped), 'file')} could not be read or segmented (see above); the "
              "scores leave them out", file=sys.stderr)
        return 1
    return 0


def _json_refusal(path: Path, overwrite: bool) -> str | None:
    """Why ``--json PATH`` cannot be written, found before the evaluation runs; None if it can be."""
    if path.is_dir():
        return f"{path} is a folder; give --json a file name, such as {path / 'eval.json'}"
    if path.exists() and not overwrite:
        return f"{path} exists; pass --overwrite to replace it"
    folder = path.parent  # made if missing: what exists of it must be writable
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return f"cannot write in {folder}; give --json a file in a folder you can write to"
    return None


INTERRUPTED = {  # what a second run does after Ctrl-C, per command
    "prepare": "; the smears done so far are kept, and the same command goes on from there",
    "fit": " without a checkpoint at this step; the same command resumes from the last one",
    "export": "; nothing was exported",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reddino-train", description="DINOv2 / RedDino pretraining.")
    commands = parser.add_subparsers(title="commands", dest="command")
    config = commands.add_parser(
        "config",
        help="list the shipped recipes, or print one resolved with overrides",
        description="Without RECIPE, list the shipped recipes. With it (a shipped name or a YAML "
        "file), print the resolved config after KEY=VALUE overrides such as optim.base_lr=1e-3.",
    )
    config.add_argument("recipe", nargs="?", metavar="RECIPE")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    config.set_defaults(handler=_config_command)
    _add_prepare_parser(commands)
    fit = commands.add_parser(
        "fit",
        help="pretrain (or resume) a model on a folder of images",
        description="Train with RECIPE (a shipped name or a YAML file) on every image under DATA_DIR, "
        "resuming from OUT/checkpoint.pt when it exists (RECIPE OUT/config.yaml resumes with the run's own settings). "
        "Run it under torchrun for several GPUs. "
        "SIGTERM or Ctrl-C stops after the current step with a checkpoint (exit status 130).",
    )
    fit.add_argument("recipe", metavar="RECIPE")
    fit.add_argument("data_dir", metavar="DATA_DIR")
    fit.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    fit.add_argument("--out", required=True, metavar="DIR", help="output folder: config.yaml, log.csv, checkpoint.pt")
    fit.add_argument("--max-steps", type=_iterations, metavar="N", help="stop after N iterations in all")
    fit.set_defaults(handler=_fit_command)
    export = commands.add_parser(
        "export",
        help="write a run's teacher backbone as a timm model folder for the plugin",
        description="Write the teacher backbone of RUN/checkpoint.pt to DIR in timm's save_for_hf layout.",
    )
    export.add_argument("run_dir", metavar="RUN", help="a run folder (its checkpoint.pt), or one of its checkpoint "
                        "files, such as RUN/earlier-checkpoints/step-3000.pt")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it is an earlier export (any other folder is refused)")
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload DIR to this Hub model repo (org/name)")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")
    export.set_defaults(handler=_export_command)
    _add_eval_parser(commands)
    return parser


_CROP_SCALE_HELP = ("cell: each window sized to its cell; smear: one window size for the whole smear "
                    "(that of a cell 1.25x the median), so a crop shows its cell's size")
_FOLDERS_CROPS = "the folder's where it holds smears already, else the plugin's:"
_TRAINED_CROPS = "as MODEL's training cells were cut, where its config records it (reddino-train export), else the plugin's"


def _add_prepare_parser(commands) -> None:
    prepare = commands.add_parser(
        "prepare",
        help="turn folders of smear images into a training set of cell crops or smear patches",
        description="Segment every smear image under SRC (folders, searched recursively, or files) and write "
        "one PNG per cell (--mode cells: a square crop around the cell with a context margin; cells touching "
        "the border are left out) or per tile (--mode patches) to DIR/<smear>/<n>.png, listed in "
        "DIR/index.csv (file, source image, label, centroid, bounding box). Run it again to resume: smears "
        "recorded in DIR/done.txt are skipped. Unreadable files are skipped and listed in DIR/skipped.txt.",
    )
    prepare.add_argument("sources", nargs="+", metavar="SRC")
    prepare.add_argument("--out", required=True, metavar="DIR")
    prepare.add_argument("--mode", choices=MODES, default="cells")
    prepare.add_argument("--size", type=int, metavar="N",
                         help="side of the written images in px (default: 224 for cells; patches keep their size)")
    prepare.add_argument("--patch-size", type=int, default=224, metavar="N", help="tile side in smear px (patches)")
    prepare.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                         help=f"context around a cell, a fraction of its box's longer side (default {DEFAULT_MARGIN}, "
                              "as the plugin)")
    prepare.add_argument("--crop-mode", choices=CROP_MODES,
                         help="masked: other cells' pixels set to the background colour; context: kept (default: "
                              f"{_FOLDERS_CROPS} masked). A model trained on DIR and exported records the crop mode, "
                              "scale and margin, and the plugin, reddino-analyse and eval cut cells so for it")
    prepare.add_argument("--crop-scale", choices=CROP_SCALES,
                         help=f"{_CROP_SCALE_HELP} (default: {_FOLDERS_CROPS} smear)")
    prepare.add_argument("--pixel-size-um", type=float, metavar="UM",
                         help="pixel size, to fix the expected cell size instead of estimating it per smear")
    prepare.set_defaults(handler=_prepare_command)


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score a model's frozen features on labelled cells (kNN k=1/20 and DINOv2's weighted vote, "
             "logistic regression)",
        description="The RedDino paper's protocol on any model the plugin loads (reddino-small, hf_hub:org/name, "
        "a folder from 'reddino-train export', or a .safetensors file with --architecture): frozen CLS "
        "features at the model's input size, in fp32 on every machine; kNN k=1 and k=20 (cosine; k=20 also "
        "with DINOv2's vote weighted by exp(similarity / 0.07)) and "
        "logistic regression (standardised, balanced class weights) in 5-fold stratified CV or folds "
        "grouped by image; balanced accuracy, accuracy, weighted F1 and per-class recall. DATA is a folder "
        "of crops by class (DATA/<class>/*.png) or smears with Chula-format point labels (Dataset/<n>.jpg + "
        "Label/<n>.txt, lines 'x y class_id'), which are segmented and matched to cells.",
    )
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("--data", required=True, metavar="PATH")
    evaluate.add_argument("--format", choices=FORMATS,
                          help="layout of DATA (default: points when it has label files, else crops)")
    evaluate.add_argument("--split", choices=("by-image", "5-fold"),
                          help="folds grouped by smear (default for points, and for crops laid out "
                               "DATA/<class>/<smear or patient>/) or 5-fold stratified (default for other crops)")
    evaluate.add_argument("--random-init", action="store_true",
                          help="also score MODEL's architecture with random weights (the baseline)")
    evaluate.add_argument("--with-measurements", action="store_true",
                          help="also score logistic regression on the plugin's shape/colour measurements (points)")
    evaluate.add_argument("--no-cls", action="store_true", help="skip MODEL's own features (baselines only)")
    evaluate.add_argument("--limit-images", type=int, metavar="N", help="only the first N annotated smears")
    evaluate.add_argument("--max-per-class", type=int, metavar="N", help="at most N random samples per class")
    evaluate.add_argument("--json", metavar="OUT",
                          help="write the numbers to OUT; features are cached beside it (<OUT less .json>.<features>.npz) "
                          "and reused by a later run on the same model and data")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    evaluate.add_argument("--seed", type=int, default=0, help="for folds, subsampling and the random init")
    evaluate.add_argument("--pixel-size-um", type=float, metavar="UM", help="pixel size, for segmentation (points)")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:1, mps")
    evaluate.add_argument("--architecture", metavar="ARCH", help="timm architecture of a bare .safetensors MODEL")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="cells per forward pass (default: automatic)")
    evaluate.add_argument("--crop-mode", choices=CROP_MODES,
                          help="cells with their neighbours blanked (masked) or with their surroundings (context); "
                          f"default: {_TRAINED_CROPS} (masked)")
    evaluate.add_argument("--crop-scale", choices=CROP_SCALES,
                          help=f"{_CROP_SCALE_HELP}; default: {_TRAINED_CROPS}")
    evaluate.add_argument("--margin", type=float, metavar="F",
                          help=f"context around a cell's box (default: {_TRAINED_CROPS})")
    evaluate.set_defaults(handler=_eval_command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options (fit R D --out O k=v), which argparse leaves over
    if rest and hasattr(args, "overrides") and not any(item.startswith("-") for item in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 0
    # A scheduler's SIGTERM (a time limit, preemption) stops as Ctrl-C does: prepare writes its index,
    # export removes its half-written folder. Not fit's: its training loop has its own, which saves a
    # checkpoint, and one after it (torchrun's agent's, at the end) must not read as an interruption.
    sigterm_interrupts = handling_signals(_interrupt, (signal.SIGTERM,), keep_ignored=False)
    with contextlib.nullcontext() if args.command == "fit" else sigterm_interrupts:
        try:
            return args.handler(args)
        except KeyboardInterrupt:  # fit's first Ctrl-C is its own (a checkpoint); this is a second, or another command
            print(f"\nreddino-train {args.command}: interrupted{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
            return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
