"""``reddino-train``: command line of the pretraining package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from .config import ConfigError, config_to_dict, load_config, shipped_configs


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
    config.set_defaults(run=_config_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)
