"""`aspkd audit`: how many calls it takes to copy a model, and what a defence changes."""

from __future__ import annotations

import argparse
import sys

from aspkd_ray import console


def register(sub) -> None:
    p = sub.add_parser(
        "audit", help="how stealable is a victim: attacks over a budget ladder, per defence",
        description="Audit a victim (victim.checkpoint or victim.endpoint): run ASPKD and "
                    "Knockoff-style random picks over a ladder of budgets (audit.* in the "
                    "config), undefended and behind each defence of audit.defences, in "
                    "parallel through Ray; write DIR/audit.md, audit.json and audit.png "
                    "(stealability curves, calls to 50/80/90%% agreement, each defence's "
                    "utility cost, PRADA's calls to detection) and an MLflow run. Rerun with "
                    "the same --output-dir to resume.")
    p.add_argument("--config", metavar="PATH", default="digits",
                   help="YAML config or packaged name (default: digits)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   dest="overrides",
                   help="override a config key, e.g. --set audit.calls_per_class=[1,8] "
                        "(repeatable)")
    p.add_argument("--output-dir", metavar="DIR", default="runs/audit",
                   help="where the audit writes (default: runs/audit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aspkd_ray.audit.runner import check_audit, run_audit
    from aspkd_ray.config import load

    cfg = load(args.config, args.overrides, args.output_dir)
    check_audit(cfg)  # before Ray starts
    a = cfg.audit
    n = len(a.calls_per_class) * len(a.attacks) * (len(a.defences) + 1) * len(a.seeds)
    with console.stage("audit") as st:
        st.start(f"{n} attack trials: {len(a.defences) + 1} defence settings x "
                 f"{len(a.attacks)} attacks x budgets {a.calls_per_class} calls/class")
        summary = run_audit(args.config, args.overrides, args.output_dir,
                            command="aspkd " + " ".join(sys.argv[1:]))
        st.detail = f"{summary['wall_s'] / 60:.1f} min"
    levels = [str(lv) for lv in a.levels]
    print("\ncalls to reach " + ", ".join(f"{float(lv):g}%" for lv in levels)
          + " agreement (- = not within the ladder):")
    for c in summary["curves"]:
        reach = ", ".join(str(c["calls_to"][lv] or "-") for lv in levels)
        print(f"  {c['defence']:<32} {c['attack']:<10} {reach}")
    print("wrote " + ", ".join(summary["paths"]))
    return 1 if summary["failed"] else 0
