"""``reddino-train``: command line of the pretraining package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from .checkpoint import CheckpointMismatchError
from .config import ConfigError, config_to_dict, load_config, shipped_configs
from .data import EmptyDatasetError


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


def _fit_command(args: argparse.Namespace) -> int:
    from .train import TrainingDivergedError, fit  # torch and timm load only when training

    try:
        cfg = load_config(args.recipe, args.overrides)
        result = fit(cfg, args.data_dir, args.out, max_steps=args.max_steps)
    except (ConfigError, EmptyDatasetError, CheckpointMismatchError, TrainingDivergedError) as error:
        print(f"reddino-train fit: {error}", file=sys.stderr)
        return 2
    print(f"reddino-train fit: {result.iterations_done} iterations done; checkpoint in {args.out}")
    return 0


def _export_command(args: argparse.Namespace) -> int:
    from .export import export_teacher

    try:
        folder = export_teacher(args.run_dir, args.out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, CheckpointMismatchError) as error:
        print(f"reddino-train export: {error}", file=sys.stderr)
        return 2
    print(f'reddino-train export: wrote {folder}; load it with timm.create_model("local-dir:{folder}", '
          "pretrained=True)")
    return 0


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
    fit = commands.add_parser(
        "fit",
        help="pretrain (or resume) a model on a folder of images",
        description="Train with RECIPE (a shipped name or a YAML file) on every image under DATA_DIR, "
        "resuming from OUT/checkpoint.pt when it exists. Run it under torchrun for several GPUs. "
        "SIGTERM or Ctrl-C stops after the current step with a checkpoint.",
    )
    fit.add_argument("recipe", metavar="RECIPE")
    fit.add_argument("data_dir", metavar="DATA_DIR")
    fit.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    fit.add_argument("--out", required=True, metavar="DIR", help="output folder: log.csv, checkpoint.pt")
    fit.add_argument("--max-steps", type=int, metavar="N", help="stop after N iterations in all")
    fit.set_defaults(handler=_fit_command)
    export = commands.add_parser(
        "export",
        help="write a run's teacher backbone as a timm model folder for the plugin",
        description="Write the teacher backbone of RUN/checkpoint.pt to DIR in timm's save_for_hf layout.",
    )
    export.add_argument("run_dir", metavar="RUN")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    export.set_defaults(handler=_export_command)
    return parser


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
    return args.handler(args)
