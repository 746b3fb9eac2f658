"""ASPKD against its baselines on the embedded scenarios, by the same code (`run_steal`).

For each scenario (digits, digits-xdomain), seed and method (see METHODS: aspkd as configured,
Algorithm 1 without the init step and prior correction, Knockoff-style vanilla, the paper's
ablation with both switches off, generation classes as labels with no calls), one attack at
`--calls-per-class` (default 8). The victim and the proxy set are fixed per scenario (seed 0);
the seed varies the attack (student init, selection, training). Writes
scripts/results/aspkd.json and aspkd.md with mean ± std of agreement.

    .venv/bin/python scripts/bench_aspkd.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from aspkd_ray.config import load
from aspkd_ray.jobs.demo import proxy_cache_dir
from aspkd_ray.jobs.steal import ensure_victim, run_steal
from aspkd_ray.layout import victim_checkpoint_dir

PLAIN = ["student.pretrain=none", "aspkd.prior_correction=false"]
METHODS = {
    "aspkd": [],                                   # as the scenario's config says
    "aspkd_plain": PLAIN,                          # Algorithm 1 alone: default init, raw answers
    # Knockoff-style: random picks, bought labels only, default init, raw answers
    "vanilla": ["aspkd.selection=random", "aspkd.self_paced=false", *PLAIN],
    # the paper's ablation: both switches off, everything else as aspkd's config
    "vanilla_same_init": ["aspkd.selection=random", "aspkd.self_paced=false"],
    "prompt_only": ["aspkd.baseline=prompt_only"],
    # reference, not an attack at this budget: the teacher's labels on the whole train pool
    # (200 per class x 0.85 = 1,700 images), one round, plain distillation
    "teacher_all": ["budget.total=1700", "aspkd.rounds=1", "aspkd.selection=random",
                    "aspkd.self_paced=false", *PLAIN],
}
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenarios", nargs="+", default=["digits", "digits-xdomain"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calls-per-class", type=int, default=8)
    ap.add_argument("--cache-dir", default=str(ROOT / ".aspkd_cache"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-aspkd"))
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--results", default="aspkd",
                    help="write scripts/results/<name>.json and .md (resumes from them)")
    args = ap.parse_args()

    out_json = ROOT / "scripts" / "results" / f"{args.results}.json"
    results: dict = {"calls_per_class": args.calls_per_class, "runs": []}
    if out_json.exists():  # resume: keep finished runs of the same budget
        old = json.loads(out_json.read_text())
        if old.get("calls_per_class") == args.calls_per_class:
            results["runs"] = old["runs"]
    done = {(r["scenario"], r["method"], r["seed"]) for r in results["runs"]}
    for scenario in args.scenarios:
        base = load(ROOT / "tune_configs" / f"{scenario}.yaml",
                    [f"cache_dir={args.cache_dir}",
                     f"budget.calls_per_class={args.calls_per_class}", *args.overrides])
        ensure_victim(base)
        fixed = [f"cache_dir={args.cache_dir}", f"proxy.dir={proxy_cache_dir(base)}",
                 f"victim.checkpoint={victim_checkpoint_dir(base).resolve()}",
                 f"budget.calls_per_class={args.calls_per_class}", *args.overrides]
        for seed in args.seeds:
            for method in args.methods:
                if (scenario, method, seed) in done:
                    continue
                name = f"{scenario}-{method}-s{seed}"
                run_dir = Path(args.out) / args.results / name
                cfg = load(ROOT / "tune_configs" / f"{scenario}.yaml",
                           fixed + METHODS[method] + [f"seed={seed}", f"output_dir={run_dir}",
                                                      f"ray.teacher_service=bench-{name}"])
                t0 = time.time()
                summary = run_steal(cfg)
                row = {"scenario": scenario, "method": method, "seed": seed,
                       "agreement": summary["agreement"],
                       "agreement_by_round": summary["agreement_by_round"],
                       "calls_used": summary["calls_used"],
                       "pseudo_label_filter_rate": summary["pseudo_label_filter_rate"],
                       "pseudo_label_agreement": summary["pseudo_label_agreement"],
                       "wall_s": round(time.time() - t0, 1)}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
                results.setdefault("config", {})[scenario] = dataclasses.asdict(cfg)
                out_json.write_text(json.dumps(results, indent=2))  # nothing lost on a crash
                write_markdown(results, out_json.with_suffix(".md"))
    write_markdown(results, out_json.with_suffix(".md"))


def write_markdown(results: dict, path: Path) -> None:
    groups: dict = {}
    for r in results["runs"]:
        groups.setdefault(r["scenario"], {}).setdefault(r["method"], []).append(r)
    lines = [f"# ASPKD vs baselines, {results['calls_per_class']} calls per class",
             "", "Agreement (%) with the victim on its real test set, mean ± std over seeds "
             "(`scripts/bench_aspkd.py`). Methods: see METHODS in the script.", "",
             "| scenario | method | agreement | per seed | pseudo-labels filtered / agree |",
             "|---|---|---|---|---|"]
    means: dict = {}
    for scenario, methods in groups.items():
        for method, rows in methods.items():
            values = [r["agreement"] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            means[scenario, method] = statistics.mean(values)
            pl = ", ".join(f"{r['pseudo_label_filter_rate'] * 100:.0f}% / "
                           f"{r['pseudo_label_agreement']:.0f}%" for r in rows
                           if r.get("pseudo_label_agreement") is not None)
            lines.append(f"| {scenario} | {method} | {means[scenario, method]:.1f} ± {sd:.1f} | "
                         f"{', '.join(f'{v:.1f}' for v in values)} | {pl} |")
    lines += ["", "Differences of the means (points):", ""]
    for scenario in groups:
        if (scenario, "aspkd") not in means:
            continue
        diffs = [f"aspkd − {m}: {means[scenario, 'aspkd'] - means[scenario, m]:+.1f}"
                 for s, m in means if s == scenario and m != "aspkd"]
        lines.append(f"- {scenario}: " + "; ".join(diffs))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
