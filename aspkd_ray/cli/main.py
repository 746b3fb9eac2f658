"""`aspkd`: the command line. Each subcommand lives in its own module under aspkd_ray/cli/
and registers itself with `register(subparsers)`; this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from aspkd_ray.config import ConfigError
from aspkd_ray.errors import UserError

# Subcommand modules, in the order of the data flow.
COMMANDS = [
    "aspkd_ray.cli.info",
    "aspkd_ray.cli.train_teacher",
    "aspkd_ray.cli.generation",
    "aspkd_ray.cli.serve",
    "aspkd_ray.cli.steal",
    "aspkd_ray.cli.sweep",
]


def add_common(parser: argparse.ArgumentParser) -> None:
    """--config, --set and --output-dir, taken by every job command."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config (tune_configs/digits.yaml, ...); defaults if omitted")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides",
                        help="override one config key, e.g. --set aspkd.sigma=17 (repeatable)")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="where results go (default: output_dir in the config)")


def load_config(args: argparse.Namespace):
    from aspkd_ray.config import load

    return load(args.config, args.overrides, args.output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aspkd",
        description="Few-call black-box model stealing (ASPKD) on Ray: generate a proxy set, "
                    "buy labels from the victim within a budget, distil a student.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing noise
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"aspkd: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"aspkd: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
