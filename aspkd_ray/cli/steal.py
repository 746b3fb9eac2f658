"""`aspkd steal` and `aspkd demo`."""

from __future__ import annotations

import argparse

from aspkd_ray import console
from aspkd_ray.cli.main import add_common, load_config


def register(sub) -> None:
    p = sub.add_parser("steal", help="run one ASPKD attack and evaluate it",
                       description="Generate (or reuse) the proxy set, buy labels from the "
                                   "teacher service within the budget, distil the student "
                                   "in rounds on Ray Train, then measure agreement with the "
                                   "victim on its real test set. Writes summary.json, "
                                   "agreement.png and an MLflow run to the output dir. "
                                   "Rerunning with the same output dir resumes.")
    add_common(p)
    p.add_argument("--train-victim", action="store_true",
                   help="when victim.checkpoint holds no victim, train one there first "
                        "(without this flag a missing checkpoint is an error)")
    p.set_defaults(func=run_steal_cmd)
    d = sub.add_parser("demo", help="the embedded digits scenario end to end",
                       description="Train or reuse the cached victim and generator, generate "
                                   "or reuse the cached proxy set, run ASPKD at one budget and "
                                   "print a short report. Each demo gets a fresh run folder "
                                   "under output_dir unless --output-dir is given.")
    add_common(d)
    d.set_defaults(func=run_demo_cmd)


def run_steal_cmd(args: argparse.Namespace) -> int:
    from aspkd_ray.jobs.demo import format_report, steal_with_progress

    summary = steal_with_progress(load_config(args), train_victim=args.train_victim)
    print(format_report(summary, _log_dir()).replace("ASPKD demo", "ASPKD attack"))
    return 0


def run_demo_cmd(args: argparse.Namespace) -> int:
    from aspkd_ray.jobs.demo import demo_config, format_report, run_demo

    summary = run_demo(demo_config(load_config(args),
                                   output_dir_given=args.output_dir is not None))
    print(format_report(summary, _log_dir()))
    return 0


def _log_dir():
    """Where Ray's and the driver's logs went (None with -v: they were on the console)."""
    return None if console.verbose() else console.log_folder()
