"""`aspkd`: the command line. Each subcommand lives in its own module under aspkd_ray/cli/
and registers itself with `register(subparsers)`; this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from aspkd_ray import console
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
    "aspkd_ray.cli.audit",
]


def add_common(parser: argparse.ArgumentParser) -> None:
    """--config, --set and --output-dir, taken by every job command."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config: a file (tune_configs/digits.yaml) or a packaged name "
                             "(digits, paper/cifar10-halfalexnet-sd2); defaults if omitted")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides",
                        help="override one config key, e.g. --set aspkd.sigma=17 (repeatable)")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="where results go (default: output_dir in the config)")


def load_config(args: argparse.Namespace):
    """The validated config of a job command; its output_dir must be a folder (or new)."""
    from pathlib import Path

    from aspkd_ray.config import load

    cfg = load(args.config, args.overrides, args.output_dir)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: got {cfg.output_dir!r}, which is a file; expected a "
                          f"folder (new, or a run's) via --output-dir or output_dir.")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aspkd",
        description="Few-call black-box model stealing (ASPKD) on Ray: generate a proxy set, "
                    "buy labels from the victim within a budget, distil a student.")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="only warnings, errors and the result")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="every log line, and Ray's own output (workers, Ray Data, Ray "
                           "Train), on the console; by default they go to Ray's log files")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        # A subcommand that fails to import is a broken install or a bug: say so, never
        # drop the command silently (the user would get "invalid choice" instead).
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"aspkd: the subcommand module {name} cannot be imported "
                              f"({exc}); reinstall aspkd-ray (pip install -e .).") from exc
        module.register(sub)
    return parser


def _one_line_error(exc: BaseException) -> BaseException | None:
    """The user-facing error in `exc`, else None (a bug: keep its traceback).

    User errors, a failing victim and an exhausted budget are told in one line. Ray wraps an
    error raised in a task or actor (RayTaskError, whose text holds the remote traceback);
    its `cause` is the original.
    """
    from aspkd_ray.teacher.errors import BudgetExhausted, VictimError

    for _ in range(8):  # wrappers nest at most a few deep
        if isinstance(exc, (UserError, VictimError, BudgetExhausted)) and \
                not _is_ray_wrapper(exc):
            return exc
        cause = getattr(exc, "cause", None) if _is_ray_wrapper(exc) else None
        if not isinstance(cause, BaseException):
            return None
        exc = cause
    return None


def _is_ray_wrapper(exc: BaseException) -> bool:
    if "ray" not in sys.modules:
        return False
    from ray.exceptions import RayTaskError

    return isinstance(exc, RayTaskError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray(was_running: bool) -> None:
    """Stop the Ray this command started, in order and while the interpreter is whole,
    rather than from Ray's atexit hook during interpreter teardown. A Ray that was running
    before (a test session, a script calling main()) is left alone."""
    if was_running or not _ray_running():
        return
    import ray

    try:
        ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - the job's result is in; say it, do not fail
        logging.getLogger(__name__).warning("Ray did not shut down cleanly: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure(console.QUIET if args.quiet else
                      console.VERBOSE if args.verbose else console.NORMAL)
    was_running = _ray_running()
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        told = _one_line_error(exc)
        if told is None:
            raise  # a bug: the traceback is what a maintainer needs
        kind = "config error" if isinstance(told, ConfigError) else "error"
        print(f"aspkd: {kind}: {_one_line(told)}", file=sys.stderr)
        return int(getattr(told, "exit_code", 1))
    finally:
        _shutdown_ray(was_running)


if __name__ == "__main__":
    sys.exit(main())
