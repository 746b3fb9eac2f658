"""`aspkd sweep`: a Ray Tune sweep of ASPKD attacks."""

from __future__ import annotations

import argparse

from aspkd_ray import console


def register(sub) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over sigma, k, rounds, learning rates",
                       description="Run a Ray Tune sweep: each trial is one ASPKD attack "
                                   "(own Ray Train run, reporting every round to Tune); all "
                                   "trials share the proxy set and one teacher service with "
                                   "per-trial caps. Run again with the same --output-dir to "
                                   "resume an interrupted sweep.")
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
        st.start(f"{spec.num_trials()} trial(s) on Ray Tune, each a whole attack "
                 f"(objective: {spec.objective}, {spec.search} search, {spec.scheduler})")
        rows = run_sweep(spec, args.output_dir)
        failed = sum(row.get("status") == "error" for row in rows)
        stopped = sum(bool(row.get("stopped_early")) for row in rows)
        st.detail = (f"{len(rows) - failed} trial(s) done" + (f", {stopped} stopped early"
                                                             if stopped else "")
                     + (f", {failed} failed" if failed else ""))
    keys = list(spec.space)
    print(f"\n{len(rows)} trial(s), best first by {spec.metric} "
          f"(objective: {spec.objective}):")
    for row in rows:
        params = ", ".join(f"{k}={row.get(k)!r}" for k in keys)
        if row.get("status") == "error":
            print(f"  {params}: failed: {row.get('error')}")
            continue
        objective = (f"{row['val_agreement']:.1f}% validation agreement, "
                     if isinstance(row.get("val_agreement"), (int, float)) else "")
        test = (f"{row['agreement']:.1f}% test agreement"
                if isinstance(row.get("agreement"), (int, float)) else "no round done")
        print(f"  {params}: {objective}{test}, {row['calls_used']} calls, "
              f"{row['rounds_done']}/{row['rounds_planned']} rounds")
    print(f"results: {args.output_dir}/sweep_results.md (.json), sweep.png; best config: "
          f"{args.output_dir}/best.yaml")
    return 0
