"""`aspkd sweep`: a Ray Tune sweep of ASPKD attacks."""

from __future__ import annotations

import argparse

from aspkd_ray import console


def register(sub) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over sigma, k, rounds, learning rates",
                       description="Run a Ray Tune sweep: each trial is one ASPKD attack "
                                   "(own Ray Train run, own MLflow run); all trials share the "
                                   "proxy set and one teacher service with per-trial caps.")
    p.add_argument("--sweep", metavar="PATH", required=True,
                   help="sweep file, e.g. tune_configs/sweep-digits.yaml")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   dest="overrides", help="override a base config key (repeatable)")
    p.add_argument("--output-dir", metavar="DIR", default="runs/sweep",
                   help="sweep folder: shared proxy set, ledger, trials/, results")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aspkd_ray.sweep.tune import load_sweep, run_sweep

    spec = load_sweep(args.sweep, args.overrides)
    with console.stage("sweep") as st:
        st.start(f"{spec.num_trials()} trial(s) on Ray Tune, each a whole attack")
        rows = run_sweep(spec, args.output_dir)
        failed = sum(row.get("agreement") is None for row in rows)
        st.detail = f"{len(rows) - failed} trial(s) done" + (f", {failed} failed"
                                                             if failed else "")
    keys = list(spec.space)
    print(f"\n{len(rows)} trial(s), best first ({spec.metric}):")
    for row in rows:
        params = ", ".join(f"{k}={row.get(k)!r}" for k in keys)
        result = (f"{row['agreement']:.1f}% agreement, {row['calls_used']} calls"
                  if row.get("agreement") is not None else f"failed: {row.get('error')}")
        print(f"  {params}: {result}")
    print(f"results: {args.output_dir}/sweep_results.json")
    return 0
